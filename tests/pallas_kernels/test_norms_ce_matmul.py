import jax
import jax.numpy as jnp
import pytest

from lepton_jax import KernelError
from lepton_jax import pallas_kernels as lpk
from tests.pallas_kernels._util import check_fwd_bwd, max_err

NB = lpk.NormBlockSizes(8)
CB = lpk.CEBlockSizes(16, 32)
MB = lpk.MatmulBlockSizes(16, 16, 16)


def _rand(seed, shape, dtype=jnp.float32, scale=1.0):
  return (jax.random.normal(jax.random.PRNGKey(seed), shape) * scale).astype(dtype)


@pytest.mark.parametrize("backend", ["interpret", "xla"])
@pytest.mark.parametrize("shape", [(3, 7, 40), (5, 16)])
def test_norms(backend, shape):
  x, s, b = _rand(0, shape), _rand(1, shape[-1:]), _rand(2, shape[-1:])
  check_fwd_bwd(lambda x, s, b: lpk.layer_norm(x, s, b, backend=backend, block_sizes=NB),
                lambda x, s, b: lpk.layer_norm_reference(x, s, b), (x, s, b), (0, 1, 2))
  check_fwd_bwd(lambda x, s: lpk.rms_norm(x, s, backend=backend, block_sizes=NB),
                lambda x, s: lpk.rms_norm_reference(x, s), (x, s), (0, 1))


def test_norms_match_flax_and_tpu_kernel():
  from flax import nnx
  x = _rand(0, (4, 6, 24))
  ln = nnx.LayerNorm(24, rngs=nnx.Rngs(0))
  rms = nnx.RMSNorm(24, rngs=nnx.Rngs(0))
  assert max_err(lpk.layer_norm(x, ln.scale[...], ln.bias[...], backend="interpret"), ln(x)) <= 1e-5
  assert max_err(lpk.rms_norm(x, rms.scale[...], backend="interpret"), rms(x)) <= 1e-5
  check_fwd_bwd(lambda x, s: lpk.rms_norm(x, s, backend="interpret_tpu", block_sizes=NB),
                lambda x, s: lpk.rms_norm_reference(x, s), (x[:2, :3], _rand(3, (24,))), (0, 1))


def test_norm_bf16_and_errors():
  x = _rand(0, (8, 32), jnp.bfloat16)
  y = lpk.rms_norm(x, jnp.ones((32,), jnp.bfloat16), backend="interpret")
  assert y.dtype == jnp.bfloat16
  assert max_err(y, lpk.rms_norm_reference(x, jnp.ones((32,)))) <= 2e-2
  with pytest.raises(KernelError, match=r"scale must have shape \(32,\)"):
    lpk.rms_norm(x, jnp.ones((16,)))
  with pytest.raises(KernelError, match="supported dtypes"):
    lpk.layer_norm(x.astype(jnp.int32), None, None)


@pytest.mark.parametrize("backend", ["interpret", "xla"])
@pytest.mark.parametrize("shape,vocab", [((3, 11), 77), ((20,), 64)])
def test_softmax_cross_entropy(backend, shape, vocab):
  logits = _rand(0, shape + (vocab,), scale=3.0)
  labels = jax.random.randint(jax.random.PRNGKey(1), shape, 0, vocab)
  check_fwd_bwd(lambda lg: lpk.softmax_cross_entropy(lg, labels, backend=backend, block_sizes=CB),
                lambda lg: lpk.softmax_cross_entropy_reference(lg, labels), (logits,), (0,))


def test_softmax_cross_entropy_matches_optax():
  import optax
  logits = _rand(0, (6, 50))
  labels = jnp.arange(6) * 7
  assert max_err(lpk.softmax_cross_entropy(logits, labels, backend="interpret"),
                 optax.softmax_cross_entropy_with_integer_labels(logits, labels)) <= 1e-5


@pytest.mark.parametrize("backend", ["interpret", "xla"])
@pytest.mark.parametrize("n,d,v", [((3, 11), 24, 77), ((16,), 32, 64)])
def test_linear_softmax_cross_entropy(backend, n, d, v):
  x, w = _rand(0, n + (d,)), _rand(1, (d, v), scale=0.3)
  labels = jax.random.randint(jax.random.PRNGKey(2), n, 0, v)
  check_fwd_bwd(lambda x, w: lpk.linear_softmax_cross_entropy(x, w, labels, backend=backend, block_sizes=CB),
                lambda x, w: lpk.linear_softmax_cross_entropy_reference(x, w, labels), (x, w), (0, 1))


def test_linear_ce_memory_never_materialises_logits():
  x = jax.ShapeDtypeStruct((8192, 1024), jnp.float32)
  w = jax.ShapeDtypeStruct((1024, 32768), jnp.float32)
  l = jax.ShapeDtypeStruct((8192,), jnp.int32)
  f = lambda x, w, l: lpk.linear_softmax_cross_entropy(x, w, l, backend="xla").mean()
  for fn in (f, jax.grad(f, argnums=(0, 1))):
    temp = jax.jit(fn).lower(x, w, l).compile().memory_analysis().temp_size_in_bytes
    assert temp <= 64 * 2**20, temp   # the logits alone would be 1 GiB


def test_cross_entropy_errors():
  with pytest.raises(KernelError, match="labels must have an integer dtype"):
    lpk.softmax_cross_entropy(jnp.zeros((4, 8)), jnp.zeros((4,)))
  with pytest.raises(KernelError, match=r"labels must have shape \(4,\)"):
    lpk.softmax_cross_entropy(jnp.zeros((4, 8)), jnp.zeros((4, 1), jnp.int32))
  with pytest.raises(KernelError, match=r"labels must lie in \[0, 8\)"):
    lpk.softmax_cross_entropy(jnp.zeros((4, 8)), jnp.array([0, 1, 2, 8]))
  with pytest.raises(KernelError, match=r"w must have shape \[D, V\] with D=8"):
    lpk.linear_softmax_cross_entropy(jnp.zeros((4, 8)), jnp.zeros((7, 5)), jnp.zeros((4,), jnp.int32))


@pytest.mark.parametrize("backend", ["interpret", "xla"])
@pytest.mark.parametrize("activation", [None, "gelu", "relu", "silu"])
def test_matmul(backend, activation):
  x, w, b = _rand(0, (3, 13, 40)), _rand(1, (40, 24), scale=0.3), _rand(2, (24,))
  f = lambda x, w, b: lpk.matmul(x, w, bias=b, activation=activation, backend=backend, block_sizes=MB)
  r = lambda x, w, b: lpk.matmul_reference(x, w, bias=b, activation=activation)
  check_fwd_bwd(f, r, (x, w, b), (0, 1, 2))


def test_matmul_tpu_kernel_no_bias_and_errors():
  x, w = _rand(0, (20, 16)), _rand(1, (16, 24))
  check_fwd_bwd(lambda x, w: lpk.matmul(x, w, backend="interpret_tpu", block_sizes=lpk.MatmulBlockSizes(8, 128, 128)),
                lambda x, w: lpk.matmul_reference(x, w), (x, w), (0, 1))
  with pytest.raises(KernelError, match="activation='tanh' is not supported"):
    lpk.matmul(x, w, activation="tanh")
  with pytest.raises(KernelError, match=r"w must have shape \[K, N\] with K=16"):
    lpk.matmul(x, x)


def test_cross_entropy_tpu_kernels_in_tpu_interpreter():
  """TPU kernels (vocabulary as an "arbitrary" grid axis, VMEM accumulators, lane-dense lse)
  with a ragged last vocabulary block (300 = 2 x 128 + 44) and ragged rows."""
  logits = _rand(0, (20, 300), scale=3.0)
  labels = jax.random.randint(jax.random.PRNGKey(1), (20,), 0, 300)
  bs = lpk.CEBlockSizes(8, 128)
  check_fwd_bwd(lambda lg: lpk.softmax_cross_entropy(lg, labels, backend="interpret_tpu", block_sizes=bs),
                lambda lg: lpk.softmax_cross_entropy_reference(lg, labels), (logits,), (0,))
  x, w = _rand(2, (20, 24)), _rand(3, (24, 300), scale=0.3)
  check_fwd_bwd(lambda x, w: lpk.linear_softmax_cross_entropy(x, w, labels, backend="interpret_tpu",
                                                              block_sizes=bs),
                lambda x, w: lpk.linear_softmax_cross_entropy_reference(x, w, labels), (x, w), (0, 1))
  with pytest.raises(KernelError, match="block_v=64 must be a positive multiple of 128 on TPU"):
    lpk.softmax_cross_entropy(logits, labels, backend="interpret_tpu", block_sizes=lpk.CEBlockSizes(8, 64))
