"""Flash attention: reference, blockwise XLA, Pallas GPU / TPU kernels, custom_vjp.

Layout follows ``jax.nn.dot_product_attention``: ``[batch, seq, heads, head_dim]``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from lepton_jax._errors import KernelError
from lepton_jax.pallas_kernels import _autotune
from lepton_jax.pallas_kernels import _registry
from lepton_jax.pallas_kernels._common import (
    call_params, fitted_pallas_call,
    mgpu_attention, mgpu_interpret,
    interpret_arg,
    FLOAT_DTYPES, FLOAT_NAMES, GPU_SMEM_BYTES, MASK_VALUE, STAT_LANES_TPU, cdiv, check_array,
    compiler_params, cost_estimate, dot_nn, dot_nt, dot_tn, is_pow2, nbytes, next_pow2, pad_axis,
    round_up, shapes_dtypes)

__all__ = ["BlockSizes", "flash_attention", "flash_attention_reference"]

MAX_HEAD_DIM = 256
_API = "flash_attention"


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes of the attention kernels.

  Attributes:
    block_q: query rows per program (forward and dq backward kernel).
    block_k: key rows per inner step (forward and dq backward kernel).
    block_q_bwd: query rows per inner step of the dk/dv backward kernel.
    block_k_bwd: key rows per program of the dk/dv backward kernel.
    num_warps: Triton warps (GPU only; None = by head_dim).
    num_stages: Triton pipeline stages (GPU only).

  >>> BlockSizes.get_default().block_q
  128
  """
  block_q: int = 128
  block_k: int = 128
  block_q_bwd: int = 64
  block_k_bwd: int = 64
  num_warps: int | None = None
  num_stages: int = 2

  @classmethod
  def get_default(cls, *, q_len: int | None = None, kv_len: int | None = None,
                  impl: str = "gpu", head_dim: int | None = None, dtype=None) -> "BlockSizes":
    """Defaults valid on the target device for ``head_dim`` / ``dtype``.

    * ``impl="gpu"`` (Triton): the largest tiles whose shared memory (forward, dq and dk/dv
      kernels, :func:`gpu_smem_bytes`) fits an H100/H200's 227 KiB for this head_dim and
      dtype (e.g. bf16 d=128: 128 x 64 forward tiles; f32 d=256: 32 x 32).
    * ``impl="tpu"``: 256 x 512 forward and 256 x 256 backward tiles (multiples of the
      (8|16|32, 128) Mosaic tiles), shrunk to the padded sequence lengths.
    * ``impl="xla"``: 512-row chunks.
    Blocks shrink (power of two, >= 16) for short sequences.
    """
    def fit(b, n, lo=16):
      return b if n is None else max(lo, min(b, next_pow2(n)))
    if impl == "xla":
      return cls(fit(512, q_len), fit(512, kv_len), fit(512, q_len), fit(512, kv_len))
    if impl == "tpu":
      return cls(fit(256, q_len, 32), fit(512, kv_len, 128), fit(256, q_len, 32),
                 fit(256, kv_len, 128))
    dp = max(16, next_pow2(head_dim or 128))
    item = jnp.dtype(dtype or jnp.bfloat16).itemsize
    for bq, bk, bqb, bkb in _GPU_CANDIDATES:
      bs = cls(fit(bq, q_len), fit(bk, kv_len), fit(bqb, q_len), fit(bkb, kv_len),
               None, 2)
      if max(gpu_smem_bytes(bs, dp, item).values()) <= GPU_SMEM_BYTES:
        return bs
    return cls(16, 16, 16, 16, None, 1)


# Preference order of the Triton tiles (forward/dq: block_q x block_k; dk/dv: block_q_bwd x
# block_k_bwd); the first that fits shared memory is the default.
_GPU_CANDIDATES = ((128, 128, 64, 64), (128, 64, 64, 64), (64, 64, 64, 64), (64, 64, 32, 64),
                   (64, 32, 32, 32), (32, 32, 32, 32), (32, 32, 16, 32), (16, 16, 16, 16))


def gpu_smem_bytes(bs: "BlockSizes", dp: int, itemsize: int) -> dict:
  """Shared-memory estimate (bytes) of the three Triton kernels at these tiles.

  Operand tiles loaded inside the pipelined loop count ``num_stages`` times, tiles loaded
  once count once, and the float32 score / probability tiles count once each (a
  conservative bound: Triton may keep some of them in registers).
  """
  st = max(1, bs.num_stages)
  bq, bk, bqb, bkb = bs.block_q, bs.block_k, bs.block_q_bwd, bs.block_k_bwd
  fwd = (bq * dp + 2 * bk * dp * st) * itemsize + bq * bk * 4 + bq * bk * itemsize
  dq = (2 * bq * dp + 2 * bk * dp * st) * itemsize + 2 * bq * bk * 4
  dkv = (2 * bkb * dp + 2 * bqb * dp * st) * itemsize + 2 * bqb * bkb * 4
  return {"fwd": fwd, "bwd_dq": dq, "bwd_dkv": dkv}


def _legality(bs: BlockSizes, impl: str, head_dim: int, itemsize: int) -> tuple[bool, str]:
  fields = ("block_q", "block_k", "block_q_bwd", "block_k_bwd")
  for f in fields:
    v = getattr(bs, f)
    if not isinstance(v, int) or v <= 0:
      return False, f"{f}={v!r} must be a positive int"
  if impl == "xla":
    return True, ""
  for f in fields:
    v = getattr(bs, f)
    if not is_pow2(v) or not 16 <= v <= 512:
      return False, f"{f}={v} must be a power of two in [16, 512] for the Pallas kernels"
  if bs.num_warps is not None and bs.num_warps not in (1, 2, 4, 8, 16):
    return False, f"num_warps={bs.num_warps} must be one of 1, 2, 4, 8, 16"
  if not isinstance(bs.num_stages, int) or not 1 <= bs.num_stages <= 8:
    return False, f"num_stages={bs.num_stages} must be in [1, 8]"
  if impl == "gpu":
    dp = max(16, next_pow2(head_dim))
    for kern, smem in gpu_smem_bytes(bs, dp, itemsize).items():
      if smem > GPU_SMEM_BYTES:
        return False, (f"estimated shared memory of the {kern} kernel {smem} B exceeds 227 KiB (H100/H200 "
                       f"limit) at head_dim={head_dim}; use smaller blocks or "
                       "BlockSizes.get_default(head_dim=..., dtype=...)")
  if impl == "tpu":
    for f, g in (("block_q", 32), ("block_q_bwd", 32), ("block_k", 128), ("block_k_bwd", 128)):
      v = getattr(bs, f)
      if v % g:
        return False, (f"{f}={v} must be a multiple of {g} on TPU (Mosaic tiling: query rows a "
                       "multiple of 32 for int8 mask tiles, key blocks a multiple of 128 lanes)")
  return True, ""


# ----------------------------------------------------------------------------- reference

def flash_attention_reference(q, k, v, *, bias=None, mask=None, is_causal=False, scale=None):
  """Plain ``jnp`` attention with the semantics of ``jax.nn.dot_product_attention``.

  >>> import jax.numpy as jnp
  >>> flash_attention_reference(jnp.ones((1, 4, 2, 8)), jnp.ones((1, 4, 1, 8)), jnp.ones((1, 4, 1, 8))).shape
  (1, 4, 2, 8)
  """
  B, T, N, D = q.shape
  S, K = k.shape[1], k.shape[2]
  scale = 1.0 / math.sqrt(D) if scale is None else scale
  k = jnp.repeat(k, N // K, axis=2)
  v = jnp.repeat(v, N // K, axis=2)
  s = jnp.einsum("btnd,bsnd->bnts", q.astype(jnp.float32), k.astype(jnp.float32)) * scale
  if bias is not None:
    s = s + bias.astype(jnp.float32)
  keep = None
  if mask is not None:
    keep = jnp.broadcast_to(mask, s.shape)
  if is_causal:
    c = jnp.tril(jnp.ones((T, S), bool))[None, None]
    keep = c if keep is None else keep & c
  if keep is not None:
    s = jnp.where(keep, s, MASK_VALUE)
  p = jax.nn.softmax(s, axis=-1)
  return jnp.einsum("bnts,bsnd->btnd", p, v.astype(jnp.float32)).astype(q.dtype)


# ----------------------------------------------------------------------------- config

@dataclasses.dataclass(frozen=True)
class _Cfg:
  impl: str            # "xla" | "gpu" | "tpu"
  interpret: str       # "" | "gpu" | "tpu"
  scale: float
  causal: bool
  q_len: int
  kv_len: int
  groups: int
  has_bias: bool
  has_mask: bool
  bias_b: bool         # bias has a real (non-broadcast) batch dim
  bias_h: bool
  mask_b: bool
  mask_h: bool
  bs: BlockSizes
  gpu_flavor: str = "triton"   # "mosaic": the forward runs the Mosaic GPU kernel (sm_90+)

  def interpret_arg(self):
    return interpret_arg(self.interpret)


def _tile_keep(cfg: _Cfg, qidx, kidx, mask_tile):
  """Boolean keep tile from causal + user mask (None if neither)."""
  keep = None
  if cfg.causal:
    keep = qidx[:, None] >= kidx[None, :]
  if mask_tile is not None:
    m = mask_tile != 0
    keep = m if keep is None else jnp.logical_and(keep, m)
  return keep


# ----------------------------------------------------------------------------- Pallas kernels
# The kernel bodies only see 2-D tiles ([rows, head_dim]) and 1-D rows (lse, delta), so
# the same bodies serve the GPU (Triton) and TPU (Mosaic) lowerings; only the layout of
# the BlockSpecs and the compiler params differ.

def _split_refs(refs, cfg: _Cfg):
  refs = list(refs)
  bias_ref = refs.pop(0) if cfg.has_bias else None
  mask_ref = refs.pop(0) if cfg.has_mask else None
  return bias_ref, mask_ref, refs


def _scores(cfg, q, kb, bias_tile, mask_tile, qidx, kidx, kv_padded):
  s = dot_nt(q, kb) * cfg.scale
  if bias_tile is not None:
    s = s + bias_tile.astype(jnp.float32)
  keep = _tile_keep(cfg, qidx, kidx, mask_tile)
  if keep is not None:
    s = jnp.where(keep, s, MASK_VALUE)
  if kv_padded:
    s = jnp.where(kidx[None, :] < cfg.kv_len, s, -jnp.inf)
  return s, keep


def _bwd_probs(s, lse, keep, count):
  """``exp(s - lse)`` for the backward, exact on a row whose every key is masked: such a row
  averages over its ``count`` keys (all at MASK_VALUE), but its log-sum-exp ``MASK_VALUE +
  log(count)`` rounds to MASK_VALUE in float32, which would make each probability 1."""
  p = jnp.exp(s - lse)
  if keep is None:
    return p
  dead = lse <= 0.5 * MASK_VALUE
  return jnp.where(dead, jnp.where(s == MASK_VALUE, 1.0 / count, 0.0), p)


def _fwd_kernel(q_ref, k_ref, v_ref, *refs, cfg: _Cfg, bq: int, bk: int, nk: int, kv_padded: bool):
  from jax.experimental import pallas as pl
  bias_ref, mask_ref, (o_ref, lse_ref) = _split_refs(refs, cfg)
  i = pl.program_id(0)
  q = q_ref[...]
  qidx = i * bq + jnp.arange(bq)
  dp = q.shape[-1]

  def body(j, carry):
    acc, m, l = carry
    ks = pl.ds(pl.multiple_of(j * bk, bk), bk)
    kb = k_ref[ks, :]
    vb = v_ref[ks, :]
    kidx = j * bk + jnp.arange(bk)
    bias_tile = bias_ref[:, ks] if bias_ref is not None else None
    mask_tile = mask_ref[:, ks] if mask_ref is not None else None
    s, _ = _scores(cfg, q, kb, bias_tile, mask_tile, qidx, kidx, kv_padded)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    corr = jnp.exp(m - m_new)
    p = jnp.exp(s - m_new[:, None])
    l = corr * l + jnp.sum(p, axis=-1)
    acc = corr[:, None] * acc + dot_nn(p.astype(vb.dtype), vb)
    return acc, m_new, l

  init = (jnp.zeros((bq, dp), jnp.float32), jnp.full((bq,), -jnp.inf, jnp.float32),
          jnp.zeros((bq,), jnp.float32))
  if cfg.causal:
    upper = jnp.minimum(lax.div((i + 1) * bq + bk - 1, bk), nk)
  else:
    upper = nk
  acc, m, l = lax.fori_loop(0, upper, body, init)
  o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
  lse_ref[...] = m + jnp.log(l)


def _bwd_dkv_kernel(q_ref, k_ref, v_ref, *refs, cfg: _Cfg, bq: int, bk: int, nq: int,
                    kv_padded: bool):
  from jax.experimental import pallas as pl
  bias_ref, mask_ref, rest = _split_refs(refs, cfg)
  do_ref, lse_ref, delta_ref, dk_ref, dv_ref = rest[:5]
  ds_ref = rest[5] if cfg.has_bias else None
  j = pl.program_id(0)
  kb = k_ref[...]
  vb = v_ref[...]
  kidx = j * bk + jnp.arange(bk)

  def body(i, carry):
    dk, dv = carry
    qs = pl.ds(pl.multiple_of(i * bq, bq), bq)
    qb = q_ref[qs, :]
    dob = do_ref[qs, :]
    lse = lse_ref[qs]
    delta = delta_ref[qs]
    qidx = i * bq + jnp.arange(bq)
    bias_tile = bias_ref[qs, :] if bias_ref is not None else None
    mask_tile = mask_ref[qs, :] if mask_ref is not None else None
    s, keep = _scores(cfg, qb, kb, bias_tile, mask_tile, qidx, kidx, kv_padded)
    p = _bwd_probs(s, lse[:, None], keep, float(cfg.kv_len))
    dv = dv + dot_tn(p.astype(dob.dtype), dob)
    dpv = dot_nt(dob, vb)
    ds = p * (dpv - delta[:, None])
    if keep is not None:
      ds = jnp.where(keep, ds, 0.0)
    if ds_ref is not None:
      ds_ref[qs, :] = ds.astype(ds_ref.dtype)
    dk = dk + dot_tn(ds.astype(qb.dtype), qb)
    return dk, dv

  dp = kb.shape[-1]
  init = (jnp.zeros((bk, dp), jnp.float32), jnp.zeros((bk, dp), jnp.float32))
  lower = lax.div(j * bk, bq) if (cfg.causal and not cfg.has_bias) else 0
  dk, dv = lax.fori_loop(lower, nq, body, init)
  dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _bwd_dq_kernel(q_ref, k_ref, v_ref, *refs, cfg: _Cfg, bq: int, bk: int, nk: int,
                   kv_padded: bool):
  from jax.experimental import pallas as pl
  bias_ref, mask_ref, (do_ref, lse_ref, delta_ref, dq_ref) = _split_refs(refs, cfg)
  i = pl.program_id(0)
  qb = q_ref[...]
  dob = do_ref[...]
  lse = lse_ref[...]
  delta = delta_ref[...]
  qidx = i * bq + jnp.arange(bq)

  def body(j, dq):
    ks = pl.ds(pl.multiple_of(j * bk, bk), bk)
    kb = k_ref[ks, :]
    vb = v_ref[ks, :]
    kidx = j * bk + jnp.arange(bk)
    bias_tile = bias_ref[:, ks] if bias_ref is not None else None
    mask_tile = mask_ref[:, ks] if mask_ref is not None else None
    s, keep = _scores(cfg, qb, kb, bias_tile, mask_tile, qidx, kidx, kv_padded)
    p = _bwd_probs(s, lse[:, None], keep, float(cfg.kv_len))
    dpv = dot_nt(dob, vb)
    ds = p * (dpv - delta[:, None])
    if keep is not None:
      ds = jnp.where(keep, ds, 0.0)
    return dq + dot_nn(ds.astype(kb.dtype), kb)

  if cfg.causal:
    upper = jnp.minimum(lax.div((i + 1) * bq + bk - 1, bk), nk)
  else:
    upper = nk
  dq = lax.fori_loop(0, upper, body, jnp.zeros(qb.shape, jnp.float32))
  dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


class _Layout:
  """BlockSpec factory for [B, S, H, D] (GPU) or [B, H, S, D] (TPU) operands."""

  def __init__(self, impl: str):
    self.tpu = impl == "tpu"

  def seq(self, rows: int, dp: int, seq_index, head_index):
    """Spec of a [B, S, H, D] operand (transposed to [B, H, S, D] on TPU)."""
    from jax.experimental import pallas as pl
    if self.tpu:
      return pl.BlockSpec((None, None, rows, dp), lambda a, b, h: (b, head_index(h), seq_index(a), 0))
    return pl.BlockSpec((None, rows, None, dp), lambda a, b, h: (b, seq_index(a), head_index(h), 0))

  def to_layout(self, x):
    return jnp.swapaxes(x, 1, 2) if self.tpu else x

  def from_layout(self, x):
    return jnp.swapaxes(x, 1, 2) if self.tpu else x


def _bh_spec(rows, cols, b_real, h_real, row_index, col_index):
  from jax.experimental import pallas as pl
  return pl.BlockSpec(
      (None, None, rows, cols),
      lambda a, b, h: (b if b_real else 0, h if h_real else 0, row_index(a), col_index(a)))


def _row_spec(rows, row_index):
  from jax.experimental import pallas as pl
  return pl.BlockSpec((None, None, rows), lambda a, b, h: (b, h, row_index(a)))


def _pad_all(cfg: _Cfg, q, k, v, bias, mask, tp, sp, dp):
  q = pad_axis(pad_axis(q, 1, tp), 3, dp)
  k = pad_axis(pad_axis(k, 1, sp), 3, dp)
  v = pad_axis(pad_axis(v, 1, sp), 3, dp)
  if bias is not None:
    bias = pad_axis(pad_axis(bias, 2, tp), 3, sp)
  if mask is not None:
    mask = pad_axis(pad_axis(mask, 2, tp, 1), 3, sp, 1)
  return q, k, v, bias, mask


def _padded_dims(cfg: _Cfg, head_dim: int):
  bs = cfg.bs
  bq = min(bs.block_q, max(16, next_pow2(cfg.q_len)))
  bk = min(bs.block_k, max(16, next_pow2(cfg.kv_len)))
  bqb = min(bs.block_q_bwd, max(16, next_pow2(cfg.q_len)))
  bkb = min(bs.block_k_bwd, max(16, next_pow2(cfg.kv_len)))
  tp = round_up(cfg.q_len, max(bq, bqb))
  sp = round_up(cfg.kv_len, max(bk, bkb))
  dp = round_up(head_dim, 128) if cfg.impl == "tpu" else max(16, next_pow2(head_dim))
  return bq, bk, bqb, bkb, tp, sp, dp


def _pallas_fwd(cfg: _Cfg, q, k, v, bias, mask):
  from jax.experimental import pallas as pl
  B, T, N, D = q.shape
  bq, bk, _, _, tp, sp, dp = _padded_dims(cfg, D)
  q, k, v, bias, mask = _pad_all(cfg, q, k, v, bias, mask, tp, sp, dp)
  lay = _Layout(cfg.impl)
  G = cfg.groups
  nq, nk = tp // bq, sp // bk
  in_specs = [lay.seq(bq, dp, lambda a: a, lambda h: h),
              lay.seq(sp, dp, lambda a: 0, lambda h: h // G),
              lay.seq(sp, dp, lambda a: 0, lambda h: h // G)]
  args = [lay.to_layout(q), lay.to_layout(k), lay.to_layout(v)]
  if bias is not None:
    in_specs.append(_bh_spec(bq, sp, cfg.bias_b, cfg.bias_h, lambda a: a, lambda a: 0))
    args.append(bias)
  if mask is not None:
    in_specs.append(_bh_spec(bq, sp, cfg.mask_b, cfg.mask_h, lambda a: a, lambda a: 0))
    args.append(mask)
  o_shape = (B, N, tp, dp) if lay.tpu else (B, tp, N, dp)
  num_warps = cfg.bs.num_warps or (4 if dp <= 64 else 8)
  o, lse = fitted_pallas_call(
      functools.partial(_fwd_kernel, cfg=cfg, bq=bq, bk=bk, nk=nk, kv_padded=sp != cfg.kv_len),
      grid=(nq, B, N),
      in_specs=in_specs,
      out_specs=[lay.seq(bq, dp, lambda a: a, lambda h: h), _row_spec(bq, lambda a: a)],
      out_shape=[jax.ShapeDtypeStruct(o_shape, q.dtype),
                 jax.ShapeDtypeStruct((B, N, tp), jnp.float32)],
      **call_params(cfg.impl, ("parallel",) * 3, num_warps, cfg.bs.num_stages),
      cost_estimate=cost_estimate(*_attn_cost(cfg, B, N, T, cfg.kv_len, D, q.dtype.itemsize, 2)),
      interpret=cfg.interpret_arg(),
      name="lepton_flash_attention_fwd",
  )(*args)
  o = lay.from_layout(o)[:, :T, :, :D]
  return o, lse


def _pallas_bwd(cfg: _Cfg, q, k, v, bias, mask, o, lse, do):
  from jax.experimental import pallas as pl
  B, T, N, D = q.shape
  S, K = k.shape[1], k.shape[2]
  G = cfg.groups
  bq, bk, bqb, bkb, tp, sp, dp = _padded_dims(cfg, D)
  delta = jnp.einsum("btnd,btnd->bnt", o.astype(jnp.float32), do.astype(jnp.float32))
  delta = pad_axis(delta, 2, tp)
  lse = lse[:, :, :tp]
  q, k, v, bias, mask = _pad_all(cfg, q, k, v, bias, mask, tp, sp, dp)
  do = pad_axis(pad_axis(do, 1, tp), 3, dp)
  lay = _Layout(cfg.impl)
  kv_padded = sp != cfg.kv_len
  num_warps = cfg.bs.num_warps or (4 if dp <= 64 else 8)
  interp = cfg.interpret_arg()
  qL, kL, vL, doL = (lay.to_layout(x) for x in (q, k, v, do))

  # dk, dv (per query head; summed over the group below) and, with a bias, dS.
  nkb, nqb = sp // bkb, tp // bqb
  in_specs = [lay.seq(tp, dp, lambda a: 0, lambda h: h),
              lay.seq(bkb, dp, lambda a: a, lambda h: h // G),
              lay.seq(bkb, dp, lambda a: a, lambda h: h // G)]
  args = [qL, kL, vL]
  if bias is not None:
    in_specs.append(_bh_spec(tp, bkb, cfg.bias_b, cfg.bias_h, lambda a: 0, lambda a: a))
    args.append(bias)
  if mask is not None:
    in_specs.append(_bh_spec(tp, bkb, cfg.mask_b, cfg.mask_h, lambda a: 0, lambda a: a))
    args.append(mask)
  in_specs += [lay.seq(tp, dp, lambda a: 0, lambda h: h), _row_spec(tp, lambda a: 0),
               _row_spec(tp, lambda a: 0)]
  args += [doL, lse, delta]
  kv_shape = (B, N, sp, dp) if lay.tpu else (B, sp, N, dp)
  out_specs = [lay.seq(bkb, dp, lambda a: a, lambda h: h), lay.seq(bkb, dp, lambda a: a, lambda h: h)]
  out_shape = [jax.ShapeDtypeStruct(kv_shape, k.dtype), jax.ShapeDtypeStruct(kv_shape, v.dtype)]
  if bias is not None:
    out_specs.append(_bh_spec(tp, bkb, True, True, lambda a: 0, lambda a: a))
    out_shape.append(jax.ShapeDtypeStruct((B, N, tp, sp), jnp.float32))
  outs = fitted_pallas_call(
      functools.partial(_bwd_dkv_kernel, cfg=cfg, bq=bqb, bk=bkb, nq=nqb, kv_padded=kv_padded),
      grid=(nkb, B, N), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      **call_params(cfg.impl, ("parallel",) * 3, num_warps, cfg.bs.num_stages),
      cost_estimate=cost_estimate(*_attn_cost(cfg, B, N, T, S, D, q.dtype.itemsize, 4)),
      interpret=interp, name="lepton_flash_attention_bwd_dkv",
  )(*args)
  dk, dv = (lay.from_layout(x) for x in outs[:2])
  dk = dk[:, :S, :, :D].reshape(B, S, K, G, D).sum(3).astype(k.dtype) if G > 1 else dk[:, :S, :, :D]
  dv = dv[:, :S, :, :D].reshape(B, S, K, G, D).sum(3).astype(v.dtype) if G > 1 else dv[:, :S, :, :D]
  dbias = outs[2][:, :, :T, :S] if bias is not None else None

  # dq
  nq = tp // bq
  nk = sp // bk
  in_specs = [lay.seq(bq, dp, lambda a: a, lambda h: h),
              lay.seq(sp, dp, lambda a: 0, lambda h: h // G),
              lay.seq(sp, dp, lambda a: 0, lambda h: h // G)]
  args = [qL, kL, vL]
  if bias is not None:
    in_specs.append(_bh_spec(bq, sp, cfg.bias_b, cfg.bias_h, lambda a: a, lambda a: 0))
    args.append(bias)
  if mask is not None:
    in_specs.append(_bh_spec(bq, sp, cfg.mask_b, cfg.mask_h, lambda a: a, lambda a: 0))
    args.append(mask)
  in_specs += [lay.seq(bq, dp, lambda a: a, lambda h: h), _row_spec(bq, lambda a: a),
               _row_spec(bq, lambda a: a)]
  args += [doL, lse, delta]
  q_shape = (B, N, tp, dp) if lay.tpu else (B, tp, N, dp)
  dq = fitted_pallas_call(
      functools.partial(_bwd_dq_kernel, cfg=cfg, bq=bq, bk=bk, nk=nk, kv_padded=kv_padded),
      grid=(nq, B, N), in_specs=in_specs,
      out_specs=lay.seq(bq, dp, lambda a: a, lambda h: h),
      out_shape=jax.ShapeDtypeStruct(q_shape, q.dtype),
      **call_params(cfg.impl, ("parallel",) * 3, num_warps, cfg.bs.num_stages),
      cost_estimate=cost_estimate(*_attn_cost(cfg, B, N, T, S, D, q.dtype.itemsize, 3)),
      interpret=interp, name="lepton_flash_attention_bwd_dq",
  )(*args)
  dq = lay.from_layout(dq)[:, :T, :, :D]
  return dq, dk, dv, dbias


# ----------------------------------------------------------------------------- Mosaic GPU forward

def _mgpu_fwd(cfg: _Cfg, q, k, v):
  """Forward on Mosaic GPU (``_attention_mgpu``); the lse matches the Triton backward's layout."""
  mg = mgpu_attention()
  B, T, N, D = q.shape
  mcfg = mg.default_config(D, q.dtype)
  tpm = round_up(cfg.q_len, mcfg.block_q)
  spm = round_up(cfg.kv_len, mcfg.block_kv)
  tp_triton = _padded_dims(cfg, D)[4]
  interp = mgpu_interpret(cfg.interpret)
  o, lse = mg.mgpu_flash_fwd(
      pad_axis(q, 1, tpm), pad_axis(k, 1, spm), pad_axis(v, 1, spm), scale=cfg.scale,
      causal=cfg.causal, kv_len=cfg.kv_len, config=mcfg, interpret=interp,
      cost_estimate=cost_estimate(*_attn_cost(cfg, B, N, T, cfg.kv_len, D, q.dtype.itemsize, 2)))
  lse = pad_axis(lse, 2, max(tpm, tp_triton))
  return o[:, :T], lse


def _mgpu_bwd(cfg: _Cfg, q, k, v, o, lse, do):
  """Backward on Mosaic GPU (``_attention_mgpu.mgpu_flash_bwd``), 64-row tiles."""
  mg = mgpu_attention()
  B, T, N, D = q.shape
  S, K = k.shape[1], k.shape[2]
  G = cfg.groups
  tp, sp = round_up(cfg.q_len, 64), round_up(cfg.kv_len, 64)
  delta = jnp.einsum("btnd,btnd->bnt", o.astype(jnp.float32), do.astype(jnp.float32))
  interp = mgpu_interpret(cfg.interpret)
  dq, dk, dv = mg.mgpu_flash_bwd(
      pad_axis(q, 1, tp), pad_axis(k, 1, sp), pad_axis(v, 1, sp), pad_axis(do, 1, tp),
      pad_axis(lse[:, :, :tp], 2, tp), pad_axis(delta, 2, tp), scale=cfg.scale, causal=cfg.causal,
      kv_len=cfg.kv_len, config=mg.default_config(D, q.dtype), interpret=interp,
      cost_estimate=cost_estimate(*_attn_cost(cfg, B, N, T, S, D, q.dtype.itemsize, 5)))
  dk = dk[:, :S].reshape(B, S, K, G, D).sum(3).astype(k.dtype) if G > 1 else dk[:, :S]
  dv = dv[:, :S].reshape(B, S, K, G, D).sum(3).astype(v.dtype) if G > 1 else dv[:, :S]
  return dq[:, :T], dk, dv, None


# ----------------------------------------------------------------------------- Pallas TPU
# Layout [B, H, S, D]; grid (batch, heads, q blocks, kv blocks) with the last axis
# "arbitrary" and the running max / sum / accumulator in VMEM scratch (the design of JAX's
# own pallas/ops/tpu/flash_attention.py). Per-row statistics (lse, delta) are stored
# lane-dense as [B, H, T, 128]; tiles are 2-D and every block's last two dims are multiples
# of the Mosaic tiles or the full dims (head_dim is never padded).

def _tpu_dims(cfg: _Cfg, head_dim: int):
  bs = cfg.bs
  bq = min(bs.block_q, max(32, next_pow2(cfg.q_len)))
  bk = min(bs.block_k, max(128, next_pow2(cfg.kv_len)))
  bqb = min(bs.block_q_bwd, max(32, next_pow2(cfg.q_len)))
  bkb = min(bs.block_k_bwd, max(128, next_pow2(cfg.kv_len)))
  tp = round_up(cfg.q_len, max(bq, bqb))
  sp = round_up(cfg.kv_len, max(bk, bkb))
  return bq, bk, bqb, bkb, tp, sp, head_dim


def _tpu_scores(cfg, q, kb, bias_ref, mask_ref, i, j, bq, bk, kv_padded):
  s = dot_nt(q, kb) * cfg.scale
  if bias_ref is not None:
    s = s + bias_ref[...].astype(jnp.float32)
  keep = None
  if cfg.causal:
    qi = i * bq + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
    kj = j * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    keep = qi >= kj
  if mask_ref is not None:
    m = mask_ref[...] != 0
    keep = m if keep is None else jnp.logical_and(keep, m)
  if keep is not None:
    s = jnp.where(keep, s, MASK_VALUE)
  if kv_padded:
    kj = j * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    s = jnp.where(kj < cfg.kv_len, s, -jnp.inf)
  return s, keep


def _lanes(x, ref):
  return jnp.broadcast_to(x, ref.shape)


def _col0(v):
  return v[:, :1]


def _tpu_fwd_kernel(q_ref, k_ref, v_ref, *refs, cfg, bq, bk, nk, kv_padded):
  from jax.experimental import pallas as pl
  bias_ref, mask_ref, (o_ref, lse_ref, m_sc, l_sc, acc_sc) = _split_refs(refs, cfg)
  i, j = pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  def step():
    vb = v_ref[...]
    s, _ = _tpu_scores(cfg, q_ref[...], k_ref[...], bias_ref, mask_ref, i, j, bq, bk, kv_padded)
    m_prev, l_prev = _col0(m_sc[...]), _col0(l_sc[...])
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=-1, keepdims=True))
    corr = jnp.exp(m_prev - m_new)
    p = jnp.exp(s - m_new)
    l_sc[...] = _lanes(corr * l_prev + jnp.sum(p, axis=-1, keepdims=True), l_sc)
    m_sc[...] = _lanes(m_new, m_sc)
    acc_sc[...] = corr * acc_sc[...] + dot_nn(p.astype(vb.dtype), vb)

  if cfg.causal:
    pl.when(j * bk < (i + 1) * bq)(step)    # skip blocks above the diagonal
  else:
    step()

  @pl.when(j == nk - 1)
  def _done():
    l = _col0(l_sc[...])
    o_ref[...] = (acc_sc[...] / l).astype(o_ref.dtype)
    lse_ref[...] = _lanes(_col0(m_sc[...]) + jnp.log(l), lse_ref)


def _tpu_dkv_kernel(q_ref, k_ref, v_ref, *refs, cfg, bq, bk, nq, kv_padded):
  """Grid (b, h, kv block j, q block i): dk/dv of key block j accumulate over i."""
  from jax.experimental import pallas as pl
  bias_ref, mask_ref, rest = _split_refs(refs, cfg)
  do_ref, lse_ref, delta_ref, dk_ref, dv_ref = rest[:5]
  ds_ref = rest[5] if cfg.has_bias else None
  dk_sc, dv_sc = rest[-2:]
  j, i = pl.program_id(2), pl.program_id(3)

  @pl.when(i == 0)
  def _init():
    dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
    dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

  def step():
    qb, kb, vb, dob = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    s, keep = _tpu_scores(cfg, qb, kb, bias_ref, mask_ref, i, j, bq, bk, kv_padded)
    p = _bwd_probs(s, _col0(lse_ref[...]), keep, float(cfg.kv_len))
    dv_sc[...] += dot_tn(p.astype(dob.dtype), dob)
    ds = p * (dot_nt(dob, vb) - _col0(delta_ref[...]))
    if keep is not None:
      ds = jnp.where(keep, ds, 0.0)
    if ds_ref is not None:
      ds_ref[...] = ds.astype(ds_ref.dtype)
    dk_sc[...] += dot_tn(ds.astype(qb.dtype), qb)

  if cfg.causal and not cfg.has_bias:
    pl.when((i + 1) * bq > j * bk)(step)
  else:
    step()

  @pl.when(i == nq - 1)
  def _done():
    dk_ref[...] = (dk_sc[...] * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _tpu_dq_kernel(q_ref, k_ref, v_ref, *refs, cfg, bq, bk, nk, kv_padded):
  from jax.experimental import pallas as pl
  bias_ref, mask_ref, (do_ref, lse_ref, delta_ref, dq_ref, dq_sc) = _split_refs(refs, cfg)
  i, j = pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

  def step():
    qb, kb, vb, dob = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    s, keep = _tpu_scores(cfg, qb, kb, bias_ref, mask_ref, i, j, bq, bk, kv_padded)
    p = _bwd_probs(s, _col0(lse_ref[...]), keep, float(cfg.kv_len))
    ds = p * (dot_nt(dob, vb) - _col0(delta_ref[...]))
    if keep is not None:
      ds = jnp.where(keep, ds, 0.0)
    dq_sc[...] += dot_nn(ds.astype(kb.dtype), kb)

  if cfg.causal:
    pl.when(j * bk < (i + 1) * bq)(step)
  else:
    step()

  @pl.when(j == nk - 1)
  def _done():
    dq_ref[...] = (dq_sc[...] * cfg.scale).astype(dq_ref.dtype)


def _tpu_specs(bq, bk, dp, G):
  """BlockSpec makers for grid (b, h, a, c): rows come from axis a (q) or c (kv)."""
  from jax.experimental import pallas as pl
  def rows(r, which, kv_head=False):
    def idx(b, h, a, c):
      return (b, h // G if kv_head else h, a if which == "a" else c, 0)
    return pl.BlockSpec((None, None, r, dp), idx)
  def stat(r, which):
    return pl.BlockSpec((None, None, r, STAT_LANES_TPU),
                        lambda b, h, a, c: (b, h, a if which == "a" else c, 0))
  def bh(br, bc, b_real, h_real, qaxis):
    def idx(b, h, a, c):
      qi, kj = (a, c) if qaxis == "a" else (c, a)
      return (b if b_real else 0, h if h_real else 0, qi, kj)
    return pl.BlockSpec((None, None, br, bc), idx)
  return rows, stat, bh


def _attn_cost(cfg, B, N, T, S, D, item, passes):
  frac = 0.5 if cfg.causal else 1.0
  flops = int(passes * 2 * B * N * T * S * D * frac)
  trans = int(B * N * T * S * frac)
  return flops, trans, int(4 * B * N * (T + S) * D * item)


def _tpu_fwd(cfg: _Cfg, q, k, v, bias, mask):
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import tpu as pltpu
  B, T, N, D = q.shape
  bq, bk, _, _, tp, sp, dp = _tpu_dims(cfg, D)
  q, k, v, bias, mask = _pad_all(cfg, q, k, v, bias, mask, tp, sp, dp)
  G = cfg.groups
  nq, nk = tp // bq, sp // bk
  rows, stat, bh = _tpu_specs(bq, bk, dp, G)
  in_specs = [rows(bq, "a"), rows(bk, "c", True), rows(bk, "c", True)]
  args = [jnp.swapaxes(x, 1, 2) for x in (q, k, v)]
  if bias is not None:
    in_specs.append(bh(bq, bk, cfg.bias_b, cfg.bias_h, "a"))
    args.append(bias)
  if mask is not None:
    in_specs.append(bh(bq, bk, cfg.mask_b, cfg.mask_h, "a"))
    args.append(mask)
  flops, trans, byts = _attn_cost(cfg, B, N, T, cfg.kv_len, D, q.dtype.itemsize, 2)
  o, lse = fitted_pallas_call(
      functools.partial(_tpu_fwd_kernel, cfg=cfg, bq=bq, bk=bk, nk=nk, kv_padded=sp != cfg.kv_len),
      grid=(B, N, nq, nk), in_specs=in_specs,
      out_specs=[rows(bq, "a"), stat(bq, "a")],
      out_shape=[jax.ShapeDtypeStruct((B, N, tp, dp), q.dtype),
                 jax.ShapeDtypeStruct((B, N, tp, STAT_LANES_TPU), jnp.float32)],
      scratch_shapes=[pltpu.VMEM((bq, STAT_LANES_TPU), jnp.float32),
                      pltpu.VMEM((bq, STAT_LANES_TPU), jnp.float32),
                      pltpu.VMEM((bq, dp), jnp.float32)],
      **call_params("tpu", ("parallel", "parallel", "parallel", "arbitrary")),
      cost_estimate=cost_estimate(flops, trans, byts + nbytes(bias, mask)),
      interpret=cfg.interpret_arg(), name="lepton_flash_attention_fwd",
  )(*args)
  return jnp.swapaxes(o, 1, 2)[:, :T, :, :D], lse


def _tpu_bwd(cfg: _Cfg, q, k, v, bias, mask, o, lse, do):
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import tpu as pltpu
  B, T, N, D = q.shape
  S, K = k.shape[1], k.shape[2]
  G = cfg.groups
  bq, bk, bqb, bkb, tp, sp, dp = _tpu_dims(cfg, D)
  delta = jnp.einsum("btnd,btnd->bnt", o.astype(jnp.float32), do.astype(jnp.float32))
  delta = jnp.broadcast_to(pad_axis(delta, 2, tp)[..., None], (B, N, tp, STAT_LANES_TPU))
  lse = lse[:, :, :tp]
  q, k, v, bias, mask = _pad_all(cfg, q, k, v, bias, mask, tp, sp, dp)
  do = pad_axis(pad_axis(do, 1, tp), 3, dp)
  kv_padded = sp != cfg.kv_len
  qL, kL, vL, doL = (jnp.swapaxes(x, 1, 2) for x in (q, k, v, do))
  item = q.dtype.itemsize
  interp = cfg.interpret_arg()

  # dk, dv per query head (summed over the group below); grid (b, h, kv block, q block).
  nkb, nqb = sp // bkb, tp // bqb
  rows, stat, bh = _tpu_specs(bqb, bkb, dp, G)
  in_specs = [rows(bqb, "c"), rows(bkb, "a", True), rows(bkb, "a", True)]
  args = [qL, kL, vL]
  if bias is not None:
    in_specs.append(bh(bqb, bkb, cfg.bias_b, cfg.bias_h, "c"))
    args.append(bias)
  if mask is not None:
    in_specs.append(bh(bqb, bkb, cfg.mask_b, cfg.mask_h, "c"))
    args.append(mask)
  in_specs += [rows(bqb, "c"), stat(bqb, "c"), stat(bqb, "c")]
  args += [doL, lse, delta]
  out_specs = [rows(bkb, "a"), rows(bkb, "a")]
  out_shape = [jax.ShapeDtypeStruct((B, N, sp, dp), k.dtype)] * 2
  if bias is not None:
    out_specs.append(bh(bqb, bkb, True, True, "c"))
    out_shape.append(jax.ShapeDtypeStruct((B, N, tp, sp), jnp.float32))
  flops, trans, byts = _attn_cost(cfg, B, N, T, S, D, item, 4)
  outs = fitted_pallas_call(
      functools.partial(_tpu_dkv_kernel, cfg=cfg, bq=bqb, bk=bkb, nq=nqb, kv_padded=kv_padded),
      grid=(B, N, nkb, nqb), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      scratch_shapes=[pltpu.VMEM((bkb, dp), jnp.float32), pltpu.VMEM((bkb, dp), jnp.float32)],
      **call_params("tpu", ("parallel", "parallel", "parallel", "arbitrary")),
      cost_estimate=cost_estimate(flops, trans, byts + nbytes(bias, mask)),
      interpret=interp, name="lepton_flash_attention_bwd_dkv",
  )(*args)
  dk, dv = (jnp.swapaxes(x, 1, 2) for x in outs[:2])
  dk = dk[:, :S, :, :D].reshape(B, S, K, G, D).sum(3).astype(k.dtype) if G > 1 else dk[:, :S, :, :D]
  dv = dv[:, :S, :, :D].reshape(B, S, K, G, D).sum(3).astype(v.dtype) if G > 1 else dv[:, :S, :, :D]
  dbias = outs[2][:, :, :T, :S] if bias is not None else None

  # dq; grid (b, h, q block, kv block).
  nq, nk = tp // bq, sp // bk
  rows, stat, bh = _tpu_specs(bq, bk, dp, G)
  in_specs = [rows(bq, "a"), rows(bk, "c", True), rows(bk, "c", True)]
  args = [qL, kL, vL]
  if bias is not None:
    in_specs.append(bh(bq, bk, cfg.bias_b, cfg.bias_h, "a"))
    args.append(bias)
  if mask is not None:
    in_specs.append(bh(bq, bk, cfg.mask_b, cfg.mask_h, "a"))
    args.append(mask)
  in_specs += [rows(bq, "a"), stat(bq, "a"), stat(bq, "a")]
  args += [doL, lse, delta]
  flops, trans, byts = _attn_cost(cfg, B, N, T, S, D, item, 3)
  dq = fitted_pallas_call(
      functools.partial(_tpu_dq_kernel, cfg=cfg, bq=bq, bk=bk, nk=nk, kv_padded=kv_padded),
      grid=(B, N, nq, nk), in_specs=in_specs, out_specs=rows(bq, "a"),
      out_shape=jax.ShapeDtypeStruct((B, N, tp, dp), q.dtype),
      scratch_shapes=[pltpu.VMEM((bq, dp), jnp.float32)],
      **call_params("tpu", ("parallel", "parallel", "parallel", "arbitrary")),
      cost_estimate=cost_estimate(flops, trans, byts + nbytes(bias, mask)),
      interpret=interp, name="lepton_flash_attention_bwd_dq",
  )(*args)
  dq = jnp.swapaxes(dq, 1, 2)[:, :T, :, :D]
  return dq, dk, dv, dbias


# ----------------------------------------------------------------------------- XLA (blockwise)

def _xla_blocks(cfg: _Cfg):
  bs = cfg.bs
  bq = min(bs.block_q, cfg.q_len)
  bk = min(bs.block_k, cfg.kv_len)
  return bq, bk, round_up(cfg.q_len, bq), round_up(cfg.kv_len, bk)


def _xla_prep(cfg, q, k, v, bias, mask, tp, sp):
  """Pads and regroups to q [B,K,G,Tp,D], k/v [B,K,Sp,D], bias/mask [Bb,Kb,Gb,Tp,Sp]."""
  B, T, N, D = q.shape
  K = k.shape[2]
  G = cfg.groups
  q = pad_axis(q, 1, tp).transpose(0, 2, 1, 3).reshape(B, K, G, tp, D)
  k = pad_axis(k, 1, sp).transpose(0, 2, 1, 3)
  v = pad_axis(v, 1, sp).transpose(0, 2, 1, 3)

  def grp(t, fill):
    if t is None:
      return None
    t = pad_axis(pad_axis(t, 2, tp, fill), 3, sp, fill)
    tb, tn = t.shape[:2]
    if tn == 1:
      return t.reshape(tb, 1, 1, tp, sp)
    return t.reshape(tb, K, G, tp, sp)
  return q, k, v, grp(bias, 0), grp(mask, 1)


def _xla_tile(t, i, j, bq, bk):
  if t is None:
    return None
  return lax.dynamic_slice(t, (0, 0, 0, i * bq, j * bk), t.shape[:3] + (bq, bk))


def _xla_scores(cfg, qi, kj, bias_t, mask_t, i, j, bq, bk, kv_padded, kvl=None):
  s = jnp.einsum("bkgqd,bksd->bkgqs", qi, kj, preferred_element_type=jnp.float32) * cfg.scale
  if bias_t is not None:
    s = s + bias_t.astype(jnp.float32)
  qidx = i * bq + jnp.arange(bq)
  kidx = j * bk + jnp.arange(bk)
  keep = None
  if cfg.causal:
    keep = qidx[:, None] >= kidx[None, :]
  if mask_t is not None:
    keep = (mask_t != 0) if keep is None else jnp.logical_and(keep, mask_t != 0)
  if keep is not None:
    s = jnp.where(keep, s, MASK_VALUE)
  if kvl is not None:  # a valid key length known at run time (<= kv_len): the rest is excluded
    s = jnp.where(kidx[None, :] < kvl, s, -jnp.inf)
  elif kv_padded:
    s = jnp.where(kidx[None, :] < cfg.kv_len, s, -jnp.inf)
  return s, keep


def _xla_fwd(cfg: _Cfg, q, k, v, bias, mask, kvl=None):
  B, T, N, D = q.shape
  bq, bk, tp, sp = _xla_blocks(cfg)
  qg, kg, vg, bg, mg = _xla_prep(cfg, q, k, v, bias, mask, tp, sp)
  nq, nk = tp // bq, sp // bk
  kv_padded = sp != cfg.kv_len
  K, G = kg.shape[1], cfg.groups

  def q_block(i):
    qi = lax.dynamic_slice_in_dim(qg, i * bq, bq, axis=3)

    def body(j, carry):
      acc, m, l = carry
      kj = lax.dynamic_slice_in_dim(kg, j * bk, bk, axis=2)
      vj = lax.dynamic_slice_in_dim(vg, j * bk, bk, axis=2)
      s, _ = _xla_scores(cfg, qi, kj, _xla_tile(bg, i, j, bq, bk), _xla_tile(mg, i, j, bq, bk),
                         i, j, bq, bk, kv_padded, kvl)
      m_new = jnp.maximum(m, s.max(-1))
      corr = jnp.exp(m - m_new)
      p = jnp.exp(s - m_new[..., None])
      l = corr * l + p.sum(-1)
      acc = corr[..., None] * acc + jnp.einsum(
          "bkgqs,bksd->bkgqd", p.astype(vj.dtype), vj, preferred_element_type=jnp.float32)
      return acc, m_new, l

    init = (jnp.zeros((B, K, G, bq, D), jnp.float32),
            jnp.full((B, K, G, bq), -jnp.inf, jnp.float32), jnp.zeros((B, K, G, bq), jnp.float32))
    upper = jnp.minimum((i * bq + bq + bk - 1) // bk, nk) if cfg.causal else nk
    if kvl is not None:  # key blocks past the valid length are skipped
      upper = jnp.minimum(upper, (kvl + bk - 1) // bk)
    acc, m, l = lax.fori_loop(0, upper, body, init)
    return (acc / l[..., None]).astype(q.dtype), m + jnp.log(l)

  o, lse = lax.map(q_block, jnp.arange(nq))        # [nq, B, K, G, bq, D], [nq, B, K, G, bq]
  o = o.transpose(1, 2, 3, 0, 4, 5).reshape(B, N, tp, D)[:, :, :T].transpose(0, 2, 1, 3)
  lse = lse.transpose(1, 2, 3, 0, 4).reshape(B, N, tp)
  return o, lse


def _xla_bwd(cfg: _Cfg, q, k, v, bias, mask, o, lse, do, kvl=None):
  B, T, N, D = q.shape
  S, K = k.shape[1], k.shape[2]
  G = cfg.groups
  bq, bk, tp, sp = _xla_blocks(cfg)
  qg, kg, vg, bg, mg = _xla_prep(cfg, q, k, v, bias, mask, tp, sp)
  dog = pad_axis(do, 1, tp).transpose(0, 2, 1, 3).reshape(B, K, G, tp, D)
  delta = jnp.einsum("btnd,btnd->bnt", o.astype(jnp.float32), do.astype(jnp.float32))
  delta = pad_axis(delta, 2, tp).reshape(B, K, G, tp)
  lse = lse[:, :, :tp].reshape(B, K, G, tp)
  nq, nk = tp // bq, sp // bk
  kv_padded = sp != cfg.kv_len

  def tile_grads(i, j, kj, vj):
    qi = lax.dynamic_slice_in_dim(qg, i * bq, bq, axis=3)
    doi = lax.dynamic_slice_in_dim(dog, i * bq, bq, axis=3)
    lse_i = lax.dynamic_slice_in_dim(lse, i * bq, bq, axis=3)
    delta_i = lax.dynamic_slice_in_dim(delta, i * bq, bq, axis=3)
    s, keep = _xla_scores(cfg, qi, kj, _xla_tile(bg, i, j, bq, bk), _xla_tile(mg, i, j, bq, bk),
                          i, j, bq, bk, kv_padded, kvl)
    p = _bwd_probs(s, lse_i[..., None], keep,
                   float(cfg.kv_len) if kvl is None else jnp.asarray(kvl, jnp.float32))
    dpv = jnp.einsum("bkgqd,bksd->bkgqs", doi, vj, preferred_element_type=jnp.float32)
    ds = p * (dpv - delta_i[..., None])
    if keep is not None:
      ds = jnp.where(keep, ds, 0.0)
    return qi, doi, p, ds

  # Pass 1 (per key block): dk, dv, and the bias gradient tiles.
  def k_block(j):
    kj = lax.dynamic_slice_in_dim(kg, j * bk, bk, axis=2)
    vj = lax.dynamic_slice_in_dim(vg, j * bk, bk, axis=2)

    def body(carry, i):
      dk, dv = carry
      qi, doi, p, ds = tile_grads(i, j, kj, vj)
      dv = dv + jnp.einsum("bkgqs,bkgqd->bksd", p.astype(doi.dtype), doi,
                           preferred_element_type=jnp.float32)
      dk = dk + jnp.einsum("bkgqs,bkgqd->bksd", ds.astype(qi.dtype), qi,
                           preferred_element_type=jnp.float32)
      db = None
      if bg is not None:
        db = ds.sum(axis=tuple(a for a in range(3) if bg.shape[a] == 1), keepdims=True)
      return (dk, dv), db

    init = (jnp.zeros((B, K, bk, D), jnp.float32), jnp.zeros((B, K, bk, D), jnp.float32))
    if bg is None:
      lower = (j * bk) // bq if cfg.causal else 0
      (dk, dv) = lax.fori_loop(lower, nq, lambda i, c: body(c, i)[0], init)
      return dk, dv, None
    (dk, dv), db = lax.scan(body, init, jnp.arange(nq))
    return dk, dv, db

  dk, dv, db = lax.map(k_block, jnp.arange(nk))    # [nk, B, K, bk, D]
  dk = dk.transpose(1, 0, 3, 2, 4).reshape(B, sp, K, D)[:, :S].astype(k.dtype)
  dv = dv.transpose(1, 0, 3, 2, 4).reshape(B, sp, K, D)[:, :S].astype(v.dtype)
  dbias = None
  if bg is not None:
    # db: [nk, nq, Bb, Kb, Gb, bq, bk] -> [Bb, Nb, Tp, Sp]
    Bb, Kb, Gb = db.shape[2:5]
    db = db.transpose(2, 3, 4, 1, 5, 0, 6).reshape(Bb, Kb * Gb, tp, sp)
    dbias = db[:, :, :T, :S]

  # Pass 2 (per query block): dq.
  def q_block(i):
    def body(j, dq):
      kj = lax.dynamic_slice_in_dim(kg, j * bk, bk, axis=2)
      vj = lax.dynamic_slice_in_dim(vg, j * bk, bk, axis=2)
      _, _, _, ds = tile_grads(i, j, kj, vj)
      return dq + jnp.einsum("bkgqs,bksd->bkgqd", ds.astype(kj.dtype), kj,
                             preferred_element_type=jnp.float32)
    upper = jnp.minimum((i * bq + bq + bk - 1) // bk, nk) if cfg.causal else nk
    if kvl is not None:
      upper = jnp.minimum(upper, (kvl + bk - 1) // bk)
    return lax.fori_loop(0, upper, body, jnp.zeros((B, K, G, bq, D), jnp.float32))

  dq = lax.map(q_block, jnp.arange(nq))            # [nq, B, K, G, bq, D]
  dq = dq.transpose(1, 0, 4, 2, 3, 5).reshape(B, tp, N, D)[:, :T]
  dq = (dq * cfg.scale).astype(q.dtype)
  dk = (dk.astype(jnp.float32) * cfg.scale).astype(k.dtype)
  return dq, dk, dv, dbias


# ----------------------------------------------------------------------------- custom_vjp

def _fwd_impl(cfg, q, k, v, bias, mask):
  if cfg.impl == "xla":
    return _xla_fwd(cfg, q, k, v, bias, mask)
  if cfg.impl == "tpu":
    return _tpu_fwd(cfg, q, k, v, bias, mask)
  if cfg.gpu_flavor == "mosaic":
    return _mgpu_fwd(cfg, q, k, v)
  return _pallas_fwd(cfg, q, k, v, bias, mask)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(cfg, q, k, v, bias, mask):
  return _fwd_impl(cfg, q, k, v, bias, mask)[0]


def _attention_fwd(cfg, q, k, v, bias, mask):
  o, lse = _fwd_impl(cfg, q, k, v, bias, mask)
  return o, (q, k, v, bias, mask, o, lse)


def _attention_bwd(cfg, res, do):
  q, k, v, bias, mask, o, lse = res
  if cfg.impl == "xla":
    dq, dk, dv, dbias = _xla_bwd(cfg, q, k, v, bias, mask, o, lse, do)
  elif cfg.impl == "tpu":
    dq, dk, dv, dbias = _tpu_bwd(cfg, q, k, v, bias, mask, o, lse, do)
  elif cfg.gpu_flavor == "mosaic":
    dq, dk, dv, dbias = _mgpu_bwd(cfg, q, k, v, o, lse, do)
  else:
    dq, dk, dv, dbias = _pallas_bwd(cfg, q, k, v, bias, mask, o, lse, do)
  return dq, dk.astype(k.dtype), dv.astype(v.dtype), _reduce_dbias(dbias, bias), None


_attention.defvjp(_attention_fwd, _attention_bwd)


def _reduce_dbias(dbias, bias):
  if dbias is None:
    return None
  dbias = dbias.sum(axis=tuple(a for a in range(2) if bias.shape[a] == 1), keepdims=True)
  return dbias.astype(bias.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention_kvl(cfg, q, k, v, bias, mask, kvl):
  """The XLA blockwise attention with a valid key length ``kvl`` (a traced int32 scalar)."""
  return _xla_fwd(cfg, q, k, v, bias, mask, kvl)[0]


def _attention_kvl_fwd(cfg, q, k, v, bias, mask, kvl):
  o, lse = _xla_fwd(cfg, q, k, v, bias, mask, kvl)
  return o, (q, k, v, bias, mask, kvl, o, lse)


def _attention_kvl_bwd(cfg, res, do):
  q, k, v, bias, mask, kvl, o, lse = res
  dq, dk, dv, dbias = _xla_bwd(cfg, q, k, v, bias, mask, o, lse, do, kvl)
  return dq, dk.astype(k.dtype), dv.astype(v.dtype), _reduce_dbias(dbias, bias), None, None


_attention_kvl.defvjp(_attention_kvl_fwd, _attention_kvl_bwd)


# ----------------------------------------------------------------------------- public API

def _broadcast_4d(api, name, t, target):
  t = jnp.asarray(t)
  if t.ndim > 4:
    raise KernelError(f"{api}: {name} must have rank <= 4 and broadcast to [batch, heads, q_seq, kv_seq]="
                      f"{list(target)}, got shape {tuple(t.shape)}")
  shape = (1,) * (4 - t.ndim) + tuple(t.shape)
  for d, (have, want) in enumerate(zip(shape, target)):
    if have not in (1, want):
      raise KernelError(
          f"{api}: {name} of shape {tuple(t.shape)} does not broadcast to [batch, heads, q_seq, kv_seq]="
          f"{list(target)} (dim {d} is {have}; valid: 1 or {want})")
  return t.reshape(shape)


def _validate(q, k, v, bias, mask, scale):
  for name, x in (("q", q), ("k", k), ("v", v)):
    check_array(_API, name, x, ndim=4)
  if not (q.dtype == k.dtype == v.dtype):
    raise KernelError(f"{_API}: q, k, v must share one dtype ({FLOAT_NAMES}), got q={q.dtype}, "
                      f"k={k.dtype}, v={v.dtype}")
  B, T, N, D = q.shape
  if k.shape != v.shape:
    raise KernelError(f"{_API}: k and v must have the same shape [batch, kv_seq, kv_heads, head_dim], "
                      f"got k={tuple(k.shape)}, v={tuple(v.shape)}")
  if k.shape[0] != B or k.shape[3] != D:
    raise KernelError(f"{_API}: k/v batch and head_dim must match q: q={tuple(q.shape)}, k={tuple(k.shape)} "
                      "(layout [batch, seq, heads, head_dim])")
  if not 1 <= D <= MAX_HEAD_DIM:
    raise KernelError(f"{_API}: head_dim={D} is out of range; supported 1 <= head_dim <= {MAX_HEAD_DIM}")
  K = k.shape[2]
  if K == 0 or N % K:
    raise KernelError(f"{_API}: q has {N} heads and k/v have {K}; the number of k/v heads must divide "
                      f"the number of q heads (grouped-query attention)")
  if T == 0 or k.shape[1] == 0:
    raise KernelError(f"{_API}: sequence lengths must be >= 1, got q_seq={T}, kv_seq={k.shape[1]}")
  if bias is not None:
    if not hasattr(bias, "dtype") or jnp.dtype(bias.dtype) not in FLOAT_DTYPES:
      raise KernelError(f"{_API}: bias must be a floating array ({FLOAT_NAMES}), got "
                        f"{getattr(bias, 'dtype', type(bias).__name__)}")
  if mask is not None:
    if not hasattr(mask, "dtype") or jnp.dtype(mask.dtype) != jnp.dtype(bool):
      raise KernelError(f"{_API}: mask must be a boolean array (True = attend), got "
                        f"{getattr(mask, 'dtype', type(mask).__name__)}")
  if scale is not None:
    try:
      float(scale)
    except Exception:
      raise KernelError(f"{_API}: scale must be a concrete Python float (it is static), got "
                        f"{type(scale).__name__}") from None


def _describe(args, kwargs):
  q, k, v = args[:3]
  shapes, dtypes = shapes_dtypes(q, k, v)
  static = {"is_causal": bool(kwargs.get("is_causal", False)),
            "bias": None if kwargs.get("bias") is None else list(kwargs["bias"].shape),
            "mask": None if kwargs.get("mask") is None else list(kwargs["mask"].shape)}
  return shapes, dtypes, static


def _candidates(args, kwargs):
  T, S = args[0].shape[1], args[1].shape[1]
  out = []
  for bq in (32, 64, 128):
    for bk in (32, 64, 128):
      for bb in (32, 64):
        for nw in (4, 8):
          out.append(BlockSizes(bq, bk, bb, bb, nw, 2))
  # TPU tiles (q rows multiples of 32, kv blocks of 128 lanes); legality filters per backend.
  for bq, bk, bqb, bkb in ((128, 128, 128, 128), (128, 256, 128, 128), (256, 512, 256, 256),
                           (512, 512, 256, 256)):
    out.append(BlockSizes(bq, bk, bqb, bkb))
  # dedupe after clamping to the sequence lengths
  seen, uniq = set(), []
  for c in out:
    key = (min(c.block_q, max(16, next_pow2(T))), min(c.block_k, max(16, next_pow2(S))),
           c.block_q_bwd, c.block_k_bwd, c.num_warps)
    if key not in seen:
      seen.add(key)
      uniq.append(c)
  return uniq


def _is_legal(bs, args, kwargs):
  q = args[0]
  impl = _registry.resolve_backend(kwargs.get("backend", "auto")).impl if "backend" in kwargs else "gpu"
  return _legality(bs, impl, q.shape[-1], jnp.dtype(q.dtype).itemsize)


def flash_attention(q, k, v, *, bias=None, mask=None, is_causal: bool = False,
                    scale: float | None = None, backend: str = "auto",
                    block_sizes: BlockSizes | None = None):
  """Memory-efficient attention with the semantics of ``jax.nn.dot_product_attention``.

  Args:
    q: ``[batch, q_seq, heads, head_dim]``.
    k: ``[batch, kv_seq, kv_heads, head_dim]``; ``kv_heads`` divides ``heads`` (GQA).
    v: same shape as ``k``.
    bias: optional float array broadcastable to ``[batch, heads, q_seq, kv_seq]``
      (differentiable).
    mask: optional boolean array broadcastable to ``[batch, heads, q_seq, kv_seq]``;
      True = attend.
    is_causal: query ``i`` attends keys ``j <= i``.
    scale: logit scale; default ``1/sqrt(head_dim)``.
    backend: ``"auto" | "pallas_gpu" | "pallas_tpu" | "xla" | "interpret" | "interpret_tpu"``.
    block_sizes: :class:`BlockSizes`; default: the autotune cache, else
      :meth:`BlockSizes.get_default`.

  Returns:
    ``[batch, q_seq, heads, head_dim]`` in ``q``'s dtype.

  Raises:
    KernelError: unsupported ranks, dtypes, head_dim, head counts or block sizes.

  >>> import jax.numpy as jnp
  >>> x = jnp.ones((1, 40, 2, 16))
  >>> flash_attention(x, x, x, is_causal=True, backend="xla").shape
  (1, 40, 2, 16)
  """
  _validate(q, k, v, bias, mask, scale)
  resolved = _registry.resolve_backend(backend, api=_API)
  B, T, N, D = q.shape
  S = k.shape[1]
  src = "explicit"
  if block_sizes is None:
    block_sizes = _autotune.lookup(flash_attention._lepton_tune_spec, (q, k, v),
                                   {"is_causal": is_causal, "bias": bias, "mask": mask},
                                   resolved.backend)
    src = "autotune-cache"
    if block_sizes is None:
      block_sizes = BlockSizes.get_default(q_len=T, kv_len=S, impl=resolved.impl, head_dim=D,
                                           dtype=q.dtype)
      src = "default"
  if not isinstance(block_sizes, BlockSizes):
    raise KernelError(f"{_API}: block_sizes must be a BlockSizes, got {type(block_sizes).__name__}")
  ok, reason = _legality(block_sizes, resolved.impl, D, jnp.dtype(q.dtype).itemsize)
  if not ok:
    raise KernelError(f"{_API}: illegal block_sizes for backend {resolved.backend!r}: {reason}")
  target = (B, N, T, S)
  if bias is not None:
    bias = _broadcast_4d(_API, "bias", bias, target)
  if mask is not None:
    mask = _broadcast_4d(_API, "mask", mask, target)
  shapes, dtypes = shapes_dtypes(q, k, v, bias, mask)
  _registry.record(_registry.Dispatch(_API, backend, resolved.backend, shapes, dtypes,
                                      dataclasses.asdict(block_sizes), src))
  scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
  if resolved.impl == "xla" and T <= block_sizes.block_q and S <= block_sizes.block_k:
    # One block covers the whole problem: the blockwise loops would only add overhead (the
    # backward measured ~2x slower than plain JAX at S=512 on CPU), so use plain JAX's
    # attention, which then needs no more memory than one block.
    return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale,
                                        is_causal=bool(is_causal), implementation="xla")
  bias_full = None
  if bias is not None:
    bias_full = jnp.broadcast_to(bias, bias.shape[:2] + (T, S))
  mask_full = None
  if mask is not None:
    mask_full = jnp.broadcast_to(mask, mask.shape[:2] + (T, S)).astype(jnp.int8)
  flavor = "triton"
  if resolved.impl == "gpu" and resolved.interpret is False:
    if (_registry.gpu_flavor() == "mosaic"
        and mgpu_attention().supported(q.dtype, D, bias is not None, mask is not None)):
      flavor = "mosaic"
  cfg = _make_cfg(resolved.impl, "" if resolved.interpret is False else resolved.impl, flavor,
                  scale, is_causal, q, k, bias, mask, block_sizes)
  return _attention(cfg, q, k, v, bias_full, mask_full)


def _make_cfg(impl, interpret, flavor, scale, is_causal, q, k, bias, mask, block_sizes) -> _Cfg:
  """The kernel configuration for ``q`` / ``k`` and the (4-d, broadcastable) ``bias`` / ``mask``."""
  T, N, S, K = q.shape[1], q.shape[2], k.shape[1], k.shape[2]
  return _Cfg(
      impl=impl, interpret=interpret, scale=scale, causal=bool(is_causal), q_len=T, kv_len=S,
      groups=N // K, has_bias=bias is not None, has_mask=mask is not None,
      bias_b=bias is not None and bias.shape[0] != 1, bias_h=bias is not None and bias.shape[1] != 1,
      mask_b=mask is not None and mask.shape[0] != 1, mask_h=mask is not None and mask.shape[1] != 1,
      bs=block_sizes, gpu_flavor=flavor)


def attention_valid_lengths(q, k, v, q_len, kv_len, *, bias=None, mask=None, is_causal=False,
                            scale=None, block_sizes: BlockSizes | None = None):
  """Attention over padded sequences whose true lengths are known only at run time.

  For ``adaptive_jit``'s shape buckets: ``q``'s first ``q_len`` positions and ``k``/``v``'s first
  ``kv_len`` positions are valid (int32 scalars, may be traced); the rest is padding of any
  content (NaN included). Valid query rows equal ``flash_attention`` of the unpadded arrays --
  padded keys are excluded outright, not given a mask fill, so a query whose own mask rejects
  every valid key still averages over the valid keys only, as unpadded -- and gradients at valid
  positions equal the unpadded gradients; padded rows of the output and gradients are zero.
  Blockwise XLA implementation (key blocks past ``kv_len`` are skipped); layouts and the other
  arguments as in :func:`flash_attention`.
  """
  _validate(q, k, v, bias, mask, scale)
  B, T, N, D = q.shape
  S = k.shape[1]
  if block_sizes is None:
    block_sizes = BlockSizes.get_default(q_len=T, kv_len=S, impl="xla", head_dim=D, dtype=q.dtype)
  scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
  q_len = jnp.clip(jnp.asarray(q_len, jnp.int32), 0, T)
  kvl = jnp.clip(jnp.asarray(kv_len, jnp.int32), 1, S)
  qv = (jnp.arange(T) < q_len)[None, :, None, None]
  kv = (jnp.arange(S) < kvl)[None, :, None, None]
  # ``where`` (not a product): padding may hold NaN/inf, and select's gradient is exactly zero.
  q = jnp.where(qv, q, jnp.zeros((), q.dtype))
  k = jnp.where(kv, k, jnp.zeros((), k.dtype))
  v = jnp.where(kv, v, jnp.zeros((), v.dtype))
  target = (B, N, T, S)
  bias_full = mask_full = None
  if bias is not None:
    bias = _broadcast_4d(_API, "bias", bias, target)
    ok = (jnp.arange(T)[:, None] < q_len) & (jnp.arange(S)[None, :] < kvl)
    bias_full = jnp.where(ok, jnp.broadcast_to(bias, bias.shape[:2] + (T, S)),
                          jnp.zeros((), bias.dtype))
  if mask is not None:
    mask = _broadcast_4d(_API, "mask", mask, target)
    mask_full = jnp.broadcast_to(mask, mask.shape[:2] + (T, S)).astype(jnp.int8)
  cfg = _make_cfg("xla", "", "triton", scale, is_causal, q, k, bias, mask, block_sizes)
  o = _attention_kvl(cfg, q, k, v, bias_full, mask_full, kvl)
  return jnp.where(qv, o, jnp.zeros((), o.dtype))


flash_attention._lepton_tune_spec = _autotune.TuneSpec(
    "flash_attention", BlockSizes, _describe, _candidates, _is_legal)
