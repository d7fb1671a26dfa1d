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

from lepton_jax.jaxpr import _compat as jax_core

from lepton_jax.jaxpr._trace import trace
from lepton_jax.jaxpr._registry import local_flops
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


def eqn_local_cost(eqn) -> Cost:
  """Cost of ``eqn`` itself, not counting any nested sub-jaxprs."""
  br = sum(aval_bytes(v) for v in eqn.invars)
  bw = sum(aval_bytes(v) for v in eqn.outvars)
  flops, trans = local_flops(eqn)
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
