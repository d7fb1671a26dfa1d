"""Compiled validation of sharding candidates: XLA's per-device memory and collective bytes.

Every candidate placement is lowered with ``jax.jit(body, in_shardings, out_shardings)`` and
compiled; what is read back:

* **memory per device**, read through :func:`lepton_jax.jaxpr._compiled.read_compiled` from
  ``compiled.memory_analysis()`` (the SPMD-partitioned program is per device):
  ``argument + temp`` bytes (``arg_temp``: what a step holds when its outputs reuse the donated
  inputs -- the figure candidates are ranked by) and ``argument + output + temp - alias``
  (``memory``: without donation, outputs next to their inputs; what ``memory_budget`` bounds);
* **collective bytes per device** = operand bytes of every ``all-reduce``, ``all-gather``,
  ``reduce-scatter``, ``all-to-all`` and ``collective-permute`` (``*-start`` counted,
  ``*-done`` not; an op inside a loop body counts once) in the optimized HLO text;
* **involuntary rematerializations**: XLA's SPMD partitioner logs ``Involuntary full
  rematerialization`` on stderr when it must replicate a tensor to reshard it; those lines are
  captured (file descriptor 2) while compiling, counted, and not re-printed.

``body`` evaluates the traced jaxpr, optionally with ``with_sharding_constraint`` on chosen
top-level intermediates (activation sharding).

Compiled programs are cached by the text of the lowered module and the mesh's devices
(:func:`_clear_caches`), so a named baseline compiled while validating ``strategy="auto"`` is
not compiled again by ``auto_shard(..., strategy="dp").lower(...).compile()``.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import os
import re
import sys
import tempfile

import jax
from jax.sharding import NamedSharding, PartitionSpec

from lepton_jax.jaxpr._compiled import read_compiled
from lepton_jax.jaxpr._eval import bind_eqn, eval_jaxpr

__all__ = ["CompiledFigures", "jaxpr_body", "compile_candidate", "cached_lowered", "collective_bytes",
           "_clear_caches"]

_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1,
                "s4": 1, "u4": 1, "f8e4m3": 1, "f8e4m3fnuz": 1, "f8e5m2fnuz": 1}
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\([^=]*?\)|[a-z][a-z0-9]*\[[0-9,]*\]\S*)\s+([\w\-]+)\((.*)$")
_SHAPE = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_OPERAND = re.compile(r"%([\w.\-]+)")
_COMMENT = re.compile(r"/\*.*?\*/")
_REMAT = "Involuntary full rematerialization"
_CACHE_SIZE = 64


class _LRU:
  """A small explicit LRU (the only cache of this package; cleared by :func:`_clear_caches`)."""

  def __init__(self, size):
    self.size = size
    self.data = collections.OrderedDict()

  def get(self, key):
    v = self.data.get(key)
    if v is not None:
      self.data.move_to_end(key)
    return v

  def put(self, key, value):
    self.data[key] = value
    self.data.move_to_end(key)
    while len(self.data) > self.size:
      self.data.popitem(last=False)


_COMPILED = _LRU(_CACHE_SIZE)


def _clear_caches() -> None:
  """Forgets every compiled candidate (wired into ``lj.clear_caches()``)."""
  _COMPILED.data.clear()


def _shape_bytes(text: str) -> int:
  total = 0
  for dt, dims in _SHAPE.findall(text):
    if dt not in _DTYPE_BYTES:
      continue
    n = 1
    for d in filter(None, dims.split(",")):
      n *= int(d)
    total += n * _DTYPE_BYTES[dt]
  return total


def collective_bytes(hlo_text: str) -> dict:
  """Operand bytes of each collective kind in an optimized HLO module (per device, static count).

  Operands are printed by name, so every instruction's result shape is read first.
  ``total`` sums operand bytes; ``result_total`` the collectives' result bytes; ``count`` ops.
  """
  shapes, colls = {}, []
  for line in hlo_text.splitlines():
    m = _INSTR.match(_COMMENT.sub("", line))
    if not m:
      continue
    name, shape, op, rest = m.groups()
    shapes[name] = _shape_bytes(shape)
    base = op[:-len("-start")] if op.endswith("-start") else op
    if base in _COLLECTIVES:
      depth, end = 1, len(rest)   # the operand list ends at the matching ')'
      for i, ch in enumerate(rest):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0:
          end = i
          break
      colls.append((base.replace("-", "_"), name, _OPERAND.findall(rest[:end])))
  out = {k.replace("-", "_"): 0 for k in _COLLECTIVES}
  result = 0
  for kind, name, operands in colls:
    out[kind] += sum(shapes.get(o, 0) for o in operands)
    result += shapes[name]
  out["total"] = sum(out.values())
  out["result_total"] = result
  out["count"] = len(colls)
  return out


@dataclasses.dataclass(frozen=True)
class CompiledFigures:
  """What XLA compiled for one candidate (per device)."""
  memory: int            # argument + output + temp - alias bytes
  argument: int
  output: int
  temp: int
  alias: int
  collectives: dict      # collective_bytes() of the optimized HLO
  remat_warnings: int    # "Involuntary full rematerialization" lines while compiling

  @property
  def arg_temp(self) -> int:
    """argument + temp bytes per device (outputs in donated buffers)."""
    return int(self.argument + self.temp)

  def to_dict(self) -> dict:
    return {"memory_bytes": int(self.memory), "arg_temp_bytes": self.arg_temp,
            "argument_bytes": int(self.argument),
            "output_bytes": int(self.output), "temp_bytes": int(self.temp),
            "alias_bytes": int(self.alias), "collective_bytes": dict(self.collectives),
            "remat_warnings": int(self.remat_warnings)}


def _constraint(x, spec, mesh, explicit):
  pspec = PartitionSpec(*[PartitionSpec.UNCONSTRAINED if e is None else (e[0] if len(e) == 1 else tuple(e))
                          if e else None for e in spec])
  if explicit:  # inside auto_axes: the context (abstract) mesh resolves the spec
    return jax.lax.with_sharding_constraint(x, pspec)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, pspec))


def jaxpr_body(closed_jaxpr, constraints: dict, mesh, explicit: bool):
  """A function of the flat input leaves that evaluates ``closed_jaxpr``.

  ``constraints``: ``{(eqn_index, out_index): spec}`` for top-level results, where ``spec`` has
  per dim a tuple of mesh axes, ``()`` (not sharded) or ``None`` (left to XLA).
  """
  jaxpr = closed_jaxpr.jaxpr
  consts = closed_jaxpr.consts
  by_eqn: dict = {}
  for (k, j), spec in constraints.items():
    by_eqn.setdefault(k, {})[j] = spec

  def constrained(k, eqn):
    def fn(read):
      outs = bind_eqn(eqn, [read(v) for v in eqn.invars])
      for j, spec in by_eqn[k].items():
        outs[j] = _constraint(outs[j], spec, mesh, explicit)
      return outs
    return fn

  replace = {k: constrained(k, jaxpr.eqns[k]) for k in by_eqn}

  def run(*args):
    return eval_jaxpr(jaxpr, consts, *args, replace=replace)
  return run


@contextlib.contextmanager
def _captured_stderr():
  """Redirects file descriptor 2 into a temporary file; yields a list that gets the text."""
  box: list = []
  try:
    sys.stderr.flush()
    saved = os.dup(2)
  except (OSError, ValueError, AttributeError):
    yield box
    return
  tmp = tempfile.TemporaryFile()
  try:
    os.dup2(tmp.fileno(), 2)
    yield box
  finally:
    try:
      sys.stderr.flush()
    except (OSError, ValueError):
      pass
    os.dup2(saved, 2)
    os.close(saved)
    tmp.seek(0)
    box.append(tmp.read().decode("utf-8", "replace"))
    tmp.close()


def compile_candidate(jitted, abstract_args, mesh):
  """Lowers ``jitted`` on ``abstract_args`` and compiles it (cached by module text + devices).

  Returns ``(lowered, compiled, CompiledFigures)``.
  """
  lowered = jitted.lower(*abstract_args)
  text = lowered.as_text()
  key = (hashlib.sha256(text.encode()).hexdigest(),
         tuple(int(d.id) for d in mesh.devices.flat), tuple(mesh.axis_names))
  hit = _COMPILED.get(key)
  if hit is not None:
    return hit
  with _captured_stderr() as box:
    compiled = lowered.compile()
  log = box[0] if box else ""
  remat = sum(_REMAT in line for line in log.splitlines())
  rest = "\n".join(line for line in log.splitlines() if _REMAT not in line and line.strip())
  if rest:
    try:
      os.write(2, (rest + "\n").encode())
    except OSError:
      pass
  fig = read_compiled(compiled)   # zeros where a backend has no memory analysis
  figs = CompiledFigures(fig.device_bytes, fig.argument_bytes, fig.output_bytes, fig.temp_bytes,
                         fig.alias_bytes, collective_bytes(compiled.as_text()), remat)
  value = (lowered, compiled, figs)
  _COMPILED.put(key, value)
  return value


def cached_lowered(jitted, abstract_args, mesh):
  """``jitted.lower(...)``, or the identical already-compiled ``Lowered`` from the cache."""
  lowered = jitted.lower(*abstract_args)
  key = (hashlib.sha256(lowered.as_text().encode()).hexdigest(),
         tuple(int(d.id) for d in mesh.devices.flat), tuple(mesh.axis_names))
  hit = _COMPILED.get(key)
  return hit[0] if hit is not None else lowered
