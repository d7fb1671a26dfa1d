"""RMS norm and layer norm: reference, XLA, Pallas GPU / TPU kernels with custom_vjp."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from lepton_jax._errors import KernelError
from lepton_jax.pallas_kernels import _autotune
from lepton_jax.pallas_kernels import _registry
from jax import lax

from lepton_jax.pallas_kernels._common import (
    TPU_VMEM_DEFAULT_BUDGET, tpu_vmem_bytes,
    call_params, fitted_pallas_call,
    interpret_arg, mgpu, mgpu_interpret,
    check_array, compiler_params, cost_estimate, is_pow2, nbytes, next_pow2, pad_axis, round_up,
    shapes_dtypes, stat_lanes, sublanes)

__all__ = ["NormBlockSizes", "rms_norm", "rms_norm_reference", "layer_norm", "layer_norm_reference"]

MAX_FEATURES = 65536


@dataclasses.dataclass(frozen=True)
class NormBlockSizes:
  """Rows per program of the norm kernels (the feature axis is one tile).

  >>> NormBlockSizes.get_default(features=1024).block_rows
  16
  >>> NormBlockSizes.get_default(features=4096, impl="tpu").block_rows
  32
  """
  block_rows: int = 16
  num_warps: int | None = None

  @classmethod
  def get_default(cls, *, features: int | None = None, rows: int | None = None,
                  impl: str = "gpu", dtype=None) -> "NormBlockSizes":
    """GPU: rows * padded features <= 16K elements (registers); TPU: a block of <= 512 KiB
    float32 and at least one native tile of rows (8 for 32-bit, 16 for 16-bit dtypes)."""
    if impl == "tpu":
      dp = round_up(features or 1024, 128)
      sub = sublanes(dtype or jnp.float32)
      br = max(sub, min(256, (2 ** 17) // dp))
      br = max(sub, 1 << (br.bit_length() - 1))
      if rows is not None:
        br = max(sub, min(br, next_pow2(rows)))
      while br > sub and tpu_vmem_estimate(br, dp, dtype or jnp.float32) > TPU_VMEM_DEFAULT_BUDGET:
        br //= 2    # fit the 16 MiB scoped VMEM (v4 / v5e / v5p)
      return cls(block_rows=br)
    dp = max(16, next_pow2(features or 1024))
    br = max(1, min(16, 16384 // dp))
    if rows is not None:
      br = min(br, next_pow2(rows))
    return cls(block_rows=max(1, br))


def tpu_vmem_estimate(br: int, dp: int, dtype) -> int:
  """VMEM bytes of the larger of the TPU norm kernels (backward: x, dy, dx row blocks, the
  scale row, two lane-dense statistics, two float32 partial rows; all double-buffered)."""
  f32 = jnp.float32
  fwd = tpu_vmem_bytes([((br, dp), dtype)] * 2 + [((1, dp), dtype)] * 2 + [((br, 128), f32)] * 2)
  bwd = tpu_vmem_bytes([((br, dp), dtype)] * 3 + [((1, dp), dtype)] + [((br, 128), f32)] * 2
                       + [((1, dp), f32)] * 2)
  return max(fwd, bwd)


def _legal(bs, impl, features, rows=None, dtype=None):
  if not is_pow2(bs.block_rows):
    return False, f"block_rows={bs.block_rows} must be a power of two"
  if impl != "xla" and bs.block_rows * max(16, next_pow2(features)) > 2 ** 20:
    return False, f"block_rows * features = {bs.block_rows * next_pow2(features)} exceeds 2**20 elements"
  if impl == "tpu":
    sub = sublanes(dtype or jnp.float32)
    if bs.block_rows % sub and (rows is None or bs.block_rows < rows):
      return False, (f"block_rows={bs.block_rows} must be a multiple of {sub} on TPU (Mosaic tiling of "
                     f"{jnp.dtype(dtype or jnp.float32).name}) unless it covers all {rows} rows")
  return True, ""


def mosaic_supported(rows: int, features: int, dtype) -> bool:
  """The Mosaic GPU norm kernels serve rows and features that are multiples of 64 (64-row
  tiles, feature chunks of 64-256 columns; no padded copy of x). Otherwise: Triton."""
  return (rows > 0 and rows % 64 == 0 and features % 64 == 0
          and jnp.dtype(dtype) in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)))


def rms_norm_reference(x, scale, *, eps=1e-6):
  """``x * rsqrt(mean(x**2, -1) + eps) * scale`` in float32, cast back to ``x.dtype``."""
  xf = x.astype(jnp.float32)
  y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  if scale is not None:
    y = y * scale.astype(jnp.float32)
  return y.astype(x.dtype)


def layer_norm_reference(x, scale, bias, *, eps=1e-6):
  """``(x - mean) * rsqrt(var + eps) * scale + bias`` in float32."""
  xf = x.astype(jnp.float32)
  mean = jnp.mean(xf, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
  y = (xf - mean) * jax.lax.rsqrt(var + eps)
  if scale is not None:
    y = y * scale.astype(jnp.float32)
  if bias is not None:
    y = y + bias.astype(jnp.float32)
  return y.astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class _Cfg:
  kind: str      # "rms" | "ln"
  impl: str
  interpret: str
  eps: float
  features: int
  block_rows: int
  num_warps: int | None
  gpu_flavor: str = "triton"   # "mosaic": the Mosaic GPU kernels (sm_90+), 64-row tiles

  def interpret_arg(self):
    return interpret_arg(self.interpret)


def _stats(cfg, x):
  """Per-row statistics as [rows, 1] columns (no rank-1 values: Mosaic TPU friendly)."""
  dp = x.shape[-1]
  d = cfg.features
  if cfg.kind == "rms":
    rstd = jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) / d + cfg.eps)
    return x, None, rstd
  mean = jnp.sum(x, axis=-1, keepdims=True) / d
  xc = x - mean
  if dp != d:
    xc = jnp.where(lax.broadcasted_iota(jnp.int32, xc.shape, 1) < d, xc, 0.0)
  rstd = jax.lax.rsqrt(jnp.sum(xc * xc, axis=-1, keepdims=True) / d + cfg.eps)
  return xc, mean, rstd


def _col(ref):
  """[rows, L] lane-broadcast statistic -> [rows, 1]."""
  v = ref[...]
  return v if v.shape[-1] == 1 else v[:, :1]


def _fwd_kernel(x_ref, s_ref, b_ref, y_ref, mean_ref, rstd_ref, *, cfg):
  x = x_ref[...].astype(jnp.float32)
  xc, mean, rstd = _stats(cfg, x)
  y = xc * rstd * s_ref[...].astype(jnp.float32)
  if cfg.kind == "ln":
    y = y + b_ref[...].astype(jnp.float32)
  else:
    mean = jnp.zeros_like(rstd)
  y_ref[...] = y.astype(y_ref.dtype)
  mean_ref[...] = jnp.broadcast_to(mean, mean_ref.shape)
  rstd_ref[...] = jnp.broadcast_to(rstd, rstd_ref.shape)


def _bwd_kernel(x_ref, s_ref, dy_ref, mean_ref, rstd_ref, dx_ref, ds_ref, db_ref, *, cfg):
  x = x_ref[...].astype(jnp.float32)
  dy = dy_ref[...].astype(jnp.float32)
  rstd = _col(rstd_ref)
  d = cfg.features
  dp = x.shape[-1]
  if cfg.kind == "ln":
    xc = x - _col(mean_ref)
    if dp != d:
      xc = jnp.where(lax.broadcasted_iota(jnp.int32, xc.shape, 1) < d, xc, 0.0)
  else:
    xc = x
  xhat = xc * rstd
  g = dy * s_ref[...].astype(jnp.float32)
  c2 = jnp.sum(g * xhat, axis=-1, keepdims=True) / d
  if cfg.kind == "ln":
    c1 = jnp.sum(g, axis=-1, keepdims=True) / d
    dx = rstd * (g - c1 - xhat * c2)
  else:
    dx = rstd * (g - xhat * c2)
  dx_ref[...] = dx.astype(dx_ref.dtype)
  ds_ref[...] = jnp.sum(dy * xhat, axis=0, keepdims=True)
  db_ref[...] = jnp.sum(dy, axis=0, keepdims=True)


def _prep(cfg, x2):
  dp = round_up(cfg.features, 128) if cfg.impl == "tpu" else max(16, next_pow2(cfg.features))
  br = cfg.block_rows
  rp = round_up(x2.shape[0], br)
  return dp, br, rp


def _mgpu_cost(x2, bwd):
  """Mosaic GPU norms walk the features twice: forward reads x twice and writes y; backward
  reads x and dy twice and writes dx."""
  r = x2.shape[0]
  return cost_estimate((14 if bwd else 8) * x2.size, r, (5 if bwd else 3) * nbytes(x2) + 8 * r)


def _pallas_fwd(cfg, x2, scale, bias):
  from jax.experimental import pallas as pl
  if cfg.gpu_flavor == "mosaic":
    return mgpu().norm_fwd(x2, scale, bias, kind=cfg.kind, eps=cfg.eps, features=cfg.features,
                           interpret=mgpu_interpret(cfg.interpret), cost_estimate=_mgpu_cost(x2, False))
  dp, br, rp = _prep(cfg, x2)
  L = stat_lanes(cfg.impl)
  xp = pad_axis(pad_axis(x2, 0, rp), 1, dp)
  sp = pad_axis(scale, 0, dp).reshape(1, dp)
  bp = pad_axis(bias, 0, dp).reshape(1, dp)
  row = pl.BlockSpec((br, dp), lambda i: (i, 0))
  vec = pl.BlockSpec((1, dp), lambda i: (0, 0))
  stat = pl.BlockSpec((br, L), lambda i: (i, 0))
  n = rp * dp
  y, mean, rstd = fitted_pallas_call(
      functools.partial(_fwd_kernel, cfg=cfg), grid=(rp // br,),
      in_specs=[row, vec, vec], out_specs=[row, stat, stat],
      out_shape=[jax.ShapeDtypeStruct((rp, dp), x2.dtype), jax.ShapeDtypeStruct((rp, L), jnp.float32),
                 jax.ShapeDtypeStruct((rp, L), jnp.float32)],
      **call_params(cfg.impl, ("parallel",), cfg.num_warps),
      cost_estimate=cost_estimate(8 * n, rp, 2 * nbytes(xp) + nbytes(sp, bp) + 2 * rp * L * 4),
      interpret=cfg.interpret_arg(), name=f"lepton_{cfg.kind}_norm_fwd",
  )(xp, sp, bp)
  return y[: x2.shape[0], : cfg.features], mean, rstd


def _pallas_bwd(cfg, x2, scale, mean, rstd, dy):
  from jax.experimental import pallas as pl
  if cfg.gpu_flavor == "mosaic":
    dx, ds, db = mgpu().norm_bwd(x2, scale, mean, rstd, dy, kind=cfg.kind, features=cfg.features,
                                 interpret=mgpu_interpret(cfg.interpret),
                                 cost_estimate=_mgpu_cost(x2, True))
    return dx, ds.sum(0), db.sum(0)
  dp, br, rp = _prep(cfg, x2)
  L = stat_lanes(cfg.impl)
  xp = pad_axis(pad_axis(x2, 0, rp), 1, dp)
  dyp = pad_axis(pad_axis(dy, 0, rp), 1, dp)
  sp = pad_axis(scale, 0, dp).reshape(1, dp)
  nr = rp // br
  row = pl.BlockSpec((br, dp), lambda i: (i, 0))
  vec = pl.BlockSpec((1, dp), lambda i: (0, 0))
  stat = pl.BlockSpec((br, L), lambda i: (i, 0))
  part = pl.BlockSpec((None, 1, dp), lambda i: (i, 0, 0))
  dx, ds, db = fitted_pallas_call(
      functools.partial(_bwd_kernel, cfg=cfg), grid=(nr,),
      in_specs=[row, vec, row, stat, stat], out_specs=[row, part, part],
      out_shape=[jax.ShapeDtypeStruct((rp, dp), x2.dtype), jax.ShapeDtypeStruct((nr, 1, dp), jnp.float32),
                 jax.ShapeDtypeStruct((nr, 1, dp), jnp.float32)],
      **call_params(cfg.impl, ("parallel",), cfg.num_warps),
      cost_estimate=cost_estimate(14 * rp * dp, 0,
                                  3 * nbytes(xp) + nbytes(sp) + 2 * rp * L * 4 + 2 * nr * dp * 4),
      interpret=cfg.interpret_arg(), name=f"lepton_{cfg.kind}_norm_bwd",
  )(xp, sp, dyp, mean, rstd)
  d = cfg.features
  return dx[: x2.shape[0], :d], ds.sum((0, 1))[:d], db.sum((0, 1))[:d]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _norm_pallas(cfg, x2, scale, bias):
  return _pallas_fwd(cfg, x2, scale, bias)[0]


def _norm_fwd(cfg, x2, scale, bias):
  y, mean, rstd = _pallas_fwd(cfg, x2, scale, bias)
  return y, (x2, scale, bias, mean, rstd)


def _norm_bwd(cfg, res, dy):
  x2, scale, bias, mean, rstd = res
  dx, ds, db = _pallas_bwd(cfg, x2, scale, mean, rstd, dy)
  return dx, ds.astype(scale.dtype), db.astype(bias.dtype)


_norm_pallas.defvjp(_norm_fwd, _norm_bwd)


def _run(kind, api, x, scale, bias, eps, backend, block_sizes, tune_fn):
  check_array(api, "x", x, ndim=tuple(range(1, 9)))
  d = x.shape[-1]
  if not 1 <= d <= MAX_FEATURES:
    raise KernelError(f"{api}: the feature (last) axis of x has size {d}; supported 1..{MAX_FEATURES}")
  for name, p in (("scale", scale), ("bias", bias)):
    if p is None:
      continue
    check_array(api, name, p, ndim=1)
    if p.shape != (d,):
      raise KernelError(f"{api}: {name} must have shape ({d},) (the last axis of x), got {tuple(p.shape)}")
  try:
    eps = float(eps)
  except Exception:
    raise KernelError(f"{api}: eps must be a concrete Python float, got {type(eps).__name__}") from None
  if not eps >= 0:
    raise KernelError(f"{api}: eps must be >= 0, got {eps}")
  resolved = _registry.resolve_backend(backend, api=api)
  rows = int(x.size // d) if d else 0
  src = "explicit"
  if block_sizes is None:
    block_sizes = _autotune.lookup(tune_fn._lepton_tune_spec, (x,), {}, resolved.backend)
    src = "autotune-cache"
    if block_sizes is None:
      block_sizes, src = NormBlockSizes.get_default(features=d, rows=rows, impl=resolved.impl,
                                                    dtype=x.dtype), "default"
  if not isinstance(block_sizes, NormBlockSizes):
    raise KernelError(f"{api}: block_sizes must be a NormBlockSizes, got {type(block_sizes).__name__}")
  ok, reason = _legal(block_sizes, resolved.impl, d, rows, x.dtype)
  if not ok:
    raise KernelError(f"{api}: illegal block_sizes: {reason}")
  shapes, dtypes = shapes_dtypes(x, scale, bias)
  _registry.record(_registry.Dispatch(api, backend, resolved.backend, shapes, dtypes,
                                      dataclasses.asdict(block_sizes), src))
  if resolved.impl == "xla":
    if kind == "rms":
      return rms_norm_reference(x, scale, eps=eps)
    return layer_norm_reference(x, scale, bias, eps=eps)
  flavor = "triton"
  if (resolved.impl == "gpu" and _registry.use_mosaic(resolved.interpret)
      and mosaic_supported(rows, d, x.dtype)):
    flavor = "mosaic"
  cfg = _Cfg(kind, resolved.impl, "" if resolved.interpret is False else resolved.impl, eps, d,
             block_sizes.block_rows, block_sizes.num_warps, flavor)
  s = scale if scale is not None else jnp.ones((d,), jnp.float32)
  b = bias if bias is not None else jnp.zeros((d,), jnp.float32)
  y = _norm_pallas(cfg, x.reshape(rows, d), s, b)
  return y.reshape(x.shape)


def rms_norm(x, scale, *, eps: float = 1e-6, backend: str = "auto",
             block_sizes: NormBlockSizes | None = None):
  """RMS normalisation over the last axis: ``x * rsqrt(mean(x**2) + eps) * scale``.

  Args:
    x: ``[..., features]``, float32/bfloat16/float16 (statistics in float32).
    scale: ``[features]`` or None.
    eps: added to the mean square.
    backend: ``"auto" | "pallas_gpu" | "pallas_tpu" | "xla" | "interpret" | "interpret_tpu"``.
    block_sizes: :class:`NormBlockSizes` (default: autotune cache, else defaults).

  >>> import jax.numpy as jnp
  >>> rms_norm(jnp.ones((2, 8)), jnp.ones((8,)), backend="interpret").shape
  (2, 8)
  """
  return _run("rms", "rms_norm", x, scale, None, eps, backend, block_sizes, rms_norm)


def layer_norm(x, scale, bias, *, eps: float = 1e-6, backend: str = "auto",
               block_sizes: NormBlockSizes | None = None):
  """Layer normalisation over the last axis: ``(x - mean) * rsqrt(var + eps) * scale + bias``.

  Args:
    x: ``[..., features]``.
    scale: ``[features]`` or None.
    bias: ``[features]`` or None.
    eps: added to the variance.
    backend: as :func:`rms_norm`.
    block_sizes: :class:`NormBlockSizes`.

  >>> import jax.numpy as jnp
  >>> layer_norm(jnp.ones((2, 8)), jnp.ones((8,)), jnp.zeros((8,)), backend="xla").shape
  (2, 8)
  """
  return _run("ln", "layer_norm", x, scale, bias, eps, backend, block_sizes, layer_norm)


def _describe(args, kwargs):
  shapes, dtypes = shapes_dtypes(args[0])
  return shapes, dtypes, {}


def _cands(args, kwargs):
  return ([NormBlockSizes(br, nw) for br in (1, 2, 4, 8, 16, 32) for nw in (4, 8)]
          + [NormBlockSizes(br) for br in (64, 128, 256)])


def _is_legal(bs, args, kwargs):
  impl = _registry.resolve_backend(kwargs["backend"]).impl if "backend" in kwargs else "gpu"
  x = args[0]
  return _legal(bs, impl, x.shape[-1], int(x.size // max(1, x.shape[-1])), x.dtype)


def _fixed(args, kwargs):
  x = args[0]
  return _registry.mosaic_tiles_fixed(
      kwargs, mosaic_supported(int(x.size // max(1, x.shape[-1])), x.shape[-1], x.dtype))


rms_norm._lepton_tune_spec = _autotune.TuneSpec("rms_norm", NormBlockSizes, _describe, _cands, _is_legal,
                                                _fixed)
layer_norm._lepton_tune_spec = _autotune.TuneSpec("layer_norm", NormBlockSizes, _describe, _cands,
                                                  _is_legal, _fixed)
