"""Mosaic GPU (Hopper, sm_90+) kernels for norms, softmax cross-entropy and the matmul epilogue.

Shared design (as ``_attention_mgpu``): ``pl.kernel`` over a Mosaic GPU mesh, one warpgroup per
CTA, tiles of 64 rows (the WGMMA register layout's row granularity), operands brought into
shared memory by TMA through ``plgpu.emit_pipeline`` (copies of step ``j + 1`` overlap the
compute of step ``j``), 128-byte swizzled tiles. A TMA box holds at most 256 elements per
dimension: Mosaic GPU splits swizzled tiles into per-tile boxes, but the untiled vector copies
(scale / bias / dscale / dbias chunks) are single boxes, and shared memory is 227 KiB, so every
long axis (features, vocabulary, K) is walked in chunks of <= 256 columns (64 for the norms /
CE: registers, see :data:`STREAM_CHUNK`).

* Norms (``norm_fwd`` / ``norm_bwd``): a CTA owns 64 rows; the feature axis is walked twice
  (statistics, then output), so no row has to fit in shared memory. The layer-norm statistics
  combine per-chunk (mean, M2) pairs (Chan et al.), as stable as a two-pass variance. The
  backward writes ``dx`` and per-CTA ``[rows/64, D]`` float32 partials of ``dscale`` /
  ``dbias`` (summed by XLA).
* Cross-entropy (``ce_fwd`` / ``ce_bwd``): a CTA owns 64 rows and walks the vocabulary with an
  online logsumexp; the backward writes ``dlogits`` chunk by chunk. Nothing of size
  ``[N, V]`` is made besides the logits and their gradient.
* Matmul (``matmul``): 128 x 128 output tiles (two wgmma M=64 halves in one accumulator),
  K chunks of 64 pipelined 4 deep, float32 accumulation, the bias + activation epilogue in
  registers, optionally also writing the pre-activation (for the backward). Transposed
  operands are read through ``plgpu.transpose_ref`` (no transposed copy).

Scope (the caller keeps the Triton kernel otherwise): rows and features / vocabulary / M, N, K
multiples of 64 (no padded copies of the big operands are ever made); norms and CE in
float32 / bfloat16 / float16, matmul in bfloat16 / float16.

jax 0.10 / 0.11: every kernel states ``lowering_semantics=Lane`` (0.11 made the warpgroup
semantics the default; these kernels place their register layouts explicitly), and vectors
are loaded with ``plgpu.load(ref.at[...])``-style calls without the ``idx`` argument where the
installed JAX allows (0.11 deprecated it; 0.10 requires it).

Interpret mode (Mosaic GPU's interpreter, how CPU tests check these kernels): the interpreter
runs neither layout hints nor wgmma with transposed / register operands, so there the
layouts are dropped and matmuls become float32-accumulating dots of the same shared-memory
tiles; everything else (TMA copies, pipelines, indexing, masking, the math) is the same code.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect

import jax
import jax.numpy as jnp
from jax import lax

# This module itself is imported lazily (``_common.mgpu()``): importing Mosaic GPU costs ~0.7 s.
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

ROWS = 64                 # rows per CTA: the WGMMA layout's row tile
MIN_CHUNK = 64
MAX_BOX = 256             # TMA: at most 256 elements along each dimension of a box
MGPU_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
MGPU_MM_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def compiler_params(**kw):
  """Mosaic GPU params with the Lane lowering semantics stated (0.11 changed the default)."""
  sem = getattr(plgpu, "LoweringSemantics", None)
  if sem is not None and "lowering_semantics" in {f.name for f in dataclasses.fields(plgpu.CompilerParams)}:
    kw.setdefault("lowering_semantics", sem.Lane)
  return plgpu.CompilerParams(**kw)


def _load_takes_idx() -> bool:
  p = inspect.signature(plgpu.load).parameters.get("idx")
  return p is not None and p.default is inspect.Parameter.empty


_LOAD_NEEDS_IDX = _load_takes_idx()


def chunk_for(n: int, cap: int = MAX_BOX) -> int | None:
  """Largest of 256 / 128 / 64 (<= cap) dividing ``n``; None if 64 does not divide it."""
  for c in (256, 128, 64):
    if c <= cap and n % c == 0:
      return c
  return None


def transforms(dtype):
  item = jnp.dtype(dtype).itemsize
  return (plgpu.TilingTransform((8, 128 // item)), plgpu.SwizzleTransform(128))


@dataclasses.dataclass(frozen=True)
class Tools:
  """Hardware (``hw``) vs interpreter spellings of the few ops the interpreter lacks."""
  hw: bool

  def interp(self, interpret):
    return False if interpret is None else interpret

  def tile(self, ref):
    """[R, C] tile from SMEM in the WGMMA register layout, as float32."""
    if self.hw:
      x = plgpu.load(ref, (), layout=plgpu.Layout.WGMMA) if _LOAD_NEEDS_IDX else \
          plgpu.load(ref, layout=plgpu.Layout.WGMMA)
    else:
      x = ref[...]
    return x.astype(jnp.float32)

  def vec(self, ref, axis, dtype=jnp.float32):
    """[n] vector from SMEM in the layout that broadcasts along ``axis`` of a WGMMA tile."""
    if self.hw:
      lay = plgpu.Layout.WGMMA.reduce(axis)
      v = plgpu.load(ref, (), layout=lay) if _LOAD_NEEDS_IDX else plgpu.load(ref, layout=lay)
    else:
      v = ref[...]
    return v.astype(dtype)

  def full(self, shape, value):
    z = jnp.full(shape, value, jnp.float32)
    if not self.hw:
      return z
    lay = plgpu.Layout.WGMMA if len(shape) == 2 else plgpu.Layout.WGMMA.reduce(1)
    return plgpu.layout_cast(z, lay)

  def iota(self, shape, dim):
    if self.hw:
      return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)
    return lax.broadcasted_iota(jnp.int32, shape, dim)

  def mm(self, a, b, *, shape, a_t=False, b_t=False, acc=None):
    """a @ b of SMEM tiles (``a_t`` / ``b_t``: use the transpose) -> float32."""
    if not self.hw:
      av = a[...]
      bv = b[...]
      av = av.T if a_t else av
      bv = bv.T if b_t else bv
      r = lax.dot_general(av, bv, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
      return r if acc is None else acc + r
    aref = plgpu.transpose_ref(a, (1, 0)) if a_t else a
    bref = plgpu.transpose_ref(b, (1, 0)) if b_t else b
    if acc is None:
      def f(acc_ref):
        plgpu.wgmma(acc_ref, aref, bref)
        return acc_ref[...]
      return pl.run_scoped(f, plgpu.ACC(shape, jnp.float32))
    def g(acc_ref):
      plgpu.wgmma(acc_ref, aref, bref)
    return pl.run_state(g)(plgpu.ACC.init(acc))


def tools(interpret) -> Tools:
  return Tools(hw=interpret is False or interpret is None)


def _rowb(v, shape):
  return lax.broadcast_in_dim(v, shape, [0])


def _colb(v, shape):
  return lax.broadcast_in_dim(v, shape, [1])


def _mesh(grid, names, name):
  return plgpu.Mesh(grid=grid, grid_names=names, kernel_name=name)


class Outs:
  """Double-buffered SMEM -> GMEM output copies issued by hand inside a pipeline step.

  ``emit_pipeline``'s own output specs use predicated copies, which Mosaic GPU's interpreter
  does not run; these are plain TMA stores: step ``j`` writes slot ``j % 2`` after waiting
  until the copies of step ``j - 2`` (same slot) have finished reading shared memory.
  """

  def __init__(self, bufs):
    self.bufs = bufs

  def slots(self, j):
    plgpu.wait_smem_to_gmem(len(self.bufs), wait_read_only=True)
    return [b.at[lax.rem(j, 2)] for b in self.bufs]

  def send(self, slots, dsts):
    plgpu.commit_smem()
    for s, d in zip(slots, dsts):
      plgpu.copy_smem_to_gmem(s, d)

  @staticmethod
  def done():
    plgpu.wait_smem_to_gmem(0)


# Chunk of the streamed axis of the norm / CE kernels: 64 columns. Registers decide it: a
# [64, C] float32 tile in the WGMMA layout holds C / 2 values per thread, and the backward keeps
# about four such tiles live (x-hat, dy, g, dx), i.e. 128 registers at C = 64 (C = 256 would be
# 512: spills past the 255-register limit). Bandwidth comes from a 4-deep TMA pipeline
# (4 x 8 KiB bf16 / 16 KiB f32 in flight per CTA) and the small shared memory, which lets
# several CTAs share an SM.
STREAM_CHUNK = 64
STREAM_STEPS = 4


def norm_chunk(d: int, dtype) -> int | None:
  """Columns per pipeline step of the norm / CE kernels (:data:`STREAM_CHUNK`); None unless
  64 divides ``d``."""
  del dtype
  return chunk_for(d, STREAM_CHUNK)


def norm_smem_bytes(d: int, dtype) -> int:
  """Shared memory of the larger (backward) norm kernel: x and dy rings, dx double-buffered,
  the scale ring, float32 dscale / dbias chunks, statistics."""
  c = norm_chunk(d, dtype)
  tile = ROWS * c * jnp.dtype(dtype).itemsize
  return (2 * STREAM_STEPS + 2) * tile + STREAM_STEPS * c * 4 + 2 * 2 * c * 4 + 4 * ROWS * 4 + 2048


# ----------------------------------------------------------------------------- norms

def norm_fwd(x, scale, bias, *, kind: str, eps: float, features: int, interpret=False,
             cost_estimate=None):
  """x [R, D] (R % 64 == 0, D % 64 == 0), scale / bias [D] -> y [R, D], mean, rstd [R] f32."""
  t = tools(interpret)
  R, D = x.shape
  C = norm_chunk(D, x.dtype)
  nc = D // C
  dtype = x.dtype
  tr = transforms(dtype)
  tile = plgpu.BlockSpec((ROWS, C), lambda j: (0, j), transforms=tr)
  vec = plgpu.BlockSpec((C,), lambda j: (j,))
  shape = (ROWS, C)

  def body(x_ref, s_ref, b_ref, y_ref, mean_ref, rstd_ref, y_buf, mean_smem, rstd_smem):
    i = lax.axis_index("rows")
    rows = pl.ds(i * ROWS, ROWS)

    def stat_step(idx, x_smem, carry):
      (j,) = idx
      xf = t.tile(x_smem)
      if kind == "rms":
        (ss,) = carry
        return (ss + (xf * xf).sum(axis=1),)
      mean, m2 = carry
      cm = xf.sum(axis=1) * (1.0 / C)
      xc = xf - _rowb(cm, shape)
      cm2 = (xc * xc).sum(axis=1)
      n_a = (j * C).astype(jnp.float32)
      w = C / (n_a + C)
      delta = cm - mean
      return mean + delta * w, m2 + cm2 + delta * delta * (n_a * w)

    init = (t.full((ROWS,), 0.0),) if kind == "rms" else (t.full((ROWS,), 0.0), t.full((ROWS,), 0.0))
    stats = plgpu.emit_pipeline(stat_step, grid=(nc,), in_specs=[tile],
                                max_concurrent_steps=min(STREAM_STEPS, nc), init_carry=init)(x_ref.at[rows])
    if kind == "rms":
      mean = t.full((ROWS,), 0.0)
      rstd = lax.rsqrt(stats[0] * (1.0 / features) + eps)
    else:
      mean = stats[0]
      rstd = lax.rsqrt(stats[1] * (1.0 / features) + eps)
    outs = Outs([y_buf])

    def out_step(idx, x_smem, s_smem, b_smem):
      (j,) = idx
      xf = t.tile(x_smem)
      y = (xf - _rowb(mean, shape)) * _rowb(rstd, shape) * _colb(t.vec(s_smem, 0), shape)
      if kind == "ln":
        y = y + _colb(t.vec(b_smem, 0), shape)
      (y_smem,) = slots = outs.slots(j)
      y_smem[...] = y.astype(dtype)
      outs.send(slots, [y_ref.at[rows, pl.ds(j * C, C)]])

    plgpu.emit_pipeline(out_step, grid=(nc,), in_specs=[tile, vec, vec],
                        max_concurrent_steps=min(STREAM_STEPS, nc))(x_ref.at[rows], s_ref, b_ref)
    mean_smem[...] = mean
    rstd_smem[...] = rstd
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(mean_smem, mean_ref.at[rows])
    plgpu.copy_smem_to_gmem(rstd_smem, rstd_ref.at[rows])
    Outs.done()

  def kernel(*refs):
    pl.run_scoped(functools.partial(body, *refs), plgpu.SMEM((2, ROWS, C), dtype, transforms=tr),
                  plgpu.SMEM((ROWS,), jnp.float32), plgpu.SMEM((ROWS,), jnp.float32),
                  collective_axes=())

  name = f"lepton_{kind}_norm_fwd_mgpu"
  stat = jax.ShapeDtypeStruct((R,), jnp.float32)
  return pl.kernel(kernel, out_type=(jax.ShapeDtypeStruct((R, D), dtype), stat, stat),
                   mesh=_mesh((R // ROWS,), ("rows",), name), compiler_params=compiler_params(),
                   interpret=t.interp(interpret), cost_estimate=cost_estimate, name=name,
                   )(x, scale, bias)


def norm_bwd(x, scale, mean, rstd, dy, *, kind: str, features: int, interpret=False,
             cost_estimate=None):
  """Returns dx [R, D] and float32 partials dscale, dbias [R / 64, D] (sum over axis 0)."""
  t = tools(interpret)
  R, D = x.shape
  C = norm_chunk(D, x.dtype)
  nc = D // C
  nr = R // ROWS
  dtype = x.dtype
  tr = transforms(dtype)
  tile = plgpu.BlockSpec((ROWS, C), lambda j: (0, j), transforms=tr)
  vec = plgpu.BlockSpec((C,), lambda j: (j,))
  shape = (ROWS, C)

  def body(x_ref, s_ref, mean_ref, rstd_ref, dy_ref, dx_ref, ds_ref, db_ref, dx_buf, ds_buf, db_buf,
           mean_smem, rstd_smem, bars):
    i = lax.axis_index("rows")
    rows = pl.ds(i * ROWS, ROWS)
    plgpu.copy_gmem_to_smem(mean_ref.at[rows], mean_smem, bars.at[0])
    plgpu.copy_gmem_to_smem(rstd_ref.at[rows], rstd_smem, bars.at[1])
    plgpu.barrier_wait(bars.at[0])
    plgpu.barrier_wait(bars.at[1])
    mean = t.vec(mean_smem, 1)
    rstd = t.vec(rstd_smem, 1)

    def xhat_g(x_smem, s_smem, dy_smem):
      xf = t.tile(x_smem)
      xhat = (xf - _rowb(mean, shape)) * _rowb(rstd, shape)
      dyf = t.tile(dy_smem)
      return xhat, dyf, dyf * _colb(t.vec(s_smem, 0), shape)

    def red_step(idx, x_smem, s_smem, dy_smem, carry):
      c1, c2 = carry
      xhat, _, g = xhat_g(x_smem, s_smem, dy_smem)
      return c1 + g.sum(axis=1), c2 + (g * xhat).sum(axis=1)

    c1, c2 = plgpu.emit_pipeline(
        red_step, grid=(nc,), in_specs=[tile, vec, tile],
        max_concurrent_steps=min(STREAM_STEPS, nc),
        init_carry=(t.full((ROWS,), 0.0), t.full((ROWS,), 0.0)))(x_ref.at[rows], s_ref, dy_ref.at[rows])
    c1 = c1 * (1.0 / features)
    c2 = c2 * (1.0 / features)
    outs = Outs([dx_buf, ds_buf, db_buf])

    def out_step(idx, x_smem, s_smem, dy_smem):
      (j,) = idx
      xhat, dyf, g = xhat_g(x_smem, s_smem, dy_smem)
      corr = _rowb(c2, shape) * xhat
      if kind == "ln":
        corr = corr + _rowb(c1, shape)
      slots = outs.slots(j)
      dx_smem, ds_smem, db_smem = slots
      dx_smem[...] = (_rowb(rstd, shape) * (g - corr)).astype(dtype)
      ds_smem[...] = (dyf * xhat).sum(axis=0)
      db_smem[...] = dyf.sum(axis=0)
      cols = pl.ds(j * C, C)
      outs.send(slots, [dx_ref.at[rows, cols], ds_ref.at[i, cols], db_ref.at[i, cols]])

    plgpu.emit_pipeline(out_step, grid=(nc,), in_specs=[tile, vec, tile],
                        max_concurrent_steps=min(STREAM_STEPS, nc),
                        )(x_ref.at[rows], s_ref, dy_ref.at[rows])
    Outs.done()

  def kernel(*refs):
    pl.run_scoped(functools.partial(body, *refs), plgpu.SMEM((2, ROWS, C), dtype, transforms=tr),
                  plgpu.SMEM((2, C), jnp.float32), plgpu.SMEM((2, C), jnp.float32),
                  plgpu.SMEM((ROWS,), jnp.float32), plgpu.SMEM((ROWS,), jnp.float32),
                  plgpu.Barrier(num_barriers=2), collective_axes=())

  name = f"lepton_{kind}_norm_bwd_mgpu"
  part = jax.ShapeDtypeStruct((nr, D), jnp.float32)
  return pl.kernel(kernel, out_type=(jax.ShapeDtypeStruct((R, D), dtype), part, part),
                   mesh=_mesh((nr,), ("rows",), name), compiler_params=compiler_params(),
                   interpret=t.interp(interpret), cost_estimate=cost_estimate, name=name,
                   )(x, scale, mean, rstd, dy)


# ----------------------------------------------------------------------------- cross-entropy

def ce_fwd(logits, labels, *, interpret=False, cost_estimate=None):
  """logits [N, V] (N, V multiples of 64), labels [N] int32 -> loss, lse [N] float32."""
  t = tools(interpret)
  N, V = logits.shape
  C = norm_chunk(V, logits.dtype)
  nv = V // C
  tile = plgpu.BlockSpec((ROWS, C), lambda j: (0, j), transforms=transforms(logits.dtype))
  shape = (ROWS, C)

  def body(x_ref, lab_ref, loss_ref, lse_ref, lab_smem, loss_smem, lse_smem, bar):
    i = lax.axis_index("rows")
    rows = pl.ds(i * ROWS, ROWS)
    plgpu.copy_gmem_to_smem(lab_ref.at[rows], lab_smem, bar.at[0])
    plgpu.barrier_wait(bar.at[0])
    lab = _rowb(t.vec(lab_smem, 1, jnp.int32), shape)

    def step(idx, x_smem, carry):
      (j,) = idx
      m, l, ll = carry
      s = t.tile(x_smem)
      hit = (t.iota(shape, 1) + j * C) == lab
      ll = ll + jnp.where(hit, s, 0.0).sum(axis=1)
      m_new = jnp.maximum(m, s.max(axis=1))
      l = l * jnp.exp(m - m_new) + jnp.exp(s - _rowb(m_new, shape)).sum(axis=1)
      return m_new, l, ll

    init = (t.full((ROWS,), -jnp.inf), t.full((ROWS,), 0.0), t.full((ROWS,), 0.0))
    m, l, ll = plgpu.emit_pipeline(step, grid=(nv,), in_specs=[tile],
                                   max_concurrent_steps=min(STREAM_STEPS, nv), init_carry=init)(x_ref.at[rows])
    lse = m + jnp.log(l)
    lse_smem[...] = lse
    loss_smem[...] = lse - ll
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(loss_smem, loss_ref.at[rows])
    plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[rows])
    Outs.done()

  def kernel(*refs):
    pl.run_scoped(functools.partial(body, *refs), plgpu.SMEM((ROWS,), jnp.int32),
                  plgpu.SMEM((ROWS,), jnp.float32), plgpu.SMEM((ROWS,), jnp.float32),
                  plgpu.Barrier(num_barriers=1), collective_axes=())

  name = "lepton_softmax_ce_fwd_mgpu"
  vec = jax.ShapeDtypeStruct((N,), jnp.float32)
  return pl.kernel(kernel, out_type=(vec, vec), mesh=_mesh((N // ROWS,), ("rows",), name),
                   compiler_params=compiler_params(approx_math=True),
                   interpret=t.interp(interpret), cost_estimate=cost_estimate, name=name,
                   )(logits, labels)


def ce_bwd(logits, labels, lse, g, *, interpret=False, cost_estimate=None):
  """dlogits [N, V] = (softmax(logits) - onehot(labels)) * g[:, None], chunk by chunk."""
  t = tools(interpret)
  N, V = logits.shape
  dtype = logits.dtype
  C = norm_chunk(V, dtype)
  nv = V // C
  tr = transforms(dtype)
  tile = plgpu.BlockSpec((ROWS, C), lambda j: (0, j), transforms=tr)
  shape = (ROWS, C)

  def body(x_ref, lab_ref, lse_ref, g_ref, dx_ref, dx_buf, lab_smem, lse_smem, g_smem, bars):
    i = lax.axis_index("rows")
    rows = pl.ds(i * ROWS, ROWS)
    for b, (src, dst) in enumerate(((lab_ref, lab_smem), (lse_ref, lse_smem), (g_ref, g_smem))):
      plgpu.copy_gmem_to_smem(src.at[rows], dst, bars.at[b])
    for b in range(3):
      plgpu.barrier_wait(bars.at[b])
    lab = _rowb(t.vec(lab_smem, 1, jnp.int32), shape)
    lse = _rowb(t.vec(lse_smem, 1), shape)
    g = _rowb(t.vec(g_smem, 1), shape)
    outs = Outs([dx_buf])

    def step(idx, x_smem):
      (j,) = idx
      s = t.tile(x_smem)
      hit = (t.iota(shape, 1) + j * C) == lab
      p = jnp.exp(s - lse) - jnp.where(hit, 1.0, 0.0)
      (dx_smem,) = slots = outs.slots(j)
      dx_smem[...] = (p * g).astype(dtype)
      outs.send(slots, [dx_ref.at[rows, pl.ds(j * C, C)]])

    plgpu.emit_pipeline(step, grid=(nv,), in_specs=[tile],
                        max_concurrent_steps=min(STREAM_STEPS, nv))(x_ref.at[rows])
    Outs.done()

  def kernel(*refs):
    pl.run_scoped(functools.partial(body, *refs), plgpu.SMEM((2, ROWS, C), dtype, transforms=tr),
                  plgpu.SMEM((ROWS,), jnp.int32), plgpu.SMEM((ROWS,), jnp.float32),
                  plgpu.SMEM((ROWS,), jnp.float32), plgpu.Barrier(num_barriers=3), collective_axes=())

  name = "lepton_softmax_ce_bwd_mgpu"
  return pl.kernel(kernel, out_type=jax.ShapeDtypeStruct((N, V), dtype),
                   mesh=_mesh((N // ROWS,), ("rows",), name),
                   compiler_params=compiler_params(approx_math=True),
                   interpret=t.interp(interpret), cost_estimate=cost_estimate, name=name,
                   )(logits, labels, lse, g)


# ----------------------------------------------------------------------------- matmul

MM_TILE_K = 64
MM_STEPS = 4


def mm_tiles(m: int, n: int) -> tuple[int, int]:
  return (128 if m % 128 == 0 else 64), (128 if n % 128 == 0 else 64)


def mm_smem_bytes(tm: int, tn: int, itemsize: int, save_z: bool, steps: int = MM_STEPS) -> int:
  return (steps * (tm + tn) * MM_TILE_K + (2 if save_z else 1) * tm * tn) * itemsize + tn * 4 + 1024


def activation(name, z):
  """The epilogue activations written with exp only (gelu: tanh approximation, as
  ``jax.nn.gelu``'s default; tanh(u) = 2 / (1 + exp(-2u)) - 1)."""
  if name is None:
    return z
  if name == "relu":
    return jnp.maximum(z, 0.0)
  if name == "silu":
    return z / (1.0 + jnp.exp(-z))
  u = 0.7978845608028654 * (z + 0.044715 * (z * z * z))
  return 0.5 * z * (2.0 / (1.0 + jnp.exp(-2.0 * u)))


def matmul(a, b, bias=None, *, act=None, save_z=False, a_t=False, b_t=False, interpret=False,
           cost_estimate=None):
  """``act(A @ B + bias)`` with A = a (or a.T if ``a_t``), B = b (or b.T if ``b_t``).

  a, b bf16/fp16; M, N, K multiples of 64. Returns [y] or [y, z] (z = A @ B + bias).
  """
  t = tools(interpret)
  M = a.shape[1] if a_t else a.shape[0]
  K = a.shape[0] if a_t else a.shape[1]
  N = b.shape[0] if b_t else b.shape[1]
  dtype = a.dtype
  tm, tn = mm_tiles(M, N)
  tk = MM_TILE_K
  nk = K // tk
  steps = max(1, min(MM_STEPS, nk))
  tr = transforms(dtype)
  a_spec = plgpu.BlockSpec((tk, tm) if a_t else (tm, tk), (lambda k: (k, 0)) if a_t else (lambda k: (0, k)),
                           transforms=tr)
  b_spec = plgpu.BlockSpec((tn, tk) if b_t else (tk, tn), (lambda k: (0, k)) if b_t else (lambda k: (k, 0)),
                           transforms=tr)
  has_bias = bias is not None
  n_out = 2 if save_z else 1

  def body(*refs):
    a_ref, b_ref = refs[:2]
    refs = list(refs[2:])
    bias_ref = refs.pop(0) if has_bias else None
    outs = [refs.pop(0) for _ in range(n_out)]
    out_smem = [refs.pop(0) for _ in range(n_out)]
    bias_smem, bar = (refs.pop(0), refs.pop(0)) if has_bias else (None, None)
    mi, ni = lax.axis_index("m"), lax.axis_index("n")
    ms, ns = pl.ds(mi * tm, tm), pl.ds(ni * tn, tn)
    if has_bias:
      plgpu.copy_gmem_to_smem(bias_ref.at[ns], bias_smem, bar.at[0])

    def step(idx, a_smem, b_smem, acc):
      return t.mm(a_smem, b_smem, shape=(tm, tn), a_t=a_t, b_t=b_t, acc=acc)

    acc = plgpu.emit_pipeline(step, grid=(nk,), in_specs=[a_spec, b_spec], max_concurrent_steps=steps,
                              init_carry=t.full((tm, tn), 0.0))(
                                  a_ref.at[:, ms] if a_t else a_ref.at[ms],
                                  b_ref.at[ns] if b_t else b_ref.at[:, ns])
    if has_bias:
      plgpu.barrier_wait(bar.at[0])
      acc = acc + _colb(t.vec(bias_smem, 0), (tm, tn))
    out_smem[0][...] = activation(act, acc).astype(dtype)
    if save_z:
      out_smem[1][...] = acc.astype(dtype)
    plgpu.commit_smem()
    for s, o in zip(out_smem, outs):
      plgpu.copy_smem_to_gmem(s, o.at[ms, ns])
    Outs.done()

  scratch = [plgpu.SMEM((tm, tn), dtype, transforms=tr) for _ in range(n_out)]
  if has_bias:
    scratch += [plgpu.SMEM((tn,), bias.dtype), plgpu.Barrier(num_barriers=1)]

  def kernel(*refs):
    pl.run_scoped(functools.partial(body, *refs), *scratch, collective_axes=())

  name = "lepton_matmul_mgpu"
  args = (a, b) + ((bias,) if has_bias else ())
  return list(pl.kernel(
      kernel, out_type=[jax.ShapeDtypeStruct((M, N), dtype)] * n_out,
      mesh=_mesh((M // tm, N // tn), ("m", "n"), name),
      compiler_params=compiler_params(approx_math=True),
      interpret=t.interp(interpret), cost_estimate=cost_estimate, name=name)(*args))
