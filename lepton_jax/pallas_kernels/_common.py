"""Shared helpers of the kernel families: validation, padding, compiler params."""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lepton_jax._errors import KernelError
from lepton_jax.jaxpr import _compat

FLOAT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
FLOAT_NAMES = "float32, bfloat16, float16"
# Large finite negative (as jax.nn.dot_product_attention uses for masked logits).
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def next_pow2(n: int) -> int:
  return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def cdiv(a: int, b: int) -> int:
  return -(-a // b)


def is_pow2(n: int) -> bool:
  return isinstance(n, int) and n > 0 and (n & (n - 1)) == 0


def check_array(api: str, name: str, x: Any, *, ndim: int | Sequence[int] | None = None,
                dtypes: Sequence[Any] | None = FLOAT_DTYPES, dtype_names: str = FLOAT_NAMES,
                integer: bool = False) -> None:
  """Raises KernelError unless ``x`` is an array of the right rank and dtype."""
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    raise KernelError(f"{api}: {name} must be an array, got {type(x).__name__}")
  if ndim is not None:
    ndims = (ndim,) if isinstance(ndim, int) else tuple(ndim)
    if x.ndim not in ndims:
      want = " or ".join(str(n) for n in ndims)
      raise KernelError(f"{api}: {name} must have rank {want}, got shape {tuple(x.shape)} (rank {x.ndim})")
  if integer:
    if not jnp.issubdtype(x.dtype, jnp.integer):
      raise KernelError(f"{api}: {name} must have an integer dtype (int32/int64/...), got {x.dtype}")
  elif dtypes is not None and jnp.dtype(x.dtype) not in dtypes:
    raise KernelError(f"{api}: {name} has dtype {x.dtype}; supported dtypes are {dtype_names}")


def pad_axis(x: jax.Array, axis: int, size: int, value: Any = 0) -> jax.Array:
  """Pads ``x`` along ``axis`` at the end up to ``size``."""
  cur = x.shape[axis]
  if cur == size:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - cur)
  return jnp.pad(x, widths, constant_values=value)


def gpu_params(num_warps: int | None = None, num_stages: int | None = None):
  """Triton compiler params. The Triton backend is deprecated from jax 0.11 (Mosaic GPU is the
  successor); lepton_jax uses it only where no Mosaic GPU kernel serves (pre-Hopper, float32
  / bias / mask attention, norms, cross-entropy, matmul), so the import-time deprecation
  notice is not re-raised to every caller."""
  import warnings
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from jax.experimental.pallas import triton as pltriton
  return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def mgpu():
  """The Mosaic GPU kernels module (``_mgpu``), imported on first use.

  Lazy on purpose: importing ``jax.experimental.pallas.mosaic_gpu`` (which ``_mgpu`` and
  ``_attention_mgpu`` need at their top) loads the Mosaic GPU MLIR dialects, measured at
  ~0.7 s (``python -X importtime``, jax 0.10.2) -- a fifth of ``import lepton_jax`` -- and
  is only needed when a kernel is built for a GPU or run in the Mosaic GPU interpreter.
  """
  from lepton_jax.pallas_kernels import _mgpu
  return _mgpu


def mgpu_attention():
  """``_attention_mgpu``, imported on first use (same reason as :func:`mgpu`)."""
  from lepton_jax.pallas_kernels import _attention_mgpu
  return _attention_mgpu


def mgpu_interpret(mode: str):
  """``interpret=`` for a Mosaic GPU kernel: its interpreter's params when ``mode`` is set."""
  if not mode:
    return False
  params = _compat.mosaic_gpu_interpret_params()
  if params is None:  # pragma: no cover - every supported JAX has it
    raise KernelError("this JAX has no Mosaic GPU interpret mode; use LEPTON_PALLAS_GPU=triton")
  return params


def interpret_arg(mode: str):
  """``pallas_call``'s ``interpret=`` for a kernel config's interpret mode: ``"gpu"`` -> the
  generic interpreter, ``"tpu"`` -> the TPU interpreter (``InterpretParams``), else compiled."""
  if mode == "gpu":
    return True
  if mode == "tpu":
    from jax.experimental.pallas import tpu as pltpu
    return pltpu.InterpretParams()
  return False


def tpu_params(semantics: Sequence[str]):
  from jax.experimental.pallas import tpu as pltpu
  return pltpu.CompilerParams(dimension_semantics=tuple(semantics))


def compiler_params(impl: str, semantics: Sequence[str], num_warps=None, num_stages=None):
  if impl == "tpu":
    return tpu_params(semantics)
  return gpu_params(num_warps, num_stages)


# Per-row statistics (logsumexp, mean, rstd) are stored lane-dense on TPU: broadcast over a
# trailing dimension of STAT_LANES_TPU lanes (as JAX's own TPU flash attention does), so that
# no block is rank-1 and the last two block dims satisfy Mosaic's (8, 128) tiling.
STAT_LANES_TPU = 128
# Shared memory per block on H100 / H200 (sm_90): 227 KiB usable.
GPU_SMEM_BYTES = 227 * 1024


def stat_lanes(impl: str) -> int:
  return STAT_LANES_TPU if impl == "tpu" else 1


def sublanes(dtype) -> int:
  """Row granularity of a TPU tile for ``dtype``: 8 (32-bit), 16 (16-bit), 32 (8-bit)."""
  return 8 * max(1, 4 // jnp.dtype(dtype).itemsize)


def cost_estimate(flops, transcendentals, bytes_accessed):
  """``pl.CostEstimate`` so that ``cost_analysis`` never shows 0 FLOPs for a routed kernel."""
  from jax.experimental import pallas as pl
  return pl.CostEstimate(flops=int(flops), transcendentals=int(transcendentals),
                         bytes_accessed=int(bytes_accessed))


def nbytes(*arrays) -> int:
  return int(sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in arrays if a is not None))


def device_kind() -> str:
  try:
    return jax.devices()[0].device_kind
  except Exception:  # pragma: no cover
    return "unknown"


def shapes_dtypes(*arrays) -> tuple[tuple, tuple]:
  arrs = [a for a in arrays if a is not None]
  return tuple(tuple(int(d) for d in a.shape) for a in arrs), tuple(str(a.dtype) for a in arrs)


def dot_nt(a, b):
  """a @ b.T with float32 accumulation (kernel-friendly)."""
  return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def dot_nn(a, b):
  return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def dot_tn(a, b):
  """a.T @ b with float32 accumulation."""
  return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def mm_dtype(x):
  """Dtype to feed matmul units: keep low precision inputs, float32 otherwise."""
  return x.dtype


# ----------------------------------------------------------------------------- TPU VMEM budget
# Scoped VMEM a Mosaic TPU kernel may use by default (XLA's scoped-VMEM limit): 16 MiB on
# v4 / v5e / v5p, 32 MiB on v6e. Defaults are chosen to fit the smallest (16 MiB).
TPU_SCOPED_VMEM_BYTES = {"TPU v4": 16 << 20, "TPU v5 lite": 16 << 20, "TPU v5e": 16 << 20,
                         "TPU v5p": 16 << 20, "TPU v5": 16 << 20, "TPU v6 lite": 32 << 20,
                         "TPU v6e": 32 << 20}
TPU_VMEM_DEFAULT_BUDGET = 16 << 20


def tpu_padded_bytes(shape, dtype) -> int:
  """Bytes of a VMEM buffer: the last two dims padded to the (sublanes, 128) Mosaic tile."""
  shape = [int(d) for d in shape] or [1]
  if len(shape) == 1:
    shape = [1] + shape
  *lead, r, c = shape
  return math.prod(lead) * round_up(r, sublanes(dtype)) * round_up(c, 128) * jnp.dtype(dtype).itemsize


def tpu_vmem_bytes(in_out_blocks, scratch=()) -> int:
  """VMEM of a pipelined TPU kernel: every in/out block double-buffered, plus scratch.

  ``in_out_blocks`` / ``scratch``: (shape, dtype) pairs (squeezed block dims left out).
  """
  return (2 * sum(tpu_padded_bytes(s, d) for s, d in in_out_blocks)
          + sum(tpu_padded_bytes(s, d) for s, d in scratch))


def pallas_tpu_vmem(jaxpr) -> list[tuple[str, int]]:
  """(kernel name, VMEM bytes) of every ``pallas_call`` in a (closed) jaxpr, read from the
  calls' own block shapes and scratch (:func:`tpu_vmem_bytes`)."""
  found = []

  def walk(j):
    for eqn in j.eqns:
      if eqn.primitive.name == "pallas_call":
        gm = eqn.params["grid_mapping"]
        blocks = [(bm.block_aval.shape, bm.block_aval.dtype) for bm in gm.block_mappings]
        scratch = [(a.shape, a.dtype) for a in gm.scratch_avals if hasattr(a, "shape")]
        name = getattr(eqn.params.get("name_and_src_info"), "name", None) or eqn.params.get("name", "?")
        found.append((str(name), tpu_vmem_bytes(blocks, scratch)))
      for p in eqn.params.values():
        for sub in (p if isinstance(p, (tuple, list)) else (p,)):
          inner = getattr(sub, "jaxpr", None)
          if inner is not None:
            walk(inner if hasattr(inner, "eqns") else inner.jaxpr)
          elif hasattr(sub, "eqns"):
            walk(sub)
  walk(jaxpr.jaxpr if hasattr(jaxpr, "jaxpr") else jaxpr)
  return found


def _block_of(spec, shape_dtype):
  bs = getattr(spec, "block_shape", None)
  shape = shape_dtype.shape if bs is None else tuple(d for d in bs if isinstance(d, int))
  return shape, shape_dtype.dtype


def tpu_call_params(semantics, in_specs, in_arrays, out_specs, out_shapes, scratch_shapes=()):
  """``pltpu.CompilerParams`` for one TPU ``pallas_call``, raising the scoped-VMEM limit only
  when its blocks (double-buffered) + scratch exceed the 16 MiB default (defaults are chosen
  to fit; an explicit large ``block_sizes`` or an extreme shape -- e.g. 64k features -- may
  not). Returns ``(params, vmem_bytes)``."""
  from jax.experimental.pallas import tpu as pltpu
  blocks = [_block_of(s, a) for s, a in zip(in_specs, in_arrays)]
  blocks += [_block_of(s, a) for s, a in zip(out_specs, out_shapes)]
  vmem = tpu_vmem_bytes(blocks, [(s.shape, s.dtype) for s in scratch_shapes])
  kw = {}
  if vmem > TPU_VMEM_DEFAULT_BUDGET:
    kw["vmem_limit_bytes"] = round_up(int(vmem * 1.25) + (1 << 20), 1 << 20)
  return pltpu.CompilerParams(dimension_semantics=tuple(semantics), **kw), vmem


def call_params(impl: str, semantics, num_warps=None, num_stages=None) -> dict:
  """Keyword arguments of :func:`fitted_pallas_call` (the old ``compiler_params`` arguments)."""
  return dict(impl=impl, semantics=tuple(semantics), num_warps=num_warps, num_stages=num_stages)


def fitted_pallas_call(kernel, *, impl, semantics, num_warps=None, num_stages=None, **kw):
  """``pl.pallas_call`` with the backend's compiler params; on TPU the scoped-VMEM limit is
  raised when the call's blocks + scratch need more than the 16 MiB default
  (:func:`tpu_call_params`)."""
  from jax.experimental import pallas as pl

  def call(*args):
    if impl == "tpu":
      out_shape = kw["out_shape"]
      outs = list(out_shape) if isinstance(out_shape, (list, tuple)) else [out_shape]
      out_specs = kw["out_specs"]
      ospecs = list(out_specs) if isinstance(out_specs, (list, tuple)) else [out_specs]
      params, _ = tpu_call_params(semantics, kw["in_specs"], args, ospecs, outs,
                                  kw.get("scratch_shapes", ()))
    else:
      params = compiler_params(impl, semantics, num_warps, num_stages)
    return pl.pallas_call(kernel, compiler_params=params, **kw)(*args)
  return call
