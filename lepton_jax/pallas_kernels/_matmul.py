"""Matmul with a fused epilogue (bias, gelu / relu / silu): reference, XLA, Pallas, custom_vjp."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from lepton_jax._errors import KernelError
from lepton_jax.pallas_kernels import _autotune
from lepton_jax.pallas_kernels import _registry
from lepton_jax.pallas_kernels._common import (
    call_params, fitted_pallas_call,
    interpret_arg, mgpu, mgpu_interpret,
    cdiv, check_array, compiler_params, cost_estimate, dot_nn, is_pow2, next_pow2, pad_axis, round_up,
    shapes_dtypes, sublanes)

__all__ = ["MatmulBlockSizes", "matmul", "matmul_reference", "ACTIVATIONS"]

ACTIVATIONS = (None, "gelu", "relu", "silu")


def _act(name, z):
  if name is None:
    return z
  if name == "gelu":
    return jax.nn.gelu(z)  # tanh approximation, as jax.nn.gelu's default
  if name == "relu":
    return jnp.maximum(z, 0.0)
  return z * jax.nn.sigmoid(z)


@dataclasses.dataclass(frozen=True)
class MatmulBlockSizes:
  """Output tile ``block_m x block_n``, reduction chunk ``block_k``.

  >>> MatmulBlockSizes.get_default().block_m
  64
  """
  block_m: int = 64
  block_n: int = 64
  block_k: int = 32
  num_warps: int | None = 4
  num_stages: int = 3

  @classmethod
  def get_default(cls, *, m: int | None = None, n: int | None = None, k: int | None = None,
                  impl: str = "gpu", dtype=None):
    """GPU (Triton): 64 x 64 tiles, k chunks of 32. TPU: 256 x 256 output tiles, k chunks of
    512 (multiples of the (8|16, 128) Mosaic tiles; x/w/accumulator blocks <= 512 KiB)."""
    if impl == "tpu":
      sub = sublanes(dtype or jnp.float32)
      def fit(b, s, g):
        return b if s is None else max(g, min(b, round_up(s, g)))
      return cls(fit(256, m, sub), fit(256, n, 128), fit(512, k, 128))
    def fit(b, s):
      return b if s is None else max(16, min(b, next_pow2(s)))
    return cls(fit(64, m), fit(64, n), fit(32, k))


def _legal(bs, impl, dtype=None):
  if impl == "tpu":
    sub = sublanes(dtype or jnp.float32)
    for f, g in (("block_m", sub), ("block_n", 128), ("block_k", 128)):
      v = getattr(bs, f)
      if not isinstance(v, int) or v <= 0 or v % g:
        return False, f"{f}={v} must be a positive multiple of {g} on TPU (Mosaic tiling)"
    return True, ""
  for f in ("block_m", "block_n", "block_k"):
    v = getattr(bs, f)
    if not is_pow2(v) or not 16 <= v <= 512:
      return False, f"{f}={v} must be a power of two in [16, 512]"
  if bs.num_warps is not None and bs.num_warps not in (1, 2, 4, 8, 16):
    return False, f"num_warps={bs.num_warps} must be one of 1, 2, 4, 8, 16"
  smem = (bs.block_m * bs.block_k + bs.block_k * bs.block_n) * 4 * max(1, bs.num_stages)
  if impl == "gpu" and smem > 227 * 1024:
    return False, f"estimated shared memory {smem} B exceeds 227 KiB"
  return True, ""


def mosaic_supported(m: int, n: int, k: int, dtype) -> bool:
  """The Mosaic GPU matmul (wgmma) serves bfloat16 / float16 with M, N, K multiples of 64 (its
  tiles; the backward's dx / dw matmuls then fit too). float32 (wgmma would be tf32) and
  other shapes: the Triton kernel."""
  return (jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
          and min(m, n, k) > 0 and m % 64 == 0 and n % 64 == 0 and k % 64 == 0)


def matmul_reference(x, w, *, bias=None, activation=None):
  """``activation(x @ w + bias)`` in float32, cast to ``x.dtype``."""
  z = jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32))
  if bias is not None:
    z = z + bias.astype(jnp.float32)
  return _act(activation, z).astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class _Cfg:
  impl: str
  interpret: str
  activation: str | None
  has_bias: bool
  bs: MatmulBlockSizes
  gpu_flavor: str = "triton"   # "mosaic": the Mosaic GPU wgmma kernel (sm_90+)

  def interpret_arg(self):
    return interpret_arg(self.interpret)


def _mm_kernel(x_ref, w_ref, *refs, cfg, nk, bk, save_z):
  from jax.experimental import pallas as pl
  refs = list(refs)
  b_ref = refs.pop(0) if cfg.has_bias else None
  y_ref = refs[0]
  z_ref = refs[1] if save_z else None

  def body(kk, acc):
    ks = pl.ds(pl.multiple_of(kk * bk, bk), bk)
    return acc + dot_nn(x_ref[:, ks], w_ref[ks, :])

  acc = lax.fori_loop(0, nk, body, jnp.zeros((x_ref.shape[0], w_ref.shape[1]), jnp.float32))
  if b_ref is not None:
    acc = acc + b_ref[...].astype(jnp.float32)
  if z_ref is not None:
    z_ref[...] = acc.astype(z_ref.dtype)
  y_ref[...] = _act(cfg.activation, acc).astype(y_ref.dtype)


def _mm_tpu_kernel(x_ref, w_ref, *refs, cfg, nk, save_z):
  """Grid (m, n, k) with k "arbitrary": the float32 accumulator lives in VMEM scratch."""
  from jax.experimental import pallas as pl
  refs = list(refs)
  b_ref = refs.pop(0) if cfg.has_bias else None
  y_ref = refs.pop(0)
  z_ref = refs.pop(0) if save_z else None
  acc_ref = refs.pop(0)
  kk = pl.program_id(2)

  @pl.when(kk == 0)
  def _init():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  acc_ref[...] += dot_nn(x_ref[...], w_ref[...])

  @pl.when(kk == nk - 1)
  def _epilogue():
    acc = acc_ref[...]
    if b_ref is not None:
      acc = acc + b_ref[...].astype(jnp.float32)
    if z_ref is not None:
      z_ref[...] = acc.astype(z_ref.dtype)
    y_ref[...] = _act(cfg.activation, acc).astype(y_ref.dtype)


def _mm_cost(cfg, m, n, k, x, save_z):
  trans = m * n if cfg.activation in ("gelu", "silu") else 0
  item = jnp.dtype(x.dtype).itemsize
  return cost_estimate(2 * m * n * k, trans, (m * k + k * n + m * n * (2 if save_z else 1)) * item)


def _pallas_mm_tpu(cfg, x, w, bias, *, save_z):
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import tpu as pltpu
  m, k = x.shape
  n = w.shape[1]
  bs = cfg.bs
  sub = sublanes(x.dtype)
  bm = min(bs.block_m, round_up(m, sub))
  bn = min(bs.block_n, round_up(n, 128))
  bk = min(bs.block_k, round_up(k, 128))
  if bk >= k:
    bk = k            # one k block equal to the full dimension (legal whatever k is)
  kp = round_up(k, bk)   # the reduction axis must not read past k: pad it (rare)
  args = [pad_axis(x, 1, kp), pad_axis(w, 0, kp)]
  in_specs = [pl.BlockSpec((bm, bk), lambda i, j, kk: (i, kk)),
              pl.BlockSpec((bk, bn), lambda i, j, kk: (kk, j))]
  if bias is not None:
    args.append(bias.reshape(1, n))
    in_specs.append(pl.BlockSpec((1, bn), lambda i, j, kk: (0, j)))
  out_spec = pl.BlockSpec((bm, bn), lambda i, j, kk: (i, j))
  out_shape = [jax.ShapeDtypeStruct((m, n), x.dtype)] * (2 if save_z else 1)
  nk = kp // bk
  return fitted_pallas_call(
      functools.partial(_mm_tpu_kernel, cfg=cfg, nk=nk, save_z=save_z),
      grid=(cdiv(m, bm), cdiv(n, bn), nk), in_specs=in_specs, out_specs=[out_spec] * len(out_shape),
      out_shape=out_shape, scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
      **call_params("tpu", ("parallel", "parallel", "arbitrary")),
      cost_estimate=_mm_cost(cfg, m, n, k, x, save_z),
      interpret=cfg.interpret_arg(), name="lepton_matmul",
  )(*args)


def _pallas_mm(cfg, x, w, bias, *, activation, save_z, x_t=False, w_t=False):
  """[M, K] @ [K, N] (+ bias, activation) with padding to the tiles. ``x_t`` / ``w_t``: the
  operand is given transposed (the Mosaic GPU kernel reads it so; others transpose it)."""
  from jax.experimental import pallas as pl
  cfg = dataclasses.replace(cfg, activation=activation, has_bias=bias is not None)
  if cfg.gpu_flavor == "mosaic":
    m, k = x.shape[::-1] if x_t else x.shape
    n = w.shape[0] if w_t else w.shape[1]
    return mgpu().matmul(x, w, bias, act=activation, save_z=save_z, a_t=x_t, b_t=w_t,
                         interpret=mgpu_interpret(cfg.interpret),
                         cost_estimate=_mm_cost(cfg, m, n, k, x, save_z))
  x = x.T if x_t else x
  w = w.T if w_t else w
  if cfg.impl == "tpu":
    return list(_pallas_mm_tpu(cfg, x, w, bias, save_z=save_z))
  m, k = x.shape
  n = w.shape[1]
  bs = cfg.bs
  bm = min(bs.block_m, max(16, next_pow2(m)))
  bn = min(bs.block_n, max(16, next_pow2(n)))
  bk = min(bs.block_k, max(16, next_pow2(k)))
  mp, np_, kp = round_up(m, bm), round_up(n, bn), round_up(k, bk)
  args = [pad_axis(pad_axis(x, 0, mp), 1, kp), pad_axis(pad_axis(w, 0, kp), 1, np_)]
  in_specs = [pl.BlockSpec((bm, kp), lambda i, j: (i, 0)), pl.BlockSpec((kp, bn), lambda i, j: (0, j))]
  if bias is not None:
    args.append(pad_axis(bias, 0, np_).reshape(1, np_))
    in_specs.append(pl.BlockSpec((1, bn), lambda i, j: (0, j)))
  out_spec = pl.BlockSpec((bm, bn), lambda i, j: (i, j))
  out_shape = [jax.ShapeDtypeStruct((mp, np_), x.dtype)]
  if save_z:
    out_shape.append(jax.ShapeDtypeStruct((mp, np_), x.dtype))
  outs = fitted_pallas_call(
      functools.partial(_mm_kernel, cfg=cfg, nk=kp // bk, bk=bk, save_z=save_z),
      grid=(mp // bm, np_ // bn), in_specs=in_specs, out_specs=[out_spec] * len(out_shape),
      out_shape=out_shape,
      **call_params(cfg.impl, ("parallel", "parallel"), bs.num_warps, bs.num_stages),
      cost_estimate=_mm_cost(cfg, m, n, k, x, save_z),
      interpret=cfg.interpret_arg(), name="lepton_matmul",
  )(*args)
  return [o[:m, :n] for o in outs]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _mm(cfg, x, w, bias):
  return _pallas_mm(cfg, x, w, bias, activation=cfg.activation, save_z=False)[0]


def _mm_fwd(cfg, x, w, bias):
  save_z = cfg.activation is not None
  outs = _pallas_mm(cfg, x, w, bias, activation=cfg.activation, save_z=save_z)
  return outs[0], (x, w, bias, outs[1] if save_z else None)


def _mm_bwd(cfg, res, g):
  x, w, bias, z = res
  if cfg.activation is None:
    dz = g
  else:
    _, act_vjp = jax.vjp(lambda t: _act(cfg.activation, t), z.astype(jnp.float32))
    dz = act_vjp(g.astype(jnp.float32))[0].astype(x.dtype)
  dx = _pallas_mm(cfg, dz, w, None, activation=None, save_z=False, w_t=True)[0]
  dw = _pallas_mm(cfg, x, dz, None, activation=None, save_z=False, x_t=True)[0]
  db = None if bias is None else dz.astype(jnp.float32).sum(0).astype(bias.dtype)
  return dx, dw.astype(w.dtype), db


_mm.defvjp(_mm_fwd, _mm_bwd)


def matmul(x, w, *, bias=None, activation: str | None = None, backend: str = "auto",
           block_sizes: MatmulBlockSizes | None = None):
  """``activation(x @ w + bias)`` with the bias and activation fused into the matmul.

  Args:
    x: ``[..., K]``.
    w: ``[K, N]`` (same dtype as ``x``).
    bias: optional ``[N]``.
    activation: None, ``"gelu"`` (tanh approximation, like ``jax.nn.gelu``), ``"relu"``, ``"silu"``.
    backend: ``"auto" | "pallas_gpu" | "pallas_tpu" | "xla" | "interpret" | "interpret_tpu"``.
    block_sizes: :class:`MatmulBlockSizes`.

  Returns:
    ``[..., N]`` in ``x``'s dtype (float32 accumulation).

  >>> import jax.numpy as jnp
  >>> matmul(jnp.ones((4, 8)), jnp.ones((8, 2)), activation="relu", backend="interpret").shape
  (4, 2)
  """
  api = "matmul"
  check_array(api, "x", x, ndim=tuple(range(1, 9)))
  check_array(api, "w", w, ndim=2)
  k = x.shape[-1]
  if w.shape[0] != k:
    raise KernelError(f"{api}: w must have shape [K, N] with K={k} (the last axis of x), got {tuple(w.shape)}")
  if w.dtype != x.dtype:
    raise KernelError(f"{api}: x and w must share a dtype, got x={x.dtype}, w={w.dtype}")
  if bias is not None:
    check_array(api, "bias", bias, ndim=1)
    if bias.shape != (w.shape[1],):
      raise KernelError(f"{api}: bias must have shape ({w.shape[1]},), got {tuple(bias.shape)}")
  if activation not in ACTIVATIONS:
    raise KernelError(f"{api}: activation={activation!r} is not supported; use one of {ACTIVATIONS}")
  resolved = _registry.resolve_backend(backend, api=api)
  m = int(np.prod(x.shape[:-1], dtype=np.int64))
  n = w.shape[1]
  src = "explicit"
  if block_sizes is None:
    block_sizes = _autotune.lookup(matmul._lepton_tune_spec, (x, w), {"activation": activation,
                                   "bias": bias}, resolved.backend)
    src = "autotune-cache"
    if block_sizes is None:
      block_sizes, src = MatmulBlockSizes.get_default(m=m, n=n, k=k, impl=resolved.impl,
                                                      dtype=x.dtype), "default"
  if not isinstance(block_sizes, MatmulBlockSizes):
    raise KernelError(f"{api}: block_sizes must be a MatmulBlockSizes, got {type(block_sizes).__name__}")
  ok, reason = _legal(block_sizes, resolved.impl, x.dtype)
  if not ok and resolved.impl != "xla":
    raise KernelError(f"{api}: illegal block_sizes for backend {resolved.backend!r}: {reason}")
  shapes, dtypes = shapes_dtypes(x, w, bias)
  _registry.record(_registry.Dispatch(api, backend, resolved.backend, shapes, dtypes,
                                      dataclasses.asdict(block_sizes), src))
  if resolved.impl == "xla":
    z = jnp.dot(x, w, preferred_element_type=jnp.float32)
    if bias is not None:
      z = z + bias.astype(jnp.float32)
    return _act(activation, z).astype(x.dtype)
  flavor = "triton"
  if resolved.impl == "gpu" and _registry.use_mosaic(resolved.interpret) and mosaic_supported(m, n, k, x.dtype):
    flavor = "mosaic"
  cfg = _Cfg(resolved.impl, "" if resolved.interpret is False else resolved.impl, activation,
             bias is not None, block_sizes, flavor)
  y = _mm(cfg, x.reshape(m, k), w, bias)
  return y.reshape(x.shape[:-1] + (n,))


def _describe(args, kwargs):
  shapes, dtypes = shapes_dtypes(*args[:2])
  return shapes, dtypes, {"activation": kwargs.get("activation"), "bias": kwargs.get("bias") is not None}


def _cands(args, kwargs):
  gpu = [MatmulBlockSizes(bm, bn, bk, nw, 3) for bm in (32, 64, 128) for bn in (32, 64, 128)
         for bk in (32, 64) for nw in (4, 8)]
  # TPU tiles (illegal on GPU by shared memory; GPU tiles are illegal on TPU): each backend
  # sweeps only its own legal candidates.
  tpu = [MatmulBlockSizes(bm, bn, bk) for bm in (128, 256) for bn in (128, 256) for bk in (128, 512)]
  return gpu + tpu


def _is_legal(bs, args, kwargs):
  impl = _registry.resolve_backend(kwargs["backend"]).impl if "backend" in kwargs else "gpu"
  return _legal(bs, impl, args[0].dtype)


def _fixed(args, kwargs):
  x, w = args[0], args[1]
  return _registry.mosaic_tiles_fixed(
      kwargs, mosaic_supported(int(x.size // max(1, x.shape[-1])), w.shape[1], x.shape[-1], x.dtype))


matmul._lepton_tune_spec = _autotune.TuneSpec("matmul", MatmulBlockSizes, _describe, _cands, _is_legal,
                                              _fixed)
