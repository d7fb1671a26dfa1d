"""adaptive_jit is a drop-in jax.jit: every common primitive family gives jax.jit's values and
gradients (linalg, fft, sort/top_k, cumulative ops, scatter/gather, loops and branches, custom
derivatives, checkpoint, nested jit, vmap, RNG, callbacks, complex and integer ops, convolutions,
reduce_window, grad/hessian inside the function)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from lepton_jax.transforms import adaptive_jit

R = np.random.default_rng(1)
X = jnp.asarray(R.normal(size=(6, 6)), jnp.float32)
SPD = X @ X.T + 6.0 * jnp.eye(6)
V = jnp.asarray(R.normal(size=(6,)), jnp.float32)


@jax.custom_jvp
def _softplus(x):
  return jnp.log1p(jnp.exp(x))


_softplus.defjvp(lambda p, t: (_softplus(p[0]), t[0] * jax.nn.sigmoid(p[0])))


@jax.custom_vjp
def _clip_grad(x):
  return jnp.sin(x)


_clip_grad.defvjp(lambda x: (jnp.sin(x), jnp.cos(x)), lambda c, g: (jnp.clip(g * c, -0.5, 0.5),))


def _host_square(x):
  return jax.pure_callback(lambda a: np.asarray(a) ** 2, jax.ShapeDtypeStruct(x.shape, x.dtype), x)


# name -> (fn(a, v) -> float array, differentiable w.r.t. a)
PROGRAMS = {
    "inv": (lambda a, v: jnp.linalg.inv(a) @ v, True),
    "solve": (lambda a, v: jnp.linalg.solve(a, v), True),
    "slogdet": (lambda a, v: jnp.linalg.slogdet(a)[1] * v, True),
    "cholesky_solve": (lambda a, v: jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(a), v), True),
    "eigh": (lambda a, v: jnp.linalg.eigh(a)[0] * v, True),
    "svd": (lambda a, v: jnp.linalg.svd(a, compute_uv=False) * v, True),
    "qr": (lambda a, v: jnp.linalg.qr(a)[1] @ v, True),
    "triangular_solve": (lambda a, v: jax.scipy.linalg.solve_triangular(jnp.tril(a) + 6 * jnp.eye(6), v, lower=True), True),
    "fft": (lambda a, v: jnp.abs(jnp.fft.fft(a @ v)) + jnp.real(jnp.fft.ifft(v)), True),
    "rfft2": (lambda a, v: jnp.abs(jnp.fft.rfft2(a)).sum(0)[:3] * v[:3], True),
    "sort_topk": (lambda a, v: jnp.sort(a @ v) + lax.top_k(a @ v, 6)[0], True),
    "argsort_take": (lambda a, v: jnp.take(v, jnp.argsort(a[0])) * a[1], True),
    "cumulative": (lambda a, v: jnp.cumsum(a @ v) + lax.cummax(v, 0) + jnp.cumprod(jnp.tanh(v)) + lax.cumlogsumexp(a[0]), True),
    "scatter_gather": (lambda a, v: (v.at[jnp.array([0, 2, 2])].add(a[0, :3])[jnp.array([2, 0])]).sum() * v, True),
    "dynamic_slice": (lambda a, v: lax.dynamic_update_slice(v, lax.dynamic_slice(a[0], (1,), (3,)), (2,)), True),
    "while_fori": (lambda a, v: lax.fori_loop(0, 4, lambda i, c: jnp.tanh(a @ c), v), True),
    "while_dynamic": (lambda a, v: lax.while_loop(lambda c: c[0] < 3.0, lambda c: (c[0] + 1.0, c[1] * 0.9), (0.0, a @ v))[1], False),
    "scan": (lambda a, v: lax.scan(lambda c, r: (jnp.tanh(c + r), c * 2), v, a)[1].sum(0), True),
    "cond_switch": (lambda a, v: lax.switch(jnp.argmax(v) % 3, [jnp.sin, jnp.cos, jnp.tanh], a @ v)
                    + lax.cond(v[0] > 0, lambda t: t * 2, lambda t: -t, v), True),
    "custom_jvp_vjp": (lambda a, v: _softplus(a @ v) + _clip_grad(a @ v), True),
    "checkpoint": (lambda a, v: jax.checkpoint(lambda t: jnp.sin(jnp.sin(a @ t)))(v), True),
    "nested_jit_vmap": (lambda a, v: jax.vmap(jax.jit(lambda r: jnp.tanh(r @ v)))(a), True),
    "rng": (lambda a, v: a @ v + jax.random.normal(jax.random.key(3), (6,)) + jax.random.uniform(jax.random.PRNGKey(4), (6,)), True),
    "pure_callback": (lambda a, v: _host_square(a @ v), False),
    "complex": (lambda a, v: jnp.abs(jnp.exp(1j * (a @ v)) * (1 + 2j)) + jnp.angle(v + 1j), True),
    "integer": (lambda a, v: (jnp.arange(6) * 3 // 2 % 5).astype(jnp.float32) * (a @ v)
                + jnp.bitwise_xor(jnp.arange(6), 3).astype(jnp.float32), True),
    "conv_reduce_window": (lambda a, v: lax.reduce_window(
        lax.conv_general_dilated(a[None, None], jnp.ones((2, 1, 3, 3)) * 0.1, (1, 1), "SAME")[0],
        -jnp.inf, lax.max, (1, 2, 2), (1, 1, 1), "VALID").sum((0, 1))[:5] * v[:5], True),
    "avg_pool": (lambda a, v: lax.reduce_window(a, 0.0, lax.add, (2, 2), (2, 2), "VALID").ravel()[:6] * v, True),
    "grad_hessian_inside": (lambda a, v: jax.grad(lambda t: jnp.sum(jnp.sin(a @ t) ** 2))(v)
                            + jax.hessian(lambda t: jnp.sum(jnp.tanh(t) ** 3))(v) @ v, True),
    "expm_logsumexp": (lambda a, v: jax.scipy.linalg.expm(a * 0.1) @ v + jax.nn.logsumexp(a, 1), True),
    "erf_special": (lambda a, v: jax.scipy.special.erf(a @ v) + jax.scipy.special.gammaln(jnp.abs(v) + 1), True),
}


def _close(a, b, tol=2e-5):
  def one(u, w):
    u, w = np.asarray(u), np.asarray(w)
    scale = max(1.0, float(np.abs(w).max(initial=0)))
    np.testing.assert_allclose(u, w, rtol=tol, atol=tol * scale)
  jax.tree.map(one, a, b)


@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_dropin_values_and_grads(name):
  fn, differentiable = PROGRAMS[name]
  a = SPD if name in ("cholesky_solve", "eigh") else X
  ours = adaptive_jit(fn)
  _close(ours(a, V), jax.jit(fn)(a, V))
  if differentiable:
    loss = lambda a, v, f: jnp.sum(jnp.sin(f(a, v)))
    got = jax.jit(jax.grad(lambda a, v: loss(a, v, ours), argnums=(0, 1)))(a, V)
    want = jax.jit(jax.grad(lambda a, v: loss(a, v, fn), argnums=(0, 1)))(a, V)
    _close(got, want, tol=1e-4)
    # The training order: adaptive_jit outside the gradient.
    got2 = adaptive_jit(jax.grad(lambda a, v: loss(a, v, fn), argnums=(0, 1)))(a, V)
    _close(got2, want, tol=1e-4)
