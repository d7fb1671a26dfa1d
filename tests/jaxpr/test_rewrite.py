"""Pattern matching and the rewriting interpreter."""

import random

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

from lepton_jax import jaxpr as ljx
from tests.jaxpr import _models

P, C = ljx.Pattern, ljx.Capture


def my_tanh(x):
  """A tanh-equivalent written differently (the custom function the rule routes to)."""
  e = jnp.exp(-2 * jnp.abs(x))
  return jnp.sign(x) * (1 - e) / (1 + e)


TANH_RULE = ljx.Rule(P("tanh", C("x")), my_tanh, name="tanh->my_tanh")


def count_prims(fun, *args):
  return [r.eqn.primitive.name for r in ljx.walk(ljx.trace(fun, *args).closed_jaxpr)]


def test_find_matches_dataflow_captures_params_and_predicates():
  def softmax(x):
    e = jnp.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)
  j = jax.make_jaxpr(softmax)(jnp.ones((2, 8)))
  num = P("exp", P("sub", C("x"), P("broadcast_in_dim", P("reduce_max", C("x"), params={"axes": (1,)}))), name="e")
  (m,) = ljx.find_matches(j, num)
  assert m.captures["x"] is j.jaxpr.invars[0] and m.root.primitive.name == "exp"
  assert [e.primitive.name for e in m.eqns] == ["reduce_max", "broadcast_in_dim", "sub", "exp"]
  assert ljx.find_matches(j, P("exp", P("sub", C("x"), P("broadcast_in_dim", P("reduce_max", C("y"), params={"axes": (0,)}))))) == []
  assert ljx.find_matches(j, P("reduce_max", shape=(2,))) and not ljx.find_matches(j, P("reduce_max", shape=(3,)))
  assert len(ljx.find_matches(j, P(("reduce_sum", "reduce_max"), C("x", where=lambda a: a.ndim == 2)))) == 2
  assert ljx.find_matches(j, P("div", where=lambda e: e.outvars[0].aval.size == 16))
  # same capture name twice must be the same value
  j2 = jax.make_jaxpr(lambda a, b: a * b)(1.0, 2.0)
  assert not ljx.find_matches(j2, P("mul", C("x"), C("x")))
  assert ljx.find_matches(jax.make_jaxpr(lambda a: a * a)(1.0), P("mul", C("x"), C("x")))


def test_commutative_and_literals():
  j = jax.make_jaxpr(lambda x: 2.0 * jnp.exp(x))(jnp.ones(3))
  pat = P("mul", P("exp", C("x")), C("c", literal=True))
  assert not ljx.find_matches(j, pat)
  (m,) = ljx.find_matches(j, P("mul", P("exp", C("x")), C("c", literal=True), commutative=True))
  assert float(m.captures["c"].val) == 2.0
  with pytest.raises(ValueError, match="commutative"):
    P("exp", C("x"), commutative=True)
  with pytest.raises(TypeError, match="operands"):
    P("exp", "x")


@pytest.mark.parametrize("shape, dtype", [((3, 4), jnp.float32), ((5,), jnp.bfloat16)])
def test_tanh_rule_values_and_gradients(shape, dtype):
  def f(w, x):
    return jnp.sum(jnp.tanh(x * w) ** 2 + jnp.tanh(w))
  x = (jnp.linspace(-2, 2, np.prod(shape)).reshape(shape)).astype(dtype)
  w = jnp.full(shape, 0.7, dtype)
  g = ljx.rewrite(f, [TANH_RULE])
  assert "tanh" not in count_prims(g, w, x)
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(np.float32(g(w, x)), np.float32(f(w, x)), rtol=tol, atol=tol)
  np.testing.assert_allclose(np.float32(jax.grad(g)(w, x)), np.float32(jax.grad(f)(w, x)), rtol=tol, atol=tol)
  np.testing.assert_allclose(np.float32(jax.jit(jax.grad(g))(w, x)), np.float32(jax.grad(f)(w, x)), rtol=tol, atol=tol)
  vm = jax.vmap(g, in_axes=(None, 0))(w, jnp.stack([x, -x]))
  np.testing.assert_allclose(np.float32(vm), np.float32(jax.vmap(f, in_axes=(None, 0))(w, jnp.stack([x, -x]))), rtol=tol, atol=tol)


def test_tanh_rule_on_flax_model_inside_jit_and_remat():
  f, args = _models.rnn_case(steps=3, unroll=True)
  loss = lambda p, xs: jnp.mean(f(p, xs) ** 2)
  inner = jax.jit(lambda p, xs: jax.checkpoint(loss)(p, xs))
  g = ljx.rewrite(inner, [TANH_RULE])
  assert "tanh" not in count_prims(g, *args)
  np.testing.assert_allclose(jax.jit(g)(*args), loss(*args), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(jax.jit(jax.grad(g))(*args)), jax.tree.leaves(jax.grad(loss)(*args))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  # attention block from Flax NNX (gelu uses tanh)
  fa, aargs = _models.attention_case(seq=4, d=8, heads=2)
  ga = ljx.rewrite(fa, [TANH_RULE])
  assert "tanh" in count_prims(fa, *aargs) and "tanh" not in count_prims(ga, *aargs)
  np.testing.assert_allclose(jax.jit(ga)(*aargs), fa(*aargs), rtol=1e-5, atol=1e-5)


def test_match_with_external_use_of_intermediate_is_skipped():
  rule = ljx.Rule(P("exp", P("sin", C("x"))), lambda x: jnp.zeros_like(x))
  only = lambda x: jnp.exp(jnp.sin(x))
  def shared(x):
    s = jnp.sin(x)
    return jnp.exp(s) + s  # sin(x) is used outside the match
  x = jnp.ones(3)
  np.testing.assert_array_equal(ljx.rewrite(only, [rule])(x), jnp.zeros(3))
  np.testing.assert_allclose(ljx.rewrite(shared, [rule])(x), shared(x))


def test_rule_output_checks_and_multi_output():
  bad = ljx.Rule(P("exp", C("x")), lambda x: x[:1])
  with pytest.raises(ValueError, match="keep shapes"):
    ljx.rewrite(jnp.exp, [bad])(jnp.ones(3))
  with pytest.raises(TypeError, match="Rule"):
    ljx.rewrite(jnp.exp, ["exp"])
  # pytree in, pytree out
  f = lambda d: {"a": jnp.exp(d["x"]), "b": (d["y"] * 2,)}
  out = ljx.rewrite(f, ljx.Rule(P("exp", C("x")), lambda x: x + 1))({"x": jnp.ones(2), "y": jnp.ones(2)})
  assert set(out) == {"a", "b"} and out["a"].tolist() == [2.0, 2.0]


# ---------------------------------------------------------------- random programs

UNARY = [jnp.sin, jnp.tanh, jnp.abs, jnp.negative, lambda v: jnp.exp(jnp.clip(v, -3, 3)), jnp.cos,
         lambda v: v ** 2, jax.nn.relu, jax.nn.sigmoid, lambda v: jnp.log1p(jnp.abs(v))]
BINARY = [jnp.add, jnp.multiply, jnp.subtract, jnp.maximum, lambda a, b: a / (1 + b * b)]


def make_program(seed):
  rng = random.Random(seed)
  n_ops = rng.randint(2, 8)
  ops = []
  for _ in range(n_ops):
    kind = rng.choice(["u", "u", "b", "b", "red", "mm", "jit", "remat", "scan", "cond"])
    ops.append((kind, rng.randrange(len(UNARY)), rng.randrange(len(BINARY)), rng.random()))

  def prog(x, y):
    vals = [x, y]
    for kind, ui, bi, r in ops:
      a = vals[int(r * len(vals))]
      b = vals[-1]
      if kind == "u":
        v = UNARY[ui](a)
      elif kind == "b":
        v = BINARY[bi](a, b)
      elif kind == "red":
        v = jnp.broadcast_to(jnp.sum(a, axis=1, keepdims=True), a.shape)
      elif kind == "mm":
        v = a @ b.T @ a * 0.1
      elif kind == "jit":
        v = jax.jit(lambda p, q: UNARY[ui](BINARY[bi](p, q)))(a, b)
      elif kind == "remat":
        v = jax.checkpoint(lambda p: UNARY[ui](p) * 2)(a)
      elif kind == "scan":
        v = jax.lax.scan(lambda c, row: (UNARY[ui](c + row), c), a[0], a)[1]
      else:
        v = jax.lax.cond(r > 0.5, lambda p: UNARY[ui](p), lambda p: p + 1, a)
      vals.append(v)
    return vals[-1], vals[-2].sum()
  return prog


IDENTITY_RULES = [
    ljx.Rule(P("tanh", C("x")), lambda x: jax.lax.tanh(x)),
    ljx.Rule(P("mul", C("a"), C("b")), lambda a, b: jax.lax.mul(a, b)),
    ljx.Rule(P("sin", C("x")), lambda x: jax.lax.sin(x)),
]


def test_random_programs_evaluate_identically():
  x = jnp.linspace(-1, 1, 12).reshape(3, 4)
  y = jnp.cos(jnp.arange(12.0)).reshape(3, 4)
  n_rewritten = 0
  for seed in range(120):
    prog = make_program(seed)
    t = ljx.trace(prog, x, y)
    # disable_jit: nested jit/scan/cond run op by op, hitting the per-primitive
    # dispatch cache instead of compiling every random program (keeps this fast).
    with jax.disable_jit():
      ref = jax.extend.core.jaxpr_as_fun(t.closed_jaxpr)(x, y)
      plain = ljx.eval_jaxpr_with_rewrites(t.closed_jaxpr, [], x, y)
      ident = ljx.eval_jaxpr_with_rewrites(t.closed_jaxpr, IDENTITY_RULES, x, y)
    n_rewritten += bool(ljx.select_matches(t.closed_jaxpr, IDENTITY_RULES))
    for a, b, c in zip(ref, plain, ident):
      np.testing.assert_array_equal(a, b, err_msg=f"seed {seed}")
      np.testing.assert_allclose(a, c, rtol=1e-6, atol=1e-6, err_msg=f"seed {seed}")
  assert n_rewritten > 60
