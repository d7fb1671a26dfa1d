"""Softmax cross-entropy (integer labels) and the fused linear variant.

Neither implementation materialises an extra ``[N, V]`` array in the forward pass;
``linear_softmax_cross_entropy`` never materialises the ``[N, V]`` logits at all
(forward or backward): it walks the vocabulary in chunks with an online logsumexp.
"""

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
    TPU_VMEM_DEFAULT_BUDGET, tpu_vmem_bytes,
    call_params, fitted_pallas_call,
    interpret_arg, mgpu, mgpu_interpret,
    cdiv, check_array, compiler_params, cost_estimate, dot_nn, dot_nt, dot_tn, is_pow2, nbytes,
    next_pow2, pad_axis, round_up, shapes_dtypes, stat_lanes, sublanes)

__all__ = [
    "CEBlockSizes", "softmax_cross_entropy", "softmax_cross_entropy_reference",
    "linear_softmax_cross_entropy", "linear_softmax_cross_entropy_reference",
]


@dataclasses.dataclass(frozen=True)
class CEBlockSizes:
  """Tiles of the cross-entropy kernels: rows per program, vocabulary chunk.

  >>> CEBlockSizes.get_default().block_v
  512
  >>> CEBlockSizes.get_default(rows=8192, vocab=32000, impl="tpu")
  CEBlockSizes(block_rows=128, block_v=2048, num_warps=None)
  """
  block_rows: int = 16
  block_v: int = 512
  num_warps: int | None = None

  @classmethod
  def get_default(cls, *, rows: int | None = None, vocab: int | None = None,
                  impl: str = "gpu", dtype=None, features: int | None = None) -> "CEBlockSizes":
    """GPU: 16 x 512 tiles (registers). TPU: 128 x 2048 tiles (1 MiB float32 in VMEM), rows a
    multiple of the dtype's sublane tile, vocabulary chunk a multiple of 128 lanes; with
    ``features`` (the fused linear CE's D) the vocabulary chunk, then the rows, shrink until the
    [D, block_v] weight blocks fit the 16 MiB scoped VMEM (:func:`lce_tpu_vmem_estimate`)."""
    if impl == "tpu":
      dt = dtype or jnp.float32
      sub = sublanes(dt)
      br, bv = 128, 2048
      if rows is not None:
        br = max(sub, min(br, round_up(rows, sub)))
      if vocab is not None:
        bv = max(128, min(bv, round_up(vocab, 128)))
      if features is not None:
        while bv > 128 and lce_tpu_vmem_estimate(br, bv, features, dt) > TPU_VMEM_DEFAULT_BUDGET:
          bv //= 2
        bv = max(128, round_up(bv, 128))
        while br > sub and lce_tpu_vmem_estimate(br, bv, features, dt) > TPU_VMEM_DEFAULT_BUDGET:
          br = max(sub, round_up(br // 2, sub))
      return cls(br, bv)
    br, bv = 16, 512
    if rows is not None and br:
      br = max(16, min(br, next_pow2(rows)))
    if vocab is not None:
      bv = max(16, min(bv, next_pow2(vocab)))
    return cls(br, bv)


def lce_tpu_vmem_estimate(br: int, bv: int, d: int, dtype) -> int:
  """VMEM bytes of the largest fused linear-CE TPU kernel (forward, dx or dw): x [br, D] and
  w [D, bv] blocks double-buffered, plus the dx [br, D] / dw [D, bv] outputs and float32
  accumulators."""
  f32, i32 = jnp.float32, jnp.int32
  common = [((br, d), dtype), ((d, bv), dtype), ((br, 1), i32)]
  fwd = tpu_vmem_bytes(common + [((br, 128), f32)] * 2, [((br, 1), f32)] * 3)
  dx = tpu_vmem_bytes(common + [((br, 128), f32), ((br, 1), f32), ((br, d), dtype)], [((br, d), f32)])
  dw = tpu_vmem_bytes(common + [((br, 128), f32), ((br, 1), f32), ((d, bv), dtype)], [((d, bv), f32)])
  return max(fwd, dx, dw)


def _legal(bs, impl, dtype=None):
  if impl == "xla":
    if not isinstance(bs.block_v, int) or bs.block_v <= 0:
      return False, f"block_v={bs.block_v!r} must be a positive int"
    return True, ""
  if impl == "tpu":
    sub = sublanes(dtype or jnp.float32)
    if not isinstance(bs.block_rows, int) or bs.block_rows <= 0 or bs.block_rows % sub:
      return False, f"block_rows={bs.block_rows} must be a positive multiple of {sub} on TPU"
    if not isinstance(bs.block_v, int) or bs.block_v <= 0 or bs.block_v % 128:
      return False, f"block_v={bs.block_v} must be a positive multiple of 128 on TPU"
    return True, ""
  if not is_pow2(bs.block_rows) or not 16 <= bs.block_rows <= 256:
    return False, f"block_rows={bs.block_rows} must be a power of two in [16, 256]"
  if not is_pow2(bs.block_v) or not 16 <= bs.block_v <= 8192:
    return False, f"block_v={bs.block_v} must be a power of two in [16, 8192]"
  return True, ""


def mosaic_supported(rows: int, vocab: int, dtype) -> bool:
  """The Mosaic GPU cross-entropy serves rows and vocabularies that are multiples of 64
  (64-row tiles, vocabulary chunks of 64-256 columns: TMA boxes are <= 256 wide, and no padded
  copy of the logits is ever made). Otherwise (e.g. V = 50257): the Triton kernel."""
  return (rows > 0 and rows % 64 == 0 and vocab % 64 == 0
          and jnp.dtype(dtype) in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)))


def softmax_cross_entropy_reference(logits, labels):
  """``logsumexp(logits) - logits[label]`` per example, float32."""
  lf = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(lf, axis=-1)
  ll = jnp.take_along_axis(lf, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return lse - ll


def linear_softmax_cross_entropy_reference(x, w, labels):
  """``softmax_cross_entropy_reference(x @ w, labels)`` (materialises the logits)."""
  logits = jnp.dot(x, w, preferred_element_type=jnp.float32)
  return softmax_cross_entropy_reference(logits, labels)


@dataclasses.dataclass(frozen=True)
class _Cfg:
  impl: str
  interpret: str
  vocab: int
  block_rows: int
  block_v: int
  num_warps: int | None
  gpu_flavor: str = "triton"   # "mosaic": the Mosaic GPU kernels (sm_90+)

  def interpret_arg(self):
    return interpret_arg(self.interpret)


def _onehot(labels, j, bv):
  return labels[:, None] == (j * bv + jnp.arange(bv))[None, :]


def _mask_cols(cfg, s, j, bv, padded):
  if padded:
    s = jnp.where((j * bv + jnp.arange(bv))[None, :] < cfg.vocab, s, -jnp.inf)
  return s


# ----------------------------------------------------------------------------- plain CE kernels
# Grid (row blocks, vocabulary chunks) over the unpadded logits: edge blocks are partial and
# their out-of-range columns are masked by index, so no padded [N, V] copy is ever made.
# TPU: the vocabulary axis is "arbitrary" and an online logsumexp lives in VMEM scratch.
# GPU (Triton, whose grid is parallel only): every chunk writes its (max, sum-exp, label
# logit) partials, combined in XLA ([V / block_v, N] floats).

def _ce_tile(cfg, x_ref, lab_ref, j, bv):
  s = x_ref[...].astype(jnp.float32)
  col = j * bv + lax.broadcasted_iota(jnp.int32, s.shape, 1)
  s = jnp.where(col < cfg.vocab, s, -jnp.inf)
  return s, col == lab_ref[...]


def _ce_fwd_tpu_kernel(x_ref, lab_ref, loss_ref, lse_ref, m_sc, l_sc, ll_sc, *, cfg, nv):
  from jax.experimental import pallas as pl
  j = pl.program_id(1)

  @pl.when(j == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    ll_sc[...] = jnp.zeros(ll_sc.shape, jnp.float32)

  s, hit = _ce_tile(cfg, x_ref, lab_ref, j, cfg.block_v)
  ll_sc[...] += jnp.sum(jnp.where(hit, s, 0.0), axis=-1, keepdims=True)
  m_prev = m_sc[...]
  m_new = jnp.maximum(m_prev, jnp.max(s, axis=-1, keepdims=True))
  l_sc[...] = l_sc[...] * jnp.exp(m_prev - m_new) + jnp.sum(jnp.exp(s - m_new), axis=-1, keepdims=True)
  m_sc[...] = m_new

  @pl.when(j == nv - 1)
  def _done():
    lse = m_sc[...] + jnp.log(l_sc[...])
    lse_ref[...] = jnp.broadcast_to(lse, lse_ref.shape)
    loss_ref[...] = jnp.broadcast_to(lse - ll_sc[...], loss_ref.shape)


def _ce_fwd_part_kernel(x_ref, lab_ref, m_ref, l_ref, ll_ref, *, cfg):
  from jax.experimental import pallas as pl
  s, hit = _ce_tile(cfg, x_ref, lab_ref, pl.program_id(1), cfg.block_v)
  m = jnp.max(s, axis=-1, keepdims=True)
  m_ref[...] = m
  l_ref[...] = jnp.sum(jnp.exp(s - m), axis=-1, keepdims=True)
  ll_ref[...] = jnp.sum(jnp.where(hit, s, 0.0), axis=-1, keepdims=True)


def _ce_bwd_kernel(x_ref, lab_ref, lse_ref, g_ref, dx_ref, *, cfg):
  from jax.experimental import pallas as pl
  s, hit = _ce_tile(cfg, x_ref, lab_ref, pl.program_id(1), cfg.block_v)
  lse = lse_ref[...]
  if lse.shape[-1] != 1:
    lse = lse[:, :1]
  p = jnp.exp(s - lse) - hit.astype(jnp.float32)
  dx_ref[...] = (p * g_ref[...]).astype(dx_ref.dtype)


def _ce_grid(cfg, n, v):
  return cdiv(n, cfg.block_rows), cdiv(v, cfg.block_v)


def _ce_pallas_fwd(cfg, logits, labels):
  """Returns the loss [N] and the logsumexp as [N, L] (L = 128 lanes on TPU, 1 on GPU;
  [N] from the Mosaic GPU kernel)."""
  from jax.experimental import pallas as pl
  n, v = logits.shape
  if cfg.gpu_flavor == "mosaic":
    return mgpu().ce_fwd(logits, labels, interpret=mgpu_interpret(cfg.interpret),
                         cost_estimate=cost_estimate(4 * n * v, n * v, nbytes(logits) + 12 * n))
  br, bv = cfg.block_rows, cfg.block_v
  nr, nv = _ce_grid(cfg, n, v)
  lab = labels.reshape(n, 1)
  x_spec = pl.BlockSpec((br, bv), lambda i, j: (i, j))
  lab_spec = pl.BlockSpec((br, 1), lambda i, j: (i, 0))
  cost = cost_estimate(4 * n * v, n * v, nbytes(logits, lab) + 8 * n)
  if cfg.impl == "tpu":
    from jax.experimental.pallas import tpu as pltpu
    L = stat_lanes("tpu")
    out = pl.BlockSpec((br, L), lambda i, j: (i, 0))
    loss, lse = fitted_pallas_call(
        functools.partial(_ce_fwd_tpu_kernel, cfg=cfg, nv=nv), grid=(nr, nv),
        in_specs=[x_spec, lab_spec], out_specs=[out, out],
        out_shape=[jax.ShapeDtypeStruct((n, L), jnp.float32)] * 2,
        scratch_shapes=[pltpu.VMEM((br, 1), jnp.float32)] * 3,
        **call_params("tpu", ("parallel", "arbitrary")),
        cost_estimate=cost, interpret=cfg.interpret_arg(), name="lepton_softmax_ce_fwd",
    )(logits, lab)
    return loss[:, 0], lse
  part = pl.BlockSpec((None, br, 1), lambda i, j: (j, i, 0))
  m, l, ll = fitted_pallas_call(
      functools.partial(_ce_fwd_part_kernel, cfg=cfg), grid=(nr, nv),
      in_specs=[x_spec, lab_spec], out_specs=[part] * 3,
      out_shape=[jax.ShapeDtypeStruct((nv, n, 1), jnp.float32)] * 3,
      **call_params(cfg.impl, ("parallel", "parallel"), cfg.num_warps),
      cost_estimate=cost, interpret=cfg.interpret_arg(), name="lepton_softmax_ce_fwd",
  )(logits, lab)
  mx = jnp.max(m, axis=0)
  lse = mx + jnp.log(jnp.sum(l * jnp.exp(m - mx), axis=0))     # [N, 1]
  return (lse - jnp.sum(ll, axis=0))[:, 0], lse


def _ce_pallas_bwd(cfg, logits, labels, lse, g):
  from jax.experimental import pallas as pl
  n, v = logits.shape
  if cfg.gpu_flavor == "mosaic":
    return mgpu().ce_bwd(logits, labels, lse, g.astype(jnp.float32),
                         interpret=mgpu_interpret(cfg.interpret),
                         cost_estimate=cost_estimate(4 * n * v, n * v, 2 * nbytes(logits) + 12 * n))
  br, bv = cfg.block_rows, cfg.block_v
  nr, nv = _ce_grid(cfg, n, v)
  L = lse.shape[-1]
  x_spec = pl.BlockSpec((br, bv), lambda i, j: (i, j))
  col = pl.BlockSpec((br, 1), lambda i, j: (i, 0))
  sem = ("parallel", "parallel")
  return fitted_pallas_call(
      functools.partial(_ce_bwd_kernel, cfg=cfg), grid=(nr, nv),
      in_specs=[x_spec, col, pl.BlockSpec((br, L), lambda i, j: (i, 0)), col], out_specs=x_spec,
      out_shape=jax.ShapeDtypeStruct((n, v), logits.dtype),
      **call_params(cfg.impl, sem, cfg.num_warps),
      cost_estimate=cost_estimate(4 * n * v, n * v, 2 * nbytes(logits) + 4 * n * (L + 2)),
      interpret=cfg.interpret_arg(), name="lepton_softmax_ce_bwd",
  )(logits, labels.reshape(n, 1), lse, g.astype(jnp.float32).reshape(n, 1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ce(cfg, logits, labels):
  return _ce_pallas_fwd(cfg, logits, labels)[0]


def _ce_fwd(cfg, logits, labels):
  loss, lse = _ce_pallas_fwd(cfg, logits, labels)
  return loss, (logits, labels, lse)


def _ce_bwd(cfg, res, g):
  logits, labels, lse = res
  return _ce_pallas_bwd(cfg, logits, labels, lse, g), None


_ce.defvjp(_ce_fwd, _ce_bwd)


# ----------------------------------------------------------------------------- fused linear CE

def _lce_fwd_kernel(x_ref, w_ref, lab_ref, loss_ref, lse_ref, *, cfg, nv, padded):
  from jax.experimental import pallas as pl
  x = x_ref[...]
  labels = lab_ref[...]
  br = labels.shape[0]
  bv = cfg.block_v

  def body(j, carry):
    m, l, ll = carry
    s = dot_nn(x, w_ref[:, pl.ds(pl.multiple_of(j * bv, bv), bv)])
    s = _mask_cols(cfg, s, j, bv, padded)
    ll = ll + jnp.sum(jnp.where(_onehot(labels, j, bv), s, 0.0), axis=-1)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    l = l * jnp.exp(m - m_new) + jnp.sum(jnp.exp(s - m_new[:, None]), axis=-1)
    return m_new, l, ll

  init = (jnp.full((br,), -jnp.inf, jnp.float32), jnp.zeros((br,), jnp.float32),
          jnp.zeros((br,), jnp.float32))
  m, l, ll = lax.fori_loop(0, nv, body, init)
  lse = m + jnp.log(l)
  lse_ref[...] = lse
  loss_ref[...] = lse - ll


def _lce_dx_kernel(x_ref, w_ref, lab_ref, lse_ref, g_ref, dx_ref, *, cfg, nv, padded):
  from jax.experimental import pallas as pl
  x = x_ref[...]
  labels = lab_ref[...]
  lse = lse_ref[...]
  g = g_ref[...]
  bv = cfg.block_v

  def body(j, dx):
    wj = w_ref[:, pl.ds(pl.multiple_of(j * bv, bv), bv)]
    s = _mask_cols(cfg, dot_nn(x, wj), j, bv, padded)
    p = (jnp.exp(s - lse[:, None]) - _onehot(labels, j, bv).astype(jnp.float32)) * g[:, None]
    return dx + dot_nt(p.astype(wj.dtype), wj)

  dx = lax.fori_loop(0, nv, body, jnp.zeros(x.shape, jnp.float32))
  dx_ref[...] = dx.astype(dx_ref.dtype)


def _lce_dw_kernel(x_ref, w_ref, lab_ref, lse_ref, g_ref, dw_ref, *, cfg, nr, padded):
  from jax.experimental import pallas as pl
  j = pl.program_id(0)
  wj = w_ref[...]
  bv = cfg.block_v
  br = cfg.block_rows

  def body(i, dw):
    rows = pl.ds(pl.multiple_of(i * br, br), br)
    x = x_ref[rows, :]
    labels = lab_ref[rows]
    s = _mask_cols(cfg, dot_nn(x, wj), j, bv, padded)
    p = (jnp.exp(s - lse_ref[rows][:, None]) - _onehot(labels, j, bv).astype(jnp.float32))
    p = p * g_ref[rows][:, None]
    return dw + dot_tn(x, p.astype(x.dtype))

  dw = lax.fori_loop(0, nr, body, jnp.zeros(wj.shape, jnp.float32))
  dw_ref[...] = dw.astype(dw_ref.dtype)


def _lce_dims(cfg, x, w):
  n, d = x.shape
  br, bv = cfg.block_rows, cfg.block_v
  dp = round_up(d, 128) if cfg.impl == "tpu" else max(16, next_pow2(d))
  return n, d, br, bv, round_up(n, br), round_up(cfg.vocab, bv), dp


def _lce_pallas_fwd(cfg, x, w, labels):
  from jax.experimental import pallas as pl
  n, d, br, bv, rp, vp, dp = _lce_dims(cfg, x, w)
  xp = pad_axis(pad_axis(x, 0, rp), 1, dp)
  wp = pad_axis(pad_axis(w, 0, dp), 1, vp)
  r1 = pl.BlockSpec((br,), lambda i: (i,))
  loss, lse = fitted_pallas_call(
      functools.partial(_lce_fwd_kernel, cfg=cfg, nv=vp // bv, padded=vp != cfg.vocab),
      grid=(rp // br,),
      in_specs=[pl.BlockSpec((br, dp), lambda i: (i, 0)), pl.BlockSpec((dp, vp), lambda i: (0, 0)), r1],
      out_specs=[r1, r1], out_shape=[jax.ShapeDtypeStruct((rp,), jnp.float32)] * 2,
      **call_params(cfg.impl, ("parallel",), cfg.num_warps),
      interpret=cfg.interpret_arg(), name="lepton_linear_ce_fwd",
  )(xp, wp, pad_axis(labels, 0, rp))
  return loss[:n], lse


def _lce_pallas_bwd(cfg, x, w, labels, lse, g):
  from jax.experimental import pallas as pl
  n, d, br, bv, rp, vp, dp = _lce_dims(cfg, x, w)
  xp = pad_axis(pad_axis(x, 0, rp), 1, dp)
  wp = pad_axis(pad_axis(w, 0, dp), 1, vp)
  lp = pad_axis(labels, 0, rp)
  gp = pad_axis(g.astype(jnp.float32), 0, rp)   # padded rows get zero weight
  padded = vp != cfg.vocab
  r1 = pl.BlockSpec((br,), lambda i: (i,))
  dx = fitted_pallas_call(
      functools.partial(_lce_dx_kernel, cfg=cfg, nv=vp // bv, padded=padded), grid=(rp // br,),
      in_specs=[pl.BlockSpec((br, dp), lambda i: (i, 0)), pl.BlockSpec((dp, vp), lambda i: (0, 0)),
                r1, r1, r1],
      out_specs=pl.BlockSpec((br, dp), lambda i: (i, 0)),
      out_shape=jax.ShapeDtypeStruct((rp, dp), x.dtype),
      **call_params(cfg.impl, ("parallel",), cfg.num_warps),
      interpret=cfg.interpret_arg(), name="lepton_linear_ce_dx",
  )(xp, wp, lp, lse, gp)
  full = pl.BlockSpec((rp,), lambda j: (0,))
  dw = fitted_pallas_call(
      functools.partial(_lce_dw_kernel, cfg=cfg, nr=rp // br, padded=padded), grid=(vp // bv,),
      in_specs=[pl.BlockSpec((rp, dp), lambda j: (0, 0)), pl.BlockSpec((dp, bv), lambda j: (0, j)),
                full, full, full],
      out_specs=pl.BlockSpec((dp, bv), lambda j: (0, j)),
      out_shape=jax.ShapeDtypeStruct((dp, vp), w.dtype),
      **call_params(cfg.impl, ("parallel",), cfg.num_warps),
      interpret=cfg.interpret_arg(), name="lepton_linear_ce_dw",
  )(xp, wp, lp, lse, gp)
  return dx[:n, :d], dw[:d, : cfg.vocab]


# TPU: grids whose sequential ("arbitrary") axis walks the vocabulary (forward, dx) or the
# rows (dw) with float32 accumulators in VMEM scratch, so a block holds [block_rows, D] of x
# and [D, block_v] of w -- never the whole [D, V] weight. Rows and vocabulary are padded to
# the tiles (copies of x / w, never an [N, V] array); statistics are [N, 128] lane-dense.

def _lce_tpu_fwd_kernel(x_ref, w_ref, lab_ref, loss_ref, lse_ref, m_sc, l_sc, ll_sc, *, cfg, nv, padded):
  from jax.experimental import pallas as pl
  j = pl.program_id(1)

  @pl.when(j == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    ll_sc[...] = jnp.zeros(ll_sc.shape, jnp.float32)

  bv = cfg.block_v
  s = dot_nn(x_ref[...], w_ref[...])
  col = j * bv + lax.broadcasted_iota(jnp.int32, s.shape, 1)
  if padded:
    s = jnp.where(col < cfg.vocab, s, -jnp.inf)
  ll_sc[...] += jnp.sum(jnp.where(col == lab_ref[...], s, 0.0), axis=-1, keepdims=True)
  m_prev = m_sc[...]
  m_new = jnp.maximum(m_prev, jnp.max(s, axis=-1, keepdims=True))
  l_sc[...] = l_sc[...] * jnp.exp(m_prev - m_new) + jnp.sum(jnp.exp(s - m_new), axis=-1, keepdims=True)
  m_sc[...] = m_new

  @pl.when(j == nv - 1)
  def _done():
    lse = m_sc[...] + jnp.log(l_sc[...])
    lse_ref[...] = jnp.broadcast_to(lse, lse_ref.shape)
    loss_ref[...] = jnp.broadcast_to(lse - ll_sc[...], loss_ref.shape)


def _lce_tpu_probs(cfg, x, wj, lab, lse, g, j, padded):
  s = dot_nn(x, wj)
  col = j * cfg.block_v + lax.broadcasted_iota(jnp.int32, s.shape, 1)
  p = jnp.exp(s - lse[:, :1]) - (col == lab).astype(jnp.float32)
  if padded:
    p = jnp.where(col < cfg.vocab, p, 0.0)
  return p * g


def _lce_tpu_dx_kernel(x_ref, w_ref, lab_ref, lse_ref, g_ref, dx_ref, acc_sc, *, cfg, nv, padded):
  from jax.experimental import pallas as pl
  j = pl.program_id(1)

  @pl.when(j == 0)
  def _init():
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  wj = w_ref[...]
  p = _lce_tpu_probs(cfg, x_ref[...], wj, lab_ref[...], lse_ref[...], g_ref[...], j, padded)
  acc_sc[...] += dot_nt(p.astype(wj.dtype), wj)

  @pl.when(j == nv - 1)
  def _done():
    dx_ref[...] = acc_sc[...].astype(dx_ref.dtype)


def _lce_tpu_dw_kernel(x_ref, w_ref, lab_ref, lse_ref, g_ref, dw_ref, acc_sc, *, cfg, nr, padded):
  from jax.experimental import pallas as pl
  j, i = pl.program_id(0), pl.program_id(1)

  @pl.when(i == 0)
  def _init():
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  x = x_ref[...]
  p = _lce_tpu_probs(cfg, x, w_ref[...], lab_ref[...], lse_ref[...], g_ref[...], j, padded)
  acc_sc[...] += dot_tn(x, p.astype(x.dtype))

  @pl.when(i == nr - 1)
  def _done():
    dw_ref[...] = acc_sc[...].astype(dw_ref.dtype)


def _lce_tpu_fwd(cfg, x, w, labels):
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import tpu as pltpu
  n, d, br, bv, rp, vp, dp = _lce_dims(cfg, x, w)
  L = stat_lanes("tpu")
  xp = pad_axis(x, 0, rp)
  wp = pad_axis(w, 1, vp)
  lab = pad_axis(labels, 0, rp).reshape(rp, 1)
  nr, nv = rp // br, vp // bv
  out = pl.BlockSpec((br, L), lambda i, j: (i, 0))
  loss, lse = fitted_pallas_call(
      functools.partial(_lce_tpu_fwd_kernel, cfg=cfg, nv=nv, padded=vp != cfg.vocab), grid=(nr, nv),
      in_specs=[pl.BlockSpec((br, d), lambda i, j: (i, 0)), pl.BlockSpec((d, bv), lambda i, j: (0, j)),
                pl.BlockSpec((br, 1), lambda i, j: (i, 0))],
      out_specs=[out, out], out_shape=[jax.ShapeDtypeStruct((rp, L), jnp.float32)] * 2,
      scratch_shapes=[pltpu.VMEM((br, 1), jnp.float32)] * 3,
      **call_params("tpu", ("parallel", "arbitrary")),
      cost_estimate=cost_estimate(2 * n * d * cfg.vocab, n * cfg.vocab, nbytes(x, w) + 8 * n),
      interpret=cfg.interpret_arg(), name="lepton_linear_ce_fwd",
  )(xp, wp, lab)
  return loss[:n, 0], lse


def _lce_tpu_bwd(cfg, x, w, labels, lse, g):
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import tpu as pltpu
  n, d, br, bv, rp, vp, dp = _lce_dims(cfg, x, w)
  L = lse.shape[-1]
  xp = pad_axis(x, 0, rp)
  wp = pad_axis(w, 1, vp)
  lab = pad_axis(labels, 0, rp).reshape(rp, 1)
  gp = pad_axis(g.astype(jnp.float32), 0, rp).reshape(rp, 1)   # padded rows get zero weight
  nr, nv = rp // br, vp // bv
  padded = vp != cfg.vocab
  cost = cost_estimate(4 * n * d * cfg.vocab, n * cfg.vocab, 2 * nbytes(x, w) + 12 * n)
  # dx: grid (row block i, vocab block j), j arbitrary
  dx = fitted_pallas_call(
      functools.partial(_lce_tpu_dx_kernel, cfg=cfg, nv=nv, padded=padded), grid=(nr, nv),
      in_specs=[pl.BlockSpec((br, d), lambda i, j: (i, 0)), pl.BlockSpec((d, bv), lambda i, j: (0, j)),
                pl.BlockSpec((br, 1), lambda i, j: (i, 0)), pl.BlockSpec((br, L), lambda i, j: (i, 0)),
                pl.BlockSpec((br, 1), lambda i, j: (i, 0))],
      out_specs=pl.BlockSpec((br, d), lambda i, j: (i, 0)),
      out_shape=jax.ShapeDtypeStruct((rp, d), x.dtype),
      scratch_shapes=[pltpu.VMEM((br, d), jnp.float32)],
      **call_params("tpu", ("parallel", "arbitrary")),
      cost_estimate=cost, interpret=cfg.interpret_arg(), name="lepton_linear_ce_dx",
  )(xp, wp, lab, lse, gp)
  # dw: grid (vocab block j, row block i), i arbitrary
  dw = fitted_pallas_call(
      functools.partial(_lce_tpu_dw_kernel, cfg=cfg, nr=nr, padded=padded), grid=(nv, nr),
      in_specs=[pl.BlockSpec((br, d), lambda j, i: (i, 0)), pl.BlockSpec((d, bv), lambda j, i: (0, j)),
                pl.BlockSpec((br, 1), lambda j, i: (i, 0)), pl.BlockSpec((br, L), lambda j, i: (i, 0)),
                pl.BlockSpec((br, 1), lambda j, i: (i, 0))],
      out_specs=pl.BlockSpec((d, bv), lambda j, i: (0, j)),
      out_shape=jax.ShapeDtypeStruct((d, vp), w.dtype),
      scratch_shapes=[pltpu.VMEM((d, bv), jnp.float32)],
      **call_params("tpu", ("parallel", "arbitrary")),
      cost_estimate=cost, interpret=cfg.interpret_arg(), name="lepton_linear_ce_dw",
  )(xp, wp, lab, lse, gp)
  return dx[:n], dw[:, : cfg.vocab]


def _lce_xla_chunks(cfg, w):
  bv = min(cfg.block_v, cfg.vocab)
  vp = round_up(cfg.vocab, bv)
  return bv, vp // bv, pad_axis(w, 1, vp), vp != cfg.vocab


def _lce_xla_fwd(cfg, x, w, labels):
  n = x.shape[0]
  bv, nv, wp, padded = _lce_xla_chunks(cfg, w)

  def body(j, carry):
    m, l, ll = carry
    wj = lax.dynamic_slice_in_dim(wp, j * bv, bv, axis=1)
    s = _mask_cols(cfg, jnp.dot(x, wj, preferred_element_type=jnp.float32), j, bv, padded)
    ll = ll + jnp.sum(jnp.where(_onehot(labels, j, bv), s, 0.0), axis=-1)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    l = l * jnp.exp(m - m_new) + jnp.sum(jnp.exp(s - m_new[:, None]), axis=-1)
    return m_new, l, ll

  init = (jnp.full((n,), -jnp.inf, jnp.float32), jnp.zeros((n,), jnp.float32), jnp.zeros((n,), jnp.float32))
  m, l, ll = lax.fori_loop(0, nv, body, init)
  lse = m + jnp.log(l)
  return lse - ll, lse


def _lce_xla_bwd(cfg, x, w, labels, lse, g):
  bv, nv, wp, padded = _lce_xla_chunks(cfg, w)
  gf = g.astype(jnp.float32)

  def body(j, carry):
    dx, dw = carry
    wj = lax.dynamic_slice_in_dim(wp, j * bv, bv, axis=1)
    s = _mask_cols(cfg, jnp.dot(x, wj, preferred_element_type=jnp.float32), j, bv, padded)
    p = (jnp.exp(s - lse[:, None]) - _onehot(labels, j, bv).astype(jnp.float32)) * gf[:, None]
    dx = dx + jnp.dot(p.astype(wj.dtype), wj.T, preferred_element_type=jnp.float32)
    dwj = jnp.dot(x.T, p.astype(x.dtype), preferred_element_type=jnp.float32).astype(w.dtype)
    return dx, lax.dynamic_update_slice_in_dim(dw, dwj, j * bv, axis=1)

  dx, dw = lax.fori_loop(0, nv, body, (jnp.zeros(x.shape, jnp.float32), jnp.zeros(wp.shape, w.dtype)))
  return dx.astype(x.dtype), dw[:, : cfg.vocab]


def _lce_impl(cfg, xla, tpu, gpu):
  return xla if cfg.impl == "xla" else tpu if cfg.impl == "tpu" else gpu


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _lce(cfg, x, w, labels):
  f = _lce_impl(cfg, _lce_xla_fwd, _lce_tpu_fwd, _lce_pallas_fwd)
  return f(cfg, x, w, labels)[0]


def _lce_fwd(cfg, x, w, labels):
  f = _lce_impl(cfg, _lce_xla_fwd, _lce_tpu_fwd, _lce_pallas_fwd)
  loss, lse = f(cfg, x, w, labels)
  return loss, (x, w, labels, lse)


def _lce_bwd(cfg, res, g):
  x, w, labels, lse = res
  f = _lce_impl(cfg, _lce_xla_bwd, _lce_tpu_bwd, _lce_pallas_bwd)
  dx, dw = f(cfg, x, w, labels, lse, g)
  return dx, dw, None


_lce.defvjp(_lce_fwd, _lce_bwd)


# ----------------------------------------------------------------------------- public

def _check_labels(api, labels, batch_shape, vocab):
  check_array(api, "labels", labels, integer=True)
  if tuple(labels.shape) != tuple(batch_shape):
    raise KernelError(f"{api}: labels must have shape {tuple(batch_shape)} (the batch axes), "
                      f"got {tuple(labels.shape)}")
  try:
    arr = np.asarray(labels)
  except Exception:  # traced: cannot check values eagerly
    return
  if arr.size and (arr.min() < 0 or arr.max() >= vocab):
    raise KernelError(f"{api}: labels must lie in [0, {vocab}) (the vocabulary size), "
                      f"got values in [{arr.min()}, {arr.max()}]")


def _blocks(api, tune_fn, args, kwargs, block_sizes, resolved, rows, vocab):
  src = "explicit"
  if block_sizes is None:
    block_sizes = _autotune.lookup(tune_fn._lepton_tune_spec, args, kwargs, resolved.backend)
    src = "autotune-cache"
    if block_sizes is None:
      features = args[0].shape[-1] if len(args) > 1 else None     # fused linear CE: x [.., D]
      block_sizes, src = CEBlockSizes.get_default(rows=rows, vocab=vocab, impl=resolved.impl,
                                                  dtype=args[0].dtype, features=features), "default"
  if not isinstance(block_sizes, CEBlockSizes):
    raise KernelError(f"{api}: block_sizes must be a CEBlockSizes, got {type(block_sizes).__name__}")
  ok, reason = _legal(block_sizes, resolved.impl, args[0].dtype)
  if not ok:
    raise KernelError(f"{api}: illegal block_sizes for backend {resolved.backend!r}: {reason}")
  return block_sizes, src


def softmax_cross_entropy(logits, labels, *, backend: str = "auto",
                          block_sizes: CEBlockSizes | None = None):
  """Per-example softmax cross-entropy with integer labels.

  Equals ``optax.softmax_cross_entropy_with_integer_labels`` (float32 result).
  The forward pass keeps only ``[N]`` statistics (no ``[N, V]`` temporary); the
  backward pass writes the logits gradient directly.

  Args:
    logits: ``[..., V]`` float32/bfloat16/float16.
    labels: ``[...]`` integers in ``[0, V)``.
    backend: ``"auto" | "pallas_gpu" | "pallas_tpu" | "xla" | "interpret" | "interpret_tpu"``.
    block_sizes: :class:`CEBlockSizes`.

  >>> import jax.numpy as jnp
  >>> softmax_cross_entropy(jnp.zeros((2, 4)), jnp.array([0, 3]), backend="xla").round(4)
  Array([1.3863, 1.3863], dtype=float32)
  """
  api = "softmax_cross_entropy"
  check_array(api, "logits", logits, ndim=tuple(range(1, 9)))
  v = logits.shape[-1]
  if v < 1:
    raise KernelError(f"{api}: the vocabulary (last) axis of logits must be >= 1, got {v}")
  _check_labels(api, labels, logits.shape[:-1], v)
  resolved = _registry.resolve_backend(backend, api=api)
  n = int(np.prod(logits.shape[:-1], dtype=np.int64))
  bs, src = _blocks(api, softmax_cross_entropy, (logits,), {}, block_sizes, resolved, n, v)
  shapes, dtypes = shapes_dtypes(logits, labels)
  _registry.record(_registry.Dispatch(api, backend, resolved.backend, shapes, dtypes,
                                      dataclasses.asdict(bs), src))
  if resolved.impl == "xla":
    # The plain-jnp formulation: XLA fuses the logsumexp reduction (no [N, V] temporary in
    # the forward) and its autodiff is what optax does, measured no slower than a custom
    # chunked implementation on CPU (benchmarks/results/kernels_cpu.json).
    return softmax_cross_entropy_reference(logits, labels)
  flavor = "triton"
  if resolved.impl == "gpu" and _registry.use_mosaic(resolved.interpret) and mosaic_supported(n, v, logits.dtype):
    flavor = "mosaic"
  cfg = _Cfg(resolved.impl, "" if resolved.interpret is False else resolved.impl, v,
             bs.block_rows, bs.block_v, bs.num_warps, flavor)
  loss = _ce(cfg, logits.reshape(n, v), labels.reshape(n).astype(jnp.int32))
  return loss.reshape(logits.shape[:-1])


def linear_softmax_cross_entropy(x, w, labels, *, backend: str = "auto",
                                 block_sizes: CEBlockSizes | None = None):
  """Per-example cross-entropy of ``x @ w`` without materialising the ``[N, V]`` logits.

  Args:
    x: ``[..., D]`` features.
    w: ``[D, V]`` output projection (same dtype as ``x``).
    labels: ``[...]`` integers in ``[0, V)``.
    backend: as :func:`softmax_cross_entropy`.
    block_sizes: :class:`CEBlockSizes` (``block_v`` = vocabulary chunk).

  >>> import jax.numpy as jnp
  >>> linear_softmax_cross_entropy(jnp.ones((2, 8)), jnp.zeros((8, 4)), jnp.array([0, 3]),
  ...                              backend="xla").round(4)
  Array([1.3863, 1.3863], dtype=float32)
  """
  api = "linear_softmax_cross_entropy"
  check_array(api, "x", x, ndim=tuple(range(1, 9)))
  check_array(api, "w", w, ndim=2)
  d = x.shape[-1]
  if w.shape[0] != d:
    raise KernelError(f"{api}: w must have shape [D, V] with D={d} (the last axis of x), got {tuple(w.shape)}")
  if x.dtype != w.dtype:
    raise KernelError(f"{api}: x and w must share a dtype, got x={x.dtype}, w={w.dtype}")
  v = w.shape[1]
  if v < 1 or d < 1:
    raise KernelError(f"{api}: D and V must be >= 1, got D={d}, V={v}")
  _check_labels(api, labels, x.shape[:-1], v)
  resolved = _registry.resolve_backend(backend, api=api)
  n = int(np.prod(x.shape[:-1], dtype=np.int64))
  bs, src = _blocks(api, linear_softmax_cross_entropy, (x, w), {}, block_sizes, resolved, n, v)
  shapes, dtypes = shapes_dtypes(x, w, labels)
  _registry.record(_registry.Dispatch(api, backend, resolved.backend, shapes, dtypes,
                                      dataclasses.asdict(bs), src))
  cfg = _Cfg(resolved.impl, "" if resolved.interpret is False else resolved.impl, v,
             bs.block_rows, bs.block_v, bs.num_warps)
  loss = _lce(cfg, x.reshape(n, d), w, labels.reshape(n).astype(jnp.int32))
  return loss.reshape(x.shape[:-1])


def _describe(args, kwargs):
  shapes, dtypes = shapes_dtypes(*args[:2] if len(args) > 1 and args[1].ndim == 2 else args[:1])
  return shapes, dtypes, {}


def _cands(args, kwargs):
  gpu = [CEBlockSizes(br, bv, nw) for br in (16, 32, 64) for bv in (128, 256, 512, 1024) for nw in (4, 8)]
  tpu = [CEBlockSizes(br, bv) for br in (64, 128, 256) for bv in (512, 1024, 2048)]   # also legal on GPU
  return gpu + [c for c in tpu if c.block_rows > 64 or c.block_v > 1024]


def _is_legal(bs, args, kwargs):
  impl = _registry.resolve_backend(kwargs["backend"]).impl if "backend" in kwargs else "gpu"
  return _legal(bs, impl, args[0].dtype)


def _fixed(args, kwargs):
  lg = args[0]
  return _registry.mosaic_tiles_fixed(
      kwargs, mosaic_supported(int(lg.size // max(1, lg.shape[-1])), lg.shape[-1], lg.dtype))


softmax_cross_entropy._lepton_tune_spec = _autotune.TuneSpec(
    "softmax_cross_entropy", CEBlockSizes, _describe, _cands, _is_legal, _fixed)
linear_softmax_cross_entropy._lepton_tune_spec = _autotune.TuneSpec(
    "linear_softmax_cross_entropy", CEBlockSizes, _describe, _cands, _is_legal)
