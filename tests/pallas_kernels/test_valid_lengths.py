"""attention_valid_lengths (shape buckets: true lengths known at run time) and the XLA flash
backward on rows whose every key is masked, against the plain-jnp reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lepton_jax.pallas_kernels import flash_attention
from lepton_jax.pallas_kernels._attention import (BlockSizes, attention_valid_lengths,
                                                  flash_attention_reference)

B, P, N, K, D = 2, 40, 4, 2, 16
SMALL = BlockSizes.get_default(q_len=16, kv_len=16, impl="xla", head_dim=D, dtype=jnp.float32)


def _close(a, b, tol=2e-5):
  a, b = np.asarray(a), np.asarray(b)
  np.testing.assert_allclose(a, b, rtol=tol, atol=tol * max(1.0, float(np.abs(b).max())))


def _inputs(seed, n):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(B, P, N, D)).astype(np.float32)
  k = rng.normal(size=(B, P, K, D)).astype(np.float32)
  v = rng.normal(size=(B, P, K, D)).astype(np.float32)
  mask = rng.random((B, 1, P, P)) < 0.7
  mask[0, 0, 3, :] = False                        # a query that attends to nothing
  bias = rng.normal(size=(1, N, P, P)).astype(np.float32)
  do = rng.normal(size=(B, P, N, D)).astype(np.float32)
  # Whatever the padding holds must not matter.
  q[:, n:], k[:, n:], v[:, n:], do[:, n:] = np.nan, np.inf, np.nan, np.nan
  bias[:, :, n:, :] = np.nan
  bias[:, :, :, n:] = -np.inf
  return q, k, v, mask, bias, do


@pytest.mark.parametrize("n,use_mask,use_bias,blocks", [
    (29, True, False, SMALL), (40, False, True, SMALL), (5, True, True, None),
], ids=["mask_3blocks", "bias_full_length", "short_mask_bias_one_block"])
def test_valid_prefix_equals_unpadded_attention_and_grads(n, use_mask, use_bias, blocks):
  q, k, v, mask, bias, do = _inputs(n, n)
  m = mask if use_mask else None
  b = bias if use_bias else None

  def ours(q, k, v):
    return attention_valid_lengths(q, k, v, n, n, mask=m, bias=b, block_sizes=blocks)

  def ref(q, k, v):
    return flash_attention_reference(q[:, :n], k[:, :n], v[:, :n],
                                     mask=None if m is None else m[:, :, :n, :n],
                                     bias=None if b is None else b[:, :, :n, :n])

  o, vjp = jax.vjp(jax.jit(ours), q, k, v)
  w, vjp_ref = jax.vjp(ref, q, k, v)
  assert np.all(np.isfinite(o))
  assert np.all(np.asarray(o[:, n:]) == 0)
  _close(o[:, :n], w)
  dmask = jnp.arange(P)[None, :, None, None] < n
  grads = vjp(jnp.where(dmask, do, 0.0))
  want = vjp_ref(jnp.asarray(do[:, :n]))
  for g, gw in zip(grads, want):
    assert np.all(np.isfinite(g))
    _close(g[:, :n], gw[:, :n], 1e-4)


def test_traced_lengths_one_executable():
  q, k, v, mask, _, _ = _inputs(0, P)
  f = jax.jit(lambda q, k, v, n: attention_valid_lengths(q, k, v, n, n, mask=mask,
                                                          block_sizes=SMALL))
  for n in (7, 33):
    want = flash_attention_reference(q[:, :n], k[:, :n], v[:, :n], mask=mask[:, :, :n, :n])
    _close(f(q, k, v, n)[:, :n], want)
  assert f._cache_size() == 1


@pytest.mark.parametrize("backend", ["xla", "interpret", "interpret_tpu"])
def test_flash_backward_exact_on_fully_masked_rows(backend):
  """The flash backward used to give such a row's probabilities 1 instead of 1/S (its
  log-sum-exp rounds to the mask value in float32), so dv was wrong there."""
  q, k, v, mask, _, do = _inputs(1, P)
  blocks = SMALL if backend == "xla" else None
  f = lambda q, k, v: flash_attention(q, k, v, mask=mask, backend=backend, block_sizes=blocks)
  g = lambda q, k, v: flash_attention_reference(q, k, v, mask=mask)
  got = jax.vjp(f, q, k, v)[1](jnp.asarray(do))
  want = jax.vjp(g, q, k, v)[1](jnp.asarray(do))
  for a, b in zip(got, want):
    _close(a, b, 1e-4)
