"""Sharding plans: frozen, inspectable, hashable data."""

from __future__ import annotations

import dataclasses
import hashlib
import json

from jax.sharding import PartitionSpec

from lepton_jax._utils import format_bytes

__all__ = ["LeafPlan", "ShardingPlan", "spec_to_pspec", "spec_str"]


def spec_to_pspec(spec: tuple) -> PartitionSpec:
  """``(("data",), None, ("data", "model"))`` -> ``P("data", None, ("data", "model"))``."""
  entries = []
  for e in spec:
    if not e:
      entries.append(None)
    elif len(e) == 1:
      entries.append(e[0])
    else:
      entries.append(tuple(e))
  while entries and entries[-1] is None:
    entries.pop()
  return PartitionSpec(*entries)


def spec_str(spec: tuple) -> str:
  return str(spec_to_pspec(spec)).replace("PartitionSpec", "P")


@dataclasses.dataclass(frozen=True)
class LeafPlan:
  """The placement of one input or output leaf.

  Attributes:
    path: the leaf's path (``jax.tree_util.keystr`` of ``args`` / the output).
    shape: global shape.
    dtype: dtype name.
    role: ``"batch"``, ``"param"`` (parameters, optimizer state and other
      state), ``"scalar"``, ``"static"`` or ``"output"``.
    spec: per-dimension tuple of mesh axis names (``()`` = not sharded).
    reason: why this placement was chosen (always given for replication).
    bytes: global bytes.
    per_device_bytes: bytes each device holds.
  """
  path: str
  shape: tuple
  dtype: str
  role: str
  spec: tuple
  reason: str
  bytes: int
  per_device_bytes: int

  @property
  def partition_spec(self) -> PartitionSpec:
    return spec_to_pspec(self.spec)

  @property
  def replicated(self) -> bool:
    return not any(self.spec)

  def to_dict(self) -> dict:
    return {"path": self.path, "shape": list(self.shape), "dtype": self.dtype, "role": self.role,
            "spec": [list(e) for e in self.spec], "partition_spec": spec_str(self.spec),
            "reason": self.reason, "bytes": int(self.bytes),
            "per_device_bytes": int(self.per_device_bytes)}


@dataclasses.dataclass(frozen=True)
class ShardingPlan:
  """What :func:`lepton_jax.auto_shard` chose, and what it estimates it costs.

  Attributes:
    strategy: ``"auto"``, ``"dp"``, ``"fsdp"``, ``"tp"`` or ``"replicate"``.
    mesh: ``[[axis_name, size], ...]``.
    data_axes / tensor_axes: the mesh axes used for batch/FSDP and for tensor
      parallelism.
    inputs / outputs: a :class:`LeafPlan` per leaf.
    tensor_parallel: descriptions of the logical dimensions split over the
      tensor axes (column-then-row matmul pairs).
    param_bytes: global bytes of non-batch inputs (parameters + optimizer state).
    param_bytes_per_device: what one device holds of them.
    replicated_param_bytes: global bytes of parameter leaves left fully replicated.
    input_bytes_per_device / output_bytes_per_device: per-device bytes of all
      inputs / of outputs that are not donated.
    activation_bytes_per_device: estimated peak of intermediates per device
      (``None`` when the analysis layer cannot estimate it).
    memory_bytes_per_device: the sum that ``memory_budget`` constrains.
    memory_budget: the budget in bytes, or ``None``.
    collective_bytes: estimated bytes moved per step, by kind
      (``all_gather``, ``reduce_scatter``, ``all_reduce``) and ``total``.
    search: how the plan was found.
    planning_seconds: wall time of tracing + planning.
    plan_hash: hex digest of the placement (the same on every process).
    role_basis: how parameters and batch were told apart (data flow or shapes).
    activation_constraints: ``[primitive, shape, partition spec]`` of each top-level
      intermediate given a ``with_sharding_constraint`` (batch dimension over the data axes).
    compiled: XLA's figures for the chosen placement (``arg_temp_bytes`` = argument + temp bytes
      per device, the figure candidates are ranked by; ``memory_bytes`` = argument + output +
      temp - alias bytes per device, ``collective_bytes`` from the optimized HLO,
      ``remat_warnings``), or ``None`` when nothing was compiled (abstract mesh, baselines).
    candidates: for ``strategy="auto"`` on a concrete mesh, every candidate (cost-model plans, the
      named baselines, activation-constraint variants): its name, the model's estimate, its exact
      per-device argument bytes, XLA's figures (``None`` when screened out without compiling: its
      argument bytes alone exceed the best compiled argument + temp), and whether it was chosen.
    validation: how the plan was checked against the compiled program, or why it was not
      (an ``AbstractMesh`` has no devices to compile for: then the plan is the cost model's).
  """
  strategy: str
  mesh: list
  data_axes: tuple
  tensor_axes: tuple
  inputs: tuple
  outputs: tuple
  tensor_parallel: tuple
  param_bytes: int
  param_bytes_per_device: int
  replicated_param_bytes: int
  input_bytes_per_device: int
  output_bytes_per_device: int
  activation_bytes_per_device: int | None
  memory_bytes_per_device: int
  memory_budget: int | None
  collective_bytes: dict
  search: str
  planning_seconds: float
  plan_hash: str
  role_basis: str = ""
  activation_constraints: tuple = ()
  compiled: dict | None = None
  candidates: tuple = ()
  validation: str = ""

  @staticmethod
  def compute_hash(strategy, mesh, inputs, outputs) -> str:
    blob = json.dumps({"strategy": strategy, "mesh": mesh,
                       "in": [[l.path, [list(e) for e in l.spec]] for l in inputs],
                       "out": [[l.path, [list(e) for e in l.spec]] for l in outputs]},
                      sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]

  def to_dict(self) -> dict:
    return {
        "strategy": self.strategy, "mesh": [list(m) for m in self.mesh],
        "data_axes": list(self.data_axes), "tensor_axes": list(self.tensor_axes),
        "inputs": [l.to_dict() for l in self.inputs],
        "outputs": [l.to_dict() for l in self.outputs],
        "tensor_parallel": list(self.tensor_parallel),
        "param_bytes": int(self.param_bytes),
        "param_bytes_per_device": int(self.param_bytes_per_device),
        "replicated_param_bytes": int(self.replicated_param_bytes),
        "input_bytes_per_device": int(self.input_bytes_per_device),
        "output_bytes_per_device": int(self.output_bytes_per_device),
        "activation_bytes_per_device": (None if self.activation_bytes_per_device is None
                                        else int(self.activation_bytes_per_device)),
        "memory_bytes_per_device": int(self.memory_bytes_per_device),
        "memory_budget": None if self.memory_budget is None else int(self.memory_budget),
        "collective_bytes": {k: int(v) for k, v in self.collective_bytes.items()},
        "search": self.search, "planning_seconds": float(self.planning_seconds),
        "plan_hash": self.plan_hash, "role_basis": self.role_basis,
        "activation_constraints": [list(a) for a in self.activation_constraints],
        "compiled": None if self.compiled is None else dict(self.compiled),
        "candidates": [dict(c) for c in self.candidates],
        "validation": self.validation,
    }

  def __str__(self) -> str:
    mesh = " x ".join(f"{n}={s}" for n, s in self.mesh)
    lines = [f"auto_shard plan ({self.strategy}; mesh {mesh}; hash {self.plan_hash}; {self.search})"]
    rows = [("", "path", "shape", "dtype", "role", "spec", "per device", "reason")]
    for kind, leaves in (("in", self.inputs), ("out", self.outputs)):
      for l in leaves:
        rows.append((kind, l.path, "x".join(map(str, l.shape)) or "()", l.dtype, l.role,
                     spec_str(l.spec), format_bytes(l.per_device_bytes), l.reason))
    widths = [min(48, max(len(r[i]) for r in rows)) for i in range(7)]
    for r in rows:
      lines.append("  ".join(c[:48].ljust(w) for c, w in zip(r[:7], widths)) + "  " + r[7])
    if self.tensor_parallel:
      lines.append("tensor parallel: " + "; ".join(self.tensor_parallel))
    act = ("n/a" if self.activation_bytes_per_device is None
           else format_bytes(self.activation_bytes_per_device))
    lines.append(
        f"per device: params+state {format_bytes(self.param_bytes_per_device)} of "
        f"{format_bytes(self.param_bytes)} (replicated {format_bytes(self.replicated_param_bytes)}), "
        f"inputs {format_bytes(self.input_bytes_per_device)}, outputs "
        f"{format_bytes(self.output_bytes_per_device)}, activations ~{act}, total "
        f"{format_bytes(self.memory_bytes_per_device)}"
        + ("" if self.memory_budget is None else f" (budget {format_bytes(self.memory_budget)})"))
    lines.append("estimated collectives per call: " + ", ".join(
        f"{k} {format_bytes(v)}" for k, v in self.collective_bytes.items()))
    if self.activation_constraints:
      lines.append(f"activation sharding constraints on {len(self.activation_constraints)} intermediates: "
                   + "; ".join(f"{p} {'x'.join(map(str, sh))} {sp}"
                               for p, sh, sp in self.activation_constraints[:4])
                   + (" ..." if len(self.activation_constraints) > 4 else ""))
    if self.role_basis:
      lines.append(f"roles from {self.role_basis}")
    if self.compiled is not None:
      c = self.compiled
      lines.append(f"compiled (XLA, per device): argument + temp {format_bytes(c['arg_temp_bytes'])}; memory "
                   f"{format_bytes(c['memory_bytes'])} (argument {format_bytes(c['argument_bytes'])} + output "
                   f"{format_bytes(c['output_bytes'])} + temp {format_bytes(c['temp_bytes'])} - alias "
                   f"{format_bytes(c['alias_bytes'])}), collectives "
                   f"{format_bytes(c['collective_bytes']['total'])} in {c['collective_bytes']['count']} ops, "
                   f"involuntary rematerializations {c['remat_warnings']}")
    if self.validation:
      lines.append(f"compiled validation: {self.validation}")
    if self.candidates:
      lines.append("candidates (model estimate | XLA compiled, per device):")
      for c in self.candidates:
        cm_ = c["compiled"]
        head = (f"  {'*' if c['chosen'] else ' '} {c['name']:<18} est mem "
                f"{format_bytes(c['estimated_memory_bytes']):>10} coll "
                f"{format_bytes(c['estimated_collective_bytes']):>10} | ")
        if cm_ is None:
          lines.append(head + f"arg {format_bytes(c['argument_bytes_per_device']):>10}  [{c['note']}]")
          continue
        lines.append(
            head + f"arg+temp {format_bytes(cm_['arg_temp_bytes']):>10} mem {format_bytes(cm_['memory_bytes']):>10}"
            f" (temp {format_bytes(cm_['temp_bytes'])}) coll {format_bytes(cm_['collective_bytes']['total']):>10}"
            f" remat {cm_['remat_warnings']}" + (f"  [{c['note']}]" if c.get("note") else ""))
    lines.append(f"planning time {self.planning_seconds:.3f} s")
    return "\n".join(lines)
