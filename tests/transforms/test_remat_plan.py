"""Tests for lj.remat_plan (lepton_jax.transforms._remat_plan)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lepton_jax import jaxpr as ljx
from lepton_jax._errors import BudgetError
from lepton_jax.jaxpr._liveness import grad_memory  # ljx.grad_memory once re-exported
from lepton_jax.transforms import RematPlan, remat_plan
from lepton_jax.transforms import _remat_solver as S


def _saved_bytes(fun, *args):
  """JAX's saved-residual accounting, inputs excluded, device memory only."""
  from jax._src.ad_checkpoint import saved_residuals
  total = 0
  for aval, desc in saved_residuals(fun, *args):
    if desc.startswith("from the argument") or desc.startswith("from a literal") or desc.startswith("from a constant"):
      continue
    if "host" in str(getattr(aval, "memory_space", "")).lower():
      continue
    total += math.prod(aval.shape) * aval.dtype.itemsize
  return total


_FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _jit_grad(fun, *args):
  """``jax.jit(jax.grad(fun))(*args)`` compiled without XLA's slow optimisation passes."""
  g = jax.jit(jax.grad(fun))
  return g.lower(*args).compile(compiler_options=_FAST)(*args)


def _nnx_grad_and_stats(fun, model, *args):
  """Jitted ``nnx.grad(fun)(model, *args)`` and the model's BatchNorm stats after it."""
  gdef, state = nnx.split(model)

  def step(state, *args):
    m = nnx.merge(gdef, state)
    grads = nnx.grad(fun)(m, *args)
    return nnx.state(grads), nnx.state(m)
  lowered = jax.jit(step).lower(state, *args)
  grads, new_state = lowered.compile(compiler_options=_FAST)(state, *args)
  nnx.update(model, new_state)
  return grads, nnx.state(model, nnx.BatchStat)


def _close(a, b, tol=1e-5):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)


# ----------------------------------------------------------------------------- models


def mlp_loss(params, x):
  for w, b in params:
    x = jnp.tanh(x @ w + b)
  return jnp.mean(x ** 2)


# Parameters come from numpy: eager jax.random calls compile one kernel per shape,
# which would cost more CPU time than the planning under test.


def mlp_setup(layers=16, d=32, batch=16, dtype=jnp.float32):
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


def _check_budget(fun, budget, *args):
  """Plans ``fun`` at ``budget`` and checks it with measures independent of the planner.

  The wrapped function is measured with ``lepton_jax.jaxpr`` (activation peak of its
  forward + backward and JAX's saved-residual accounting, inputs excluded) and with
  JAX's own ``saved_residuals`` (all arguments differentiated).
  """
  f = remat_plan(fun, budget=budget)
  plan = f.plan(*args)
  assert isinstance(plan, RematPlan)
  assert plan.budget_bytes == int(budget * plan.baseline_bytes)
  m = grad_memory(f, *args)  # the wrapped function, as a user would measure it
  assert m.saved_bytes <= m.peak_bytes <= plan.budget_bytes, (m, plan.budget_bytes)
  assert (plan.peak_bytes, plan.saved_bytes) == (m.peak_bytes, m.saved_bytes)
  assert _saved_bytes(f, *args) <= plan.budget_bytes
  return f, plan


@pytest.fixture(scope="module")
def mlp_case():
  params, x = mlp_setup()
  return params, x, _jit_grad(mlp_loss, params, x)


@pytest.mark.parametrize("budget", BUDGETS)
def test_mlp_tower_budget_and_grads(budget, mlp_case):
  params, x, g0 = mlp_case
  f, plan = _check_budget(mlp_loss, budget, params, x)
  # the baseline is plain jax.grad's peak, measured the same way
  assert plan.baseline_bytes == ljx.grad_peak_bytes(mlp_loss, params, x)
  assert plan.saved_bytes == ljx.saved_residual_bytes(f, params, x)
  if budget == 0.25:  # 16 layers: only segments inside segments reach a quarter
    assert plan.depth >= 2
  assert plan.saved_bytes < plan.baseline_saved_bytes
  _close(jax.jit(jax.grad(f))(params, x), g0)
  np.testing.assert_allclose(f(params, x), mlp_loss(params, x), rtol=1e-6)


@pytest.fixture(scope="module")
def transformer_cases():
  x = _normal(2, (2, 8, 32))
  out = {}
  for scanned, fun, layers in ((False, transformer_unrolled, 4), (True, transformer_scanned, 8)):
    params = transformer_params(layers=layers, stacked=scanned)
    out[scanned] = (fun, params, x, _jit_grad(fun, params, x))
  return out


@pytest.mark.parametrize("scanned", [False, True])
@pytest.mark.parametrize("budget", BUDGETS)
def test_transformer_budget_and_grads(budget, scanned, transformer_cases):
  fun, params, x, g0 = transformer_cases[scanned]
  f, _ = _check_budget(fun, budget, params, x)
  _close(_jit_grad(f, params, x), g0, tol=2e-5)


@pytest.fixture(scope="module")
def resnet_case():
  model = make_resnet(blocks=6)
  x = _normal(3, (4, 8, 8, 3))
  y = jnp.arange(4) % 10
  g0, stats0 = _nnx_grad_and_stats(resnet_loss, nnx.clone(model), x, y)
  return model, x, y, g0, stats0


@pytest.mark.parametrize("budget", BUDGETS)
def test_resnet_nnx_budget_grads_and_state(budget, resnet_case):
  model0, x, y, g0, stats0 = resnet_case
  model = nnx.clone(model0)
  f, plan = _check_budget(resnet_loss, budget, model, x, y)
  if budget == 0.25:
    assert plan.depth >= 2
  g, stats = _nnx_grad_and_stats(f, model, x, y)
  _close(g, g0, tol=2e-5)
  # BatchNorm statistics updated in place, as without the wrapper
  _close(stats, stats0)
  assert float(jnp.abs(nnx.state(model, nnx.BatchStat)["blocks"][0]["bn1"]["mean"][...]).sum()) > 0


def test_shallow_stack_quarter_budget_error_is_honest():
  """A 2-layer transformer cannot reach a quarter (one block's backward alone is more):
  the error names a budget that then plans."""
  params = transformer_params(layers=2)
  x = _normal(2, (2, 8, 32))
  with pytest.raises(BudgetError) as ei:
    remat_plan(transformer_unrolled, budget=0.25).plan(params, x)
  smallest = ei.value.smallest_feasible_bytes
  f = remat_plan(transformer_unrolled, budget=smallest)
  plan = f.plan(params, x)
  assert plan.peak_bytes <= smallest and plan.saved_bytes <= smallest
  assert ljx.grad_peak_bytes(f, params, x) <= smallest


# ------------------------------------------------------------------------------ solver


def test_greedy_within_5_percent_of_milp():
  """Same problems (the real layouts of an MLP tower and a transformer), same budgets."""
  from lepton_jax.transforms import _remat_plan as R
  cases = [(mlp_loss, mlp_setup(layers=12)),
           (transformer_unrolled, (transformer_params(layers=2), jnp.ones((2, 8, 32))))]
  ratios = []
  for fun, args in cases:
    flat, _ = jax.tree.flatten(args)
    closed = jax.make_jaxpr(lambda *a: fun(*jax.tree.unflatten(jax.tree.structure(args), a)))(*flat)
    g = R._build_graph(closed, "t:")
    cm = R.CostModel.default("cpu")
    for cuts in R._candidate_cut_sets(g):
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


def _policy_point(fun, policy, *args):
  """(saved bytes, extra FLOPs vs plain grad) of jax.checkpoint(fun, policy)."""
  from lepton_jax import jaxpr as ljx
  base = ljx.cost(jax.grad(fun), *args).flops
  ck = jax.checkpoint(fun, policy=policy)
  return _saved_bytes(ck, *args), ljx.cost(jax.grad(ck), *args).flops - base


def test_plans_dominate_builtin_policies():
  """On (activation peak, recompute FLOPs), with the same measures for both:
  peak from the shared liveness analysis, FLOPs from the shared cost model."""
  from lepton_jax import jaxpr as ljx
  params, x = mlp_setup(layers=12)
  base_flops = ljx.cost(jax.grad(mlp_loss), params, x).flops
  pols = {"nothing": jax.checkpoint_policies.nothing_saveable,
          "dots": jax.checkpoint_policies.dots_saveable,
          "everything": jax.checkpoint_policies.everything_saveable}
  for name, pol in pols.items():
    ck = jax.checkpoint(mlp_loss, policy=pol)
    peak = ljx.grad_peak_bytes(ck, params, x)
    extra = ljx.cost(jax.grad(ck), params, x).flops - base_flops
    plan = remat_plan(mlp_loss, budget=peak).plan(params, x)
    f = remat_plan(mlp_loss, budget=peak)
    ours_extra = ljx.cost(jax.grad(f), params, x).flops - base_flops
    assert plan.peak_bytes <= peak
    assert ours_extra <= extra, (name, ours_extra, extra)
  # and a tight plan is a point no built-in policy reaches: lower peak than all of them
  tight = remat_plan(mlp_loss, budget=0.6).plan(params, x)
  assert all(tight.peak_bytes < ljx.grad_peak_bytes(jax.checkpoint(mlp_loss, policy=p), params, x)
             for p in pols.values())


# ------------------------------------------------------------------------------ offload


def test_offload_tight_budget_host_memory():
  params, x = mlp_setup(layers=12, d=64, batch=64)
  cm = __import__("lepton_jax.transforms._remat_plan", fromlist=["CostModel"]).CostModel(
      device_flops=1e9, host_bandwidth=1e12)  # transfers much cheaper than recompute
  f = remat_plan(mlp_loss, budget=0.6, offload=True, cost_model=cm)
  plan = f.plan(params, x)
  assert plan.offloaded_bytes > 0 and plan.names("offload")
  assert plan.saved_bytes <= plan.budget_bytes and plan.peak_bytes <= plan.budget_bytes
  _close(jax.jit(jax.grad(f))(params, x), jax.grad(mlp_loss)(params, x))
  # residuals live in host memory in the jaxpr (f32<host>) ...
  assert "<host>" in str(jax.make_jaxpr(jax.grad(f))(params, x))
  # ... and the program for an accelerator places them in pinned_host
  text = jax.export.export(jax.jit(jax.grad(f)), platforms=["cuda"])(params, x).mlir_module()
  assert '_xla_buffer_placement = "pinned_host"' in text
  if jax.default_backend() != "cpu":
    compiled = jax.jit(jax.grad(f)).lower(params, x).compile().as_text()
    assert "S(5)" in compiled or "pinned_host" in compiled


# ------------------------------------------------------------------------ API behaviour


def test_budget_error_names_smallest_feasible():
  params, x = mlp_setup(layers=4)
  f = remat_plan(mlp_loss, budget=1)
  with pytest.raises(BudgetError, match=r"smallest feasible plan \(.*\).*pass budget>="):
    f.plan(params, x)
  with pytest.raises(BudgetError) as ei:
    jax.grad(f)(params, x)
  assert ei.value.smallest_feasible_bytes > 1
  # the named budget is feasible
  ok = remat_plan(mlp_loss, budget=ei.value.smallest_feasible_bytes).plan(params, x)
  assert ok.peak_bytes <= ei.value.smallest_feasible_bytes


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
  assert p.peak_bytes == p.baseline_bytes  # budget above the plain peak: nothing to do
  d = p.to_dict()
  import json
  json.dumps(d)
  assert "budget" in str(p) and "decision" in str(p)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dtypes_and_value_and_grad_under_jit(dtype):
  params, x = mlp_setup(layers=12, dtype=dtype)
  f = remat_plan(mlp_loss, budget=0.6)
  v, g = jax.jit(jax.value_and_grad(f))(params, x)
  v0, g0 = jax.value_and_grad(mlp_loss)(params, x)
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  _close(v, v0, tol)
  _close(g, g0, tol)


def test_no_replan_on_second_call():
  params, x = mlp_setup(layers=8)
  f = remat_plan(mlp_loss, budget=0.75)
  p1 = f.plan(params, x)
  p2 = f.plan(params, x)
  assert p1 is p2
  jax.grad(f)(params, x)
  assert f.plan(params, x) is p1
