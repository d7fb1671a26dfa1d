"""A readable report of a function's cost hotspots and peak memory."""

from __future__ import annotations

import dataclasses

import jax

from lepton_jax._utils import format_bytes
from lepton_jax.jaxpr._cost import Cost, eqn_local_cost, jaxpr_cost
from lepton_jax.jaxpr._liveness import grad_peak_bytes, peak_live_bytes
from lepton_jax.jaxpr._trace import trace
from lepton_jax.jaxpr._walk import sub_jaxprs, walk

__all__ = ["EqnSummary", "Summary", "summarize"]


@dataclasses.dataclass(frozen=True)
class EqnSummary:
  """One row of the hotspot tables (costs include the enclosing trip counts)."""
  id: str
  primitive: str
  shapes: str
  flops: int
  transcendentals: int
  bytes: int

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Summary:
  """Result of :func:`summarize`.

  Attributes:
    total: total :class:`Cost` of the function.
    top_flops: the equations with the most FLOPs (+ transcendentals).
    top_bytes: the equations moving the most bytes.
    n_eqns: number of (innermost) equations.
    peak_bytes: forward peak of live intermediates (inputs excluded, outputs included).
    grad_peak_bytes: activation peak of forward+backward w.r.t. the first
      argument, or ``None`` when the function is not differentiable that way.
  """
  total: Cost
  top_flops: tuple
  top_bytes: tuple
  n_eqns: int
  peak_bytes: int
  grad_peak_bytes: int | None

  def to_dict(self) -> dict:
    return {"total": self.total.to_dict(), "top_flops": [r.to_dict() for r in self.top_flops],
            "top_bytes": [r.to_dict() for r in self.top_bytes], "n_eqns": self.n_eqns,
            "peak_bytes": self.peak_bytes, "grad_peak_bytes": self.grad_peak_bytes}

  def __str__(self) -> str:
    t = self.total
    lines = [f"jaxpr summary: {self.n_eqns} equations, {t.flops:,} flops, {t.transcendentals:,} transcendentals, "
             f"{format_bytes(t.bytes_accessed)} accessed",
             f"peak live (forward): {format_bytes(self.peak_bytes)}"
             + ("" if self.grad_peak_bytes is None else f"; peak live (forward+backward): {format_bytes(self.grad_peak_bytes)}")]
    for title, rows in (("top equations by FLOPs", self.top_flops), ("top equations by bytes", self.top_bytes)):
      lines.append("")
      lines.append(title)
      lines.append(f"  {'id':<14} {'primitive':<22} {'flops':>14} {'bytes':>12}  shapes")
      for r in rows:
        lines.append(f"  {r.id:<14} {r.primitive:<22} {r.flops + r.transcendentals:>14,} {format_bytes(r.bytes):>12}  {r.shapes}")
    return "\n".join(lines)


def _shapes(eqn) -> str:
  ins = ",".join(v.aval.str_short(short_dtypes=True) for v in eqn.invars if hasattr(v.aval, "shape"))
  outs = ",".join(v.aval.str_short(short_dtypes=True) for v in eqn.outvars if hasattr(v.aval, "shape"))
  s = f"{ins} -> {outs}"
  return s if len(s) <= 80 else s[:77] + "..."


def summarize(fun, *args, top: int = 10, **kwargs) -> Summary:
  """Cost hotspots and peak-memory estimates of ``fun(*args, **kwargs)``.

  Args:
    fun: function of arrays.
    *args: its arguments.
    top: how many rows in each table.
    **kwargs: keyword arguments of ``fun``.

  >>> import jax.numpy as jnp
  >>> from lepton_jax import jaxpr as ljx
  >>> s = ljx.summarize(lambda w, x: jnp.sum(jnp.tanh(x @ w)), jnp.ones((32, 32)), jnp.ones((4, 32)))
  >>> s.top_flops[0].primitive, s.total.flops
  ('dot_general', 8319)
  """
  if isinstance(top, bool) or not isinstance(top, int) or top < 1:
    raise ValueError(f"lepton_jax.jaxpr.summarize: top must be a positive int, got {top!r}")
  t = trace(fun, *args, **kwargs)
  rows = []
  for ref in walk(t.closed_jaxpr):
    if sub_jaxprs(ref.eqn):
      continue
    c = eqn_local_cost(ref.eqn).scale(ref.multiplier)
    rows.append(EqnSummary(ref.id, ref.eqn.primitive.name, _shapes(ref.eqn), c.flops, c.transcendentals,
                           c.bytes_accessed))
  top_f = tuple(sorted(rows, key=lambda r: -(r.flops + r.transcendentals))[:top])
  top_b = tuple(sorted(rows, key=lambda r: -r.bytes)[:top])
  gpk = None
  if args and not kwargs:
    out_ok = all(jax.numpy.issubdtype(a.dtype, jax.numpy.inexact) for a in t.out_avals)
    in_leaves = jax.tree_util.tree_leaves(args[0])
    in_ok = in_leaves and all(jax.numpy.issubdtype(jax.numpy.result_type(x), jax.numpy.inexact) for x in in_leaves)
    if out_ok and in_ok:
      try:
        gpk = grad_peak_bytes(fun, *args)
      except Exception:  # not differentiable (integer ops, custom rules without grad...)
        gpk = None
  return Summary(jaxpr_cost(t.closed_jaxpr), top_f, top_b, len(rows),
                 peak_live_bytes(t.closed_jaxpr), gpk)
