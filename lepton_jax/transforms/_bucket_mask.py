"""Masked evaluation of a program padded along one axis, with the true length known at run time.

``adaptive_jit(buckets=...)`` compiles a function once per bucket size ``P`` and runs it for any
true length ``n <= P``. This module builds that program from two traces of the user's function:
the trace at the bucket size ``P`` and a trace at another length ``L`` (the *probe*). Walking both
jaxprs in lock step gives, for every value, which dimensions scale with the length (a dimension
of size ``P + c`` in one trace and ``L + c`` in the other is *tagged* with offset ``c``: at run time
its first ``n + c`` positions are valid, the rest is padding), and which literals depend on it.

The rewritten program keeps one invariant: **the valid positions of every tagged value equal the
unpadded program's values**. Position-wise operations (elementwise, broadcasts, transposes,
reshapes that keep the axis whole, gathers indexed by padded tokens, ...) keep it for free. Every
operation that mixes positions along a tagged dimension is rewritten to ignore the padding:
reductions (sum, max, min, prod, argmax, ...; softmax and means are built from them), contractions
(``dot_general`` over the axis: attention's ``P @ V``, weight gradients), reverse cumulative ops and
scatter-adds of padded updates (embedding gradients) see the padded positions replaced by the
operation's identity with ``select`` (so NaN/inf in padding never leaks), and literals that depend
on the length (a mean's divisor ``B * L``, ``1 / L``, ``L - 1``) become functions of ``n``.
A slice at a length-relative start (``x[:, -1]``) becomes a dynamic slice at ``n - 1``.

What cannot be made exact is refused with the reason and the equation's source line: reshapes
that merge the axis with another, sorts / reversals / convolutions / windows / FFTs along it,
data-dependent reads of padded positions (a gather *along* the axis), random numbers drawn along
it (the unpadded draw would differ), scans over it, and programs whose structure changes with the
length. Each new true length is traced once more and its rules compared with the bucket's (one
trace, no compile); the compiled program is shared by every length in the bucket.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lepton_jax.jaxpr import _compat as core
from lepton_jax.jaxpr._eval import bind_eqn
from lepton_jax.jaxpr._registry import primitive_info, subjaxpr_params

__all__ = ["UnsafeBucketing", "MaskedProgram", "build_masked", "Tags"]

Tags = dict  # dim -> offset c: the first n + c positions along dim are valid


class UnsafeBucketing(Exception):
  """Padding could change results (the message says why and where)."""


# Derivative-rule params of custom_jvp/custom_vjp calls: callables re-created on every trace.
# The traced program evaluates the primal body only (gradients are already in the jaxpr).
_RULE_PARAMS = frozenset({"jvp_jaxpr_fun", "jvp_jaxpr_thunk", "jvp", "fwd_jaxpr_thunk", "bwd",
                          "out_trees", "fwd", "fun_jaxpr_thunk"})

# Params that may legitimately hold the length (checked per primitive below).
_LENGTH_PARAMS = {
    "broadcast_in_dim": {"shape"}, "reshape": {"new_sizes"}, "iota": {"shape"},
    "slice": {"start_indices", "limit_indices"}, "gather": {"slice_sizes"},
    "dynamic_slice": {"slice_sizes"}, "full": {"shape"}, "pad": {"padding_config"},
}

_POSITIONWISE = frozenset("""transpose squeeze expand_dims broadcast_in_dim iota
optimization_barrier copy copy_p stop_gradient""".split())

_REDUCE_FILL = {"reduce_sum": "zero", "reduce_prod": "one", "reduce_max": "low",
                "argmax": "low", "reduce_min": "high", "argmin": "high", "reduce_and": "high",
                "reduce_or": "low", "reduce_xor": "zero"}
_CUM_FILL = {"cumsum": "zero", "cumprod": "one", "cummax": "low", "cummin": "high",
             "cumlogsumexp": "low"}
_SCATTER_FILL = {"scatter-add": "zero", "scatter_add": "zero", "scatter-mul": "one",
                 "scatter_mul": "one", "scatter-min": "high", "scatter_min": "high",
                 "scatter-max": "low", "scatter_max": "low", "scatter_sub": "zero"}


def _where(eqn) -> str:
  try:
    src = core.source_info_util.summarize(eqn.source_info)
  except Exception:  # pragma: no cover - source info is best effort
    src = ""
  return f"'{eqn.primitive.name}'" + (f" at {src}" if src else "")


def _fill_value(kind: str, dtype):
  dtype = np.dtype(dtype)
  if kind == "zero":
    return np.zeros((), dtype)
  if kind == "one":
    return np.ones((), dtype)
  if dtype == np.bool_:
    return np.bool_(kind == "high")
  if jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.complexfloating):
    return np.array(np.inf if kind == "high" else -np.inf, dtype)
  info = np.iinfo(dtype)
  return np.array(info.max if kind == "high" else info.min, dtype)


def _equal(a, b) -> bool:
  if a is b:
    return True
  if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
    return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
  if isinstance(a, (np.ndarray, np.generic)) or isinstance(b, (np.ndarray, np.generic)):
    try:
      a, b = np.asarray(a), np.asarray(b)
      return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True)
    except Exception:
      return False
  if isinstance(a, float) and isinstance(b, float) and a != a and b != b:
    return True
  if core.is_jaxpr(a) or core.is_jaxpr(b):
    return True  # walked in lock step by the caller
  try:
    eq = a == b
    if isinstance(eq, bool):
      return eq
    return bool(np.all(eq))
  except Exception:
    return False


def _is_int_sequence(v) -> bool:
  return isinstance(v, (tuple, list)) and all(
      _is_int_sequence(x) if isinstance(x, (tuple, list))
      else isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in v)


@dataclasses.dataclass(eq=False)
class MaskedProgram:
  """A bucket's masked program (``closed``: invars ``(n, *flat_padded_inputs)``).

  Attributes:
    closed: the rewritten ClosedJaxpr; its first input is the true length (int32 scalar).
    out_tags: per output, ``{dim: offset}`` of dimensions to slice back to ``n + offset``.
    rules: what the lock-step walk found (tags, literal rules), compared across lengths.
    size: the bucket size ``P``.
  """
  closed: Any
  out_tags: tuple
  rules: tuple
  size: int
  routed: int = 0         # attentions computed by the kernel with the true lengths
  pipelined: Any = None   # adaptive_jit's PipelineResult of ``closed``, once computed
  note: str | None = None  # why routed attention was or was not kept (compiled figures)


class _Walk:
  """One lock-step walk of the jaxprs at the bucket size ``P`` and the probe length ``L``."""

  def __init__(self, P: int, L: int, n):
    self.P, self.L, self.n = int(P), int(L), n
    self.rules: list = []
    self.outer: list = []   # enclosing call / control equations (for source lines)

  def where(self, eqn) -> str:
    """``'prim' at file:line`` of ``eqn``, or of the closest enclosing equation with a user
    source line (primitives inside ``jnp`` functions' own jits have none)."""
    if eqn is None:
      return "an output"
    here = _where(eqn)
    if " at " in here:
      return here
    for outer in reversed(self.outer):
      o = _where(outer)
      if " at " in o:
        return here + " at" + o.split(" at", 1)[1]
    return here

  # -- tags and literals --------------------------------------------------------------
  def tags(self, avP, avL, what: str) -> Tags:
    sP, sL = tuple(getattr(avP, "shape", ())), tuple(getattr(avL, "shape", ()))
    if len(sP) != len(sL):
      raise UnsafeBucketing(f"{what} has a different rank at length {self.L} and {self.P}")
    t = {}
    for d, (p, l) in enumerate(zip(sP, sL)):
      if p == l:
        continue
      if p - l == self.P - self.L:
        t[d] = int(p) - self.P
      else:
        raise UnsafeBucketing(
            f"{what}: dimension {d} is {l} at length {self.L} and {p} at length {self.P}: the "
            "padded axis is merged with another axis or repeated")
    return t

  def literal(self, vP, vL, what: str):
    """The value of a literal that may depend on the length, as a function of ``n``."""
    if _equal(vP, vL):
      self.rules.append(("lit",))
      return vP
    aP, aL = np.asarray(vP), np.asarray(vL)
    if aP.shape != () or aL.shape != () or aP.dtype.kind not in "iuf":
      raise UnsafeBucketing(f"{what}: a constant depends on the length")
    dtype = aP.dtype
    span = self.P - self.L
    slope = (float(aP) - float(aL)) / span
    if slope != 0 and float(slope).is_integer():
      a = int(slope)
      self.rules.append(("lin", a, float(aP) - a * self.P))
      n = self.n
      return (aP.astype(np.float64) + a * (jnp.asarray(n, jnp.float32) - self.P)).astype(dtype) \
          if dtype.kind == "f" else (aP + a * (jnp.asarray(n, dtype) - self.P)).astype(dtype)
    if dtype.kind == "f" and float(aP) != 0 and float(aL) != 0:
      rs = (1.0 / float(aP) - 1.0 / float(aL)) / span
      if rs != 0 and abs(rs - round(rs)) < 1e-6 * max(1.0, abs(rs)):
        a = int(round(rs))
        b = 1.0 / float(aP) - a * self.P
        self.rules.append(("inv", a, round(b, 6)))
        denom = a * jnp.asarray(self.n, jnp.float32) + b
        return (1.0 / denom).astype(dtype)
    raise UnsafeBucketing(f"{what}: a constant is {aL.item()} at length {self.L} and {aP.item()} "
                          f"at length {self.P}, not a linear function of the length")

  def const(self, cP, cL, what: str):
    """A closed-over constant array: equal, or equal on its valid prefix when it scales."""
    if isinstance(cP, core.Tracer) or isinstance(cL, core.Tracer):
      if cP is cL:
        return cP
      raise UnsafeBucketing(f"{what}: a traced constant differs between lengths")
    if np.shape(cP) == () and np.shape(cL) == ():
      return self.literal(np.asarray(cP), np.asarray(cL), what)
    t = self.tags(jax.typeof(cP), jax.typeof(cL), what)
    aP, aL = np.asarray(cP), np.asarray(cL)
    if t:
      aP = aP[tuple(slice(0, aL.shape[d]) if d in t else slice(None) for d in range(aP.ndim))]
    if not (aP.shape == aL.shape and np.array_equal(aP, aL, equal_nan=True)):
      raise UnsafeBucketing(f"{what}: a constant array's values depend on the length")
    self.rules.append(("const", tuple(sorted(t.items()))))
    return cP

  # -- masking -------------------------------------------------------------------------
  def valid(self, shape, dims: Tags):
    """Boolean mask of ``shape``: True where every tagged dim's index is < n + offset."""
    m = None
    for d, c in dims.items():
      pos = lax.broadcasted_iota(jnp.int32, shape, d)
      cur = pos < (jnp.asarray(self.n, jnp.int32) + c)
      m = cur if m is None else jnp.logical_and(m, cur)
    return m

  def mask(self, x, dims: Tags, fill: str):
    if not dims:
      return x
    m = self.valid(np.shape(x), dims)
    return lax.select(m, x, lax.full_like(x, _fill_value(fill, jnp.result_type(x))))

  # -- the walk ------------------------------------------------------------------------
  def run(self, jP, jL, constsP, constsL, args, in_tags, plan=None):
    if (len(jP.eqns) != len(jL.eqns) or len(jP.invars) != len(jL.invars)
        or len(jP.outvars) != len(jL.outvars) or len(jP.constvars) != len(jL.constvars)):
      raise UnsafeBucketing(f"the program's structure changes with the length ({len(jL.eqns)} "
                            f"equations at length {self.L}, {len(jP.eqns)} at {self.P})")
    env: dict = {}
    tenv: dict = {}
    for vP, vL, cP, cL in zip(jP.constvars, jL.constvars, constsP, constsL):
      env[vP] = self.const(cP, cL, "a closed-over constant")
      tenv[vP] = self.tags(vP.aval, vL.aval, "a closed-over constant")
    for vP, vL, x, t in zip(jP.invars, jL.invars, args, in_tags):
      got = self.tags(vP.aval, vL.aval, "an input")
      if got != dict(t):
        raise UnsafeBucketing(f"an input's length dimensions {got} differ from the padded ones {t}")
      env[vP] = x
      tenv[vP] = dict(t)

    def read(aP, aL, eqn):
      if isinstance(aP, core.Literal):
        if not isinstance(aL, core.Literal):
          raise UnsafeBucketing(f"{self.where(eqn)}: the program's structure changes with the length")
        return self.literal(aP.val, aL.val, self.where(eqn)), {}
      return env[aP], tenv.get(aP, {})

    for idx, (eP, eL) in enumerate(zip(jP.eqns, jL.eqns)):
      if eP.primitive is not eL.primitive or len(eP.invars) != len(eL.invars):
        raise UnsafeBucketing(f"{self.where(eP)}: the program's structure changes with the length")
      otags = [self.tags(a.aval, b.aval, self.where(eP)) for a, b in zip(eP.outvars, eL.outvars)]
      if plan is not None and idx in plan.skip:
        continue
      if plan is not None and idx in plan.replace:
        plan.n = self.n
        res = plan.replace[idx](lambda a: read(a, a, eP)[0])
        if isinstance(res, dict):   # a joint backward: the region's outputs
          for v, x in res.items():
            env[v] = x
            tenv[v] = plan.vtags.get(v, {})
          continue
        outs = res
      else:
        got = [read(a, b, eP) for a, b in zip(eP.invars, eL.invars)]
        ins = [g[0] for g in got]
        itags = [g[1] for g in got]
        self.rules.append((eP.primitive.name, tuple(tuple(sorted(t.items())) for t in otags)))
        outs = self.eqn(eP, eL, ins, itags, otags)
      for v, x, t in zip(eP.outvars, outs, otags):
        if not isinstance(v, core.DropVar):
          env[v] = x
          tenv[v] = t
    outs, otags = [], []
    for aP, aL in zip(jP.outvars, jL.outvars):
      x, _ = read(aP, aL, None)
      outs.append(x)
      otags.append(self.tags(aP.aval, aL.aval, "an output"))
    return outs, otags

  def sub(self, cjP, cjL, args, tags):
    jP = cjP.jaxpr if isinstance(cjP, core.ClosedJaxpr) else cjP
    jL = cjL.jaxpr if isinstance(cjL, core.ClosedJaxpr) else cjL
    cP = cjP.consts if isinstance(cjP, core.ClosedJaxpr) else ()
    cL = cjL.consts if isinstance(cjL, core.ClosedJaxpr) else ()
    return self.run(jP, jL, cP, cL, args, tags)

  # -- per equation --------------------------------------------------------------------
  def eqn(self, eP, eL, ins, itags, otags):
    name = eP.primitive.name
    diff = {k for k in eP.params if k not in _RULE_PARAMS and k in eL.params
            and not _equal(eP.params[k], eL.params[k])}
    if set(eP.params) != set(eL.params):
      raise UnsafeBucketing(f"{self.where(eP)}: the program's structure changes with the length")
    info = primitive_info(name)
    if info.kind == "random" and (diff or any(itags) or any(otags)):
      raise UnsafeBucketing(f"{self.where(eP)} draws random numbers along the padded axis (the "
                            "unpadded program's draw would differ)")
    allowed = _LENGTH_PARAMS.get(name, set())
    if diff - allowed:
      raise UnsafeBucketing(f"{self.where(eP)}: its parameter {sorted(diff - allowed)[0]!r} depends "
                            "on the length")
    for k in diff:
      if not _is_int_sequence(eP.params[k]):
        raise UnsafeBucketing(f"{self.where(eP)}: its parameter {k!r} depends on the length")
    if info.kind in ("call", "control"):
      return self.control(eP, eL, ins, itags, otags)
    tagged = any(itags) or any(otags)
    if not tagged and not diff:
      return bind_eqn(eP, ins)
    if info.kind == "elementwise" or name in _POSITIONWISE:
      return bind_eqn(eP, ins)
    handler = getattr(self, "_" + name.replace("-", "_"), None)
    if handler is not None:
      return handler(eP, eL, ins, itags, otags)
    if name in _REDUCE_FILL:
      axes = tuple(eP.params.get("axes", ()))
      x = self.mask(ins[0], {d: c for d, c in itags[0].items() if d in axes}, _REDUCE_FILL[name])
      return bind_eqn(eP, [x] + ins[1:])
    if name in _CUM_FILL:
      ax = eP.params["axis"]
      x = ins[0]
      if ax in itags[0] and eP.params.get("reverse", False):
        x = self.mask(x, {ax: itags[0][ax]}, _CUM_FILL[name])
      return bind_eqn(eP, [x])
    if name in _SCATTER_FILL or name == "scatter":
      return self._scatter_family(eP, eL, ins, itags, otags)
    if info.kind == "random":
      raise UnsafeBucketing(f"{self.where(eP)} draws random numbers along the padded axis (the "
                            "unpadded program's draw would differ)")
    raise UnsafeBucketing(f"{self.where(eP)} is not known to keep positions along the padded axis "
                          "independent")

  def _reshape(self, eP, eL, ins, itags, otags):
    if eP.params.get("dimensions") not in (None, ()):
      raise UnsafeBucketing(f"{self.where(eP)} with dimensions is not supported along the padded axis")
    ishape = eP.invars[0].aval.shape
    oshape = eP.outvars[0].aval.shape
    for d, c in itags[0].items():
      pre = int(np.prod(ishape[:d]))
      post = int(np.prod(ishape[d + 1:]))
      ok = False
      for k in range(len(oshape)):
        if (int(np.prod(oshape[:k])) == pre and oshape[k] == ishape[d]
            and int(np.prod(oshape[k + 1:])) == post and otags[0].get(k) == c):
          ok = True
          break
      if not ok:
        raise UnsafeBucketing(f"{self.where(eP)} merges or splits the padded axis with another axis")
    if len(otags[0]) != len(itags[0]):
      raise UnsafeBucketing(f"{self.where(eP)} merges or splits the padded axis with another axis")
    return bind_eqn(eP, ins)

  def _dot_general(self, eP, eL, ins, itags, otags):
    (lc, rc), _ = eP.params["dimension_numbers"]
    x, y = ins
    x = self.mask(x, {d: c for d, c in itags[0].items() if d in lc}, "zero")
    y = self.mask(y, {d: c for d, c in itags[1].items() if d in rc}, "zero")
    return bind_eqn(eP, [x, y])

  def _slice(self, eP, eL, ins, itags, otags):
    p = eP.params
    startP, limitP = list(p["start_indices"]), list(p["limit_indices"])
    strides = p["strides"] or (1,) * len(startP)
    startL = list(eL.params["start_indices"])
    dyn = []
    for d in range(len(startP)):
      rel = startP[d] != startL[d]
      if d in itags[0] and strides[d] != 1:
        raise UnsafeBucketing(f"{self.where(eP)} strides along the padded axis")
      if rel:
        if d not in itags[0] or d in otags[0] or startP[d] - startL[d] != self.P - self.L:
          raise UnsafeBucketing(f"{self.where(eP)} slices at a position that depends on the length")
        dyn.append((d, startP[d] - self.P + itags[0][d], limitP[d] - startP[d]))
    if not dyn:
      return bind_eqn(eP, ins)
    x = ins[0]
    st = list(startP)
    lim = list(limitP)
    for d, _, _ in dyn:
      st[d], lim[d] = 0, x.shape[d]
    x = lax.slice(x, st, lim, p["strides"])
    for d, off, size in dyn:
      start = jnp.asarray(self.n, jnp.int32) + off
      x = lax.dynamic_slice_in_dim(x, start, size, axis=d)
    return [x]

  def _pad(self, eP, eL, ins, itags, otags):
    # Padding *after* a tagged axis (the transpose of ``x[:, :-1]``): the positions between the
    # valid data and the new end must hold the padding value, so invalid input positions are
    # set to it first. Padding *before* by a length-dependent amount (the transpose of
    # ``x[:, -1]``) places the input at ``n + offset`` instead.
    x, value = ins
    cfgP = eP.params["padding_config"]
    cfgL = eL.params["padding_config"]
    fill, moved = {}, {}
    for d, ((lo, hi, interior), (loL, hiL, intL)) in enumerate(zip(cfgP, cfgL)):
      if (lo, hi, interior) != (loL, hiL, intL):
        if (lo - loL == self.P - self.L and hi == hiL and interior == intL == 0 and loL >= 0
            and d not in itags[0] and d in otags[0]):
          moved[d] = lo - self.P
          continue
        raise UnsafeBucketing(f"{self.where(eP)} pads by an amount that depends on the length")
      if d not in itags[0] and d not in otags[0]:
        continue
      if interior != 0 or d not in itags[0]:
        raise UnsafeBucketing(f"{self.where(eP)} pads inside or around the padded axis")
      if hi != 0:
        fill[d] = itags[0][d]
    if fill:
      m = self.valid(np.shape(x), fill)
      x = lax.select(m, x, lax.broadcast(jnp.asarray(value, x.dtype), np.shape(x)))
    if not moved:
      return bind_eqn(eP, [x, value])
    static_cfg = [(0, 0, 0) if d in moved else c for d, c in enumerate(cfgP)]
    x = lax.pad(x, jnp.asarray(value, x.dtype), static_cfg)
    out_shape = eP.outvars[0].aval.shape
    base = lax.broadcast(jnp.asarray(value, x.dtype), out_shape)
    n = jnp.asarray(self.n, jnp.int32)
    starts = [n + moved[d] if d in moved else jnp.int32(0) for d in range(len(out_shape))]
    return [lax.dynamic_update_slice(base, x, starts)]

  def _concatenate(self, eP, eL, ins, itags, otags):
    d = eP.params["dimension"]
    if d in otags[0]:
      if any(d in t for t in itags[:-1]) or d not in itags[-1]:
        raise UnsafeBucketing(f"{self.where(eP)} concatenates after the padded axis")
    return bind_eqn(eP, ins)

  def _rev(self, eP, eL, ins, itags, otags):
    if set(eP.params["dimensions"]) & set(itags[0]):
      raise UnsafeBucketing(f"{self.where(eP)} reverses the padded axis")
    return bind_eqn(eP, ins)

  def _sort(self, eP, eL, ins, itags, otags):
    d = eP.params["dimension"]
    if any(d in t for t in itags):
      raise UnsafeBucketing(f"{self.where(eP)} sorts along the padded axis")
    return bind_eqn(eP, ins)

  def _top_k(self, eP, eL, ins, itags, otags):
    last = len(eP.invars[0].aval.shape) - 1
    if last in itags[0]:
      raise UnsafeBucketing(f"{self.where(eP)} takes top-k along the padded axis")
    return bind_eqn(eP, ins)

  def _split(self, eP, eL, ins, itags, otags):
    if eP.params["axis"] in itags[0]:
      raise UnsafeBucketing(f"{self.where(eP)} splits the padded axis")
    return bind_eqn(eP, ins)

  def _conv_general_dilated(self, eP, eL, ins, itags, otags):
    dn = eP.params["dimension_numbers"]
    lhs_batch = dn.lhs_spec[0] if dn is not None else 0
    out_batch = dn.out_spec[0] if dn is not None else 0
    if set(itags[0]) - {lhs_batch} or itags[1] or set(otags[0]) - {out_batch}:
      raise UnsafeBucketing(f"{self.where(eP)} convolves along the padded axis")
    return bind_eqn(eP, ins)

  def _gather(self, eP, eL, ins, itags, otags):
    dn = eP.params["dimension_numbers"]
    sizes = eP.params["slice_sizes"]
    oshape = eP.invars[0].aval.shape
    batching = tuple(getattr(dn, "operand_batching_dims", ()))
    for d in itags[0]:
      full = (d not in dn.start_index_map and d not in dn.collapsed_slice_dims
              and sizes[d] == oshape[d])
      if not (d in batching or full):
        raise UnsafeBucketing(f"{self.where(eP)} reads along the padded axis at computed indices")
    return bind_eqn(eP, ins)

  def _dynamic_slice(self, eP, eL, ins, itags, otags):
    # A full-size slice along a tagged dim is position-wise (the start clamps to 0); so is a
    # slice at a constant start whose size follows the length (``lax.dynamic_slice_in_dim(
    # padded, 0, padded.shape[1] - 1)``, Flax's ``shift_right``): it keeps the valid prefix.
    sizes = eP.params["slice_sizes"]
    shape = eP.invars[0].aval.shape
    for d in itags[0]:
      const_start = (isinstance(eP.invars[1 + d], core.Literal)
                     and not isinstance(ins[1 + d], core.Tracer))
      if sizes[d] != shape[d] and not (const_start and d in otags[0]):
        raise UnsafeBucketing(f"{self.where(eP)} reads along the padded axis at a computed offset")
    if any(itags[1:]):
      raise UnsafeBucketing(f"{self.where(eP)} takes its offset from the padded axis")
    return bind_eqn(eP, ins)

  def _dynamic_update_slice(self, eP, eL, ins, itags, otags):
    shape = eP.invars[0].aval.shape
    ushape = eP.invars[1].aval.shape
    for d in set(itags[0]) | set(itags[1]):
      if ushape[d] != shape[d] or itags[0].get(d) != itags[1].get(d):
        raise UnsafeBucketing(f"{self.where(eP)} writes along the padded axis at a computed offset")
    if any(itags[2:]):
      raise UnsafeBucketing(f"{self.where(eP)} takes its offset from the padded axis")
    return bind_eqn(eP, ins)

  def _scatter_family(self, eP, eL, ins, itags, otags):
    name = eP.primitive.name
    dn = eP.params["dimension_numbers"]
    operand_t, upd_t = itags[0], itags[2]
    batching = set(getattr(dn, "operand_batching_dims", ()))
    for d in operand_t:
      window = d not in dn.inserted_window_dims and d not in dn.scatter_dims_to_operand_dims
      if not (d in batching or window):
        raise UnsafeBucketing(f"{self.where(eP)} writes along the padded axis at computed indices")
    scatter_dims = {d: c for d, c in upd_t.items() if d not in dn.update_window_dims}
    if scatter_dims and not (batching & set(operand_t)):
      if name not in _SCATTER_FILL:
        raise UnsafeBucketing(f"{self.where(eP)} writes padded positions' updates into the result")
      upd = self.mask(ins[2], scatter_dims, _SCATTER_FILL[name])
      return bind_eqn(eP, [ins[0], ins[1], upd] + list(ins[3:]))
    return bind_eqn(eP, ins)

  def _reduce_window_generic(self, eP, eL, ins, itags, otags):
    dims = eP.params.get("window_dimensions", ())
    strides = eP.params.get("window_strides", ())
    for t in itags:
      for d in t:
        if d < len(dims) and (dims[d] != 1 or (strides and strides[d] != 1)):
          raise UnsafeBucketing(f"{self.where(eP)} slides a window along the padded axis")
    return bind_eqn(eP, ins)

  _reduce_window_sum = _reduce_window_max = _reduce_window_min = _reduce_window_generic
  _reduce_window = _select_and_scatter_add = _select_and_gather_add = _reduce_window_generic

  def _fft(self, eP, eL, ins, itags, otags):
    nd = len(eP.params["fft_lengths"])
    rank = len(eP.invars[0].aval.shape)
    if any(d >= rank - nd for d in itags[0]) or any(d >= rank - nd for d in otags[0]):
      raise UnsafeBucketing(f"{self.where(eP)} transforms along the padded axis")
    return bind_eqn(eP, ins)

  # -- calls and control flow ----------------------------------------------------------
  def control(self, eP, eL, ins, itags, otags):
    self.outer.append(eP)
    try:
      return self._control(eP, eL, ins, itags, otags)
    finally:
      self.outer.pop()

  def _control(self, eP, eL, ins, itags, otags):
    name = eP.primitive.name
    p = eP.params
    if name == "scan":
      return self._scan(eP, eL, ins, itags, otags)
    if name == "while":
      return self._while(eP, eL, ins, itags, otags)
    if name == "cond":
      if itags[0]:
        raise UnsafeBucketing(f"{self.where(eP)} branches on a value along the padded axis")
      fns = []
      for bP, bL in zip(p["branches"], eL.params["branches"]):
        fns.append(lambda *ops, bP=bP, bL=bL: self._fixed(self.sub(bP, bL, ops, itags[1:]),
                                                          otags, eP))
      return list(lax.switch(ins[0], fns, *ins[1:]))
    subsP = subjaxpr_params(eP)
    subsL = subjaxpr_params(eL)
    if len(subsP) != 1 or len(subsL) != 1:
      if any(itags) or any(otags):
        raise UnsafeBucketing(f"{self.where(eP)} is not known to keep positions along the padded "
                              "axis independent")
      return bind_eqn(eP, ins)
    subP, subL = subsP[0][2], subsL[0][2]
    if name in ("remat", "remat2", "checkpoint"):
      fn = jax.checkpoint(lambda *a: self._fixed(self.sub(subP, subL, a, itags), otags, eP),
                          prevent_cse=p.get("prevent_cse", True), policy=p.get("policy"))
      return list(fn(*ins))
    # jit / custom_jvp / custom_vjp bodies: evaluated inline (the gradient, if any, is already
    # part of the traced program).
    outs, _ = self.sub(subP, subL, ins, itags)
    return outs

  def _fixed(self, result, otags, eqn):
    outs, got = result
    for g, t in zip(got, otags):
      if g != t:
        raise UnsafeBucketing(f"{self.where(eqn)}: the body's padded dimensions disagree with the "
                              "equation's")
    return outs

  def _scan(self, eP, eL, ins, itags, otags):
    p = eP.params
    nc, nk = core.scan_counts(p)
    if p["length"] != eL.params["length"]:
      raise UnsafeBucketing(f"{self.where(eP)} scans along the padded axis")
    xs_t = itags[nc + nk:]
    if any(0 in t for t in xs_t):
      raise UnsafeBucketing(f"{self.where(eP)} scans along the padded axis")
    body_tags = (list(itags[:nc + nk])
                 + [{d - 1: c for d, c in t.items()} for t in xs_t])
    carry_out = otags[:nk]
    if carry_out != list(itags[nc:nc + nk]):
      raise UnsafeBucketing(f"{self.where(eP)}: a loop carry changes its padded dimensions")
    consts, init, xs = ins[:nc], ins[nc:nc + nk], ins[nc + nk:]
    bP, bL = p["jaxpr"], eL.params["jaxpr"]
    ys_t = [{d - 1: c for d, c in t.items()} for t in otags[nk:]]

    def body(carry, x):
      outs = self._fixed(self.sub(bP, bL, list(consts) + list(carry) + list(x), body_tags),
                         carry_out + ys_t, eP)
      return outs[:nk], outs[nk:]

    carry, ys = lax.scan(body, list(init), list(xs), length=p["length"], reverse=p["reverse"],
                         unroll=p.get("unroll", 1))
    return list(carry) + list(ys)

  def _while(self, eP, eL, ins, itags, otags):
    p = eP.params
    cn, bn = p["cond_nconsts"], p["body_nconsts"]
    cconsts, bconsts, init = ins[:cn], ins[cn:cn + bn], ins[cn + bn:]
    ct, bt, it = itags[:cn], itags[cn:cn + bn], itags[cn + bn:]
    if list(otags) != list(it):
      raise UnsafeBucketing(f"{self.where(eP)}: a loop carry changes its padded dimensions")
    cP, cL = p["cond_jaxpr"], eL.params["cond_jaxpr"]
    bP, bL = p["body_jaxpr"], eL.params["body_jaxpr"]

    def cond(c):
      return self.sub(cP, cL, list(cconsts) + list(c), list(ct) + list(it))[0][0]

    def body(c):
      return self._fixed(self.sub(bP, bL, list(bconsts) + list(c), list(bt) + list(it)), it, eP)

    return list(lax.while_loop(cond, body, list(init)))


def _var_tags(walk: "_Walk", jP, jL) -> dict:
  """``{var: tags}`` for every variable of the top level of ``jP`` (from the two traces' shapes)."""
  out: dict = {}
  pairs = list(zip(jP.constvars, jL.constvars)) + list(zip(jP.invars, jL.invars))
  for eP, eL in zip(jP.eqns, jL.eqns):
    pairs += list(zip(eP.outvars, eL.outvars))
  for vP, vL in pairs:
    if isinstance(vP, core.Var) and not isinstance(vP, core.DropVar):
      out[vP] = walk.tags(vP.aval, vL.aval, "a value")
  return out


def build_masked(closedP, closedL, P: int, L: int, in_tags: Sequence[Tags], *,
                 route_attention: bool | str = False) -> MaskedProgram | None:
  """Builds the masked program of the bucket ``P`` from the traces at ``P`` and at ``L``.

  ``in_tags[i]`` gives the padded dimensions of input ``i`` (``{axis: 0}`` for the bucketed
  argument's leaves, ``{}`` otherwise). Raises :class:`UnsafeBucketing` with the reason.
  ``route_attention``: build instead the program whose attentions run on the kernel with the
  true lengths (see :mod:`._bucket_route`; ``"single_block"`` also routes attentions that fit
  one kernel block); ``None`` when there is no such attention.

  >>> import jax, jax.numpy as jnp
  >>> f = lambda x: (x * 2).mean()
  >>> mp = build_masked(jax.make_jaxpr(f)(jnp.ones(8)), jax.make_jaxpr(f)(jnp.ones(5)), 8, 5,
  ...                   [{0: 0}])
  >>> x = jnp.array([1., 2., 3., jnp.nan, jnp.nan, 0., 0., 0.])
  >>> float(jax.core.eval_jaxpr(mp.closed.jaxpr, mp.closed.consts, 3, x)[0])
  4.0
  """
  if P == L:
    raise ValueError(f"build_masked needs two different lengths, got {P} and {L}")
  holder: dict = {}
  plan = None
  if route_attention:
    # Attention computed by the kernel with the true lengths (see _bucket_route); None when the
    # program has no attention the kernel can take.
    # Nested jit calls inlined and dead code removed, the same way at both lengths; a structure
    # that then differs is not routed.
    from lepton_jax.transforms import _bucket_route
    closedP, closedL = _bucket_route.prepare(closedP), _bucket_route.prepare(closedL)
    if len(closedP.jaxpr.eqns) != len(closedL.jaxpr.eqns):
      return None
    try:
      vtags = _var_tags(_Walk(P, L, None), closedP.jaxpr, closedL.jaxpr)
    except UnsafeBucketing:
      return None
    plan = _bucket_route.plan_attention(closedP, vtags,
                                        single_block=route_attention == "single_block")
    if plan is None:
      return None
    plan.vtags = vtags

  def masked(n, *flat):
    walk = _Walk(P, L, n)
    outs, otags = walk.run(closedP.jaxpr, closedL.jaxpr, closedP.consts, closedL.consts,
                           list(flat), [dict(t) for t in in_tags], plan)
    holder["out_tags"] = tuple(otags)
    holder["rules"] = tuple(walk.rules)
    return outs

  specs = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype,
                                weak_type=getattr(v.aval, "weak_type", False))
           for v in closedP.jaxpr.invars]
  closed = jax.make_jaxpr(masked)(jax.ShapeDtypeStruct((), jnp.int32), *specs)
  return MaskedProgram(closed, holder["out_tags"], holder["rules"], int(P),
                       routed=plan.routed if plan is not None else 0)

