"""Compiled measurement for ``lj.remat_plan``: the judge of every candidate plan.

Role: compiles ``jax.jit(jax.grad(loss))`` of a candidate's flat function (gradient w.r.t.
the leaves of the first positional argument, as plain ``jax.grad`` of the wrapped function
takes it) on the default backend, and reads XLA's ``memory_analysis().temp_size_in_bytes``
and ``cost_analysis()`` FLOPs (through ``lepton_jax.jaxpr._compiled.read_compiled``). The
planner memoises results per program structure (``_remat_planner._Structure``), so planning at
another budget, or in another wrapper of the same program, does not recompile.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from lepton_jax import jaxpr as ljx
from lepton_jax.jaxpr._compiled import read_compiled

__all__ = ["Measured", "compile_grad", "lower_grad", "compile_lowered", "model_grad_memory", "SCREEN_OPTIONS"]


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


# Candidate compiles on XLA:CPU skip LLVM's expensive optimisation (compile time about half).
# These options act on code generation only: the HLO passes and buffer assignment -- what
# memory_analysis() / cost_analysis() report -- are those of the default compile (measured
# identical temp bytes and FLOPs on every candidate of the tests' and the benchmark's models; the
# tests compare each returned plan with an independent default-options compile). The MLIR fusion
# emitters are left on: turning them off halves compile time again but changes fusion, and with
# it temp bytes.
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
  fig = read_compiled(compiled)
  return Measured(int(fig.temp_bytes), max(float(fig.flops), 0.0))


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
