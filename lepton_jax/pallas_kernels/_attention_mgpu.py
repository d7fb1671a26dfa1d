"""Flash attention forward on Mosaic GPU (Hopper, sm_90+): TMA loads, wgmma, pipelined K/V.

The design follows FlashAttention-3 / JAX's ``pallas/ops/gpu/attention_mgpu.py`` in its
essentials: each CTA owns ``block_q`` query rows of one (batch, head); the query tile is
brought into shared memory once by TMA; key/value tiles stream through a
``max_concurrent_steps``-deep shared-memory ring (``plgpu.emit_pipeline``: TMA copies of step
``j + 1`` overlap the wgmma of step ``j``); ``S = Q K^T`` and ``O += P V`` run on the tensor
cores as wgmma with float32 register accumulators; the online softmax keeps the running max
and sum in the WGMMA row layout. The output reuses the query's shared-memory tile and leaves
by TMA; the log-sum-exp ([B, H, T] float32) is written for the backward pass.

Scope (anything else is served by the Triton kernel): float16 / bfloat16, head_dim a multiple
of 64 up to 256, no bias / mask (causal and ragged lengths are supported: lengths are padded
to the tiles and padded keys masked).

Status: lowers from a CPU host for ``cuda`` (Mosaic GPU assumes sm_90 there) and runs in
Mosaic GPU's interpret mode; it has not yet been compiled or timed on a real Hopper GPU
(``benchmarks/gpu_check.py`` does that).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

MGPU_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


@dataclasses.dataclass(frozen=True)
class MgpuConfig:
  block_q: int = 64             # one warpgroup: wgmma M = 64
  block_kv: int = 128
  max_concurrent_steps: int = 2


def supported(dtype, head_dim: int, has_bias: bool, has_mask: bool) -> bool:
  return (jnp.dtype(dtype) in MGPU_DTYPES and head_dim % 64 == 0 and 64 <= head_dim <= 256
          and not has_bias and not has_mask)


def default_config(head_dim: int, dtype) -> MgpuConfig:
  """Tiles within the 227 KiB of shared memory (q tile + a 2-deep K/V ring, 16-bit)."""
  block_kv = 128 if head_dim <= 128 else 64
  return MgpuConfig(64, block_kv, 2)


def smem_bytes(cfg: MgpuConfig, head_dim: int, itemsize: int) -> int:
  return (cfg.block_q * head_dim + 2 * cfg.max_concurrent_steps * cfg.block_kv * head_dim) * itemsize \
      + cfg.block_q * 4 + 1024


def mgpu_flash_fwd(q, k, v, *, scale: float, causal: bool, kv_len: int, config: MgpuConfig,
                   interpret=False, cost_estimate=None):
  """q [B, Tp, N, D], k/v [B, Sp, K, D] (Tp % block_q == 0, Sp % block_kv == 0).

  Returns ``(o [B, Tp, N, D], lse [B, N, Tp] float32)``; keys at positions >= ``kv_len`` are
  masked.
  """
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import mosaic_gpu as plgpu

  B, Tp, N, D = q.shape
  Sp, K = k.shape[1], k.shape[2]
  G = N // K
  bq, bk = config.block_q, config.block_kv
  if Tp % bq or Sp % bk:
    raise ValueError(f"mosaic gpu attention: padded lengths {Tp}, {Sp} must be multiples of "
                     f"block_q={bq}, block_kv={bk}")
  dtype = q.dtype
  nk_total = Sp // bk
  steps = max(1, min(config.max_concurrent_steps, nk_total))
  kv_padded = Sp != kv_len
  swizzle = 128
  transforms = (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)),
                plgpu.SwizzleTransform(swizzle))
  # Mosaic GPU's interpreter (0.10) runs neither ``run_state``, a wgmma with a transposed
  # (K^T) shared-memory operand or one with a register A operand, nor layout hints; so in
  # interpret mode the two matmuls are plain float32-accumulating dots of the same tiles and
  # the layout hints are dropped. Everything else (TMA copies, the K/V pipeline, indexing,
  # masking, the online softmax, the output / lse stores) is the same code, which is what the
  # interpret-mode test checks; the wgmma path is checked by lowering only.
  in_place = interpret is False or interpret is None
  if in_place:
    layout_cast = plgpu.layout_cast
    def iota(shape, dim):
      return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)
  else:
    def layout_cast(x, _):
      return x
    def iota(shape, dim):
      return lax.broadcasted_iota(jnp.int32, shape, dim)
  wgmma_layout = plgpu.Layout.WGMMA
  row_layout = plgpu.Layout.WGMMA.reduce(1)

  def body(q_ref, k_ref, v_ref, o_ref, lse_ref, q_smem, lse_smem, q_barrier):
    b = lax.axis_index("batch")
    h = lax.axis_index("heads")
    q_base = lax.axis_index("q_seq") * bq
    plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(q_base, bq), h], q_smem, q_barrier)
    plgpu.barrier_wait(q_barrier)

    m0 = layout_cast(jnp.full((bq,), -jnp.inf, jnp.float32), row_layout)
    l0 = layout_cast(jnp.full((bq,), 0.0, jnp.float32), row_layout)
    acc0 = layout_cast(jnp.full((bq, D), 0.0, jnp.float32), wgmma_layout)

    def step(idx, k_smem, v_smem, carry):
      acc, m, l = carry
      (j,) = idx

      def qk(acc_ref):
        plgpu.wgmma(acc_ref, q_smem, plgpu.transpose_ref(k_smem, (1, 0)))
        return acc_ref[...]

      if in_place:
        s = pl.run_scoped(qk, plgpu.ACC((bq, bk), jnp.float32)) * scale
      else:   # the interpreter's wgmma does not take a transposed (K^T) operand
        s = lax.dot_general(q_smem[...], k_smem[...], (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32) * scale
      if causal or kv_padded:
        kid = iota((bq, bk), 1) + j * bk
        keep = None
        if causal:
          qid = iota((bq, bk), 0) + q_base
          keep = qid >= kid
        if kv_padded:
          in_range = kid < kv_len
          keep = in_range if keep is None else jnp.logical_and(keep, in_range)
        s = jnp.where(keep, s, -jnp.inf)
      m_new = jnp.maximum(m, s.max(axis=1))
      alpha = jnp.exp(m - m_new)
      p = jnp.exp(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
      l = l * alpha + p.sum(axis=1)
      acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])

      if in_place:
        def pv(acc_ref):
          plgpu.wgmma(acc_ref, p.astype(dtype), v_smem)
        acc = pl.run_state(pv)(plgpu.ACC.init(acc))
      else:
        acc = acc + lax.dot_general(p.astype(dtype), v_smem[...], (((1,), (0,)), ((), ())),
                                    preferred_element_type=jnp.float32)
      return acc, m_new, l

    if causal:
      nk = jnp.minimum(lax.div(q_base + bq + bk - 1, jnp.int32(bk)), jnp.int32(nk_total))
    else:
      nk = nk_total
    kv_head = lax.div(h, jnp.int32(G))
    spec = plgpu.BlockSpec((bk, D), lambda j: (j, 0), transforms=transforms)
    pipeline = plgpu.emit_pipeline(step, grid=(nk,), in_specs=[spec, spec],
                                   max_concurrent_steps=steps, init_carry=(acc0, m0, l0))
    acc, m, l = pipeline(k_ref.at[b, :, kv_head], v_ref.at[b, :, kv_head])
    acc = acc / lax.broadcast_in_dim(l, acc.shape, [0])
    q_smem[...] = acc.astype(dtype)          # the q tile is no longer needed: reuse it
    lse_smem[...] = m + jnp.log(l)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_smem, o_ref.at[b, pl.ds(q_base, bq), h])
    plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, h, pl.ds(q_base, bq)])
    plgpu.wait_smem_to_gmem(0)

  def kernel_body(q_ref, k_ref, v_ref, o_ref, lse_ref):
    # Scratch allocated as plgpu.kernel does (run_scoped inside the kernel body).
    pl.run_scoped(functools.partial(body, q_ref, k_ref, v_ref, o_ref, lse_ref),
                  plgpu.SMEM((bq, D), dtype, transforms=transforms),
                  plgpu.SMEM((bq,), jnp.float32),
                  plgpu.Barrier(num_barriers=1),
                  collective_axes=())

  # pl.kernel over a Mosaic GPU mesh (what plgpu.kernel wraps) so that the call carries a
  # cost estimate.
  mesh = plgpu.Mesh(grid=(N, Tp // bq, B), grid_names=("heads", "q_seq", "batch"),
                    kernel_name="lepton_flash_attention_fwd_mgpu")
  return pl.kernel(
      kernel_body,
      out_type=(jax.ShapeDtypeStruct(q.shape, dtype), jax.ShapeDtypeStruct((B, N, Tp), jnp.float32)),
      mesh=mesh,
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=False if interpret is None else interpret,
      cost_estimate=cost_estimate,
      name="lepton_flash_attention_fwd_mgpu",
  )(q, k, v)
