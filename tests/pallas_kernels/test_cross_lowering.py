"""Every kernel, forward and backward, lowers for cuda and for TPU from this CPU host.

Realistic shapes, DEFAULT block sizes, `backend="pallas_gpu"` / `"pallas_tpu"`. Lowering only
(nothing is compiled or run): for TPU under an abstract TPU v5p device, where Pallas enforces
Mosaic's block-shape rules (last two block dims multiples of (8, 128) or the full dims); for
cuda under an abstract NVIDIA H100 device (sm_90), Mosaic GPU and Triton (jax 0.11's Triton
lowering needs the abstract device on a host without a GPU; 0.10 assumed sm_90).
"""

import jax
import jax.numpy as jnp
import pytest

from lepton_jax import KernelError
from lepton_jax import pallas_kernels as lpk
from lepton_jax.pallas_kernels import _attention
from lepton_jax.pallas_kernels import _registry

S = jax.ShapeDtypeStruct
BF, F32 = jnp.bfloat16, jnp.float32
TAGS = {"tpu": ("tpu_custom_call",), "triton": ("__gpu$xla.gpu.triton",), "mosaic": ("mosaic_gpu",)}


def _lower_text(fn, args, platform, device_kind=None):
  if platform == "tpu":
    with jax.sharding.use_abstract_mesh(_registry.abstract_tpu_mesh(device_kind or "TPU v5p")):
      return jax.jit(fn).trace(*args).lower(lowering_platforms=("tpu",)).as_text()
  with jax.sharding.use_abstract_mesh(_registry.abstract_gpu_mesh(device_kind or "NVIDIA H100")):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def _grad(fn, argnums):
  return jax.grad(lambda *a: fn(*a).astype(jnp.float32).sum(), argnums=argnums)


def _assert_lowers(fn, args, argnums, platform, want_fwd, want_bwd=None):
  backend = "pallas_tpu" if platform == "tpu" else "pallas_gpu"
  f = lambda *a: fn(*a, backend=backend)
  fwd = _lower_text(f, args, platform)
  for tag in want_fwd:
    assert tag in fwd, f"{tag} not in the forward module"
  bwd = _lower_text(_grad(f, argnums), args, platform)
  for tag in (want_bwd or want_fwd):
    assert tag in bwd, f"{tag} not in the backward module"
  return fwd, bwd


PLATFORMS = ["tpu", "cuda"]


def _gpu_tags(platform, mosaic_fwd=False):
  """Expected custom calls; ``mosaic_fwd``: on cuda the Mosaic GPU kernels (sm_90)."""
  if platform == "tpu":
    return TAGS["tpu"], TAGS["tpu"]
  if mosaic_fwd:
    return TAGS["mosaic"], TAGS["mosaic"]   # Mosaic GPU forward and backward
  return TAGS["triton"], TAGS["triton"]


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("dtype,D,causal,seq", [(BF, 128, True, 4096), (F32, 64, False, 1024),
                                                (BF, 256, True, 2048)])
def test_flash_attention_lowers(platform, dtype, D, causal, seq, monkeypatch):
  monkeypatch.delenv("LEPTON_PALLAS_GPU", raising=False)
  q, kv = S((2, seq, 8, D), dtype), S((2, seq, 4, D), dtype)       # GQA 8 / 4 heads
  fn = lambda q, k, v, backend: lpk.flash_attention(q, k, v, is_causal=causal, backend=backend)
  # On Hopper (and when cross-lowering, sm_90) the 16-bit forward is the Mosaic GPU kernel.
  fwd_tags, bwd_tags = _gpu_tags(platform, mosaic_fwd=dtype == BF)
  fwd, bwd = _assert_lowers(fn, (q, kv, kv), (0, 1, 2), platform, fwd_tags, bwd_tags)
  if platform == "cuda" and dtype == BF:   # no deprecated Triton call left on Hopper
    assert TAGS["triton"][0] not in fwd and TAGS["triton"][0] not in bwd


@pytest.mark.parametrize("platform", PLATFORMS)
def test_flash_attention_bias_mask_lowers(platform, monkeypatch):
  monkeypatch.delenv("LEPTON_PALLAS_GPU", raising=False)
  q = S((2, 1024, 8, 128), BF)
  bias, mask = S((1, 8, 1024, 1024), BF), S((2, 1, 1024, 1024), jnp.bool_)
  def fn(q, k, v, b, m, backend):
    return lpk.flash_attention(q, k, v, bias=b, mask=m, backend=backend)
  tags = _gpu_tags(platform)   # bias / mask: the Triton kernel on GPU
  _assert_lowers(fn, (q, q, q, bias, mask), (0, 1, 2, 3), platform, *tags)


def test_triton_forward_when_asked(monkeypatch):
  monkeypatch.setenv("LEPTON_PALLAS_GPU", "triton")
  q = S((2, 2048, 8, 128), BF)
  fn = lambda q, k, v, backend: lpk.flash_attention(q, k, v, is_causal=True, backend=backend)
  fwd, _ = _assert_lowers(fn, (q, q, q), (0, 1, 2), "cuda", TAGS["triton"])
  assert "mosaic_gpu" not in fwd
  monkeypatch.setenv("LEPTON_PALLAS_GPU", "bogus")
  with pytest.raises(KernelError, match="LEPTON_PALLAS_GPU='bogus' is not valid"):
    _registry.gpu_flavor()


def test_gpu_flavor_follows_the_abstract_device(monkeypatch):
  """Under an abstract GPU device the flavour follows its compute capability: Ampere lowers
  the Triton kernel, Hopper the Mosaic GPU one; a bad device kind is refused by name."""
  monkeypatch.delenv("LEPTON_PALLAS_GPU", raising=False)
  q = S((1, 1024, 4, 128), BF)
  fn = lambda q: lpk.flash_attention(q, q, q, is_causal=True, backend="pallas_gpu")
  for kind, want, other in [("NVIDIA A100", "triton", "mosaic"), ("NVIDIA H200", "mosaic", "triton")]:
    with jax.sharding.use_abstract_mesh(_registry.abstract_gpu_mesh(kind)):
      assert _registry.gpu_flavor() == want, kind
    text = _lower_text(fn, (q,), "cuda", device_kind=kind)
    assert TAGS[want][0] in text and TAGS[other][0] not in text, kind
  with pytest.raises(KernelError, match="device_kind must be a GPU device kind.*got ''"):
    _registry.abstract_gpu_mesh("")


def _no_triton(*texts):
  for text in texts:
    assert TAGS["triton"][0] not in text, "a deprecated Triton call is left on Hopper"


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("dtype", [BF, F32])
def test_norms_lower(platform, dtype, monkeypatch):
  monkeypatch.delenv("LEPTON_PALLAS_GPU", raising=False)
  x, s = S((8192, 4096), dtype), S((4096,), dtype)
  tags = _gpu_tags(platform, mosaic_fwd=True)    # Mosaic GPU norms on sm_90, fwd and bwd
  texts = _assert_lowers(lambda x, s, backend: lpk.rms_norm(x, s, backend=backend), (x, s), (0, 1),
                         platform, *tags)
  texts += _assert_lowers(lambda x, s, backend: lpk.layer_norm(x, s, s, backend=backend), (x, s), (0, 1),
                          platform, *tags)
  if platform == "cuda":
    _no_triton(*texts)


@pytest.mark.parametrize("platform", PLATFORMS)
def test_softmax_cross_entropy_lowers_without_padded_logits(platform, monkeypatch):
  monkeypatch.delenv("LEPTON_PALLAS_GPU", raising=False)
  n, v = 8192, 32000                        # V = 32k, not a multiple of the TPU vocabulary chunk
  lg, lab = S((n, v), BF), S((n,), jnp.int32)
  fwd, bwd = _assert_lowers(lambda lg, lab, backend: lpk.softmax_cross_entropy(lg, lab, backend=backend),
                            (lg, lab), (0,), platform, *_gpu_tags(platform, mosaic_fwd=True))
  # no padded [N, V'] copy of the logits in either module
  for text in (fwd, bwd):
    assert "stablehlo.pad" not in text
  if platform == "cuda":
    _no_triton(fwd, bwd)
    # float32 logits: 128-column chunks (shared memory), Mosaic GPU too
    f32 = _assert_lowers(lambda lg, lab, backend: lpk.softmax_cross_entropy(lg, lab, backend=backend),
                         (S((n, v), F32), lab), (0,), platform, TAGS["mosaic"])
    _no_triton(*f32)


def test_gpu_fallbacks_to_triton_where_mosaic_cannot_serve(monkeypatch):
  """Shapes off the Mosaic GPU tiles (V = 50257, 100 rows, K = 100) and float32 matmul keep
  the Triton kernels (no padded copies); the selection is per call."""
  monkeypatch.delenv("LEPTON_PALLAS_GPU", raising=False)
  cases = [
      (lambda lg, lab, backend: lpk.softmax_cross_entropy(lg, lab, backend=backend),
       (S((256, 50257), BF), S((256,), jnp.int32)), (0,)),
      (lambda x, s, backend: lpk.layer_norm(x, s, s, backend=backend), (S((100, 1024), BF), S((1024,), BF)),
       (0,)),
      (lambda x, w, backend: lpk.matmul(x, w, backend=backend), (S((256, 100), BF), S((100, 256), BF)), (0,)),
      (lambda x, w, backend: lpk.matmul(x, w, backend=backend), (S((256, 256), F32), S((256, 256), F32)), (0,)),
  ]
  for fn, args, argnums in cases:
    fwd, bwd = _assert_lowers(fn, args, argnums, "cuda", TAGS["triton"])
    assert "mosaic_gpu" not in fwd and "mosaic_gpu" not in bwd


@pytest.mark.parametrize("platform", PLATFORMS)
def test_linear_cross_entropy_lowers(platform):
  x, w, lab = S((8192, 1024), BF), S((1024, 32000), BF), S((8192,), jnp.int32)
  fn = lambda x, w, lab, backend: lpk.linear_softmax_cross_entropy(x, w, lab, backend=backend)
  _assert_lowers(fn, (x, w, lab), (0, 1), platform, *_gpu_tags(platform))


@pytest.mark.parametrize("platform", PLATFORMS)
def test_matmul_lowers(platform, monkeypatch):
  monkeypatch.delenv("LEPTON_PALLAS_GPU", raising=False)
  x, w, b = S((4096, 4096), BF), S((4096, 11008), BF), S((11008,), BF)
  fn = lambda x, w, b, backend: lpk.matmul(x, w, bias=b, activation="gelu", backend=backend)
  fwd, bwd = _assert_lowers(fn, (x, w, b), (0, 1, 2), platform, *_gpu_tags(platform, mosaic_fwd=True))
  if platform == "cuda":   # wgmma kernel, fwd (with the pre-activation) and both bwd matmuls
    _no_triton(fwd, bwd)
    assert bwd.count("lepton_matmul_mgpu") >= 3
    assert "stablehlo.transpose" not in bwd     # x^T / w^T are read transposed, not copied


def test_tpu_lowering_enforces_block_tiling():
  """The check is real: a (4, 128) block of a float32 array (4 rows: not a multiple of 8) is
  rejected by Pallas' TPU lowering, as the old rank-1 / 4-row norm blocks were."""
  from jax.experimental import pallas as pl

  def bad(x):
    return pl.pallas_call(lambda x_ref, o_ref: o_ref.__setitem__(..., x_ref[...] * 2), grid=(16,),
                          in_specs=[pl.BlockSpec((4, 128), lambda i: (i, 0))],
                          out_specs=pl.BlockSpec((4, 128), lambda i: (i, 0)),
                          out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype))(x)
  with pytest.raises(Exception, match="divisible by 8"):
    _lower_text(bad, (S((64, 128), F32),), "tpu")


def test_gpu_attention_defaults_fit_shared_memory():
  for dtype in (F32, BF, jnp.float16):
    item = jnp.dtype(dtype).itemsize
    for d in (64, 128, 256):
      bs = lpk.BlockSizes.get_default(q_len=4096, kv_len=4096, head_dim=d, dtype=dtype)
      ok, why = _attention._legality(bs, "gpu", d, item)
      assert ok, (dtype, d, why)
      assert max(_attention.gpu_smem_bytes(bs, d, item).values()) <= 227 * 1024
  # what issue 16 measured: the old defaults (128, 128, 64, 64) at bf16 d=128 did not fit
  ok, why = _attention._legality(lpk.BlockSizes(128, 128, 64, 64), "gpu", 128, 2)
  assert not ok and "227 KiB" in why
  from lepton_jax.pallas_kernels import _attention_mgpu as mg
  for d in (64, 128, 256):
    assert mg.smem_bytes(mg.default_config(d, BF), d, 2) <= 227 * 1024


def _pallas_cost_estimates(jaxpr):
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ("pallas_call", "mpmd_map"):   # mpmd_map: pl.kernel (Mosaic GPU)
      found.append(eqn.params.get("cost_estimate"))
    for p in eqn.params.values():
      for sub in (p if isinstance(p, (tuple, list)) else (p,)):
        inner = getattr(sub, "jaxpr", None)
        if inner is not None:
          found += _pallas_cost_estimates(inner if hasattr(inner, "eqns") else inner.jaxpr)
  return found


def test_cost_estimates_attached():
  x, s = S((1024, 4096), BF), S((4096,), BF)
  lg, lab = S((512, 32000), BF), S((512,), jnp.int32)
  q = S((1, 1024, 4, 128), F32)
  fns = [
      (lambda x, s: lpk.rms_norm(x, s, backend="pallas_gpu"), (x, s), (0, 1)),
      (lambda x, s: lpk.layer_norm(x, s, s, backend="pallas_tpu"), (x, s), (0, 1)),
      (lambda lg: lpk.softmax_cross_entropy(lg, jnp.zeros((512,), jnp.int32), backend="pallas_gpu"), (lg,), (0,)),
      (lambda x, s: lpk.matmul(x, x.T, backend="pallas_tpu"), (x, s), (0,)),
      (lambda q: lpk.flash_attention(q, q, q, backend="pallas_gpu"), (q,), (0,)),
      (lambda q: lpk.flash_attention(q, q, q, backend="pallas_tpu"), (q,), (0,)),
      (lambda q: lpk.flash_attention(q, q, q, backend="pallas_gpu"), (q.update(dtype=BF),), (0,)),  # Mosaic
  ]
  for fn, args, argnums in fns:
    for f in (fn, _grad(fn, argnums)):
      ests = _pallas_cost_estimates(jax.make_jaxpr(f)(*args).jaxpr)
      assert ests and all(e is not None and e.flops > 0 and e.bytes_accessed > 0 for e in ests)
  # and on TPU the estimate reaches the lowered custom call (XLA's cost model reads it)
  text = _lower_text(lambda x, s: lpk.rms_norm(x, s, backend="pallas_tpu"), (x, s), "tpu")
  assert "cost_estimate" in text and '\\22flops\\22:0' not in text.replace(" ", "")


def _tpu_vmem(fn, args, argnums):
  """(kernel, VMEM bytes, scoped-VMEM limit asked for) of every TPU pallas_call, fwd and bwd."""
  from lepton_jax.pallas_kernels._common import pallas_tpu_vmem
  rows = []
  for f in (fn, _grad(fn, argnums)):
    jaxpr = jax.make_jaxpr(f)(*args)
    rows += pallas_tpu_vmem(jaxpr)
  return rows


# float16 has bfloat16's itemsize and sublane tile, so the same blocks: not repeated.
@pytest.mark.parametrize("dtype", [F32, BF])
def test_tpu_default_blocks_fit_scoped_vmem(dtype):
  """Default TPU blocks: every kernel's in/out blocks (double-buffered, padded to the Mosaic
  tiles) + scratch fit the 16 MiB scoped VMEM of v4 / v5e / v5p, for head_dim 64-256 and the
  realistic shapes of the cross-lowering tests (and the fused CE at D = 4096, where the
  [D, block_v] weight block forces a smaller vocabulary chunk)."""
  budget = 16 << 20
  cases = []
  for d in (64, 128, 256):
    q = S((1, 4096, 8, d), dtype)
    cases.append((lambda q, k, v: lpk.flash_attention(q, k, v, is_causal=True, backend="pallas_tpu"),
                  (q, q, q), (0, 1, 2)))
  q, bias = S((1, 2048, 8, 256), dtype), S((1, 8, 2048, 2048), dtype)
  cases.append((lambda q, k, v, b: lpk.flash_attention(q, k, v, bias=b, backend="pallas_tpu"),
                (q, q, q, bias), (0, 1, 2, 3)))
  x, s = S((8192, 8192), dtype), S((8192,), dtype)
  cases.append((lambda x, s: lpk.layer_norm(x, s, s, backend="pallas_tpu"), (x, s), (0, 1)))
  cases.append((lambda lg: lpk.softmax_cross_entropy(lg, jnp.zeros((8192,), jnp.int32), backend="pallas_tpu"),
                (S((8192, 128256), dtype),), (0,)))
  cases.append((lambda x, w: lpk.linear_softmax_cross_entropy(x, w, jnp.zeros((8192,), jnp.int32),
                                                              backend="pallas_tpu"),
                (S((8192, 4096), dtype), S((4096, 32000), dtype)), (0, 1)))
  cases.append((lambda x, w, b: lpk.matmul(x, w, bias=b, activation="gelu", backend="pallas_tpu"),
                (S((4096, 4096), dtype), S((4096, 11008), dtype), S((11008,), dtype)), (0, 1, 2)))
  for fn, args, argnums in cases:
    rows = _tpu_vmem(fn, args, argnums)
    assert rows
    for name, vmem in rows:
      assert vmem <= budget, (name, vmem / 2 ** 20)


def test_tpu_scoped_vmem_raised_only_beyond_the_budget():
  """Where no legal block fits 16 MiB (layer norm over 65536 bf16 features: 16 rows minimum),
  the call asks Mosaic for a larger scoped-VMEM limit; calls that fit leave the default."""
  from jax.experimental.pallas import tpu as pltpu
  from lepton_jax.pallas_kernels import _common
  spec = lambda shape: type("Spec", (), {"block_shape": shape})()
  big = S((16, 65536), BF)
  params, vmem = _common.tpu_call_params(("parallel",), [spec((16, 65536))] * 3, [big] * 3,
                                         [spec((16, 65536))] * 2, [big] * 2)   # 5 blocks x 2 MiB x 2
  assert vmem == 5 * 2 * 16 * 65536 * 2 and params.vmem_limit_bytes >= vmem
  params, vmem = _common.tpu_call_params(("parallel",), [spec((16, 4096))], [S((16, 4096), BF)],
                                         [spec((16, 4096))], [S((16, 4096), BF)])
  assert vmem == 4 * 16 * 4096 * 2 and params.vmem_limit_bytes is None
  assert isinstance(params, pltpu.CompilerParams)
  # the padding is Mosaic's: a (1, 4096) float32 row occupies an (8, 4096) tile band
  assert _common.tpu_padded_bytes((1, 4096), F32) == 8 * 4096 * 4
  assert _common.tpu_padded_bytes((40, 100), BF) == 48 * 128 * 2


def test_mosaic_gpu_lowering_enforces_tma_box_limit():
  """The cuda check is real too: an untiled TMA copy wider than 256 elements is rejected when
  lowering from this host (why the kernels' untiled vector copies -- scale / bias / dscale
  chunks -- are chunked to <= 256; swizzled tiles are split per tile by Mosaic GPU)."""
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import mosaic_gpu as plgpu
  from lepton_jax.pallas_kernels import _mgpu

  def f(x):
    def body(x_ref, o_ref, smem, bar):
      plgpu.copy_gmem_to_smem(x_ref.at[pl.ds(0, 64), pl.ds(0, 512)], smem, bar.at[0])
      plgpu.barrier_wait(bar.at[0])
      plgpu.copy_smem_to_gmem(smem, o_ref)
      plgpu.wait_smem_to_gmem(0)

    def kernel(x_ref, o_ref):
      pl.run_scoped(lambda s, b: body(x_ref, o_ref, s, b), plgpu.SMEM((64, 512), BF),
                    plgpu.Barrier(num_barriers=1), collective_axes=())
    return pl.kernel(kernel, out_type=S((64, 512), BF), mesh=plgpu.Mesh(grid=(1,), grid_names=("x",)),
                     compiler_params=_mgpu.compiler_params())(x)
  with pytest.raises(ValueError, match="<=256 elements"):
    _lower_text(f, (S((64, 1024), BF),), "cuda")
  # jax 0.11 made the warpgroup semantics the default: the kernels state Lane (their layouts
  # are explicit), on 0.10 too
  assert _mgpu.compiler_params().lowering_semantics == plgpu.LoweringSemantics.Lane
