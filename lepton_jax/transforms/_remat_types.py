"""Remat plans as data: ``RematPlan`` (what ``lj.remat_plan(...).plan(*args)`` returns),
``TensorDecision`` (one row of it) and ``CostModel`` (FLOP/s and host bandwidth).

Role: the frozen, JSON-serialisable records shared by the search (``_remat_search``), the
planner (``_remat_planner``) and the public API (``_remat_plan``). No planning logic here.
"""

from __future__ import annotations

import dataclasses

import jax

from lepton_jax._utils import format_bytes

__all__ = ["CostModel", "TensorDecision", "Candidate", "RematPlan"]


# --------------------------------------------------------------------------- data


@dataclasses.dataclass(frozen=True)
class CostModel:
  """Device FLOP/s and host<->device bandwidth used to price recompute vs offload.

  >>> CostModel(device_flops=1e14, host_bandwidth=2e10).recompute_seconds(1e12)
  0.01
  """
  device_flops: float
  host_bandwidth: float

  def recompute_seconds(self, flops: float) -> float:
    return float(flops) / self.device_flops

  def transfer_seconds(self, nbytes: float) -> float:
    return 2.0 * float(nbytes) / self.host_bandwidth  # to host and back

  @classmethod
  def default(cls, platform: str | None = None) -> "CostModel":
    platform = platform or jax.default_backend()
    if platform == "gpu" or platform == "cuda" or platform == "rocm":
      return cls(device_flops=4e14, host_bandwidth=2.5e10)
    if platform == "tpu":
      return cls(device_flops=2e14, host_bandwidth=2e10)
    return cls(device_flops=1e11, host_bandwidth=1e10)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class TensorDecision:
  """What the plan does with one residual.

  Attributes:
    name: the checkpoint name given to the value (``checkpoint_name``).
    shape, dtype: of one instance (one scan iteration inside a scan).
    count: how many instances (scan trip count, else 1).
    nbytes: device bytes if kept (``count`` instances).
    decision: ``"save"``, ``"recompute"``, ``"offload"`` or ``"boundary"`` (a value
      crossing checkpoint regions, kept on device).
    segment: index of the checkpoint region.
    recompute_flops: FLOPs to recompute it (all instances).
    primitive: the primitive that produced it.
  """
  name: str
  shape: tuple[int, ...]
  dtype: str
  count: int
  nbytes: int
  decision: str
  segment: int
  recompute_flops: float
  primitive: str

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["shape"] = list(self.shape)
    return d


@dataclasses.dataclass(frozen=True)
class Candidate:
  """One compiled candidate of a planning run (the plan returned is one of them).

  Attributes:
    label: what it is (``"tree d2 k3"``, ``"per-segment nothing_saveable x4"``, ``"no remat"``, ...).
    compiled_bytes: XLA ``memory_analysis().temp_size_in_bytes`` of ``jax.jit(jax.grad(planned))``.
    recompute_flops: compiled ``cost_analysis()`` FLOPs minus plain ``jax.grad``'s (clipped at 0).
    fits: ``compiled_bytes <= budget_bytes``.
  """
  label: str
  compiled_bytes: int
  recompute_flops: float
  fits: bool

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class RematPlan:
  """A remat plan for one argument signature (see :func:`remat_plan`).

  The judge is the compiled program: ``compiled_bytes`` is XLA's temp bytes of
  ``jax.jit(jax.grad(planned))`` (gradient w.r.t. the first argument) on the backend
  planned for, and never exceeds ``budget_bytes``.

  Attributes:
    budget_bytes: the budget on compiled temp bytes (a float budget is that fraction of
      ``baseline_compiled_bytes``).
    baseline_bytes: plain ``jax.grad``'s peak as compiled (equal to ``baseline_compiled_bytes``).
    peak_bytes: the planner's own model of the planned activation peak (jaxpr liveness of the
      planned forward + backward, ``lepton_jax.jaxpr.grad_memory``); guides the search only.
    saved_bytes: residuals kept between forward and backward in the same jaxpr model
      (JAX's saved-residual accounting, inputs excluded).
    offloaded_bytes: residuals kept in host memory between forward and backward (model).
    recompute_flops: extra FLOPs of the planned gradient, from the compiled program:
      ``cost_analysis()`` FLOPs of ``jax.jit(jax.grad(planned))`` minus plain ``jax.grad``'s.
    transfer_bytes: bytes moved device->host->device for offloaded residuals.
    num_segments: innermost checkpoint regions (scan bodies count once).
    solver: which solver / candidate family produced the decisions.
    decisions: one :class:`TensorDecision` per candidate and boundary value.
    baseline_saved_bytes: plain ``jax.grad``'s saved residual bytes (model, inputs excluded).
    model_peak_bytes: the search model's estimate of the peak (used to rank plans).
    measured_peak_bytes: same as ``peak_bytes`` (kept for compatibility).
    cost_model: the FLOP/s and bandwidth used.
    depth: levels of nested checkpoint regions (0: plain grad).
    compiled_bytes: compiled temp bytes of the planned gradient (``<= budget_bytes``).
    baseline_compiled_bytes: compiled temp bytes of plain ``jax.grad``.
    form: how recomputation is applied: ``"cond"`` (per-region ``custom_vjp`` whose backward
      recomputes inside a ``lax.cond`` on the cotangent: kept apart on XLA:CPU, which drops
      optimization barriers), ``"barrier"`` (``optimization_barrier`` over residuals and
      cotangent: GPU/TPU), ``"checkpoint"`` (``jax.checkpoint`` policies), or ``"none"``.
    platform: the backend the candidates were compiled for.
    candidates: every candidate compiled while planning, in the order tried.
    planning_seconds: wall time of planning (tracing, search, compiles).
  """
  budget_bytes: int
  baseline_bytes: int
  peak_bytes: int
  saved_bytes: int
  offloaded_bytes: int
  recompute_flops: float
  transfer_bytes: int
  num_segments: int
  solver: str
  decisions: tuple[TensorDecision, ...]
  baseline_saved_bytes: int
  model_peak_bytes: int
  measured_peak_bytes: int
  cost_model: CostModel
  depth: int = 1
  compiled_bytes: int = 0
  baseline_compiled_bytes: int = 0
  form: str = "none"
  platform: str = ""
  candidates: tuple[Candidate, ...] = ()
  planning_seconds: float = 0.0

  @property
  def estimated_seconds(self) -> float:
    return (self.cost_model.recompute_seconds(self.recompute_flops)
            + self.transfer_bytes / self.cost_model.host_bandwidth)

  def names(self, decision: str) -> tuple[str, ...]:
    return tuple(d.name for d in self.decisions if d.decision == decision)

  def to_dict(self) -> dict:
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    d["decisions"] = [x.to_dict() for x in self.decisions]
    d["candidates"] = [x.to_dict() for x in self.candidates]
    d["cost_model"] = self.cost_model.to_dict()
    d["estimated_seconds"] = self.estimated_seconds
    return d

  def __str__(self) -> str:
    base = max(self.baseline_compiled_bytes, 1)
    lines = [
        f"RematPlan (solver={self.solver}, form={self.form}, segments={self.num_segments}, "
        f"depth={self.depth}, platform={self.platform})",
        f"  compiled temp {format_bytes(self.compiled_bytes):>10} ({self.compiled_bytes / base:.2f}x)"
        f"   budget {format_bytes(self.budget_bytes)}   plain jax.grad {format_bytes(self.baseline_compiled_bytes)}",
        f"  model peak    {format_bytes(self.peak_bytes):>10}   saved {format_bytes(self.saved_bytes)}"
        f" (plain jax.grad saves {format_bytes(self.baseline_saved_bytes)})",
        f"  offload       {format_bytes(self.offloaded_bytes):>10}   recompute {self.recompute_flops:.3g} FLOPs"
        f" (compiled)   est. {self.estimated_seconds * 1e3:.3g} ms   planned in {self.planning_seconds:.2f} s",
        f"  host<->device {format_bytes(self.transfer_bytes):>10} moved per step (to host and back) at a stated "
        f"{format_bytes(int(self.cost_model.host_bandwidth))}/s"
        f" = {self.transfer_bytes / self.cost_model.host_bandwidth * 1e3:.3g} ms"
        f" (recompute priced at {self.cost_model.device_flops:.3g} FLOP/s)",
        "",
        f"  {'name':<16} {'decision':<10} {'seg':>3} {'shape':<20} {'count':>5} {'bytes':>10} {'FLOPs':>10}  primitive",
    ]
    for x in self.decisions:
      shape = "x".join(map(str, x.shape)) + f" {x.dtype}"
      lines.append(f"  {x.name:<16} {x.decision:<10} {x.segment:>3} {shape:<20} {x.count:>5} "
                   f"{format_bytes(x.nbytes):>10} {x.recompute_flops:>10.3g}  {x.primitive}")
    if self.candidates:
      lines += ["", f"  {'candidate (compiled)':<40} {'temp':>10} {'recompute FLOPs':>16}  fits"]
      for c in self.candidates:
        lines.append(f"  {c.label:<40} {format_bytes(c.compiled_bytes):>10} {c.recompute_flops:>16.3g}  "
                     f"{'yes' if c.fits else 'no'}")
    return "\n".join(lines)
