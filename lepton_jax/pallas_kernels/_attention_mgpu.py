"""Flash attention forward and backward on Mosaic GPU (Hopper, sm_90+): TMA, wgmma, pipelines.

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

The backward (``mgpu_flash_bwd``) is two kernels of 64-row tiles (dK/dV per key block, dQ per
query block), see below.

Not yet done (FA3 features): warp specialisation (a producer warpgroup issuing TMA while two
consumer warpgroups compute, with ping-pong scheduling barriers); this kernel overlaps TMA
and wgmma through ``emit_pipeline``'s multi-buffering within one warpgroup. No fp8.

Status: lowers from a CPU host for ``cuda`` (Mosaic GPU assumes sm_90 there) and runs in
Mosaic GPU's interpret mode (with dots in place of wgmma, see below); it has NOT yet been
compiled or timed on a real Hopper GPU (``benchmarks/gpu_check.py`` does that).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from lepton_jax.pallas_kernels import _mgpu

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
      compiler_params=_mgpu.compiler_params(approx_math=True),
      interpret=False if interpret is None else interpret,
      cost_estimate=cost_estimate,
      name="lepton_flash_attention_fwd_mgpu",
  )(q, k, v)


# ----------------------------------------------------------------------------- backward
# Two kernels, as FlashAttention-2/3: dK/dV per key block (S^T = K Q^T so that P^T and dS^T
# are wgmma A operands in registers; Q, dO, lse, delta stream through a TMA pipeline) and dQ
# per query block (K, V stream). dK/dV are per query head ([B, Sp, N, D]); the caller sums
# over the GQA group. Causal: dQ stops at the diagonal block; dK/dV masks (no block skipping
# yet). Same interpret-mode substitutions as the forward.

def _tools(interpret):
  hw = interpret is False or interpret is None

  def mm(a, b, *, shape, a_smem, b_smem, b_t=False, acc=None):
    """a @ b (b transposed when b_t) -> float32; wgmma on the GPU, a dot when interpreting."""
    if not hw:
      av = a[...] if a_smem else a
      bv = b[...]
      dims = (((1,), (1,)), ((), ())) if b_t else (((1,), (0,)), ((), ()))
      r = lax.dot_general(av, bv, dims, preferred_element_type=jnp.float32)
      return r if acc is None else acc + r
    bref = plgpu.transpose_ref(b, (1, 0)) if b_t else b
    if acc is None:
      def f(acc_ref):
        plgpu.wgmma(acc_ref, a, bref)
        return acc_ref[...]
      return pl.run_scoped(f, plgpu.ACC(shape, jnp.float32))
    def g(acc_ref):
      plgpu.wgmma(acc_ref, a, bref)
    return pl.run_state(g)(plgpu.ACC.init(acc))

  def zeros(shape):
    z = jnp.full(shape, 0.0, jnp.float32)
    return plgpu.layout_cast(z, plgpu.Layout.WGMMA) if hw else z

  def iota(shape, dim):
    if hw:
      return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)
    return lax.broadcasted_iota(jnp.int32, shape, dim)

  def load_vec(ref, axis):
    """[n] float32 from SMEM in the layout that broadcasts along ``axis`` of a WGMMA tile."""
    return _mgpu.Tools(hw).vec(ref, axis)

  return hw, mm, zeros, iota, load_vec


def mgpu_flash_bwd(q, k, v, do, lse, delta, *, scale: float, causal: bool, kv_len: int,
                   config: MgpuConfig, interpret=False, cost_estimate=None):
  """Padded q/do [B, Tp, N, D], k/v [B, Sp, K, D], lse/delta [B, N, Tp] float32.

  Returns dq [B, Tp, N, D], dk, dv [B, Sp, N, D] (per query head).
  """

  B, Tp, N, D = q.shape
  Sp, K = k.shape[1], k.shape[2]
  G = N // K
  bq, bk = 64, 64
  if Tp % bq or Sp % bk:
    raise ValueError(f"mosaic gpu attention bwd: padded lengths {Tp}, {Sp} must be multiples of 64")
  dtype = q.dtype
  nq, nk_total = Tp // bq, Sp // bk
  steps = max(1, min(config.max_concurrent_steps, min(nq, nk_total)))
  kv_padded = Sp != kv_len
  transforms = (plgpu.TilingTransform((8, 128 // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(128))
  hw, mm, zeros, iota, load_vec = _tools(interpret)
  interp = False if interpret is None else interpret
  tile = lambda r: plgpu.BlockSpec((r, D), lambda i: (i, 0), transforms=transforms)
  vec = plgpu.BlockSpec((bq,), lambda i: (i,))

  # ---- dK, dV: grid (heads, kv blocks, batch); pipeline over the query blocks.
  def dkv_body(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, k_smem, v_smem, bars):
    h, j, b = lax.axis_index("heads"), lax.axis_index("kv_seq"), lax.axis_index("batch")
    kv_head = lax.div(h, jnp.int32(G))
    k_base = j * bk
    plgpu.copy_gmem_to_smem(k_ref.at[b, pl.ds(k_base, bk), kv_head], k_smem, bars.at[0])
    plgpu.copy_gmem_to_smem(v_ref.at[b, pl.ds(k_base, bk), kv_head], v_smem, bars.at[1])
    plgpu.barrier_wait(bars.at[0])
    plgpu.barrier_wait(bars.at[1])

    def step(idx, q_smem, do_smem, lse_smem, delta_smem, carry):
      dk, dv = carry
      (i,) = idx
      s_t = mm(k_smem, q_smem, shape=(bk, bq), a_smem=True, b_smem=True, b_t=True) * scale
      lse = load_vec(lse_smem, 0)
      p_t = jnp.exp(s_t - lax.broadcast_in_dim(lse, (bk, bq), [1]))
      if causal:
        keep = (iota((bk, bq), 1) + i * bq) >= (iota((bk, bq), 0) + k_base)
        p_t = jnp.where(keep, p_t, 0.0)
      dv = mm(p_t.astype(dtype), do_smem, shape=(bk, D), a_smem=False, b_smem=True, acc=dv)
      dp_t = mm(v_smem, do_smem, shape=(bk, bq), a_smem=True, b_smem=True, b_t=True)
      delta = load_vec(delta_smem, 0)
      ds_t = p_t * (dp_t - lax.broadcast_in_dim(delta, (bk, bq), [1]))
      dk = mm(ds_t.astype(dtype), q_smem, shape=(bk, D), a_smem=False, b_smem=True, acc=dk)
      return dk, dv

    pipeline = plgpu.emit_pipeline(step, grid=(nq,), in_specs=[tile(bq), tile(bq), vec, vec],
                                   max_concurrent_steps=steps, init_carry=(zeros((bk, D)), zeros((bk, D))))
    dk, dv = pipeline(q_ref.at[b, :, h], do_ref.at[b, :, h], lse_ref.at[b, h], delta_ref.at[b, h])
    k_smem[...] = (dk * scale).astype(dtype)
    v_smem[...] = dv.astype(dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[b, pl.ds(k_base, bk), h])
    plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[b, pl.ds(k_base, bk), h])
    plgpu.wait_smem_to_gmem(0)

  def dkv_kernel(*refs):
    pl.run_scoped(functools.partial(dkv_body, *refs),
                  plgpu.SMEM((bk, D), dtype, transforms=transforms),
                  plgpu.SMEM((bk, D), dtype, transforms=transforms),
                  plgpu.Barrier(num_barriers=2), collective_axes=())

  kv_out = jax.ShapeDtypeStruct((B, Sp, N, D), dtype)
  dk, dv = pl.kernel(
      dkv_kernel, out_type=(kv_out, kv_out),
      mesh=plgpu.Mesh(grid=(N, nk_total, B), grid_names=("heads", "kv_seq", "batch"),
                      kernel_name="lepton_flash_attention_bwd_dkv_mgpu"),
      compiler_params=_mgpu.compiler_params(approx_math=True), interpret=interp,
      cost_estimate=cost_estimate, name="lepton_flash_attention_bwd_dkv_mgpu",
  )(q, k, v, do, lse, delta)

  # ---- dQ: grid (heads, q blocks, batch); pipeline over the key blocks.
  def dq_body(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, q_smem, do_smem, lse_smem,
              delta_smem, bars):
    h, i, b = lax.axis_index("heads"), lax.axis_index("q_seq"), lax.axis_index("batch")
    kv_head = lax.div(h, jnp.int32(G))
    q_base = i * bq
    plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(q_base, bq), h], q_smem, bars.at[0])
    plgpu.copy_gmem_to_smem(do_ref.at[b, pl.ds(q_base, bq), h], do_smem, bars.at[1])
    plgpu.copy_gmem_to_smem(lse_ref.at[b, h, pl.ds(q_base, bq)], lse_smem, bars.at[2])
    plgpu.copy_gmem_to_smem(delta_ref.at[b, h, pl.ds(q_base, bq)], delta_smem, bars.at[3])
    for t in range(4):
      plgpu.barrier_wait(bars.at[t])
    lse = load_vec(lse_smem, 1)
    delta = load_vec(delta_smem, 1)

    def step(idx, k_smem, v_smem, dq):
      (jj,) = idx
      s = mm(q_smem, k_smem, shape=(bq, bk), a_smem=True, b_smem=True, b_t=True) * scale
      p = jnp.exp(s - lax.broadcast_in_dim(lse, (bq, bk), [0]))
      if causal or kv_padded:
        kid = iota((bq, bk), 1) + jj * bk
        keep = None
        if causal:
          keep = (iota((bq, bk), 0) + q_base) >= kid
        if kv_padded:
          keep = (kid < kv_len) if keep is None else jnp.logical_and(keep, kid < kv_len)
        p = jnp.where(keep, p, 0.0)
      dp = mm(do_smem, v_smem, shape=(bq, bk), a_smem=True, b_smem=True, b_t=True)
      ds = p * (dp - lax.broadcast_in_dim(delta, (bq, bk), [0]))
      return mm(ds.astype(dtype), k_smem, shape=(bq, D), a_smem=False, b_smem=True, acc=dq)

    if causal:
      nk = jnp.minimum(lax.div(q_base + bq + bk - 1, jnp.int32(bk)), jnp.int32(nk_total))
    else:
      nk = nk_total
    pipeline = plgpu.emit_pipeline(step, grid=(nk,), in_specs=[tile(bk), tile(bk)],
                                   max_concurrent_steps=steps, init_carry=zeros((bq, D)))
    dq = pipeline(k_ref.at[b, :, kv_head], v_ref.at[b, :, kv_head])
    q_smem[...] = (dq * scale).astype(dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[b, pl.ds(q_base, bq), h])
    plgpu.wait_smem_to_gmem(0)

  def dq_kernel(*refs):
    pl.run_scoped(functools.partial(dq_body, *refs),
                  plgpu.SMEM((bq, D), dtype, transforms=transforms),
                  plgpu.SMEM((bq, D), dtype, transforms=transforms),
                  plgpu.SMEM((bq,), jnp.float32), plgpu.SMEM((bq,), jnp.float32),
                  plgpu.Barrier(num_barriers=4), collective_axes=())

  dq = pl.kernel(
      dq_kernel, out_type=jax.ShapeDtypeStruct(q.shape, dtype),
      mesh=plgpu.Mesh(grid=(N, nq, B), grid_names=("heads", "q_seq", "batch"),
                      kernel_name="lepton_flash_attention_bwd_dq_mgpu"),
      compiler_params=_mgpu.compiler_params(approx_math=True), interpret=interp,
      cost_estimate=cost_estimate, name="lepton_flash_attention_bwd_dq_mgpu",
  )(q, k, v, do, lse, delta)
  return dq, dk, dv
