"""Shared test helpers for the kernel tests."""

import jax
import jax.numpy as jnp
import numpy as np


def max_err(a, b):
  return float(jnp.max(jnp.abs(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32))))


def check_fwd_bwd(f, ref, args, argnums, *, fwd_tol=1e-5, grad_tol=5e-4):
  """Compares f to ref (values under jit and gradients of a nonlinear loss)."""
  def loss(fn):
    def l(*a):
      y = fn(*a).astype(jnp.float32)
      return jnp.sum(y * jnp.sin(y))
    return l
  # one compile for the value and the gradient
  out, g = jax.jit(lambda *a: (f(*a), jax.grad(loss(f), argnums=argnums)(*a)))(*args)
  want = ref(*args)
  assert out.shape == want.shape and out.dtype == want.dtype
  assert max_err(out, want) <= fwd_tol, max_err(out, want)
  gr = jax.grad(loss(ref), argnums=argnums)(*args)
  for i, (a, b) in enumerate(zip(g, gr)):
    scale = max(1.0, float(jnp.max(jnp.abs(b))))
    err = max_err(a, b) / scale
    assert err <= grad_tol, (i, err)
    assert np.all(np.isfinite(np.asarray(a, np.float32)))
