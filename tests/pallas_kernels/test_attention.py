import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lepton_jax import KernelError
from lepton_jax import pallas_kernels as lpk
from tests.pallas_kernels._util import check_fwd_bwd, check_vjp, max_err

BS = lpk.BlockSizes(16, 16, 16, 16)


def _inputs(B, T, S, N, K, D, bias_shape=None, mask_shape=None, dtype=jnp.float32, seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 5)
  q = jax.random.normal(ks[0], (B, T, N, D), dtype)
  k = jax.random.normal(ks[1], (B, S, K, D), dtype)
  v = jax.random.normal(ks[2], (B, S, K, D), dtype)
  bias = None if bias_shape is None else jax.random.normal(ks[3], bias_shape, dtype)
  mask = None if mask_shape is None else jax.random.bernoulli(ks[4], 0.7, mask_shape)
  return q, k, v, bias, mask


# (B, T, S, N, K, D, bias_shape, mask_shape, causal): ragged lengths (40, 33, 17 with block 16), GQA.
# (2 q heads over 1 kv head: the group sum of dK / dV is exercised as with 4 over 2, at half the
# interpreter's programs.)
CASES = [
    (2, 24, 40, 2, 1, 16, (2, 1, 24, 40), (1, 2, 1, 40), False),
    (1, 33, 17, 2, 1, 8, (1, 1, 1, 17), (1, 1, 33, 17), True),
]


@pytest.mark.parametrize("backend", ["interpret", "xla"])
@pytest.mark.parametrize("case", CASES, ids=["bias-mask-gqa", "ragged-causal-bias-mask-gqa"])
def test_flash_attention_matches_reference(backend, case):
  B, T, S, N, K, D, bsh, msh, causal = case
  q, k, v, bias, mask = _inputs(B, T, S, N, K, D, bsh, msh)
  f = lambda q, k, v, bias: lpk.flash_attention(q, k, v, bias=bias, mask=mask, is_causal=causal,
                                                backend=backend, block_sizes=BS)
  r = lambda q, k, v, bias: lpk.flash_attention_reference(q, k, v, bias=bias, mask=mask, is_causal=causal)
  argnums = (0, 1, 2, 3) if bias is not None else (0, 1, 2)
  check_vjp(f, r, (q, k, v, bias), argnums)
  # and the reference really is jax.nn.dot_product_attention
  want = jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, is_causal=causal)
  assert max_err(r(q, k, v, bias), want) <= 1e-5


def test_flash_attention_tpu_kernel_in_tpu_interpreter():
  # TPU-legal tiles (q rows multiple of 32, kv blocks of 128 lanes); 3 kv blocks along the
  # "arbitrary" grid axis, a ragged last kv block, GQA, bias and mask.
  # (2 q heads over 1 kv head: half the programs of 4 over 2, the same GQA code paths; one
  # forward and one backward trace, see check_vjp.)
  bs = lpk.BlockSizes(32, 128, 32, 128)
  q, k, v, bias, mask = _inputs(1, 40, 260, 2, 1, 16, (1, 1, 40, 260), (1, 2, 1, 260))
  f = lambda q, k, v, b: lpk.flash_attention(q, k, v, bias=b, mask=mask, backend="interpret_tpu",
                                             block_sizes=bs)
  r = lambda q, k, v, b: lpk.flash_attention_reference(q, k, v, bias=b, mask=mask)
  check_vjp(f, r, (q, k, v, bias), (0, 1, 2, 3))
  with pytest.raises(KernelError, match="block_k=16 must be a multiple of 128 on TPU"):
    lpk.flash_attention(q, k, v, backend="interpret_tpu", block_sizes=lpk.BlockSizes(32, 16, 32, 128))


@pytest.mark.parametrize("dtype,tol,backend", [(jnp.bfloat16, 3e-2, "interpret"), (jnp.float16, 5e-3, "xla")])
def test_flash_attention_low_precision(dtype, tol, backend):
  q, k, v, _, _ = _inputs(1, 20, 20, 2, 2, 16, dtype=dtype)
  out = jax.jit(lambda q, k, v: lpk.flash_attention(q, k, v, backend=backend, block_sizes=BS))(q, k, v)
  assert out.dtype == dtype
  want = jax.nn.dot_product_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32))
  assert max_err(out, want) <= tol
  g = jax.grad(lambda q: lpk.flash_attention(q, k, v, backend="xla").astype(jnp.float32).sum())(q)
  assert g.dtype == dtype and bool(jnp.all(jnp.isfinite(g.astype(jnp.float32))))


def test_fully_masked_rows_match_jax():
  q, k, v, _, _ = _inputs(1, 20, 20, 1, 1, 8)
  mask = jnp.ones((1, 1, 20, 20), bool).at[:, :, 3, :].set(False)
  for backend in ("interpret",):
    out = lpk.flash_attention(q, k, v, mask=mask, backend=backend, block_sizes=BS)
    assert max_err(out, jax.nn.dot_product_attention(q, k, v, mask=mask)) <= 1e-5


def _temp_bytes(f, *shapes):
  return jax.jit(f).lower(*shapes).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("heads", [1, 2])
def test_xla_attention_memory_at_seq_4096(heads):
  s = jax.ShapeDtypeStruct((1, 4096, heads, 64), jnp.float32)
  ref = _temp_bytes(lambda q, k, v: jax.nn.dot_product_attention(q, k, v), s, s, s)
  ours = _temp_bytes(lambda q, k, v: lpk.flash_attention(q, k, v, backend="xla"), s, s, s)
  assert ours * 8 <= ref, (ours, ref)
  # the backward is blockwise too
  grad = lambda f: jax.grad(lambda q, k, v: f(q, k, v).sum(), argnums=(0, 1, 2))
  ref_g = _temp_bytes(grad(lambda q, k, v: jax.nn.dot_product_attention(q, k, v)), s, s, s)
  ours_g = _temp_bytes(grad(lambda q, k, v: lpk.flash_attention(q, k, v, backend="xla")), s, s, s)
  assert ours_g * 8 <= ref_g, (ours_g, ref_g)


def test_auto_is_xla_on_cpu_and_recorded():
  q, k, v, _, _ = _inputs(1, 8, 8, 1, 1, 8)
  with lpk.record_dispatches() as log:
    out = lpk.flash_attention(q, k, v)
  assert log.last().kernel == "flash_attention"
  assert log.last().requested == "auto" and log.last().backend == "xla"
  assert max_err(out, jax.nn.dot_product_attention(q, k, v)) <= 1e-5


@pytest.mark.parametrize("kwargs,match", [
    (dict(q=(1, 8, 2, 8), k=(1, 8, 3, 8)), "must divide the number of q heads"),
    (dict(q=(1, 8, 2, 300), k=(1, 8, 2, 300)), "head_dim=300 is out of range"),
    (dict(q=(8, 2, 8), k=(8, 2, 8)), "q must have rank 4"),
    (dict(q=(1, 8, 2, 8), k=(1, 8, 2, 4)), "head_dim must match"),
])
def test_flash_attention_shape_errors(kwargs, match):
  q = jnp.zeros(kwargs["q"])
  k = jnp.zeros(kwargs["k"])
  with pytest.raises(KernelError, match=match):
    lpk.flash_attention(q, k, k)


def test_flash_attention_dtype_mask_bias_errors():
  q = jnp.zeros((1, 8, 2, 8))
  with pytest.raises(KernelError, match="supported dtypes are float32, bfloat16, float16"):
    lpk.flash_attention(q.astype(jnp.int32), q.astype(jnp.int32), q.astype(jnp.int32))
  with pytest.raises(KernelError, match="share one dtype"):
    lpk.flash_attention(q, q.astype(jnp.bfloat16), q)
  with pytest.raises(KernelError, match="mask must be a boolean"):
    lpk.flash_attention(q, q, q, mask=jnp.ones((1, 1, 8, 8)))
  with pytest.raises(KernelError, match=r"does not broadcast to .*dim 2 is 3; valid: 1 or 8"):
    lpk.flash_attention(q, q, q, bias=jnp.ones((1, 1, 3, 8)))
  with pytest.raises(KernelError, match="backend='bogus' is not valid"):
    lpk.flash_attention(q, q, q, backend="bogus")
  # pallas_gpu is built on any host (it cross-lowers for cuda, see test_cross_lowering.py);
  # running it on the CPU is refused by Pallas itself.
  with pytest.raises(ValueError, match="interpret mode"):
    lpk.flash_attention(q, q, q, backend="pallas_gpu")
  with pytest.raises(KernelError, match="block_q=24 must be a power of two"):
    lpk.flash_attention(q, q, q, backend="interpret", block_sizes=lpk.BlockSizes(24, 16, 16, 16))


def test_mosaic_gpu_forward_in_interpret_mode():
  """The Mosaic GPU forward and backward (TMA, pipelines, masking, online softmax, lse, dK/dV
  per query head summed over the GQA group) in Mosaic GPU's interpret mode; ragged
  lengths (100 queries, 150 keys: padded to the 64 / 128 tiles), causal, GQA, bf16. The
  wgmma instructions themselves are checked by lowering only (test_cross_lowering.py)."""
  from lepton_jax.jaxpr import _compat
  from lepton_jax.pallas_kernels import _attention as A
  if _compat.mosaic_gpu_interpret_params() is None:
    pytest.skip("this JAX has no Mosaic GPU interpret mode")
  q, k, v, _, _ = _inputs(1, 100, 150, 2, 1, 64, dtype=jnp.bfloat16)
  cfg = A._Cfg(impl="gpu", interpret="gpu", scale=0.125, causal=True, q_len=100, kv_len=150, groups=2,
               has_bias=False, has_mask=False, bias_b=False, bias_h=False, mask_b=False, mask_h=False,
               bs=lpk.BlockSizes(32, 32, 32, 32), gpu_flavor="mosaic")
  f = lambda q, k, v: A._attention(cfg, q, k, v, None, None)
  r = lambda q, k, v: lpk.flash_attention_reference(q, k, v, is_causal=True, scale=0.125)
  assert max_err(f(q, k, v), r(q, k, v)) <= 2e-2
  loss = lambda fn: (lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) ** 2))
  g = jax.grad(loss(f), argnums=(0, 1, 2))(q, k, v)
  gr = jax.grad(loss(r), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(g, gr):
    assert max_err(a, b) <= 2e-2 * max(1.0, float(jnp.max(jnp.abs(b.astype(jnp.float32)))))


def test_xla_single_block_uses_plain_attention():
  """Default XLA blocks cover short sequences in one block: values and gradients still equal
  the reference (bias, mask, GQA, causal)."""
  q, k, v, bias, mask = _inputs(2, 24, 40, 4, 2, 16, (2, 1, 24, 40), (1, 4, 1, 40))
  f = lambda q, k, v, b: lpk.flash_attention(q, k, v, bias=b, mask=mask, is_causal=True, backend="xla")
  r = lambda q, k, v, b: lpk.flash_attention_reference(q, k, v, bias=b, mask=mask, is_causal=True)
  check_fwd_bwd(f, r, (q, k, v, bias), (0, 1, 2, 3))
