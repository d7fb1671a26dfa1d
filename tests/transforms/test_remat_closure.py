"""Save-set remat plans: the exact model, its solvers, and dominance over JAX's policies."""

import itertools
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lepton_jax as lj
from lepton_jax.jaxpr._liveness import grad_memory
from lepton_jax.transforms import _remat_closure as cl

POLICIES = ("nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable", "everything_saveable")


# ------------------------------------------------------------------ the model


def _random_problem(rng: random.Random, n: int) -> cl.Problem:
  """A random layered DAG: eqn i reads 1-2 earlier values and defines one."""
  eqns, values = [], []
  for i in range(n):
    ins = tuple(sorted(set(rng.sample(range(i), min(i, rng.randint(1, 2)))))) if i else ()
    eqns.append(cl.Eqn(ins, (i,), float(rng.choice([0, 1, 10, 100]))))
    values.append(cl.Value(rng.choice([1, 2, 4]), rng.random() < 0.5, i))
  return cl.Problem(tuple(eqns), tuple(values))


def _brute_force(problem: cl.Problem, budget: int):
  best = None
  for bits in itertools.product((0, 1), repeat=len(problem.values)):
    plan = cl.closure(problem, [v for v, b in enumerate(bits) if b])
    if plan.saved_bytes <= budget and (best is None or plan.recompute_flops < best):
      best = plan.recompute_flops
  return best


def test_closure_of_a_chain():
  # a -> b -> c, the backward needs c: save c (no recompute) or recompute c (and b) from a.
  p = cl.Problem((cl.Eqn((), (0,), 5.0), cl.Eqn((0,), (1,), 7.0), cl.Eqn((1,), (2,), 11.0)),
                 (cl.Value(4, False, 0), cl.Value(4, False, 1), cl.Value(4, True, 2)))
  assert cl.closure(p, {2}).recompute_flops == 0 and cl.closure(p, {2}).saved_bytes == 4
  assert cl.closure(p, {1}).recompute_flops == 11 and cl.closure(p, {1}).saved == {1}
  assert cl.closure(p, set()).recompute_flops == 23 and cl.closure(p, set()).saved_bytes == 0
  # saving a value nobody needs costs nothing and is not kept
  assert cl.closure(p, {0, 2}).saved == {2}


@pytest.mark.parametrize("seed", range(6))
def test_milp_is_exact_and_lp_feasible(seed):
  rng = random.Random(seed)
  p = _random_problem(rng, 9)
  total = cl.closure(p, range(9)).saved_bytes
  for budget in sorted({0, total // 3, total // 2, total - 1}):
    exact = _brute_force(p, budget)
    got = cl.solve(p, budget, method="milp")
    assert got is not None and got.saved_bytes <= budget
    assert got.recompute_flops == pytest.approx(exact)
    lp = cl.solve(p, budget, method="lp")
    assert lp is not None and lp.saved_bytes <= budget and lp.recompute_flops >= exact - 1e-9


def test_forced_values_make_small_budgets_infeasible():
  p = cl.Problem((cl.Eqn((), (0,), 1.0, recomputable=False), cl.Eqn((0,), (1,), 1.0)),
                 (cl.Value(8, True, 0), cl.Value(4, True, 1)), fixed_bytes=2)
  assert cl.solve(p, 9, method="milp") is None
  assert cl.solve(p, 10, method="milp").saved == {0}


# ------------------------------------------------------------- on real programs


def _mlp(params, x):
  for w, b in params:
    x = jnp.tanh(x @ w + b)
  return jnp.mean(x ** 2)


def _scanned(params, x):
  def layer(h, p):
    y = jax.nn.gelu(h @ p["w1"]) @ p["w2"]
    return h + jnp.tanh(y), None
  x, _ = jax.lax.scan(layer, x, params)
  return jnp.mean(x ** 2)


def _models():
  k = jax.random.split(jax.random.key(0), 4)
  mlp = ([(jax.random.normal(kk, (16, 16)) * 0.3, jnp.zeros(16)) for kk in jax.random.split(k[0], 6)],
         jax.random.normal(k[1], (4, 16)))
  sc = ({"w1": jax.random.normal(k[2], (4, 16, 32)) * 0.2, "w2": jax.random.normal(k[3], (4, 32, 16)) * 0.2},
        jax.random.normal(k[1], (4, 16)))
  return {"mlp": (_mlp, mlp), "scanned": (_scanned, sc)}


def _close(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model", ["mlp", "scanned"])
def test_saved_budget_dominates_every_builtin_policy(model):
  fun, args = _models()[model]
  ref = jax.grad(fun)(*args)
  for name in POLICIES:
    pol = grad_memory(jax.checkpoint(fun, policy=getattr(jax.checkpoint_policies, name)), *args)
    planned = lj.remat_plan(fun, budget=int(pol.saved_bytes), budget_kind="saved")
    plan = planned.plan(*args)
    ours = grad_memory(planned, *args)
    assert ours.saved_bytes == plan.saved_bytes <= pol.saved_bytes, name
    assert ours.flops <= pol.flops + 1e-6, name  # recompute no more than the policy
    _close(jax.jit(jax.grad(planned))(*args), ref)


def _compiled(fun, *args):
  """XLA's (temp bytes, FLOPs) of ``jax.jit(jax.grad(fun))`` (default compiler options)."""
  c = jax.jit(jax.grad(fun)).lower(*args).compile()
  cost = c.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return c.memory_analysis().temp_size_in_bytes, float(cost["flops"])


@pytest.mark.parametrize("model", ["scanned"])
def test_peak_budget_dominates_policies_at_their_compiled_temp(model):
  """At each built-in policy's compiled temp bytes, the plan fits and recomputes no more FLOPs
  (both measured from the compiled programs)."""
  fun, args = _models()[model]
  base_temp, base_flops = _compiled(fun, *args)
  for name in ("nothing_saveable", "dots_saveable"):
    temp, flops = _compiled(jax.checkpoint(fun, policy=getattr(jax.checkpoint_policies, name)), *args)
    planned = lj.remat_plan(fun, budget=int(temp))
    plan = planned.plan(*args)
    assert _compiled(planned, *args)[0] == plan.compiled_bytes <= temp, name
    assert plan.recompute_flops <= max(flops - base_flops, 0.0) + 1.0, name
  _close(jax.grad(planned)(*args), jax.grad(fun)(*args))


def test_integer_intermediates_and_saved_budget_error():
  def loss(w, x, labels):
    for _ in range(4):
      x = jnp.tanh(x @ w)
    logits = x @ w
    idx = jnp.argmax(logits, -1)  # integer intermediates flow through the plan
    picked = jnp.take_along_axis(logits, labels[:, None], -1)[:, 0]
    return jnp.mean(jax.nn.logsumexp(logits, -1) - picked) + 0.0 * jnp.sum(idx)
  w = jax.random.normal(jax.random.key(1), (16, 16)) * 0.3
  x = jax.random.normal(jax.random.key(2), (8, 16))
  labels = jnp.arange(8) % 16
  ref = jax.grad(loss)(w, x, labels)
  with pytest.raises(lj.BudgetError) as ei:  # integers flow through the smallest compiled plan too
    lj.remat_plan(loss, budget=1).plan(w, x, labels)
  for kind, budget in (("saved", 0.3), ("peak", ei.value.smallest_feasible_bytes)):
    planned = lj.remat_plan(loss, budget=budget, budget_kind=kind)
    plan = planned.plan(w, x, labels)
    # budget_kind="saved" bounds the saved residuals (model), "peak" the compiled temp bytes
    assert (plan.saved_bytes if kind == "saved" else plan.compiled_bytes) <= plan.budget_bytes
    _close(jax.grad(planned)(w, x, labels), ref)
  with pytest.raises(ValueError, match="budget_kind"):
    lj.remat_plan(loss, budget=0.5, budget_kind="residuals")


def test_saved_budget_on_flax_nnx_module():
  nnx = pytest.importorskip("flax.nnx")

  class Tower(nnx.Module):
    def __init__(self, rngs):
      self.layers = nnx.List([nnx.Linear(16, 16, rngs=rngs) for _ in range(4)]) if hasattr(nnx, "List") \
          else [nnx.Linear(16, 16, rngs=rngs) for _ in range(4)]

    def __call__(self, x):
      for layer in self.layers:
        x = jax.nn.relu(layer(x))
      return x

  model = Tower(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(3), (4, 16))

  def loss(m, x):
    return jnp.mean(m(x) ** 2)

  ref = nnx.grad(loss)(model, x)
  planned = lj.remat_plan(loss, budget=0.5, budget_kind="saved")
  plan = planned.plan(model, x)
  assert plan.saved_bytes <= plan.budget_bytes
  got = nnx.grad(planned)(model, x)
  _close(nnx.state(got), nnx.state(ref))
