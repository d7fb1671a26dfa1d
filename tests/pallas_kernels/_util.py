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


def check_vjp(f, ref, args, argnums, *, fwd_tol=1e-5, grad_tol=5e-4):
  """Value and VJP (for a random cotangent) of ``f`` against ``ref``, in one compile with one
  forward and one backward kernel instance (``check_fwd_bwd`` traces the forward twice: the
  interpreters' cost). Tolerances relative to max(1, max |reference|)."""
  def run(fn, *a):
    def part(*d):
      full = list(a)
      for i, v in zip(argnums, d):
        full[i] = v
      return fn(*full)
    y, vjp = jax.vjp(part, *[a[i] for i in argnums])
    ct = jax.random.normal(jax.random.PRNGKey(7), y.shape, jnp.float32).astype(y.dtype)
    return y, vjp(ct)
  out, g = jax.jit(lambda *a: run(f, *a))(*args)
  want, gr = jax.jit(lambda *a: run(ref, *a))(*args)
  assert out.shape == want.shape and out.dtype == want.dtype
  assert max_err(out, want) <= fwd_tol * max(1.0, float(jnp.max(jnp.abs(want.astype(jnp.float32))))), \
      max_err(out, want)
  for i, (a, b) in enumerate(zip(g, gr)):
    assert a.shape == b.shape and a.dtype == b.dtype
    err = max_err(a, b) / max(1.0, float(jnp.max(jnp.abs(b.astype(jnp.float32)))))
    assert err <= grad_tol, (i, err)
    assert np.all(np.isfinite(np.asarray(a, np.float32)))
