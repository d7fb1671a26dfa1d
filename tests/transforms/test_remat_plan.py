"""Tests for lj.remat_plan: compiled memory is the judge.

Every budget claim is checked by compiling ``jax.jit(jax.grad(planned))`` here, independently of the
planner, and reading XLA's ``memory_analysis().temp_size_in_bytes``; gradients are compared with
plain ``jax.grad``.
"""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lepton_jax._errors import BudgetError
from lepton_jax.transforms import RematPlan, remat_plan
from lepton_jax.transforms import _remat_graph as G
from lepton_jax.transforms import _remat_measure as M
from lepton_jax.transforms import _remat_planner as P
from lepton_jax.transforms import _remat_search as R
from lepton_jax.transforms import _remat_solver as S
from lepton_jax.transforms._remat_apply import _apply
from lepton_jax.transforms._remat_types import CostModel


def compiled(fun, *args, run=False):
  """XLA's (temp bytes, FLOPs) of ``jax.jit(jax.grad(fun))`` with default compiler options
  (``run``: also the gradient, from the same executable)."""
  c = jax.jit(jax.grad(fun)).lower(*args).compile()
  cost = c.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  out = c.memory_analysis().temp_size_in_bytes, float(cost["flops"])
  return out + (c(*args),) if run else out


def _close(a, b, tol=1e-5):
  """Equal to float tolerance, atol scaled with the magnitude of the reference leaf."""
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
    np.testing.assert_allclose(x, y, rtol=tol, atol=tol * max(1.0, float(np.abs(y).max(initial=0.0))))


def _nnx_grad_and_stats(fun, model, *args):
  """Jitted ``nnx.grad(fun)(model, *args)`` and the model's BatchNorm stats after it."""
  gdef, state = nnx.split(model)

  def step(state, *args):
    m = nnx.merge(gdef, state)
    grads = nnx.grad(fun)(m, *args)
    return nnx.state(grads), nnx.state(m)
  grads, new_state = jax.jit(step)(state, *args)
  nnx.update(model, new_state)
  return grads, nnx.state(model, nnx.BatchStat)


# ----------------------------------------------------------------------------- models


def mlp_loss(params, x):
  for w, b in params:
    x = jnp.tanh(x @ w + b)
  return jnp.mean(x ** 2)


# Parameters come from numpy: eager jax.random calls compile one kernel per shape,
# which would cost more CPU time than the planning under test.


def mlp_setup(layers=8, d=32, batch=64, dtype=jnp.float32):
  rng = np.random.default_rng(0)
  params = [(jnp.asarray(rng.normal(size=(d, d)) / math.sqrt(d), dtype), jnp.zeros(d, dtype))
            for _ in range(layers)]
  return params, jnp.ones((batch, d), dtype)


def _normal(seed, shape, scale=1.0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * scale, jnp.float32)


def _attn_block(x, p):
  b, t, d = x.shape
  h = 4
  y = (x - x.mean(-1, keepdims=True)) * jax.lax.rsqrt(x.var(-1, keepdims=True) + 1e-6)
  q, k, v = jnp.split(y @ p["qkv"], 3, axis=-1)
  q, k, v = (z.reshape(b, t, h, d // h) for z in (q, k, v))
  s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d // h)
  a = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1), v).reshape(b, t, d)
  x = x + a @ p["o"]
  y = (x - x.mean(-1, keepdims=True)) * jax.lax.rsqrt(x.var(-1, keepdims=True) + 1e-6)
  return x + jax.nn.gelu(y @ p["w1"]) @ p["w2"]


def transformer_params(layers=4, d=32, stacked=False):
  rng = np.random.default_rng(1)
  def mk(shape, scale):
    return rng.normal(size=(layers,) + shape) * scale
  p = {"qkv": mk((d, 3 * d), 0.1), "o": mk((d, d), 0.1), "w1": mk((d, 4 * d), 0.1),
       "w2": mk((4 * d, d), 0.05)}
  if stacked:
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), p)
  return [jax.tree.map(lambda a: jnp.asarray(a[i], jnp.float32), p) for i in range(layers)]


def transformer_unrolled(params, x):
  for p in params:
    x = _attn_block(x, p)
  return jnp.mean(x ** 2)


def transformer_scanned(params, x):
  x, _ = jax.lax.scan(lambda c, p: (_attn_block(c, p), None), x, params)
  return jnp.mean(x ** 2)


class _Block(nnx.Module):
  def __init__(self, c, rngs):
    self.conv1 = nnx.Conv(c, c, (3, 3), rngs=rngs)
    self.bn1 = nnx.BatchNorm(c, rngs=rngs)
    self.conv2 = nnx.Conv(c, c, (3, 3), rngs=rngs)
    self.bn2 = nnx.BatchNorm(c, rngs=rngs)

  def __call__(self, x):
    y = nnx.relu(self.bn1(self.conv1(x)))
    return nnx.relu(x + self.bn2(self.conv2(y)))


class ResNet(nnx.Module):
  def __init__(self, rngs, c=8, blocks=3):
    self.stem = nnx.Conv(3, c, (3, 3), rngs=rngs)
    self.blocks = nnx.List([_Block(c, rngs) for _ in range(blocks)])
    self.head = nnx.Linear(c, 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.stem(x))
    for b in self.blocks:
      x = b(x)
    return self.head(x.mean((1, 2)))


def make_resnet(blocks, c=4, seed=0):
  """A :class:`ResNet` with numpy-initialised weights (BatchNorm: scale/var 1, bias/mean 0)."""
  gdef, state = nnx.split(nnx.eval_shape(lambda: ResNet(nnx.Rngs(0), c=c, blocks=blocks)))
  rng = np.random.default_rng(seed)

  def init(path, s):
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    name = [n for n in names if n != "value"][-1]
    if name == "kernel":
      return jnp.asarray(rng.normal(size=s.shape) / np.sqrt(np.prod(s.shape[:-1])), s.dtype)
    return (jnp.ones if name in ("scale", "var") else jnp.zeros)(s.shape, s.dtype)
  model = nnx.merge(gdef, jax.tree_util.tree_map_with_path(init, state))
  assert float(jnp.abs(model.stem.kernel[...]).sum()) > 0
  return model


def resnet_loss(model, x, y):
  logits = model(x)
  return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))


# ------------------------------------------------------------------------- acceptance


BUDGETS = [0.25, 0.5, 0.75]


def _check(fun, budget, *args):
  """Plans ``fun`` at ``budget``; checks the plan against an independent compile.

  Returns ``(wrapped, plan)``, or ``(wrapped, None)`` when planning raised ``BudgetError`` -- then
  the error must name a compiled budget above this one at which planning succeeds.
  """
  f = remat_plan(fun, budget=budget)
  base_temp, base_flops = compiled(fun, *args)
  try:
    plan = f.plan(*args)
  except BudgetError as e:
    smallest = e.smallest_feasible_bytes
    assert smallest > int(budget * base_temp), (smallest, budget, base_temp)
    assert str(smallest) in str(e)
    g = remat_plan(fun, budget=smallest)
    assert g.plan(*args).compiled_bytes <= smallest
    return f, None, None
  assert isinstance(plan, RematPlan)
  assert plan.baseline_compiled_bytes == plan.baseline_bytes == base_temp
  assert plan.budget_bytes == int(budget * base_temp)
  temp, flops, grads = compiled(f, *args, run=True)  # the wrapped function, compiled as a user would
  assert temp == plan.compiled_bytes <= plan.budget_bytes, (temp, plan.compiled_bytes, plan.budget_bytes)
  assert plan.recompute_flops == pytest.approx(max(flops - base_flops, 0.0), rel=1e-6, abs=1.0)
  assert any(c.label == "no remat (plain jax.grad)" for c in plan.candidates)
  assert all(c.fits == (c.compiled_bytes <= plan.budget_bytes) for c in plan.candidates)
  return f, plan, grads


@pytest.fixture(scope="module")
def mlp_case():
  params, x = mlp_setup(layers=12, d=32, batch=64)
  return params, x, jax.jit(jax.grad(mlp_loss))(params, x)


def test_mlp_tower_compiled_budget_and_grads(mlp_case):
  params, x, g0 = mlp_case
  f, plan, grads = _check(mlp_loss, 0.75, params, x)
  assert plan is not None and plan.compiled_bytes < plan.baseline_compiled_bytes
  assert plan.recompute_flops > 0
  _close(grads, g0)
  np.testing.assert_allclose(f(params, x), mlp_loss(params, x), rtol=1e-6)
  # a larger budget never recomputes more
  p90 = remat_plan(mlp_loss, budget=0.9).plan(params, x)
  assert p90.compiled_bytes <= p90.budget_bytes and p90.recompute_flops <= plan.recompute_flops


@pytest.fixture(scope="module")
def transformer_cases():
  x = _normal(2, (2, 8, 32))
  out = {}
  for scanned, fun, layers in ((False, transformer_unrolled, 3), (True, transformer_scanned, 4)):
    params = transformer_params(layers=layers, stacked=scanned)
    out[scanned] = (fun, params, x, jax.jit(jax.grad(fun))(params, x))
  return out


@pytest.mark.parametrize("scanned", [False, True])
def test_transformer_compiled_budget_and_grads(scanned, transformer_cases):
  fun, params, x, g0 = transformer_cases[scanned]
  _, plan, grads = _check(fun, 0.5 if scanned else 0.75, params, x)
  assert plan is not None
  _close(grads, g0, tol=2e-5)


# A Flax NNX transformer block (pre-norm attention + MLP), the shape of Flax's lm1b / gemma
# examples at toy size, written for this test.
class _TBlock(nnx.Module):
  def __init__(self, d, heads, rngs):
    self.ln1 = nnx.LayerNorm(d, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(heads, d, decode=False, rngs=rngs)
    self.ln2 = nnx.LayerNorm(d, rngs=rngs)
    self.up = nnx.Linear(d, 4 * d, rngs=rngs)
    self.down = nnx.Linear(4 * d, d, rngs=rngs)

  def __call__(self, x):
    y = self.ln1(x)
    x = x + self.attn(y, y, y, mask=nnx.make_causal_mask(x[..., 0]))
    return x + self.down(nnx.gelu(self.up(self.ln2(x))))


class _TinyLM(nnx.Module):
  def __init__(self, rngs, vocab=64, d=32, heads=4, layers=3):
    self.embed = nnx.Embed(vocab, d, rngs=rngs)
    self.blocks = nnx.List([_TBlock(d, heads, rngs) for _ in range(layers)])
    self.out = nnx.Linear(d, vocab, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens)
    for b in self.blocks:
      x = b(x)
    return self.out(x)


def lm_loss(model, tokens):
  logits = model(tokens[:, :-1])
  logp = jax.nn.log_softmax(logits)
  return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))


@pytest.fixture(scope="module")
def lm_case():
  model = _TinyLM(nnx.Rngs(0))
  tokens = jnp.asarray(np.random.default_rng(5).integers(0, 64, (4, 33)), jnp.int32)
  gdef, state = nnx.split(model)
  # the planner differentiates the first argument (the model's state): measure exactly that
  pure = lambda s, t: lm_loss(nnx.merge(gdef, s), t)
  base_temp, _, ref = compiled(pure, state, tokens, run=True)
  return model, tokens, ref, base_temp


@pytest.mark.parametrize("budget", BUDGETS)
def test_flax_transformer_lm_budgets(budget, lm_case):
  """The budgets share one compiled candidate set (the first pays for it)."""
  model, tokens, ref, base_temp = lm_case
  gdef, state = nnx.split(model)
  f = remat_plan(lm_loss, budget=budget)
  planned = lambda s, t: f(nnx.merge(gdef, s), t)
  try:
    plan = f.plan(model, tokens)
  except BudgetError as e:  # (that the named budget plans: test_budget_error_names_an_achievable_...)
    assert e.smallest_feasible_bytes > int(budget * base_temp)
    assert budget < 0.5, "half of plain grad's compiled temp is reachable for a 3-block LM"
    return
  assert plan.baseline_compiled_bytes == base_temp
  temp, _, grads = compiled(planned, state, tokens, run=True)
  assert temp == plan.compiled_bytes <= plan.budget_bytes
  _close(grads, ref, tol=2e-5)


@pytest.fixture(scope="module")
def resnet_case():
  model = make_resnet(blocks=4)
  x = _normal(3, (4, 8, 8, 3))
  y = jnp.arange(4) % 10
  g0, stats0 = _nnx_grad_and_stats(resnet_loss, nnx.clone(model), x, y)
  return model, x, y, g0, stats0


def test_resnet_nnx_compiled_budget_grads_and_state(resnet_case):
  model0, x, y, g0, stats0 = resnet_case
  model = nnx.clone(model0)
  f = remat_plan(resnet_loss, budget=0.6)
  plan = f.plan(model, x, y)
  gdef, state = nnx.split(model)
  temp, _ = compiled(lambda s, x, y: f(nnx.merge(gdef, s), x, y), state, x, y)
  assert temp == plan.compiled_bytes <= plan.budget_bytes
  g, stats = _nnx_grad_and_stats(f, model, x, y)
  _close(g, g0, tol=2e-5)
  # BatchNorm statistics updated in place, as without the wrapper
  _close(stats, stats0)
  assert float(jnp.abs(nnx.state(model, nnx.BatchStat)["blocks"][0]["bn1"]["mean"][...]).sum()) > 0


def test_budget_error_names_an_achievable_compiled_budget():
  params, x = mlp_setup(layers=6)
  f = remat_plan(mlp_loss, budget=1)
  with pytest.raises(BudgetError, match=r"smallest feasible plan \(.*compiled temp bytes.*\).*pass budget>=") as ei:
    f.plan(params, x)
  smallest = ei.value.smallest_feasible_bytes
  assert f"budget>={smallest} bytes" in str(ei.value)
  base_temp, _ = compiled(mlp_loss, params, x)
  assert 1 < smallest <= base_temp
  with pytest.raises(BudgetError):
    jax.grad(f)(params, x)
  ok = remat_plan(mlp_loss, budget=smallest)
  plan = ok.plan(params, x)
  assert plan.compiled_bytes <= smallest
  assert compiled(ok, params, x)[0] <= smallest
  _close(jax.grad(ok)(params, x), jax.grad(mlp_loss)(params, x))


def test_scanned_transformer_never_dominated_by_per_layer_dots_saveable(transformer_cases):
  """JAX's dots_saveable on each scanned layer, as a user writes it (the plan at 0.9 used to be
  dominated by it): at the policy's compiled temp and at any larger budget, the plan fits and
  recomputes no more FLOPs (independent compiles of both)."""
  fun, params, x, g0 = transformer_cases[True]
  base_temp, base_flops = compiled(fun, params, x)

  def per_layer(params, x):
    body = jax.checkpoint(_attn_block, policy=jax.checkpoint_policies.dots_saveable)
    x, _ = jax.lax.scan(lambda c, p: (body(c, p), None), x, params)
    return jnp.mean(x ** 2)
  temp, flops = compiled(per_layer, params, x)
  assert temp < base_temp
  f = remat_plan(fun, budget=int(temp))
  plan = f.plan(params, x)
  got_temp, got_flops, grads = compiled(f, params, x, run=True)
  assert got_temp == plan.compiled_bytes <= temp
  assert got_flops <= flops + 1.0, (got_flops, flops)
  _close(grads, g0, tol=2e-5)
  for budget in (0.9, max(temp / base_temp, 0.5)):
    if budget * base_temp >= temp:
      assert remat_plan(fun, budget=budget).plan(params, x).recompute_flops <= plan.recompute_flops


def test_budgets_share_one_candidate_set_and_are_monotone(monkeypatch):
  """Another wrapper / budget of the same program compiles nothing new, and a larger budget never
  recomputes more (checked on independent compiles of the planned gradients)."""
  params, x = mlp_setup(layers=8, d=32, batch=64)
  P._clear_caches()
  assert len(P._STRUCTURES) == 0
  first = remat_plan(mlp_loss, budget=0.9)
  first.plan(params, x)
  calls = []
  real = M.compile_lowered
  counting = lambda *a, **k: calls.append(1) or real(*a, **k)
  monkeypatch.setattr(M, "compile_lowered", counting)
  monkeypatch.setattr(P, "compile_lowered", counting)
  plans = {}
  for b in (0.5, 0.6, 0.7, 0.8, 0.9, 0.95):
    try:
      plans[b] = remat_plan(mlp_loss, budget=b)
      plans[b].plan(params, x)
    except BudgetError:
      del plans[b]
  assert not calls, "planning at another budget recompiled"
  monkeypatch.undo()
  assert len(plans) >= 2
  flops = [plans[b].plan(params, x).recompute_flops for b in sorted(plans)]
  assert all(a >= b for a, b in zip(flops, flops[1:])), flops
  _, base_flops = compiled(mlp_loss, params, x)
  lo, hi = min(plans), max(plans)
  t_lo, f_lo = compiled(plans[lo], params, x)
  t_hi, f_hi = compiled(plans[hi], params, x)
  assert t_lo <= plans[lo].plan(params, x).budget_bytes and t_hi <= plans[hi].plan(params, x).budget_bytes
  assert f_hi <= f_lo
  P._clear_caches()
  assert len(P._STRUCTURES) == 0


@pytest.mark.parametrize("layers", [3, 5])
def test_layer_cuts_find_repeated_blocks(layers):
  """Per-layer policy candidates cut where a user's per-layer checkpoint would: one block each."""
  for fun, args in ((mlp_loss, mlp_setup(layers=layers)),
                    (transformer_unrolled, (transformer_params(layers=layers), jnp.ones((2, 8, 32))))):
    flat, tree = jax.tree.flatten(args)
    closed = jax.make_jaxpr(lambda *a: fun(*jax.tree.unflatten(tree, a)))(*flat)
    g = G._build_graph(closed, "t:")
    cuts, (lo, hi) = G._layer_cuts(g)
    bounds = [c for c in (lo,) + cuts + (hi,) if lo <= c <= hi]
    bounds = sorted(set(bounds))
    assert len(bounds) - 1 == layers, (fun.__name__, bounds)
    dots = [sum(e.primitive.name == "dot_general" for e in closed.jaxpr.eqns[a:b]) for a, b in zip(bounds, bounds[1:])]
    assert len(set(dots)) == 1 and dots[0] > 0, dots
  # nothing repeats: no layers
  closed = jax.make_jaxpr(lambda x: jnp.sum(jnp.tanh(x @ x.T)))(jnp.ones((4, 4)))
  assert G._layer_cuts(G._build_graph(closed, "t:")) is None


# ------------------------------------------------------------------------------ solver


def test_greedy_within_5_percent_of_milp():
  """Same problems (the real layouts of an MLP tower and a transformer), same budgets."""
  cases = [(mlp_loss, mlp_setup(layers=12)),
           (transformer_unrolled, (transformer_params(layers=2), jnp.ones((2, 8, 32))))]
  ratios = []
  for fun, args in cases:
    flat, _ = jax.tree.flatten(args)
    closed = jax.make_jaxpr(lambda *a: fun(*jax.tree.unflatten(jax.tree.structure(args), a)))(*flat)
    g = G._build_graph(closed, "t:")
    cm = CostModel.default("cpu")
    for cuts in G._candidate_cut_sets(g):
      prob = R._layout(g, cuts, cm, False).problem
      lo, hi = S.min_peak(prob), prob.peak([False] * len(prob.items))
      for frac in (0.2, 0.5, 0.8):
        budget = int(lo + frac * (hi - lo))
        m, gr = S.solve_milp(prob, budget), S.solve_greedy(prob, budget)
        assert m is not None and gr is not None and gr.peak <= budget
        ratios.append(sum(it.recompute_flops for it, r in zip(prob.items, gr.removed) if r) /
                      max(sum(it.recompute_flops for it, r in zip(prob.items, m.removed) if r), 1.0))
  assert max(ratios) <= 1.05, sorted(ratios)[-5:]


def test_solvers_on_random_abstract_problems():
  rng = np.random.default_rng(0)
  for trial in range(30):
    n = int(rng.integers(3, 25))
    k = int(rng.integers(1, 5))
    items = tuple(S.Item(f"v{i}", int(rng.integers(0, k)), int(b), int(b), float(c), math.inf, float(c))
                  for i, (b, c) in enumerate(zip(rng.integers(1, 100, n), rng.integers(1, 1000, n))))
    prob = S.Problem(items, int(rng.integers(0, 50)), k)
    lo, hi = S.min_peak(prob), prob.peak([False] * n)
    budget = int(rng.integers(lo, hi + 1))
    m = S.solve_milp(prob, budget)
    gsol = S.solve_greedy(prob, budget)
    assert m is not None and gsol is not None
    assert m.peak <= budget and gsol.peak <= budget
    assert m.cost <= gsol.cost + 1e-9
    assert S.solve_milp(prob, lo - 1) is None and S.solve_greedy(prob, lo - 1) is None


def test_never_dominated_by_per_layer_jax_policies():
  """JAX's built-in policies written per layer by a user, compiled: at each one's compiled temp
  the plan fits and recomputes no more FLOPs (compiled cost_analysis of both)."""
  params, x = mlp_setup(layers=8)
  base_temp, base_flops = compiled(mlp_loss, params, x)

  def per_layer(policy):
    def loss(params, x):
      for w, b in params:
        x = jax.checkpoint(lambda x, w, b: jnp.tanh(x @ w + b), policy=policy)(x, w, b)
      return jnp.mean(x ** 2)
    return loss
  for name in ("nothing_saveable", "dots_saveable", "everything_saveable"):
    temp, flops = compiled(per_layer(getattr(jax.checkpoint_policies, name)), params, x)
    plan = remat_plan(mlp_loss, budget=int(temp)).plan(params, x)
    assert plan.compiled_bytes <= temp, name
    assert plan.recompute_flops <= max(flops - base_flops, 0.0) + 1.0, (name, plan.recompute_flops, flops - base_flops)


# ------------------------------------------------------------------------------ offload


def test_offload_plan_fits_compiled_budget():
  params, x = mlp_setup(layers=8, d=32, batch=64)
  cm = CostModel(device_flops=1e9, host_bandwidth=1e12)  # transfers much cheaper than recompute
  f = remat_plan(mlp_loss, budget=0.8, offload=True, cost_model=cm)
  plan = f.plan(params, x)
  assert compiled(f, params, x)[0] == plan.compiled_bytes <= plan.budget_bytes
  _close(jax.jit(jax.grad(f))(params, x), jax.grad(mlp_loss)(params, x))
  if plan.offloaded_bytes:  # offloaded residuals live in host memory in the jaxpr
    assert "<host>" in str(jax.make_jaxpr(jax.grad(f))(params, x))
    assert plan.transfer_bytes > 0
  # bytes moved per step and the stated bandwidth they are priced at
  assert "moved per step" in str(plan) and plan.cost_model.host_bandwidth == 1e12
  assert plan.estimated_seconds == pytest.approx(plan.recompute_flops / 1e9 + plan.transfer_bytes / 1e12)


def test_offload_tree_plan_places_residuals_in_pinned_host():
  """The offload application itself (independent of whether a budget picks it on this backend)."""
  params, x = mlp_setup(layers=6, d=64, batch=64)
  flat, tree = jax.tree.flatten((params, x))
  closed = jax.make_jaxpr(lambda *a: mlp_loss(*jax.tree.unflatten(tree, a)))(*flat)
  g = G._build_graph(closed, "t:")
  lay = R._layout(g, G._balanced_cuts(g, 0, g.n, 2), CostModel(1e9, 1e12), True)
  decision = {c.name: "offload" for _, c, _, _ in lay.items}
  fn = _apply(g, lay, decision, "cond")
  loss = lambda *a: fn(*a)[0]
  grads = jax.grad(loss, argnums=tuple(range(len(flat))))(*flat)
  _close(grads, jax.tree.leaves(jax.grad(mlp_loss, argnums=(0, 1))(params, x)))
  assert "<host>" in str(jax.make_jaxpr(jax.grad(loss))(*flat))
  text = jax.export.export(jax.jit(jax.grad(loss)), platforms=["cuda"])(*flat).mlir_module()
  assert '_xla_buffer_placement = "pinned_host"' in text


# ------------------------------------------------------------------------ API behaviour


def test_options_validated_at_decoration():
  with pytest.raises(ValueError, match="budget"):
    remat_plan(mlp_loss, budget=1.5)
  with pytest.raises(ValueError, match="budget"):
    remat_plan(budget="12 parsecs")
  with pytest.raises(TypeError, match="budget"):
    remat_plan(mlp_loss, budget=None)
  with pytest.raises(ValueError, match="solver"):
    remat_plan(mlp_loss, budget=0.5, solver="magic")
  with pytest.raises(TypeError):
    remat_plan(mlp_loss, budget=0.5, offload="yes")


def test_bare_decorator_string_budget_and_wraps():
  @remat_plan(budget="1MiB")
  def loss(params, x):
    """doc"""
    return mlp_loss(params, x)
  assert loss.__name__ == "loss" and loss.__doc__ == "doc"
  params, x = mlp_setup(layers=3)
  p = loss.plan(params, x)
  assert p.budget_bytes == 2**20
  # budget above plain jax.grad's compiled temp: nothing to do, nothing recomputed
  assert p.compiled_bytes == p.baseline_compiled_bytes == compiled(mlp_loss, params, x)[0]
  assert p.recompute_flops == 0 and p.form == "none"
  json.dumps(p.to_dict())
  assert "budget" in str(p) and "decision" in str(p) and "compiled temp" in str(p)


@pytest.mark.parametrize("dtype", [jnp.bfloat16])  # float32: the tests above
def test_dtypes_and_value_and_grad_under_jit(dtype):
  params, x = mlp_setup(layers=8, dtype=dtype)
  f = remat_plan(mlp_loss, budget=0.8)
  plan = f.plan(params, x)
  assert compiled(f, params, x)[0] == plan.compiled_bytes <= plan.budget_bytes
  v, g = jax.jit(jax.value_and_grad(f))(params, x)
  v0, g0 = jax.jit(jax.value_and_grad(mlp_loss))(params, x)
  tol = 1e-5 if dtype == jnp.float32 else 2e-2  # bf16: 8 mantissa bits
  _close(v, v0, tol)
  _close(g, g0, tol)


def test_no_replan_on_second_call():
  params, x = mlp_setup(layers=6)
  f = remat_plan(mlp_loss, budget=0.75)
  p1 = f.plan(params, x)
  p2 = f.plan(params, x)
  assert p1 is p2
  jax.grad(f)(params, x)
  assert f.plan(params, x) is p1


def test_complex_intermediates_and_smallest_feasible_is_never_above_plain_grad():
  """An FFT's complex intermediates cannot carry a checkpoint name (JAX raises): they stay
  unnamed and the plan works; and a BudgetError never names a smallest budget above plain
  jax.grad's own compiled temp (plain grad is a plan too, the least one on tiny programs)."""
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.normal(size=(6, 6)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(6,)), jnp.float32)
  f = lambda a, v: jnp.sum(jnp.sin(jnp.abs(jnp.fft.rfft2(a)).sum(0)[:3] * v[:3]))
  planned = remat_plan(f, budget=1.0)
  got = jax.jit(jax.grad(planned, argnums=(0, 1)))(a, v)
  want = jax.jit(jax.grad(f, argnums=(0, 1)))(a, v)
  for x, y in zip(got, want):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)
  base = planned.plan(a, v).baseline_compiled_bytes
  with pytest.raises(BudgetError) as e:
    remat_plan(f, budget=1).plan(a, v)
  assert 0 < e.value.smallest_feasible_bytes <= base
