import json
import os

import jax
import jax.numpy as jnp
import pytest

from lepton_jax import KernelError
from lepton_jax import pallas_kernels as lpk


def test_resolve_backend_on_cpu():
  assert lpk.resolve_backend("auto").backend == "xla"
  assert lpk.resolve_backend("interpret").impl == "gpu"
  assert lpk.resolve_backend("interpret_tpu").impl == "tpu"
  # the Pallas backends are built on any host (for cross-lowering)
  assert (lpk.resolve_backend("pallas_tpu").impl, lpk.resolve_backend("pallas_gpu").impl) == ("tpu", "gpu")
  with pytest.raises(KernelError, match="is not valid; use one of"):
    lpk.resolve_backend("cuda")


def test_record_dispatches_is_explicit_and_clearable():
  x = jnp.ones((4, 16))
  lpk.rms_norm(x, jnp.ones((16,)), backend="xla")   # outside: nothing recorded anywhere
  with lpk.record_dispatches() as log:
    lpk.rms_norm(x, jnp.ones((16,)), backend="interpret")
    lpk.matmul(x, jnp.ones((16, 4)), backend="xla")
  assert [(d.kernel, d.backend) for d in log] == [("rms_norm", "interpret"), ("matmul", "xla")]
  assert "rms_norm" in str(log) and log.last().to_dict()["shapes"] == [[4, 16], [16, 4]]
  log.clear()
  assert len(log) == 0


def test_block_size_legality_without_gpu():
  ok, _ = lpk._attention._legality(lpk.BlockSizes(64, 64, 32, 32), "gpu", 128, 2)
  assert ok
  ok, why = lpk._attention._legality(lpk.BlockSizes(48, 64, 32, 32), "gpu", 128, 2)
  assert not ok and "power of two" in why
  ok, why = lpk._attention._legality(lpk.BlockSizes(512, 512, 32, 32, num_stages=4), "gpu", 256, 4)
  assert not ok and "shared memory" in why
  cands = lpk.flash_attention._lepton_tune_spec.candidates((jnp.zeros((1, 40, 1, 8)), jnp.zeros((1, 40, 1, 8))), {})
  # the candidate list spans GPU and TPU tiles; autotune keeps those legal for its backend
  assert cands and sum(lpk._attention._legality(c, "gpu", 8, 4)[0] for c in cands) >= len(cands) - 4
  assert not lpk._matmul._legal(lpk.MatmulBlockSizes(512, 512, 512, 4, 3), "gpu")[0]
  assert lpk.BlockSizes.get_default(q_len=40).block_q == 64


def test_autotune_persists_and_replays(tmp_path, monkeypatch):
  path = tmp_path / "tune.json"
  cache = lpk.AutotuneCache(path)
  x, w = jnp.ones((32, 32)), jnp.ones((32, 32))
  cands = [lpk.MatmulBlockSizes(16, 16, 16), lpk.MatmulBlockSizes(32, 32, 16),
           lpk.MatmulBlockSizes(24, 16, 16)]   # the last is illegal
  res = lpk.autotune(lpk.matmul, x, w, backend="interpret", cache=cache, candidates=cands, repeats=1)
  assert not res.from_cache and res.best in cands[:2] and len(res.illegal) == 1
  data = json.loads(path.read_text())
  assert len(data["entries"]) == 1
  # a fresh cache object on the same file replays the same choice without timing
  res2 = lpk.autotune(lpk.matmul, x, w, backend="interpret", cache=lpk.AutotuneCache(path), candidates=cands)
  assert res2.from_cache and res2.best == res.best
  # kernels replay from the default cache (env var) when block_sizes is not given
  monkeypatch.setenv("LEPTON_AUTOTUNE_CACHE", str(path))
  lpk.clear_autotune_cache()
  try:
    with lpk.record_dispatches() as log:
      lpk.matmul(x, w, backend="interpret")
      lpk.matmul(jnp.ones((8, 32)), w, backend="interpret")   # other shape: defaults
    assert log.records[0].block_sizes_source == "autotune-cache"
    assert log.records[0].block_sizes == res.best.__dict__
    assert log.records[1].block_sizes_source == "default"
  finally:
    lpk.clear_autotune_cache()


def test_default_cache_path(monkeypatch, tmp_path):
  monkeypatch.delenv("LEPTON_AUTOTUNE_CACHE", raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  assert lpk.default_cache_path() == os.path.join(str(tmp_path), "lepton_jax", "autotune.json")
  with pytest.raises(KernelError, match="not a tunable"):
    lpk.autotune(jnp.dot, jnp.ones(2), jnp.ones(2))


def test_kernels_compose_with_vmap_and_jit():
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 5, 16))
  s = jnp.ones((16,))
  out = jax.jit(jax.vmap(lambda x: lpk.rms_norm(x, s, backend="interpret")))(x)
  assert float(jnp.max(jnp.abs(out - lpk.rms_norm_reference(x, s)))) <= 1e-5


def test_autotune_sweeps_only_legal_candidates_for_the_target():
  from lepton_jax.pallas_kernels import _attention, _matmul
  q = jnp.ones((1, 4096, 8, 128), jnp.bfloat16)
  tpu = [c for c in _attention._candidates((q, q, q), {})
         if _attention._is_legal(c, (q, q, q), {"backend": "pallas_tpu"})[0]]
  assert tpu and all(c.block_k % 128 == 0 and c.block_q % 32 == 0 for c in tpu)
  gpu = [c for c in _attention._candidates((q, q, q), {})
         if _attention._is_legal(c, (q, q, q), {"backend": "pallas_gpu"})[0]]
  assert gpu and all(max(_attention.gpu_smem_bytes(c, 128, 2).values()) <= 227 * 1024 for c in gpu)
  x = jnp.ones((512, 512), jnp.bfloat16)
  mm_tpu = [c for c in _matmul._cands((x,), {}) if _matmul._is_legal(c, (x,), {"backend": "pallas_tpu"})[0]]
  assert mm_tpu and all(c.block_n % 128 == 0 and c.block_k % 128 == 0 for c in mm_tpu)
  # never spends time on GPU / TPU configs on a CPU host
  with pytest.raises(KernelError, match="backend='pallas_gpu' can only be timed on a GPU"):
    lpk.autotune(lpk.rms_norm, jnp.ones((64, 256)), jnp.ones((256,)), backend="pallas_gpu")
