"""Per-equation FLOP and byte cost model, following XLA's ``HloCostAnalysis``.

Conventions (the same as ``jax.jit(f).lower(...).compile().cost_analysis()``):

* ``flops`` excludes transcendental operations; they are counted in
  ``transcendentals`` (one per output element of ``exp``, ``log``, ``tanh``,
  ``sin``, ``sqrt``, ``rsqrt``, ``pow``, ``erf``...). Primitives that XLA
  expands into arithmetic (``logistic`` = 3 flops + 1 transcendental,
  ``integer_pow`` = its multiplies, ``erf_inv``, ``lgamma``...) count what the
  expansion does. ``Cost.total_ops`` is ``flops + transcendentals``.
* elementwise arithmetic, comparisons, selects and converts: 1 flop per output
  element; data movement (reshape, transpose, slice, gather, pad...): 0 flops.
* reductions: ``input elements - output elements`` reducer applications.
* ``dot_general``: ``2 * output elements * contracted size``.
* ``conv_general_dilated``: ``2 * batch/batch_groups * in_features/feature_groups
  * out_features * prod(valid window positions per spatial dim)``, skipping
  taps that fall in padding or lhs-dilation holes (exactly as XLA).
* ``scan`` multiplies its body by ``length``; ``while`` counts its body once
  unless it is a counted (``fori_loop``-style) loop with literal bounds;
  ``cond`` takes the maximum over branches; calls (``jit``, ``remat``,
  ``custom_jvp``/``custom_vjp`` primal, ``shard_map`` x shards) add their body.
* ``bytes_read``/``bytes_written``: bytes of the input/output abstract values of
  each (innermost) equation, i.e. unfused memory traffic.

Note that XLA's own ``cost_analysis()`` counts a rolled ``while``/``scan`` body
once on CPU; compare loops against an unrolled program.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
from lepton_jax.jaxpr import _compat as jax_core

from lepton_jax.jaxpr._trace import trace
from lepton_jax.jaxpr._walk import aval_bytes, as_closed, sub_jaxprs

__all__ = ["Cost", "eqn_cost", "jaxpr_cost", "cost", "eqn_local_cost"]


@dataclasses.dataclass(frozen=True)
class Cost:
  """FLOPs, transcendentals and bytes moved.

  >>> Cost(flops=2, transcendentals=1) + Cost(flops=3)
  Cost(flops=5, transcendentals=1, bytes_read=0, bytes_written=0)
  """
  flops: int = 0
  transcendentals: int = 0
  bytes_read: int = 0
  bytes_written: int = 0

  def __add__(self, other: "Cost") -> "Cost":
    if not isinstance(other, Cost):
      return NotImplemented
    return Cost(self.flops + other.flops, self.transcendentals + other.transcendentals,
                self.bytes_read + other.bytes_read, self.bytes_written + other.bytes_written)

  def __radd__(self, other):
    if isinstance(other, (int, float)) and other == 0:  # sum([...])
      return self
    return NotImplemented

  def scale(self, k: float) -> "Cost":
    """Every field multiplied by ``k`` (rounded to an int)."""
    return Cost(int(round(self.flops * k)), int(round(self.transcendentals * k)),
                int(round(self.bytes_read * k)), int(round(self.bytes_written * k)))

  def max(self, other: "Cost") -> "Cost":
    """Field-wise maximum (how ``cond`` branches combine)."""
    return Cost(max(self.flops, other.flops), max(self.transcendentals, other.transcendentals),
                max(self.bytes_read, other.bytes_read), max(self.bytes_written, other.bytes_written))

  @property
  def bytes_accessed(self) -> int:
    """``bytes_read + bytes_written``."""
    return self.bytes_read + self.bytes_written

  @property
  def total_ops(self) -> int:
    """``flops + transcendentals``."""
    return self.flops + self.transcendentals

  def to_dict(self) -> dict:
    """Plain-Python dict of the fields plus ``bytes_accessed``."""
    d = dataclasses.asdict(self)
    d["bytes_accessed"] = self.bytes_accessed
    return d


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
    "logistic": (3, 1), "exp2": (1, 1), "erf_inv": (37, 2), "lgamma": (52, 4),
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


def eqn_local_cost(eqn) -> Cost:
  """Cost of ``eqn`` itself, not counting any nested sub-jaxprs."""
  name = eqn.primitive.name
  br = sum(aval_bytes(v) for v in eqn.invars)
  bw = sum(aval_bytes(v) for v in eqn.outvars)
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
  return Cost(int(flops), int(trans), int(br), int(bw))


def eqn_cost(eqn) -> Cost:
  """Cost of one equation, including nested sub-jaxprs times their trip counts.

  >>> import jax, jax.numpy as jnp
  >>> from lepton_jax import jaxpr as ljx
  >>> j = jax.make_jaxpr(jnp.dot)(jnp.ones((4, 8)), jnp.ones((8, 2)))
  >>> ljx.eqn_cost(j.eqns[0]).flops
  128
  """
  subs = sub_jaxprs(eqn)
  if not subs:
    return eqn_local_cost(eqn)
  total = Cost()
  branch_max = None
  for s in subs:
    c = jaxpr_cost(s.closed_jaxpr)
    if s.exclusive:
      branch_max = c if branch_max is None else branch_max.max(c)
    else:
      trip = 1 if s.trip_count is None else s.trip_count
      total = total + c.scale(trip)
  if branch_max is not None:
    total = total + branch_max
  return total


def jaxpr_cost(closed_jaxpr) -> Cost:
  """Total cost of a ``ClosedJaxpr`` / ``Jaxpr`` / :class:`Traced`.

  >>> import jax, jax.numpy as jnp
  >>> from lepton_jax import jaxpr as ljx
  >>> ljx.jaxpr_cost(jax.make_jaxpr(jnp.exp)(jnp.ones(5))).transcendentals
  5
  """
  if hasattr(closed_jaxpr, "closed_jaxpr") and not isinstance(closed_jaxpr, (jax_core.Jaxpr, jax_core.ClosedJaxpr)):
    closed_jaxpr = closed_jaxpr.closed_jaxpr
  jaxpr = as_closed(closed_jaxpr).jaxpr
  total = Cost()
  for eqn in jaxpr.eqns:
    total = total + eqn_cost(eqn)
  return total


def cost(fun, *args, **kwargs) -> Cost:
  """Traces ``fun(*args, **kwargs)`` and returns its total :class:`Cost`.

  >>> import jax.numpy as jnp
  >>> from lepton_jax import jaxpr as ljx
  >>> ljx.cost(lambda a, b: a @ b, jnp.ones((4, 8)), jnp.ones((8, 2))).flops
  128
  """
  return jaxpr_cost(trace(fun, *args, **kwargs).closed_jaxpr)
