"""The primitive registry: one table, keyed by primitive name, that every analysis consults.

Role: answers, for any primitive, (1) which params hold sub-jaxprs and how often each runs,
(2) its class -- position-wise, reduction, cumulative, layout, contraction, gather/scatter,
control flow, call, random, effect, collective, opaque --, (3) whether two equal equations may
be merged (CSE) or evaluated at trace time (constant folding), and (4) whether it is commutative.
The rewrite passes, the cost model, liveness, shape buckets, remat graphs and auto_shard's
dimension analysis read this table instead of keeping their own lists (like JAX's own
``pe.dce_rules``). Unknown primitives get a conservative entry: class ``"other"``, never merged or
folded, sub-jaxprs found by scanning their params.

The table is immutable (a ``MappingProxyType`` built once at import); there is nothing to
register at run time.
"""

from __future__ import annotations

import dataclasses
import math
import types
from typing import Any

import numpy as np

from lepton_jax.jaxpr import _compat as jc

__all__ = ["PrimitiveInfo", "primitive_info", "REGISTRY", "SubJaxpr", "sub_jaxprs",
           "subjaxpr_params", "as_closed", "while_trip_count", "KINDS", "local_flops"]

KINDS = ("elementwise", "reduction", "cumulative", "layout", "contraction", "gather_scatter",
         "control", "call", "random", "effect", "collective", "state", "opaque", "other")


@dataclasses.dataclass(frozen=True)
class PrimitiveInfo:
  """What lepton_jax knows about one primitive.

  Attributes:
    name: the primitive's name (``eqn.primitive.name``).
    kind: one of :data:`KINDS`.
    subjaxpr_params: the params that hold sub-jaxprs whose equations lepton_jax may analyse
      and rewrite (only the primal computation of custom derivative rules).
    cse_safe: two equations with equal primitive, params and inputs compute the same value
      and may be merged.
    foldable: may be evaluated at trace time on constant inputs.
    commutative: a binary primitive whose two operands may be swapped.
    view: moves or relabels its first operand's elements without arithmetic on them (a dtype
      cast, transpose, reshape, broadcast, ...): analyses may treat the output as the same tensor.
  """
  name: str
  kind: str
  subjaxpr_params: tuple[str, ...] = ()
  cse_safe: bool = True
  foldable: bool = True
  commutative: bool = False
  view: bool = False


_ELEMENTWISE = """
add sub mul div rem pow max min neg sign floor ceil round is_finite exp exp2 log log1p expm1
tanh logistic sin cos tan asin acos atan atan2 sinh cosh asinh acosh atanh sqrt rsqrt cbrt abs
integer_pow erf erfc erf_inv lgamma digamma igamma igammac igamma_grad_a random_gamma_grad
polygamma zeta bessel_i0e bessel_i1e regularized_incomplete_beta select_n
convert_element_type and or not xor eq ne lt le gt ge shift_left shift_right_logical
shift_right_arithmetic nextafter clamp square copy copy_p real imag conj complex
population_count clz reduce_precision add_any stop_gradient bitcast_convert_type
one_minus_square log2
""".split()  # one_minus_square (1 - x**2, tanh's JVP) and log2: primitives since jax 0.11
_COMMUTATIVE = frozenset("add mul max min and or xor eq ne add_any".split())
_VIEWS = frozenset("""convert_element_type copy copy_p transpose reshape broadcast_in_dim squeeze
expand_dims reduce_precision optimization_barrier""".split())
_REDUCTION = """
reduce_sum reduce_max reduce_min reduce_prod reduce_and reduce_or reduce_xor argmax argmin
reduce reduce_and_
""".split()
_CUMULATIVE = "cumsum cumprod cummax cummin cumlogsumexp".split()
_LAYOUT = """
reshape broadcast_in_dim transpose slice dynamic_slice dynamic_update_slice concatenate pad
squeeze expand_dims rev iota split select_and_scatter_add select_and_gather_add
reduce_window reduce_window_sum reduce_window_max reduce_window_min sort top_k
""".split()
_CONTRACTION = "dot_general conv_general_dilated ragged_dot ragged_dot_general".split()
_GATHER = "gather scatter scatter-add scatter_add scatter_mul scatter_min scatter_max scatter_sub".split()
_RANDOM = """
random_bits random_seed random_wrap random_unwrap random_fold_in random_split threefry2x32
rng_uniform rng_bit_generator iota_2x32_shape
""".split()
_EFFECT = """
pure_callback io_callback debug_callback debug_print callback infeed outfeed
optimization_barrier name device_put sharding_constraint mesh_cast reshard pvary
psum_invariant create_token after_all
""".split()
_COLLECTIVE = """
psum pmax pmin ppermute all_gather all_to_all reduce_scatter psum_scatter axis_index pbroadcast
all_gather_invariant
""".split()
_STATE = "get swap addupdate mutable_array freeze new_ref ref_get ref_swap ref_addupdate".split()
_OPAQUE = "pallas_call custom_lin custom_transpose_call call_hi_primitive".split()

# Sub-jaxpr params of call-like and control-flow primitives (jax 0.10 / 0.11 spellings).
_CALLS: dict[str, tuple[str, ...]] = {
    "jit": ("jaxpr",), "pjit": ("jaxpr",), "closed_call": ("call_jaxpr",),
    "eval_jaxpr": ("call_jaxpr",),  # jax 0.11's name for closed_call / core.call_p
    "core_call": ("call_jaxpr",), "xla_call": ("call_jaxpr",),
    "remat": ("jaxpr",), "remat2": ("jaxpr",), "checkpoint": ("jaxpr",),
    "custom_jvp_call": ("call_jaxpr",), "custom_vjp_call": ("call_jaxpr",),
    "custom_vjp_call_jaxpr": ("fun_jaxpr",), "shard_map": ("jaxpr",), "run_state": ("jaxpr",),
    "custom_linear_solve": (),  # its jaxprs live in a _LinearSolveTuple: analysed, never rebuilt
    "linear_call": (),
}
_CONTROL: dict[str, tuple[str, ...]] = {
    "scan": ("jaxpr",), "while": ("cond_jaxpr", "body_jaxpr"), "cond": ("branches",),
}


def _build() -> types.MappingProxyType:
  table: dict[str, PrimitiveInfo] = {}

  def add(names, kind, **kw):
    for n in names:
      table[n] = PrimitiveInfo(n, kind, commutative=n in _COMMUTATIVE, view=n in _VIEWS, **kw)

  add(_ELEMENTWISE, "elementwise")
  add(_REDUCTION, "reduction")
  add(_CUMULATIVE, "cumulative")
  add(_LAYOUT, "layout")
  add(_CONTRACTION, "contraction")
  add(_GATHER, "gather_scatter")
  add(_RANDOM, "random", cse_safe=False, foldable=False)
  add(_EFFECT, "effect", cse_safe=False, foldable=False)
  add(_COLLECTIVE, "collective", cse_safe=False, foldable=False)
  add(_STATE, "state", cse_safe=False, foldable=False)
  add(_OPAQUE, "opaque", cse_safe=False, foldable=False)
  for n, keys in _CALLS.items():
    table[n] = PrimitiveInfo(n, "call", keys, cse_safe=n not in ("shard_map", "run_state"),
                             foldable=False)
  for n, keys in _CONTROL.items():
    table[n] = PrimitiveInfo(n, "control", keys, foldable=False)
  return types.MappingProxyType(table)


#: name -> :class:`PrimitiveInfo` for every primitive lepton_jax knows (read-only).
REGISTRY = _build()

# Substrings of primitive names that are never merged or folded when the name is unknown.
_UNSAFE_TOKENS = ("rng", "random", "callback", "debug", "print", "infeed", "outfeed", "barrier",
                  "ref", "mutable", "psum", "all_", "ppermute", "pmax", "pmin", "sharding",
                  "mesh", "device_put", "axis_index", "state", "pallas", "token", "effect")


def primitive_info(prim: Any) -> PrimitiveInfo:
  """The :class:`PrimitiveInfo` of a primitive, an equation or a primitive name.

  >>> primitive_info("exp").kind
  'elementwise'
  >>> primitive_info("my_custom_thing").cse_safe
  False
  """
  if isinstance(prim, jc.JaxprEqn):
    prim = prim.primitive
  name = prim if isinstance(prim, str) else getattr(prim, "name", str(prim))
  info = REGISTRY.get(name)
  if info is not None:
    return info
  safe = not any(t in name for t in _UNSAFE_TOKENS)
  return PrimitiveInfo(name, "other", (), cse_safe=False, foldable=safe)


def as_closed(j) -> jc.ClosedJaxpr:
  """Wraps an open ``Jaxpr`` as a ``ClosedJaxpr`` (no consts); passes closed ones through."""
  if isinstance(j, jc.ClosedJaxpr):
    return j
  if isinstance(j, jc.Jaxpr):
    return jc.ClosedJaxpr(j, ())
  raise TypeError(f"lepton_jax.jaxpr: expected a Jaxpr or ClosedJaxpr, got {type(j).__name__}")


def subjaxpr_params(eqn) -> list[tuple[str, int | None, Any]]:
  """``(param name, index in a tuple or None, jaxpr)`` for every rewritable sub-jaxpr of ``eqn``.

  Known primitives use the registry's ``subjaxpr_params`` (only the primal body of custom
  derivative rules; none for opaque primitives such as ``pallas_call``); unknown primitives are
  scanned for ``Jaxpr`` / ``ClosedJaxpr`` params (directly or in a tuple of them).
  """
  info = REGISTRY.get(eqn.primitive.name)
  keys = info.subjaxpr_params if info is not None else None
  if info is not None and info.kind == "opaque":
    return []
  out = []
  items = eqn.params.items() if keys is None else ((k, eqn.params.get(k)) for k in keys)
  for k, v in items:
    if jc.is_jaxpr(v):
      out.append((k, None, v))
    elif isinstance(v, (tuple, list)) and v and all(jc.is_jaxpr(b) for b in v):
      out.extend((k, i, b) for i, b in enumerate(v))
  return out


@dataclasses.dataclass(frozen=True)
class SubJaxpr:
  """A jaxpr nested in an equation's params.

  Attributes:
    name: stable name within the equation (``"jaxpr"``, ``"call_jaxpr"``,
      ``"body_jaxpr"``, ``"cond_jaxpr"``, ``"branch0"``...).
    closed_jaxpr: the nested jaxpr as a ``ClosedJaxpr``.
    trip_count: how many times the body runs per execution of the equation:
      the scan length, a detected ``fori_loop`` trip count, the number of
      shards for ``shard_map``, 1 for calls, and ``None`` when unknown
      (a data-dependent ``while``).
    exclusive: ``True`` for ``cond`` branches (only one of them runs).
  """
  name: str
  closed_jaxpr: Any
  trip_count: int | None
  exclusive: bool = False


def _literal_int(atom):
  if isinstance(atom, jc.Literal):
    try:
      v = np.asarray(atom.val)
      if v.shape == () and np.issubdtype(v.dtype, np.integer):
        return int(v)
    except Exception:  # pragma: no cover
      return None
  return None


def while_trip_count(eqn) -> int | None:
  """Trip count of a ``while`` equation written as a counted loop, else ``None``.

  Detects ``fori_loop``-style loops: the condition is ``i < upper`` on a carry
  ``i`` that the body increments by a literal 1, with ``i``'s initial value and
  ``upper`` known literals (``upper`` either a literal in the condition or a
  carry the body passes through unchanged).
  """
  if eqn.primitive.name != "while":
    return None
  p = eqn.params
  cj, bj = p["cond_jaxpr"].jaxpr, p["body_jaxpr"].jaxpr
  cn, bn = p["cond_nconsts"], p["body_nconsts"]
  init = eqn.invars[cn + bn:]
  if len(cj.eqns) != 1 or cj.eqns[0].primitive.name not in ("lt", "ne"):
    return None
  ceqn = cj.eqns[0]
  if cj.outvars[0] is not ceqn.outvars[0]:
    return None
  cond_carry = cj.invars[cn:]
  lhs, rhs = ceqn.invars
  if lhs not in cond_carry:
    return None
  i = cond_carry.index(lhs)
  lower = _literal_int(init[i])
  if lower is None:
    return None
  if isinstance(rhs, jc.Literal):
    upper = _literal_int(rhs)
  elif rhs in cond_carry:
    j = cond_carry.index(rhs)
    body_carry_in = bj.invars[bn:]
    if bj.outvars[j] is not body_carry_in[j]:
      return None
    upper = _literal_int(init[j])
  else:
    return None
  if upper is None:
    return None
  body_in = bj.invars[bn:][i]
  out = bj.outvars[i]
  step_ok = False
  for e in bj.eqns:
    if e.outvars and e.outvars[0] is out and e.primitive.name == "add":
      a, b = e.invars
      if (a is body_in and _literal_int(b) == 1) or (b is body_in and _literal_int(a) == 1):
        step_ok = True
  if not step_ok:
    return None
  return max(0, upper - lower)


def _shard_count(eqn) -> int:
  mesh = eqn.params.get("mesh")
  axes = eqn.params.get("newly_manual_axes") or eqn.params.get("manual_axes")
  try:
    shape = dict(mesh.shape)
  except Exception:  # pragma: no cover
    return 1
  if axes is None:
    axes = shape.keys()
  return int(math.prod(shape[a] for a in axes if a in shape))


def sub_jaxprs(eqn) -> list[SubJaxpr]:
  """Jaxprs nested in ``eqn``'s params, with how many times each runs.

  Handles ``jit``/``pjit``, ``remat``/``checkpoint``, ``custom_jvp_call``,
  ``custom_vjp_call``, ``scan``, ``while``, ``cond``, ``shard_map``,
  ``closed_call`` and (generically) any other primitive whose params hold jaxprs.
  Only the primal computation of custom derivative rules is returned.

  >>> import jax, jax.numpy as jnp
  >>> from lepton_jax import jaxpr as ljx
  >>> j = jax.make_jaxpr(lambda x: jax.lax.scan(lambda c, x: (c + x, None), 0., x)[0])(jnp.ones(5))
  >>> [(s.name, s.trip_count) for s in ljx.sub_jaxprs(j.eqns[0])]
  [('jaxpr', 5)]
  """
  name = eqn.primitive.name
  p = eqn.params
  if name == "scan":
    return [SubJaxpr("jaxpr", as_closed(p["jaxpr"]), int(p["length"]))]
  if name == "while":
    trip = while_trip_count(eqn)
    return [SubJaxpr("cond_jaxpr", as_closed(p["cond_jaxpr"]), None if trip is None else trip + 1),
            SubJaxpr("body_jaxpr", as_closed(p["body_jaxpr"]), trip)]
  if name == "cond":
    return [SubJaxpr(f"branch{i}", as_closed(b), 1, exclusive=True) for i, b in enumerate(p["branches"])]
  if name == "custom_linear_solve":  # analysed (cost/liveness), not rewritten
    jaxprs = p.get("jaxprs")
    return [SubJaxpr(f"{f}", as_closed(getattr(jaxprs, f)), 1)
            for f in ("matvec", "vecmat", "solve", "transpose_solve")
            if jc.is_jaxpr(getattr(jaxprs, f, None))]
  trips = _shard_count(eqn) if name == "shard_map" else 1
  subs = subjaxpr_params(eqn)
  many = {k for k, i, _ in subs if i is not None and i > 0}
  return [SubJaxpr(f"{k}{i}" if k in many else k, as_closed(j), trips) for k, i, j in subs]

# --------------------------------------------------------------------------- FLOP rules
# XLA's counting conventions (checked against cost_analysis on CPU, within 2% on our corpus).

def _size(aval) -> int:
  shape = getattr(aval, "shape", ())
  return int(math.prod(int(d) for d in shape)) if shape is not None else 0


# flops per output element, transcendentals per output element.
_ELEMENTWISE_1 = frozenset("""
add sub mul div rem max min neg abs sign floor ceil round nextafter_ is_finite
eq ne lt le gt ge and or not xor select_n clamp convert_element_type square
shift_left shift_right_logical shift_right_arithmetic population_count clz
add_any real imag conj complex reduce_precision copysign
""".split())
_TRANSCENDENTAL = frozenset("""
exp log log1p expm1 tanh sin cos tan sqrt rsqrt cbrt pow atan2 erf atan
""".split())
# (flops, transcendentals) per output element for primitives XLA expands.
_EXPANDED = {
    "logistic": (3, 1), "exp2": (1, 1), "log2": (1, 1), "one_minus_square": (3, 0), "erf_inv": (37, 2), "lgamma": (52, 4),
    "digamma": (60, 4), "sinh": (10, 3), "cosh": (10, 3), "asin": (5, 2), "acos": (6, 2),
    "asinh": (6, 2), "acosh": (6, 2), "atanh": (5, 2), "erfc": (10, 2), "nextafter": (23, 0),
    "igamma": (100, 10), "igammac": (100, 10), "bessel_i0e": (20, 1), "bessel_i1e": (20, 1),
    "random_gamma_grad": (100, 10), "polygamma": (100, 10), "zeta": (100, 10),
    "regularized_incomplete_beta": (200, 20),
}
_REDUCE = {"reduce_sum": 1, "reduce_max": 1, "reduce_min": 1, "reduce_prod": 1, "reduce_and": 1,
           "reduce_or": 1, "reduce_xor": 1, "argmax": 9, "argmin": 9, "reduce_and_": 1}
_CUMULATIVE = frozenset({"cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp"})
_FREE = frozenset("""
reshape broadcast_in_dim transpose slice dynamic_slice dynamic_update_slice gather concatenate pad
squeeze expand_dims rev iota copy copy_p device_put bitcast_convert_type stop_gradient
optimization_barrier split sharding_constraint mesh_cast reshard name pvary psum_invariant
random_seed random_wrap random_unwrap random_fold_in threefry2x32_ axis_index
""".split())


def _integer_pow_flops(y: int) -> int:
  a = abs(int(y))
  if a == 0:
    return 0
  mults = a.bit_length() - 1 + bin(a).count("1") - 1
  return mults + (1 if y < 0 else 0)


def _conv_flops(eqn) -> int:
  lhs, rhs = eqn.invars[0].aval, eqn.invars[1].aval
  out = eqn.outvars[0].aval
  p = eqn.params
  dn = p["dimension_numbers"]
  lhs_spec, rhs_spec, out_spec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
  batch = lhs.shape[lhs_spec[0]]
  in_feat = lhs.shape[lhs_spec[1]]
  out_feat = out.shape[out_spec[1]]
  nsp = len(lhs_spec) - 2
  strides = p.get("window_strides") or (1,) * nsp
  padding = p.get("padding") or ((0, 0),) * nsp
  lhs_dil = p.get("lhs_dilation") or (1,) * nsp
  rhs_dil = p.get("rhs_dilation") or (1,) * nsp
  valid = []
  for d in range(nsp):
    n_in = int(lhs.shape[lhs_spec[2 + d]])
    n_k = int(rhs.shape[rhs_spec[2 + d]])
    n_out = int(out.shape[out_spec[2 + d]])
    pad_lo = int(padding[d][0])
    k = np.arange(n_k)[:, None]
    o = np.arange(n_out)[None, :]
    und = o * int(strides[d]) - pad_lo + k * int(rhs_dil[d])
    bd = int(lhs_dil[d])
    if bd > 1:
      idx = np.trunc(und / bd).astype(np.int64)  # C++ truncating division, as XLA
      ok = (idx * bd == und)
    else:
      idx = und
      ok = np.ones_like(und, dtype=bool)
    ok &= (idx >= 0) & (idx < n_in)
    valid.append(int(ok.sum()))
  fgc = int(p.get("feature_group_count", 1) or 1)
  bgc = int(p.get("batch_group_count", 1) or 1)
  fma = (in_feat // fgc) * out_feat * (batch // bgc) * math.prod(valid)
  return 2 * int(fma)


def _dot_flops(eqn) -> int:
  lhs = eqn.invars[0].aval
  (lc, _), _ = eqn.params["dimension_numbers"]
  k = math.prod(int(lhs.shape[i]) for i in lc)
  return 2 * _size(eqn.outvars[0].aval) * k


def local_flops(eqn) -> tuple[int, int]:
  """``(flops, transcendentals)`` of ``eqn`` itself, not counting nested sub-jaxprs.

  >>> import jax, jax.numpy as jnp
  >>> local_flops(jax.make_jaxpr(jnp.dot)(jnp.ones((4, 8)), jnp.ones((8, 2))).eqns[0])
  (128, 0)
  """
  name = eqn.primitive.name
  out_n = sum(_size(v.aval) for v in eqn.outvars)
  flops = trans = 0
  if name == "dot_general":
    flops = _dot_flops(eqn)
  elif name == "conv_general_dilated":
    flops = _conv_flops(eqn)
  elif name in _ELEMENTWISE_1:
    flops = out_n
  elif name in _TRANSCENDENTAL:
    trans = out_n
  elif name in _EXPANDED:
    f, t = _EXPANDED[name]
    flops, trans = f * out_n, t * out_n
  elif name == "integer_pow":
    flops = _integer_pow_flops(eqn.params["y"]) * out_n
  elif name in _REDUCE:
    in_n = _size(eqn.invars[0].aval)
    flops = _REDUCE[name] * max(0, in_n - _size(eqn.outvars[0].aval))
  elif name in _CUMULATIVE:
    aval = eqn.invars[0].aval
    n = int(aval.shape[eqn.params["axis"]]) if aval.shape else 1
    rows = _size(aval) // max(n, 1)
    flops = rows * n * (n - 1) // 2
    if name == "cumlogsumexp":
      trans = 2 * _size(aval)
  elif name.startswith("reduce_window"):
    wd = eqn.params.get("window_dimensions", ())
    flops = _size(eqn.outvars[0].aval) * max(0, math.prod(wd) - 1)
  elif name == "select_and_scatter_add" or name == "select_and_gather_add":
    wd = eqn.params.get("window_dimensions", ())
    flops = _size(eqn.invars[0].aval) * max(1, math.prod(wd))
  elif name.startswith("scatter"):
    if name != "scatter":  # scatter-add/mul/min/max apply the combiner per update
      flops = _size(eqn.invars[2].aval) if len(eqn.invars) > 2 else 0
  elif name == "sort":
    aval = eqn.invars[0].aval
    n = int(aval.shape[eqn.params.get("dimension", -1)]) if aval.shape else 1
    flops = _size(aval) * max(1, math.ceil(math.log2(max(n, 2))))
  elif name in ("psum", "pmax", "pmin", "psum_scatter", "all_reduce"):
    flops = out_n
  elif name == "pallas_call":
    ce = eqn.params.get("cost_estimate")
    if ce is not None:
      flops = int(getattr(ce, "flops", 0) or 0)
      trans = int(getattr(ce, "transcendentals", 0) or 0)
  return int(flops), int(trans)
