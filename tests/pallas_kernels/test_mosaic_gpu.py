"""Values of the Mosaic GPU norm / cross-entropy / matmul kernels in Mosaic GPU's interpreter.

``LEPTON_PALLAS_GPU=mosaic`` + ``backend="interpret"`` runs the Mosaic GPU kernels (TMA copies,
``emit_pipeline`` over feature / vocabulary / K chunks, the hand-issued double-buffered output
stores, the math) in Mosaic GPU's own interpreter, against the plain-JAX references. The
interpreter runs no wgmma and no register layouts: there the matmuls are dots of the same
shared-memory tiles (the wgmma path is checked by lowering, test_cross_lowering.py). Shapes are
small (the interpreter is slow) but span several chunks and, where it matters, several CTAs.
"""

import jax
import jax.numpy as jnp
import pytest

from lepton_jax import pallas_kernels as lpk
from lepton_jax.pallas_kernels import _mgpu
from tests.pallas_kernels._util import check_vjp as check_fwd_bwd
from tests.pallas_kernels._util import max_err


@pytest.fixture(autouse=True)
def _mosaic(monkeypatch):
  monkeypatch.setenv("LEPTON_PALLAS_GPU", "mosaic")


def _keys(n):
  return jax.random.split(jax.random.PRNGKey(0), n)


def test_norms_mosaic_gpu_interpret():
  k = _keys(4)
  # float32 layer norm: 192 features = 3 chunks of 64 (the chunked (mean, M2) combination),
  # a large mean (cancellation-prone in a one-pass variance).
  x = jax.random.normal(k[0], (64, 192)) * 2 + 30
  s, b = jax.random.normal(k[1], (192,)), jax.random.normal(k[2], (192,))
  with lpk.record_dispatches() as log:
    check_fwd_bwd(lambda x, s, b: lpk.layer_norm(x, s, b, backend="interpret"),
                  lambda x, s, b: lpk.layer_norm_reference(x, s, b), (x, s, b), (0, 1, 2),
                  fwd_tol=2e-5, grad_tol=5e-4)
  assert log.last().backend == "interpret"
  # bfloat16 RMS norm, two CTAs (128 rows), one chunk
  xb = jax.random.normal(k[3], (128, 64), jnp.bfloat16)
  sb = s[:64].astype(jnp.bfloat16)
  check_fwd_bwd(lambda x, s: lpk.rms_norm(x, s, backend="interpret"),
                lambda x, s: lpk.rms_norm_reference(x, s), (xb, sb), (0, 1),
                fwd_tol=3e-2, grad_tol=2e-2)


def test_cross_entropy_mosaic_gpu_interpret():
  k = _keys(2)
  # 320 = 5 vocabulary chunks of 64 (float32): the online logsumexp across chunks; labels in
  # every chunk.
  lg = jax.random.normal(k[0], (64, 320)) * 4
  lab = jax.random.randint(k[1], (64,), 0, 320)
  check_fwd_bwd(lambda lg: lpk.softmax_cross_entropy(lg, lab, backend="interpret"),
                lambda lg: lpk.softmax_cross_entropy_reference(lg, lab), (lg,), (0,),
                fwd_tol=1e-5, grad_tol=1e-5)


def test_matmul_mosaic_gpu_interpret():
  k = _keys(3)
  # bf16, bias + gelu epilogue; K = 128 (2 pipelined K chunks); the backward's dx / dw use the
  # transposed-operand reads (w^T, x^T) of the same kernel.
  x = jax.random.normal(k[0], (64, 128), jnp.bfloat16)
  w = (jax.random.normal(k[1], (128, 64)) / 8).astype(jnp.bfloat16)
  b = jax.random.normal(k[2], (64,), jnp.bfloat16)
  check_fwd_bwd(lambda x, w, b: lpk.matmul(x, w, bias=b, activation="gelu", backend="interpret"),
                lambda x, w, b: lpk.matmul_reference(x, w, bias=b, activation="gelu"), (x, w, b),
                (0, 1, 2), fwd_tol=3e-2, grad_tol=2e-2)


def test_matmul_epilogue_activations_match_jax():
  """The epilogue's exp-only spellings equal jax.nn's (tanh-approximate gelu, silu)."""
  z = jnp.linspace(-12.0, 12.0, 2001)
  ours, want = jax.jit(lambda z: ([_mgpu.activation(a, z) for a in ("gelu", "silu", "relu")],
                                  [jax.nn.gelu(z), jax.nn.silu(z), jax.nn.relu(z)]))(z)
  assert max_err(ours[0], want[0]) <= 2e-6
  assert max_err(ours[1], want[1]) <= 2e-6
  assert max_err(ours[2], want[2]) == 0.0


def test_mosaic_gpu_chunks_fit_tma_and_shared_memory():
  # a TMA box is <= 256 wide: every chunk is; the norm / CE kernels fit 227 KiB
  for d in (64, 192, 4096, 32000, 65536):
    for dt in (jnp.float32, jnp.bfloat16):
      c = _mgpu.norm_chunk(d, dt)
      assert c is not None and c <= 256 and d % c == 0
      assert _mgpu.norm_smem_bytes(d, dt) <= 227 * 1024
  assert _mgpu.chunk_for(50257) is None           # V = 50257: the Triton kernel serves it
  for m, n in ((4096, 11008), (64, 64), (192, 128)):
    tm, tn = _mgpu.mm_tiles(m, n)
    assert _mgpu.mm_smem_bytes(tm, tn, 2, save_z=True) <= 227 * 1024


def test_autotune_times_one_candidate_for_fixed_mosaic_tiles(tmp_path, monkeypatch):
  """The Mosaic GPU norm ignores block sizes: autotune times one candidate and says why for the
  rest; with the Triton kernel (LEPTON_PALLAS_GPU unset) every legal candidate is timed."""
  x, s = jnp.ones((64, 64)), jnp.ones((64,))
  cands = [lpk.NormBlockSizes(16), lpk.NormBlockSizes(32)]
  cache = lpk.AutotuneCache(str(tmp_path / "tune.json"))
  r = lpk.autotune(lpk.rms_norm, x, s, backend="interpret", candidates=cands, cache=cache, repeats=1,
                   force=True)
  assert len(r.timings) == 1 and len(r.illegal) == 1 and "fixed tiles" in r.illegal[0][1]
  monkeypatch.delenv("LEPTON_PALLAS_GPU")
  r = lpk.autotune(lpk.rms_norm, x, s, backend="interpret", candidates=cands, cache=cache, repeats=1,
                   force=True)
  assert len(r.timings) == 2 and not r.illegal
