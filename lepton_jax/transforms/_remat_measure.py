"""Compiled measurement for ``lj.remat_plan``: the judge of every candidate plan.

Role: compiles ``jax.jit(jax.grad(loss))`` of a candidate's flat function (gradient w.r.t.
the leaves of the first positional argument, as plain ``jax.grad`` of the wrapped function
takes it) on the default backend, and reads XLA's ``memory_analysis().temp_size_in_bytes``
and ``cost_analysis()`` FLOPs. Results are memoised in a :class:`CompileCache` owned by each
planner, keyed by the traced program and the candidate's structure, so repeated planning
(another budget, the same shapes) does not recompile.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Callable, Hashable, Sequence

import jax
import jax.numpy as jnp

from lepton_jax import jaxpr as ljx

__all__ = ["Measured", "CompileCache", "compile_grad", "lower_grad", "compile_lowered", "model_grad_memory"]


@dataclasses.dataclass(frozen=True)
class Measured:
  """Compiled temp bytes and FLOPs of one gradient program."""
  temp_bytes: int
  flops: float


def _is_inexact(x) -> bool:
  return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)


def _loss(flat_fun: Callable) -> Callable:
  def loss(*flat):
    out = flat_fun(*flat)[0]
    if jnp.ndim(out) == 0 and _is_inexact(out):
      return out  # exactly what jax.grad of the wrapped function differentiates
    return jnp.sum(jnp.asarray(out, jnp.float32))
  return loss


# Screening compiles skip LLVM's expensive optimisation (XLA:CPU compile time halves); buffer
# assignment -- what memory_analysis() reports -- runs before code generation and is the same.
# The plan returned is compiled again with default options (``fast=False``) before it is accepted.
SCREEN_OPTIONS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def lower_grad(flat_fun: Callable, flat_specs: Sequence, argnums: Sequence[int]):
  """``jax.jit(jax.grad(flat_fun's first output, argnums)).lower(*flat_specs)``."""
  return jax.jit(jax.grad(_loss(flat_fun), argnums=tuple(argnums))).lower(*flat_specs)


def compile_lowered(lowered, fast: bool) -> Measured:
  """XLA's temp bytes and FLOPs of a lowered gradient (``fast``: screening options, on CPU only)."""
  if fast and jax.default_backend() == "cpu":
    compiled = lowered.compile(compiler_options=SCREEN_OPTIONS)
  else:
    compiled = lowered.compile()
  mem = compiled.memory_analysis()
  temp = int(getattr(mem, "temp_size_in_bytes", 0) or 0) if mem is not None else 0
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
    cost = cost[0] if cost else {}
  flops = float((cost or {}).get("flops", 0.0))
  return Measured(temp, max(flops, 0.0))


def compile_grad(flat_fun: Callable, flat_specs: Sequence, argnums: Sequence[int], fast: bool = False) -> Measured:
  """XLA's temp bytes and FLOPs of ``jax.jit(jax.grad(flat_fun's first output, argnums))``."""
  if not argnums:
    return Measured(0, 0.0)
  return compile_lowered(lower_grad(flat_fun, flat_specs, argnums), fast)


def model_grad_memory(flat_fun: Callable, flat_specs: Sequence, argnums: Sequence[int]):
  """The planner's jaxpr model of the same gradient: ``lepton_jax.jaxpr.grad_memory``
  (saved device bytes, host bytes, activation peak, FLOPs)."""
  if not argnums:
    return 0, 0, 0, 0.0
  m = ljx.grad_memory(_loss(flat_fun), *flat_specs, argnums=tuple(argnums))
  return int(m.saved_bytes), int(m.offloaded_bytes), int(m.peak_bytes), float(m.flops)


class CompileCache:
  """Memo of :func:`compile_grad` results, keyed by ``(program key, candidate key)``.

  Owned by one planner (one ``lj.remat_plan`` wrapper); ``clear()`` empties it.
  """

  def __init__(self, max_entries: int = 512):
    self._max = max_entries
    self._data: dict = {}
    self._lock = threading.Lock()
    self.compiles = 0
    self.hits = 0

  def peek(self, key: Hashable) -> Measured | None:
    with self._lock:
      return self._data.get(key)

  def get(self, key: Hashable, build: Callable[[], Measured]) -> Measured:
    with self._lock:
      hit = self._data.get(key)
      if hit is not None:
        self.hits += 1
        return hit
    got = build()
    with self._lock:
      self.compiles += 1
      if len(self._data) >= self._max:
        self._data.pop(next(iter(self._data)))
      self._data[key] = got
    return got

  def clear(self) -> None:
    with self._lock:
      self._data.clear()
