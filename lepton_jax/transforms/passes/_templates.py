"""Exact template matching of norm / cross-entropy / matmul+bias+activation hotspots.

A *template* is a small reference function written the way real code spells the
hotspot (Flax ``RMSNorm`` / ``LayerNorm``, hand-written ``jnp`` norms,
``optax.softmax_cross_entropy_with_integer_labels``, ``log_softmax`` +
``take_along_axis``, the one-hot spellings of Flax's examples, ``act(x @ w + b)``). It is traced to a jaxpr (raw, and normalised
by the same passes that run before routing), and a program sub-graph matches when its
data-flow DAG is *identical* to the template's, equation by equation: same primitives,
same parameters, same constants, the same template inputs bound consistently. The only
freedoms are

- commutative operands (``add``, ``mul``, ``max``, ``min``) may be swapped;
- ``x * x``, ``x ** 2`` and ``square(x)`` are one operation;
- ``reshape`` / ``broadcast_in_dim`` / ``expand_dims`` / ``squeeze`` that only insert or
  drop unit dims are one operation ("unit reshape to shape S");
- the epsilon of a norm is captured (the template is traced with a sentinel value).

Matching runs in two phases: a shape-agnostic structural match against the template
traced at small canonical shapes (cheap; binds the template's inputs to program
atoms), then an exact match against the template traced at the bound inputs' shapes
and dtypes. So a match computes, by construction, the template's function of the bound
inputs; near misses (another axis, eps elsewhere, sum instead of mean, another
activation) differ in some primitive, parameter or constant and do not match.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np

import jax
import jax.numpy as jnp
import lepton_jax.pallas_kernels as lpk
from lepton_jax.jaxpr import _compat as core
from lepton_jax.jaxpr._defuse import DefUse
from lepton_jax.jaxpr._driver import inline_calls
from lepton_jax.transforms.passes._cse import cse
from lepton_jax.transforms.passes._dce import dce
from lepton_jax.transforms.passes._fold import fold
from lepton_jax.transforms.passes._simplify import simplify

__all__ = ["TEMPLATES", "TemplateMatch", "find_template_matches", "clear_template_cache"]

EPS_SENTINEL = 1.2345678e-5
_COMMUTATIVE = frozenset({"add", "mul", "max", "min", "and", "or"})
_UNIT_RESHAPES = frozenset({"reshape", "broadcast_in_dim", "expand_dims", "squeeze"})


@dataclasses.dataclass(frozen=True)
class Template:
  """One spelling of a hotspot.

  Attributes:
    family: ``"rms_norm" | "layer_norm" | "softmax_cross_entropy" | "matmul"``.
    name: the spelling (for tests/debugging).
    fn: ``fn(*inputs, eps=...)`` (``eps`` only when ``has_eps``).
    canonical: input avals ``((shape, dtype), ...)`` for the structural phase.
    has_eps: whether ``eps`` is captured.
    activation: for ``matmul``: the activation name.
    labels_trailing_one: for CE: labels are given as ``[..., 1]``.
  """
  family: str
  name: str
  fn: Callable
  canonical: tuple
  has_eps: bool = False
  activation: str | None = None
  labels_trailing_one: bool = False

  @property
  def arity(self) -> int:
    return len(self.canonical)


@dataclasses.dataclass
class TemplateMatch:
  template: Template
  root: int                    # eqn index whose (single) output the kernel replaces
  inputs: list                 # program atoms bound to the template's inputs
  eps: float | None
  eqns: set                    # matched eqn indices (root included)

  @property
  def pattern(self) -> str:
    t = self.template
    if t.family == "matmul":
      return f"matmul_bias_{t.activation}" if t.arity == 3 else f"matmul_{t.activation}"
    return t.family


# --------------------------------------------------------------------------- the templates

def _mean_keep(x):
  return x.mean(-1, keepdims=True)


def _rms_hand(x, s, *, eps):
  return x * jax.lax.rsqrt(_mean_keep(x * x) + eps) * s


def _rms_hand_noscale(x, *, eps):
  return x * jax.lax.rsqrt(_mean_keep(x * x) + eps)


def _rms_hand_div(x, s, *, eps):
  return x / jnp.sqrt(_mean_keep(x * x) + eps) * s


def _rms_hand_div_noscale(x, *, eps):
  return x / jnp.sqrt(_mean_keep(x * x) + eps)


def _rms_hand_nokeep(x, s, *, eps):
  return x * jax.lax.rsqrt(jnp.mean(x * x, -1) + eps)[..., None] * s


def _rms_linen(x, s, *, eps):
  from flax import linen
  return linen.RMSNorm(epsilon=eps).apply({"params": {"scale": s}}, x)


def _rms_linen_noscale(x, *, eps):
  from flax import linen
  return linen.RMSNorm(epsilon=eps, use_scale=False).apply({}, x)


def _ln_core(x, eps, div):
  m = _mean_keep(x)
  v = _mean_keep((x - m) * (x - m))
  return (x - m) / jnp.sqrt(v + eps) if div else (x - m) * jax.lax.rsqrt(v + eps)


def _ln_hand(x, s, b, *, eps):
  return _ln_core(x, eps, False) * s + b


def _ln_hand_noaffine(x, *, eps):
  return _ln_core(x, eps, False)


def _ln_hand_div(x, s, b, *, eps):
  return _ln_core(x, eps, True) * s + b


def _ln_hand_div_noaffine(x, *, eps):
  return _ln_core(x, eps, True)


def _ln_jnp_var(x, s, b, *, eps):
  m = _mean_keep(x)
  return (x - m) * jax.lax.rsqrt(jnp.var(x, -1, keepdims=True) + eps) * s + b


def _ln_jnp_var_div(x, s, b, *, eps):
  m = _mean_keep(x)
  return (x - m) / jnp.sqrt(jnp.var(x, -1, keepdims=True) + eps) * s + b


def _ln_linen(x, s, b, *, eps, fast=True):
  from flax import linen
  return linen.LayerNorm(epsilon=eps, use_fast_variance=fast).apply(
      {"params": {"scale": s, "bias": b}}, x)


def _ln_linen_slow(x, s, b, *, eps):
  return _ln_linen(x, s, b, eps=eps, fast=False)


def _ln_linen_noaffine(x, *, eps):
  from flax import linen
  return linen.LayerNorm(epsilon=eps, use_scale=False, use_bias=False).apply({}, x)


def _ce_optax(logits, labels):
  import optax
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def _ce_logsm(logits, labels):
  return -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), labels[..., None], axis=-1)[..., 0]


def _ce_logsm_keep(logits, labels):
  return -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), labels[..., None], axis=-1)


def _ce_logsm_lab1(logits, labels1):
  return -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), labels1, axis=-1)


def _ce_logsm_lab1_squeeze(logits, labels1):
  return -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), labels1, axis=-1)[..., 0]


def _ce_onehot(logits, labels):
  """Flax examples' spelling: ``-sum(onehot(labels) * log_softmax(logits))``."""
  onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
  return -jnp.sum(onehot * jax.nn.log_softmax(logits, axis=-1), axis=-1)


def _ce_onehot_eq(logits, labels):
  """``flax.training.common_utils.onehot``: ``labels[..., None] == arange(V)``."""
  onehot = jnp.asarray(labels[..., None] == jnp.arange(logits.shape[-1]), logits.dtype)
  return -jnp.sum(onehot * jax.nn.log_softmax(logits, axis=-1), axis=-1)


def _ce_onehot_select(logits, labels):
  """``flax.training.common_utils.onehot`` with its defaults, as Flax's lm1b / wmt train loops
  call it: ``select(labels[..., None] == arange(V), 1.0, 0.0)``."""
  hit = labels[..., None] == jnp.arange(logits.shape[-1]).reshape((1,) * labels.ndim + (-1,))
  onehot = jax.lax.select(hit, jnp.full(hit.shape, 1.0), jnp.full(hit.shape, 0.0)).astype(jnp.float32)
  return -jnp.sum(onehot * jax.nn.log_softmax(logits, axis=-1), axis=-1)


def _ce_optax_dense(logits, labels):
  import optax
  return optax.softmax_cross_entropy(logits, jax.nn.one_hot(labels, logits.shape[-1]))


_ACTS = {"relu": jax.nn.relu, "gelu": lambda z: jax.nn.gelu(z, approximate=True),
         "silu": jax.nn.silu}


def _mm_bias(act):
  return lambda x, w, b: _ACTS[act](x @ w + b)


def _mm_nobias(act):
  return lambda x, w: _ACTS[act](x @ w)


_F = jnp.float32
_X = ((2, 8), _F)
_S = ((8,), _F)
_LOG = ((2, 8), _F)
_LAB = ((2,), jnp.int32)
_LAB1 = ((2, 1), jnp.int32)


def _build_templates() -> tuple[Template, ...]:
  t = []
  for name, fn in (("hand", _rms_hand), ("hand_div", _rms_hand_div),
                   ("hand_nokeepdims", _rms_hand_nokeep), ("flax", _rms_linen)):
    t.append(Template("rms_norm", name, fn, (_X, _S), has_eps=True))
  for name, fn in (("hand_noscale", _rms_hand_noscale), ("hand_div_noscale", _rms_hand_div_noscale),
                   ("flax_noscale", _rms_linen_noscale)):
    t.append(Template("rms_norm", name, fn, (_X,), has_eps=True))
  for name, fn in (("hand", _ln_hand), ("hand_div", _ln_hand_div), ("jnp_var", _ln_jnp_var),
                   ("jnp_var_div", _ln_jnp_var_div), ("flax", _ln_linen),
                   ("flax_exact_variance", _ln_linen_slow)):
    t.append(Template("layer_norm", name, fn, (_X, _S, _S), has_eps=True))
  for name, fn in (("hand_noaffine", _ln_hand_noaffine), ("hand_div_noaffine", _ln_hand_div_noaffine),
                   ("flax_noaffine", _ln_linen_noaffine)):
    t.append(Template("layer_norm", name, fn, (_X,), has_eps=True))
  t.append(Template("softmax_cross_entropy", "optax", _ce_optax, (_LOG, _LAB)))
  t.append(Template("softmax_cross_entropy", "log_softmax", _ce_logsm, (_LOG, _LAB)))
  t.append(Template("softmax_cross_entropy", "onehot_log_softmax", _ce_onehot, (_LOG, _LAB)))
  t.append(Template("softmax_cross_entropy", "onehot_eq_log_softmax", _ce_onehot_eq, (_LOG, _LAB)))
  t.append(Template("softmax_cross_entropy", "onehot_select_log_softmax", _ce_onehot_select,
                    (_LOG, _LAB)))
  t.append(Template("softmax_cross_entropy", "optax_dense_onehot", _ce_optax_dense, (_LOG, _LAB)))
  t.append(Template("softmax_cross_entropy", "log_softmax_keepdims", _ce_logsm_keep, (_LOG, _LAB)))
  t.append(Template("softmax_cross_entropy", "log_softmax_labels1", _ce_logsm_lab1, (_LOG, _LAB1),
                    labels_trailing_one=True))
  t.append(Template("softmax_cross_entropy", "log_softmax_labels1_squeeze", _ce_logsm_lab1_squeeze,
                    (_LOG, _LAB1), labels_trailing_one=True))
  for act in ("relu", "gelu", "silu"):
    t.append(Template("matmul", f"bias_{act}", _mm_bias(act), (((2, 4), _F), ((4, 8), _F), _S),
                      activation=act))
    t.append(Template("matmul", f"{act}", _mm_nobias(act), (((2, 4), _F), ((4, 8), _F)),
                      activation=act))
  return tuple(t)


TEMPLATES: tuple[Template, ...] = _build_templates()

# Traced templates keyed by (template name, family, input avals): an explicit, clearable
# cache (see clear_template_cache / route_kernels.clear_spot_check_cache).
_TRACE_CACHE: dict = {}


def clear_template_cache() -> None:
  """Forgets traced templates."""
  _TRACE_CACHE.clear()


# --------------------------------------------------------------------------- tracing

@dataclasses.dataclass
class _Traced:
  variants: list               # [(jaxpr, producer map, known consts, root var)]


def _inline_all(closed):
  return inline_calls(closed)[0]


def _normalize(closed):
  """The passes that run before routing, in the default order (so templates look alike)."""
  for p in (fold, simplify, cse, dce):
    closed = p(closed)[0]
  return closed


def _trace_template(tpl: Template, avals: tuple) -> _Traced | None:
  key = (tpl.family, tpl.name, avals)
  if key in _TRACE_CACHE:
    return _TRACE_CACHE[key]
  specs = [jax.ShapeDtypeStruct(s, d) for s, d in avals]
  fn = (lambda *a: tpl.fn(*a, eps=EPS_SENTINEL)) if tpl.has_eps else tpl.fn
  try:
    closed = jax.make_jaxpr(fn)(*specs)
  except Exception:  # the template does not apply to these shapes
    _TRACE_CACHE[key] = None
    return None
  if len(closed.jaxpr.outvars) != 1:
    _TRACE_CACHE[key] = None
    return None
  cands = [_inline_all(closed), _inline_all(_normalize(closed)), _normalize(_inline_all(closed))]
  variants, seen = [], set()
  for c in cands:
    s = str(c.jaxpr)
    if s in seen:
      continue
    seen.add(s)
    root = c.jaxpr.outvars[0]
    if not isinstance(root, core.Var) or root in c.jaxpr.invars:
      continue
    prod = {v: c.jaxpr.eqns[i] for v, i in DefUse(c.jaxpr).producers.items()}
    if root not in prod:
      continue
    known = {v: np.asarray(x) for v, x in zip(c.jaxpr.constvars, c.consts)}
    variants.append((c.jaxpr, prod, known, root))
  out = _Traced(variants) if variants else None
  _TRACE_CACHE[key] = out
  return out


# --------------------------------------------------------------------------- matching

def _nonunit(shape):
  return [s for s in shape if s != 1]


def _op_key(e: core.JaxprEqn):
  """A normalised operation name (see module doc)."""
  name = e.primitive.name
  if name in _UNIT_RESHAPES and len(e.invars) == 1:
    a, o = e.invars[0].aval, e.outvars[0].aval
    if _nonunit(a.shape) == _nonunit(o.shape) and a.dtype == o.dtype:
      if name != "reshape" or e.params.get("dimensions") in (None, ()):
        return "unit_reshape"
  if name == "square" or (name == "integer_pow" and e.params.get("y") == 2) or (
      name == "mul" and len(e.invars) == 2 and e.invars[0] is e.invars[1]
      and isinstance(e.invars[0], core.Var)):
    return "square"
  return name


def _norm_params(e: core.JaxprEqn) -> dict:
  """Params with spelling-only differences removed (``preferred_element_type=None`` on a
  ``dot_general`` means the output dtype)."""
  p = e.params
  if e.primitive.name == "dot_general" and p.get("preferred_element_type") is None:
    p = dict(p)
    p["preferred_element_type"] = np.dtype(e.outvars[0].aval.dtype)
  return p


def _params_equal(p1: dict, p2: dict) -> bool:
  if set(p1) != set(p2):
    return False
  for k in p1:
    a, b = p1[k], p2[k]
    if isinstance(a, (core.ClosedJaxpr, core.Jaxpr)) or isinstance(b, (core.ClosedJaxpr, core.Jaxpr)):
      if str(a) != str(b):
        return False
      continue
    if callable(a) and callable(b) and not isinstance(a, type):
      continue  # custom_jvp rules etc.: the primal sub-jaxpr is compared instead
    try:
      if a != b and repr(a) != repr(b):
        return False
    except Exception:
      if repr(a) != repr(b):
        return False
  return True


class _Matcher:
  """DAG isomorphism from a template root to a program var (see module doc)."""

  def __init__(self, tjaxpr, tprod, tknown, pjaxpr, pprod, pknown, *, exact: bool,
               has_eps: bool):
    self.t_in = {v: i for i, v in enumerate(tjaxpr.invars)}
    self.tprod, self.tknown = tprod, tknown
    self.pprod, self.pknown = pprod, pknown
    self.exact, self.has_eps = exact, has_eps
    self.steps = 0

  def _tconst(self, a):
    if isinstance(a, core.Literal):
      return np.asarray(a.val)
    return self.tknown.get(a)

  def _pconst(self, a):
    if isinstance(a, core.Literal):
      try:
        return np.asarray(a.val)
      except Exception:
        return None
    return self.pknown.get(a)

  def match(self, t, p, b: dict) -> dict | None:
    self.steps += 1
    if self.steps > 20000:
      return None
    if isinstance(t, core.Var) and t in self.t_in:
      if t in b:
        return b if b[t] is p else None
      if self.exact and not _aval_eq(t.aval, p.aval):
        return None
      nb = dict(b)
      nb[t] = p
      return nb
    tc = self._tconst(t)
    if tc is not None:
      pc = self._pconst(p)
      if pc is None:
        return None
      if not self.exact:
        return b
      if self.has_eps and tc.size == 1 and np.isclose(float(tc.reshape(())), EPS_SENTINEL,
                                                      rtol=1e-6, atol=0):
        if pc.size != 1 or not np.issubdtype(pc.dtype, np.floating):
          return None
        val = float(pc.reshape(()))
        if not (math.isfinite(val) and val >= 0):
          return None
        if "__eps" in b and b["__eps"] != val:
          return None
        nb = dict(b)
        nb["__eps"] = val
        return nb
      if tc.shape != pc.shape or tc.dtype != pc.dtype or not np.array_equal(tc, pc, equal_nan=True):
        return None
      return b
    if not isinstance(p, core.Var):
      return None
    if t in b:
      return b if b[t] is p else None
    te, pe = self.tprod.get(t), self.pprod.get(p)
    if te is None or pe is None:
      return None
    pi, pe = pe
    tk, pk = _op_key(te), _op_key(pe)
    if tk != pk or len(te.outvars) != len(pe.outvars):
      return None
    k = te.outvars.index(t)
    if pe.outvars[k] is not p:
      return None
    if self.exact:
      if not all(_aval_eq(a.aval, c.aval) for a, c in zip(te.outvars, pe.outvars)):
        return None
      if tk != "unit_reshape" and tk != "square" and not _params_equal(_norm_params(te),
                                                                      _norm_params(pe)):
        return None
    nb = dict(b)
    for a, c in zip(te.outvars, pe.outvars):
      nb[a] = c
    nb.setdefault("__eqns", frozenset())
    nb["__eqns"] = nb["__eqns"] | {pi}
    tins, pins = list(te.invars), list(pe.invars)
    if tk == "square":
      tins, pins = tins[:1], pins[:1]
    if len(tins) != len(pins):
      return None
    orders = [pins]
    if tk in _COMMUTATIVE and len(pins) == 2:
      orders.append(pins[::-1])
    for order in orders:
      r = nb
      for ta, pa in zip(tins, order):
        r = self.match(ta, pa, r)
        if r is None:
          break
      if r is not None:
        return r
    return None


def _aval_eq(a, b) -> bool:
  return getattr(a, "shape", None) == getattr(b, "shape", None) and \
      getattr(a, "dtype", None) == getattr(b, "dtype", None)


def _root_keys(traced: _Traced) -> set:
  return {_op_key(prod[root]) for _, prod, _, root in traced.variants}


def find_template_matches(closed: core.ClosedJaxpr, families=None) -> list[TemplateMatch]:
  """Exact template matches at the top level of ``closed`` (non-overlapping, largest first).

  >>> import jax, jax.numpy as jnp
  >>> f = lambda x, g: x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + 1e-5) * g
  >>> [m.pattern for m in find_template_matches(jax.make_jaxpr(f)(jnp.ones((2, 8)), jnp.ones(8)))]
  ['rms_norm']
  """
  jaxpr = closed.jaxpr
  pknown = {}
  for v, c in zip(jaxpr.constvars, closed.consts):
    if not isinstance(c, core.Tracer):
      try:
        pknown[v] = np.asarray(c)
      except Exception:
        pass
  pprod = {v: (i, jaxpr.eqns[i]) for v, i in DefUse(jaxpr).producers.items()}
  by_root: dict = {}
  structs = []
  for tpl in TEMPLATES:
    if families is not None and tpl.family not in families:
      continue
    tr = _trace_template(tpl, tuple((s, np.dtype(d)) for s, d in tpl.canonical))
    if tr is None:
      continue
    structs.append((tpl, tr))
    for k in _root_keys(tr):
      by_root.setdefault(k, []).append((tpl, tr))
  found: list[TemplateMatch] = []
  for i, e in enumerate(jaxpr.eqns):
    if len(e.outvars) != 1 or isinstance(e.outvars[0], core.DropVar):
      continue
    cands = by_root.get(_op_key(e))
    if not cands:
      continue
    for tpl, tr in cands:
      m = _try(tpl, tr, jaxpr, pprod, pknown, i)
      if m is not None:
        found.append(m)
  # Largest matches win; a root may not lie inside another accepted match.
  found.sort(key=lambda m: (-len(m.eqns), m.root))
  out, taken = [], set()
  for m in found:
    if m.eqns & taken:
      continue
    taken |= m.eqns
    out.append(m)
  return sorted(out, key=lambda m: m.root)


def _try(tpl, tr, jaxpr, pprod, pknown, i) -> TemplateMatch | None:
  proot = jaxpr.eqns[i].outvars[0]
  for tj, tprod_raw, tknown, troot in tr.variants:
    tprod = {v: e for v, e in tprod_raw.items()}
    m = _Matcher(tj, tprod, tknown, jaxpr, pprod, pknown, exact=False, has_eps=tpl.has_eps)
    b = m.match(troot, proot, {})
    if b is None:
      continue
    inputs = [b.get(v) for v in tj.invars]
    if any(a is None for a in inputs):
      continue
    avals = []
    for a in inputs:
      av = a.aval
      if not hasattr(av, "shape") or not hasattr(av, "dtype"):
        break
      avals.append((tuple(av.shape), np.dtype(av.dtype)))
    else:
      exact = _trace_template(tpl, tuple(avals))
      if exact is None:
        continue
      for ej, eprod, eknown, eroot in exact.variants:
        mm = _Matcher(ej, eprod, eknown, jaxpr, pprod, pknown, exact=True, has_eps=tpl.has_eps)
        eb = mm.match(eroot, proot, {})
        if eb is None:
          continue
        ins = [eb.get(v) for v in ej.invars]
        if any(a is None for a in ins):
          continue
        if tpl.has_eps and "__eps" not in eb:
          continue
        return TemplateMatch(tpl, i, ins, eb.get("__eps"), set(eb.get("__eqns", frozenset())))
  return None


# --------------------------------------------------------------------------- replacements

def replacement(m: TemplateMatch, backend: str, out_aval) -> Callable:
  """``fn(*inputs) -> root value`` calling the ``lepton_jax.pallas_kernels`` entry."""
  t = m.template
  shape = tuple(out_aval.shape)
  if t.family == "rms_norm":
    k = lpk.rms_norm
    fn = lambda x, s=None: k(x, s, eps=m.eps, backend=backend)
  elif t.family == "layer_norm":
    k = lpk.layer_norm
    fn = lambda x, s=None, b=None: k(x, s, b, eps=m.eps, backend=backend)
  elif t.family == "softmax_cross_entropy":
    k = lpk.softmax_cross_entropy

    def fn(logits, labels):
      if t.labels_trailing_one:
        labels = labels.reshape(labels.shape[:-1])
      return k(logits, labels, backend=backend)
  elif t.family == "matmul":
    k = lpk.matmul
    fn = lambda x, w, b=None: k(x, w, bias=b, activation=t.activation, backend=backend)
  else:  # pragma: no cover
    raise ValueError(t.family)
  return lambda *a: fn(*a).reshape(shape)
