"""Kernel routing of norms, softmax cross-entropy and matmul+bias+activation.

Third-party spellings (Flax NNX / linen modules, optax) and hand-written jnp are routed
to lepton_jax.pallas_kernels; near misses are not; values and gradients equal jax.jit.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen, nnx
from jax import lax

from lepton_jax import pallas_kernels as lpk
from lepton_jax.transforms import adaptive_jit

R = np.random.default_rng(1)
D = 16


def _n(*shape):
  return jnp.asarray(R.normal(size=shape), jnp.float32)


X = _n(3, 4, D)
G, B = 1.0 + 0.1 * _n(D), 0.1 * _n(D)
LAB = jnp.asarray(R.integers(0, D, (3, 4)), jnp.int32)
W, BW = 0.2 * _n(D, 8), 0.1 * _n(8)

_nnx_rms = nnx.RMSNorm(D, rngs=nnx.Rngs(0))
_nnx_ln = nnx.LayerNorm(D, epsilon=1e-5, rngs=nnx.Rngs(0))
_nnx_lin = nnx.Linear(D, 8, rngs=nnx.Rngs(0))


def _nnx_apply(module):
  graphdef, state = nnx.split(module)
  return lambda state, x: nnx.merge(graphdef, state)(x), state


def _linen_apply(module):
  params = module.init(jax.random.key(0), X)
  return lambda p, x: module.apply(p, x), params


_rms_nnx, _rms_nnx_s = _nnx_apply(_nnx_rms)
_ln_nnx, _ln_nnx_s = _nnx_apply(_nnx_ln)
_rms_linen, _rms_linen_p = _linen_apply(linen.RMSNorm(epsilon=1e-5))
_ln_linen, _ln_linen_p = _linen_apply(linen.LayerNorm())
_lin_nnx, _lin_nnx_s = _nnx_apply(_nnx_lin)


def _hand_ln(x, g, b):
  m = x.mean(-1, keepdims=True)
  return (x - m) * lax.rsqrt(((x - m) ** 2).mean(-1, keepdims=True) + 1e-5) * g + b


# (name, fn, args, expected route pattern)
ROUTED = [
    ("rms_hand", lambda x, g: x * lax.rsqrt((x * x).mean(-1, keepdims=True) + 1e-6) * g,
     (X, G), "rms_norm"),
    ("rms_hand_pow_div", lambda x, g: x / jnp.sqrt(jnp.mean(x ** 2, -1, keepdims=True) + 1e-6) * g,
     (X, G), "rms_norm"),
    ("rms_nnx", _rms_nnx, (_rms_nnx_s, X), "rms_norm"),
    ("rms_linen", _rms_linen, (_rms_linen_p, X), "rms_norm"),
    ("ln_hand", _hand_ln, (X, G, B), "layer_norm"),
    ("ln_jnp_var", lambda x, g, b: (x - x.mean(-1, keepdims=True)) * lax.rsqrt(
        jnp.var(x, -1, keepdims=True) + 1e-5) * g + b, (X, G, B), "layer_norm"),
    ("ln_nnx", _ln_nnx, (_ln_nnx_s, X), "layer_norm"),
    ("ln_linen", _ln_linen, (_ln_linen_p, X), "layer_norm"),
    ("ce_optax", optax.softmax_cross_entropy_with_integer_labels, (X, LAB),
     "softmax_cross_entropy"),
    ("ce_log_softmax", lambda l, y: -jnp.take_along_axis(
        jax.nn.log_softmax(l, axis=-1), y[..., None], axis=-1)[..., 0], (X, LAB),
     "softmax_cross_entropy"),
    ("mm_bias_relu", lambda x, w, b: jax.nn.relu(x @ w + b), (X, W, BW), "matmul_bias_relu"),
    ("mm_bias_gelu", lambda x, w, b: jax.nn.gelu(x @ w + b), (X, W, BW), "matmul_bias_gelu"),
    ("mm_silu_nobias", lambda x, w: jax.nn.silu(x @ w), (X, W), "matmul_silu"),
    ("nnx_linear_silu", lambda s, x: jax.nn.silu(_lin_nnx(s, x)), (_lin_nnx_s, X),
     "matmul_bias_silu"),
]


def _close(a, b, tol=1e-4):
  jax.tree.map(lambda u, v: np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=tol,
                                                       atol=tol), a, b)


def _float_argnums(args):
  return tuple(i for i, a in enumerate(args)
               if all(jnp.issubdtype(l.dtype, jnp.floating) for l in jax.tree.leaves(a)))


@pytest.mark.parametrize("name,fn,args,pattern", ROUTED, ids=[r[0] for r in ROUTED])
def test_routed_values_and_grads_equal_jit(name, fn, args, pattern):
  g = adaptive_jit(fn, kernels="xla")
  rep = g.explain(*args)
  routes = [r for r in rep.rewrites if r.pass_name == "route_kernels"]
  assert [r.pattern for r in routes] == [pattern], str(rep)
  assert routes[0].count >= 2 and routes[0].location
  assert pattern in str(rep)
  ct = _n(*jax.eval_shape(fn, *args).shape)

  def loss(*a):
    y = fn(*a)
    return jnp.sum(y * ct), y        # the outputs as aux: values checked elementwise too

  argnums = _float_argnums(args)
  vg = lambda f: jax.value_and_grad(f, argnums=argnums, has_aux=True)
  # jax.jit(jax.value_and_grad(adaptive_jit(loss))) and the plain-JAX reference, compiled
  # as one program (one XLA compile instead of two).
  ours, want = jax.jit(lambda *a: (vg(adaptive_jit(loss, kernels="xla"))(*a), vg(loss)(*a)))(*args)
  _close(ours, want)


def test_backend_follows_kernels_option():
  fn = lambda x, g: x * lax.rsqrt((x * x).mean(-1, keepdims=True) + 1e-6) * g
  for kernels in ("auto", "xla"):
    with lpk.record_dispatches() as log:
      adaptive_jit(fn, kernels=kernels, passes=["route_kernels"]).explain(X, G)
    assert [(d.kernel, d.requested) for d in log.records][-1] == ("rms_norm", kernels)
  rep = adaptive_jit(fn, kernels=None).explain(X, G)
  assert not [r for r in rep.rewrites if r.pass_name == "route_kernels"]


def _ce_ref(l, y):
  return -jnp.take_along_axis(jax.nn.log_softmax(l, axis=-1), y[..., None], axis=-1)[..., 0]


NEAR_MISSES = {
    "rms_wrong_axis": (lambda x, g: x * lax.rsqrt((x * x).mean(1, keepdims=True) + 1e-6) * g[:4, None],
                       (X, G)),
    "rms_eps_outside_rsqrt": (lambda x, g: x * (lax.rsqrt((x * x).mean(-1, keepdims=True)) + 1e-6) * g,
                              (X, G)),
    "rms_eps_outside_sqrt": (lambda x, g: x / (jnp.sqrt((x * x).mean(-1, keepdims=True)) + 1e-6) * g,
                             (X, G)),
    "rms_sum_not_mean": (lambda x, g: x * lax.rsqrt((x * x).sum(-1, keepdims=True) + 1e-6) * g, (X, G)),
    "rms_abs_not_square": (lambda x, g: x * lax.rsqrt(jnp.abs(x).mean(-1, keepdims=True) + 1e-6) * g,
                           (X, G)),
    "rms_normalizes_other_tensor": (lambda x, g: (x + 1.0) * lax.rsqrt(
        (x * x).mean(-1, keepdims=True) + 1e-6) * g, (X, G)),
    "ln_wrong_axis": (lambda x, g, b: (x - x.mean(1, keepdims=True)) * lax.rsqrt(
        ((x - x.mean(1, keepdims=True)) ** 2).mean(1, keepdims=True) + 1e-5) * g + b, (X, G, B)),
    "ln_mean_of_other_tensor": (lambda x, g, b: (x - x[:, :1].mean(-1, keepdims=True)) * lax.rsqrt(
        ((x - x.mean(-1, keepdims=True)) ** 2).mean(-1, keepdims=True) + 1e-5) * g + b, (X, G, B)),
    "ln_var_not_centered": (lambda x, g, b: (x - x.mean(-1, keepdims=True)) * lax.rsqrt(
        (x ** 2).mean(-1, keepdims=True) + 1e-5) * g + b, (X, G, B)),
    "ln_bias_inside": (lambda x, g, b: (x - x.mean(-1, keepdims=True) + b) * lax.rsqrt(
        ((x - x.mean(-1, keepdims=True)) ** 2).mean(-1, keepdims=True) + 1e-5) * g, (X, G, B)),
    "ce_wrong_axis": (lambda l, y: -jnp.take_along_axis(jax.nn.log_softmax(l, axis=1), y[..., None],
                                                        axis=-1)[..., 0], (X, LAB)),
    "ce_softmax_not_log": (lambda l, y: -jnp.take_along_axis(jax.nn.softmax(l, axis=-1), y[..., None],
                                                             axis=-1)[..., 0], (X, LAB)),
    "ce_positive_sign": (lambda l, y: jnp.take_along_axis(jax.nn.log_softmax(l, axis=-1), y[..., None],
                                                          axis=-1)[..., 0], (X, LAB)),
    "ce_take_other_axis": (lambda l, y: -jnp.take_along_axis(jax.nn.log_softmax(l, axis=-1),
                                                             y[:, :1, None] % 4, axis=1)[..., 0],
                           (X, LAB)),
    "mm_gelu_exact": (lambda x, w, b: jax.nn.gelu(x @ w + b, approximate=False), (X, W, BW)),
    "mm_leaky_relu": (lambda x, w, b: jax.nn.leaky_relu(x @ w + b), (X, W, BW)),
    "mm_tanh": (lambda x, w, b: jnp.tanh(x @ w + b), (X, W, BW)),
    "mm_relu6": (lambda x, w, b: jax.nn.relu6(x @ w + b), (X, W, BW)),
    "mm_sigmoid_not_silu": (lambda x, w, b: jax.nn.sigmoid(x @ w + b), (X, W, BW)),
}


@pytest.mark.parametrize("name", sorted(NEAR_MISSES))
def test_near_misses_are_not_routed(name):
  fn, args = NEAR_MISSES[name]
  g = adaptive_jit(fn, kernels="xla")
  rep = g.explain(*args)
  assert not [r for r in rep.rewrites if r.pass_name == "route_kernels"], str(rep)
  _close(*jax.jit(lambda *a: (g(*a), fn(*a)))(*args), tol=1e-5)


def test_failed_check_falls_back_with_warning(monkeypatch):
  from lepton_jax.transforms.passes import _templates
  real = _templates.replacement

  def wrong(m, backend, aval):
    f = real(m, backend, aval)
    return lambda *a: f(*a) * 1.01     # a subtly wrong "kernel"
  monkeypatch.setattr(_templates, "replacement", wrong)
  fn = _hand_ln
  g = adaptive_jit(fn, kernels="xla")
  with pytest.warns(RuntimeWarning, match="layer_norm.*numeric spot check failed"):
    out = g(X, G, B)
  _close(out, jax.jit(fn)(X, G, B), tol=1e-6)


def test_explain_lists_each_routed_hotspot():
  def model(x, g, b, w, bw, y):
    h = jax.nn.gelu(_hand_ln(x, g, b) @ w + bw)
    return optax.softmax_cross_entropy_with_integer_labels(h @ w.T, y).mean()
  args = (X, G, B, W, BW, LAB)
  g = adaptive_jit(model, kernels="xla")
  rep = g.explain(*args)
  counts = {pat: n for (ps, pat), n in rep.counts().items() if ps == "route_kernels"}
  assert set(counts) == {"layer_norm", "matmul_bias_gelu", "softmax_cross_entropy"}, str(rep)
  d = rep.to_dict()
  assert all(r["location"] for r in d["rewrites"] if r["pass_name"] == "route_kernels")
  argnums = (0, 1, 2, 3, 4)
  _close(jax.value_and_grad(g, argnums)(*args),
         jax.jit(jax.value_and_grad(model, argnums))(*args))
