"""FLOP model vs XLA's compiled cost analysis on real (Flax/optax) models."""

import jax
import jax.numpy as jnp
import pytest

from lepton_jax import jaxpr as ljx
from tests.jaxpr import _models


def _mse(f):
  return lambda *a: jnp.mean(jax.tree.leaves(f(*a))[0] ** 2)


CASES = {
    "mlp": _models.mlp_case,
    "cnn": lambda: (lambda f, a: (_mse(f), a))(*_models.cnn_case()),
    "attention": lambda: (lambda f, a: (_mse(f), a))(*_models.attention_case()),
    "rnn_scan": lambda: (lambda f, a: (_mse(f), a))(*_models.rnn_case()),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("grad", [False, True])
def test_flops_agree_with_xla(name, grad):
  f, args = CASES[name]()
  if grad:
    f = jax.grad(f)
  ours = ljx.cost(f, *args)
  xla_f, xla_t = _models.xla_flops(f, *args)
  assert xla_f > 0
  assert abs(ours.flops / xla_f - 1) < 0.10, (name, grad, ours.flops, xla_f)
  assert abs(ours.transcendentals - xla_t) <= 0.10 * max(xla_t, 1), (ours.transcendentals, xla_t)


def test_scan_multiplies_by_length_and_matches_unrolled():
  f_roll, args = _models.rnn_case(unroll=1)
  f_unroll, _ = _models.rnn_case(unroll=True)
  c_roll, c_unroll = ljx.cost(f_roll, *args), ljx.cost(f_unroll, *args)
  assert c_roll.flops == c_unroll.flops
  assert c_roll.transcendentals == c_unroll.transcendentals == 10 * 4 * 32
  f_one, args_one = _models.rnn_case(steps=1, unroll=1)
  one = ljx.cost(f_one, *args_one)
  assert c_roll.flops == 10 * one.flops


def test_primitive_rules():
  x = jnp.ones((8, 16))
  w = jnp.ones((16, 4))
  assert ljx.cost(lambda a, b: a @ b, x, w).flops == 2 * 8 * 16 * 4
  a = jnp.ones((3, 5, 8, 16))
  b = jnp.ones((3, 5, 16, 2))
  assert ljx.cost(jnp.matmul, a, b).flops == 2 * 3 * 5 * 8 * 16 * 2
  c = ljx.cost(jnp.exp, x)
  assert (c.flops, c.transcendentals) == (0, 128)
  assert c.bytes_read == c.bytes_written == 512
  assert ljx.cost(lambda v: v + 1, x).flops == 128
  assert ljx.cost(lambda v: v.sum(), x).flops == 127
  assert ljx.cost(lambda v: v.max(axis=1), x).flops == 8 * 15
  assert ljx.cost(lambda v: v ** 5, x).flops == 3 * 128
  assert ljx.cost(jax.nn.sigmoid, x) == ljx.Cost(3 * 128, 128, 512, 512)
  assert ljx.cost(lambda v: v.T.reshape(-1), x).flops == 0
  # conv: SAME padding skips taps in the padding, exactly like XLA.
  img = jnp.ones((2, 6, 6, 3))
  k = jnp.ones((3, 3, 3, 4))
  conv = lambda i, k: jax.lax.conv_general_dilated(i, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  assert ljx.cost(conv, img, k).flops == _models.xla_flops(conv, img, k)[0]
  conv_valid = lambda i, k: jax.lax.conv_general_dilated(i, k, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  assert ljx.cost(conv_valid, img, k).flops == 2 * 2 * 4 * 4 * 4 * 3 * 3 * 3
  dil = lambda i, k: jax.lax.conv_general_dilated(i, k, (2, 1), ((2, 1), (0, 2)), lhs_dilation=(2, 1), rhs_dilation=(1, 2),
                                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))
  assert ljx.cost(dil, img, k).flops == _models.xla_flops(dil, img, k)[0]


def test_cond_takes_max_and_while_trip_counts():
  x = jnp.ones((16, 16))
  f = lambda p, x: jax.lax.cond(p, lambda x: x @ x @ x, lambda x: x + 1, x)
  c = ljx.cost(f, True, x)
  assert c.flops >= 2 * 2 * 16 ** 3 and c.flops < 2 * 2 * 16 ** 3 + 16 * 16 + 10

  body = lambda i, a: a @ x
  counted = ljx.cost(lambda a: jax.lax.while_loop(lambda c: c[0] < 7, lambda c: (c[0] + 1, c[1] @ x), (0, a))[1], x)
  assert counted.flops == 7 * 2 * 16 ** 3 + 7 + 8  # body adds + 8 cond compares
  unknown = ljx.cost(lambda a, n: jax.lax.fori_loop(0, n, body, a), x, 5)
  assert unknown.flops >= 2 * 16 ** 3 and unknown.flops < 2 * 2 * 16 ** 3  # body counted once
  scan_loop = ljx.cost(lambda a: jax.lax.fori_loop(0, 5, body, a), x)
  assert scan_loop.flops >= 5 * 2 * 16 ** 3


def test_cost_algebra_and_dict():
  a = ljx.Cost(1, 2, 3, 4)
  assert a + a == ljx.Cost(2, 4, 6, 8) == a.scale(2)
  assert sum([a, a]) == a.scale(2)
  assert a.to_dict() == {"flops": 1, "transcendentals": 2, "bytes_read": 3, "bytes_written": 4, "bytes_accessed": 7}
  assert a.total_ops == 3
  with pytest.raises(Exception):
    a.flops = 3


def test_jit_and_custom_derivatives_are_walked():
  x = jnp.ones((8, 8))
  inner = ljx.cost(lambda v: jnp.tanh(v @ v), x)
  assert ljx.cost(jax.jit(lambda v: jnp.tanh(v @ v)), x) == inner
  assert ljx.cost(jax.checkpoint(lambda v: jnp.tanh(v @ v)), x) == inner

  @jax.custom_vjp
  def g(v):
    return jnp.tanh(v @ v)
  g.defvjp(lambda v: (g(v), v), lambda v, ct: (ct,))
  assert ljx.cost(g, x) == inner
  assert ljx.cost(lambda v: jax.nn.relu(v @ v), x).flops == 2 * 8 ** 3 + 64
