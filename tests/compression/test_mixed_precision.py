"""lj.mixed_precision and lj.DynamicLossScale: values/grads vs plain JAX, dtypes, compiled bf16 dots,
composition with jit/grad/vmap/adaptive_jit/remat_plan, NNX, fp16 training with loss scaling."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lepton_jax as lj


def _params(seed=0, d_in=16, d_h=32, d_out=8):
  r = np.random.default_rng(seed)  # numpy: no per-shape compiles of the random kernels
  return {"w1": jnp.asarray(r.standard_normal((d_in, d_h)) / 4, jnp.float32), "b1": jnp.zeros(d_h),
          "w2": jnp.asarray(r.standard_normal((d_h, d_out)) / 6, jnp.float32)}


def _loss(p, x, y):
  h = jax.nn.gelu(x @ p["w1"] + p["b1"])
  h = h - h.mean(-1, keepdims=True)
  h = h * jax.lax.rsqrt(jnp.mean(h * h, -1, keepdims=True) + 1e-5)  # a norm: stays float32
  logits = h @ p["w2"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _data(seed=1, n=8, d_in=16, classes=8):
  r = np.random.default_rng(seed)
  return jnp.asarray(r.standard_normal((n, d_in)), jnp.float32), jnp.asarray(r.integers(0, classes, n), jnp.int32)


def _close(a, b, rtol):
  """Relative L2 agreement with the float32 reference (bf16 keeps ~3 significant digits)."""
  a, b = np.asarray(a, np.float32).ravel(), np.asarray(b, np.float32).ravel()
  err = np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-12)
  assert err <= rtol, (err, rtol)


def test_values_and_grads_match_float32_within_bf16_tolerance_and_keep_dtypes():
  p, (x, y) = _params(), _data()
  mp = lj.mixed_precision(_loss)
  assert mp.__name__ == "_loss"
  v, g = jax.jit(jax.value_and_grad(_loss))(p, x, y)
  vm, gm = jax.jit(jax.value_and_grad(mp))(p, x, y)
  _close(_loss(p, x, y), mp(p, x, y), 2e-2)  # eager call
  assert vm.dtype == jnp.float32
  _close(v, vm, 2e-2)
  for k in p:
    assert gm[k].dtype == p[k].dtype == jnp.float32
    _close(g[k], gm[k], 5e-2)
  # the rewrite changes the numbers (it is not a no-op): bf16 operands round
  assert not np.array_equal(np.asarray(g["w1"]), np.asarray(gm["w1"]))


def test_jit_vmap_and_compiled_program_has_bf16_dots_with_f32_results():
  p, (x, y) = _params(), _data()
  mp = lj.mixed_precision(_loss)
  step = jax.jit(jax.value_and_grad(mp))
  v, g = step(p, x, y)
  _close(_loss(p, x, y), v, 2e-2)
  per_example = jax.vmap(mp, in_axes=(None, 0, 0))(p, x[:, None], y[:, None])
  ref = jax.vmap(_loss, in_axes=(None, 0, 0))(p, x[:, None], y[:, None])
  _close(ref, per_example, 2e-2)
  text = step.lower(p, x, y).as_text()
  dots = re.findall(r"stablehlo\.dot_general.*", text)
  assert dots and all("bf16" in d for d in dots), dots  # forward and backward matmuls
  assert any(re.search(r"xbf16>.*xbf16>\) -> tensor<[0-9x]*xf32>", d) for d in dots)
  plain = jax.jit(jax.value_and_grad(_loss)).lower(p, x, y).as_text()
  assert "bf16" not in plain


def test_nested_jaxprs_are_rewritten_and_custom_derivatives_left_alone():
  w = jax.random.normal(jax.random.key(0), (8, 8)) / 3

  @jax.custom_jvp
  def opaque(a):
    return a @ w

  opaque.defjvp(lambda pr, tg: (opaque(pr[0]), tg[0] @ w))

  def f(w, x):
    h = jax.jit(lambda a: a @ w)(x)
    h = jax.checkpoint(lambda a: jnp.sin(a @ w))(h)
    h = jax.lax.scan(lambda c, _: (jnp.tanh(c @ w), None), h, None, length=3)[0]
    h = jax.lax.fori_loop(0, 2, lambda i, c: c @ w, h)
    h = jax.lax.cond(h.sum() > 0, lambda a: a @ w, lambda a: -a, h)
    return (opaque(h) ** 2).sum()

  x = jax.random.normal(jax.random.key(1), (4, 8))
  mp = lj.mixed_precision(f)
  rep = mp.explain(w, x)
  conv = [op for op in rep.ops if op.converted]
  assert len(conv) == 5  # jit, checkpoint, scan, while, cond; the custom_jvp body is not rewritten
  scopes = " ".join(op.scope for op in conv)
  assert scopes.count("scan") >= 2 and "cond" in scopes  # fori_loop with static bounds is a scan
  assert any("custom_jvp_call" in s for s in rep.skipped_calls)
  _close(f(w, x), jax.jit(mp)(w, x), 3e-2)
  _close(jax.jit(jax.grad(f))(w, x), jax.jit(jax.grad(mp))(w, x), 5e-2)
  d = rep.to_dict()
  assert d["converted"] == len(conv) and d["after"]["flops"] > 0 and "converted" in str(rep)


def test_keep_scope_and_highest_precision_stay_float32():
  def f(w, x):
    with jax.named_scope("final_loss"):
      a = x @ w
    b = jnp.dot(x, w, precision=jax.lax.Precision.HIGHEST)
    return a + b + x @ w

  w, x = jnp.ones((4, 4)), jnp.ones((2, 4))
  rep = lj.mixed_precision(f).explain(w, x)
  status = [(op.converted, op.reason) for op in rep.ops]
  assert status[0][0] is False and "loss" in status[0][1]
  assert status[1] == (False, "precision=HIGHEST requested")
  assert status[2] == (True, "")
  rep2 = lj.mixed_precision(f, keep=()).explain(w, x)
  assert [op.converted for op in rep2.ops] == [True, False, True]


def test_convolution_and_nnx_module():
  class Net(nnx.Module):
    def __init__(self, rngs):
      self.conv = nnx.Conv(3, 8, (3, 3), rngs=rngs)
      self.norm = nnx.LayerNorm(8, rngs=rngs)
      self.head = nnx.Linear(8, 4, rngs=rngs)

    def __call__(self, x):
      h = jax.nn.relu(self.norm(self.conv(x)))
      return self.head(h.mean((1, 2)))

  model = Net(nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 8, 8, 3)), jnp.float32)
  ref = nnx.jit(lambda m, x: m(x))(model, x)
  mp = lj.mixed_precision(lambda m, x: m(x))
  out = nnx.jit(mp)(model, x)
  _close(ref, out, 3e-2)
  assert {op.primitive for op in mp.explain(model, x).ops if op.converted} == {"conv_general_dilated", "dot_general"}

  def loss(m, x):
    return (m(x) ** 2).mean()

  g_ref = nnx.jit(nnx.grad(loss))(model, x)
  g = nnx.jit(nnx.grad(lj.mixed_precision(loss)))(model, x)
  for a, b in zip(jax.tree.leaves(g_ref), jax.tree.leaves(g)):
    assert a.dtype == b.dtype == jnp.float32
    _close(a, b, 5e-2)


def test_nnx_state_mutation_is_visible():
  class Counter(nnx.Module):
    def __init__(self):
      self.w = nnx.Param(jnp.eye(4))
      self.calls = nnx.Variable(jnp.zeros((), jnp.int32))

    def __call__(self, x):
      self.calls.value += 1
      return x @ self.w.value

  c = Counter()
  f = lj.mixed_precision(lambda m, x: m(x))
  f(c, jnp.ones((2, 4)))
  f(c, jnp.ones((2, 4)))
  assert int(c.calls.value) == 2


def test_composes_with_adaptive_jit_and_remat_plan():
  p, (x, y) = _params(), _data()
  ref_v, ref_g = jax.jit(jax.value_and_grad(_loss))(p, x, y)
  step = lj.adaptive_jit(jax.value_and_grad(lj.mixed_precision(_loss)))
  v, g = step(p, x, y)
  _close(ref_v, v, 2e-2)
  for k in p:
    assert g[k].dtype == jnp.float32
    _close(ref_g[k], g[k], 5e-2)
  planned = jax.jit(jax.value_and_grad(lj.remat_plan(lj.mixed_precision(_loss), budget=0.9)))
  v2, g2 = planned(p, x, y)
  _close(ref_v, v2, 2e-2)
  _close(ref_g["w1"], g2["w1"], 5e-2)


def test_cache_and_closure_over_tracers():
  p, (x, y) = _params(), _data()
  mp = lj.mixed_precision(_loss)
  mp(p, x, y)
  mp(p, x + 1, y)
  assert len(mp._cache) == 1
  # a function closing over a traced value: gradient flows through the closure
  w = jax.random.normal(jax.random.key(3), (16, 8))
  g = jax.grad(lambda w: lj.mixed_precision(lambda x: jnp.sum(jnp.tanh(x @ w)))(x))(w)
  g_ref = jax.grad(lambda w: jnp.sum(jnp.tanh(x @ w)))(w)
  _close(g_ref, g, 5e-2)


def test_bad_options_raise_at_decoration():
  with pytest.raises(ValueError, match=r"compute_dtype='int8' is not supported; valid: 'bfloat16', 'float16'"):
    lj.mixed_precision(compute_dtype="int8")
  with pytest.raises(ValueError, match="accum_dtype='bfloat16' must be 'float32' or the compute_dtype 'float16'"):
    lj.mixed_precision(compute_dtype="float16", accum_dtype="bfloat16")
  with pytest.raises(ValueError, match="keep must hold non-empty strings"):
    lj.mixed_precision(keep=("norm", ""))
  with pytest.raises(TypeError, match="fun must be callable"):
    lj.mixed_precision(3)
  with pytest.raises(ValueError, match="period=0 must be an int >= 1"):
    lj.DynamicLossScale(loss_scale=1.0, period=0)


def test_dynamic_loss_scale_state_machine():
  s = lj.DynamicLossScale(loss_scale=jnp.float32(8.0), period=2, factor=2.0, min_loss_scale=2.0)
  s = s.adjust(jnp.bool_(True))
  assert float(s.loss_scale) == 8.0 and int(s.counter) == 1
  s = s.adjust(jnp.bool_(True))
  assert float(s.loss_scale) == 16.0 and int(s.counter) == 0
  s = s.adjust(jnp.bool_(False))
  assert float(s.loss_scale) == 8.0 and int(s.counter) == 0
  s = jax.jit(lambda s: s.adjust(False).adjust(False).adjust(False))(s)
  assert float(s.loss_scale) == 2.0  # floored at min_loss_scale
  g = {"a": jnp.ones(3, jnp.float16)}
  assert s.unscale(s.scale(g))["a"].dtype == jnp.float16
  assert bool(lj.DynamicLossScale.all_finite(g)) and not bool(lj.DynamicLossScale.all_finite({"a": jnp.array([jnp.inf])}))


def test_fp16_training_with_dynamic_loss_scale_trains():
  p, (x, y) = _params(d_h=32), _data(n=64)
  opt = optax.sgd(0.3)
  mp = lj.mixed_precision(_loss, compute_dtype="float16")

  @jax.jit
  def step(p, o, s):
    loss, grads = jax.value_and_grad(lambda p: s.scale(mp(p, x, y)))(p)
    grads = s.unscale(grads)
    finite = lj.DynamicLossScale.all_finite(grads)
    upd, o2 = opt.update(grads, o, p)
    p2 = optax.apply_updates(p, upd)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    return keep(p2, p), keep(o2, o), s.adjust(finite), s.unscale(loss), finite

  s = lj.DynamicLossScale(loss_scale=jnp.float32(2.0 ** 40), period=10)  # overflows float16 at first
  o = opt.init(p)
  first = float(_loss(p, x, y))
  skipped = 0
  for _ in range(60):
    p, o, s, loss, finite = step(p, o, s)
    skipped += int(not bool(finite))
  assert skipped >= 1 and float(s.loss_scale) < 2.0 ** 40  # overflow detected and the scale backed off
  final = float(_loss(p, x, y))
  assert final < 0.6 * first, (first, final)
  text = step.lower(p, o, s).as_text()
  assert "xf16>" in text


def test_jvp_matches_float32_and_tangent_matmuls_run_in_bf16():
  p, (x, y) = _params(), _data()
  mp = lj.mixed_precision(_loss)
  r = np.random.default_rng(5)
  tp = jax.tree.map(lambda a: jnp.asarray(r.standard_normal(a.shape), jnp.float32), p)
  tx = jnp.asarray(r.standard_normal(x.shape), jnp.float32)
  ref_v, ref_t = jax.jit(lambda p, x, tp, tx: jax.jvp(lambda p, x: _loss(p, x, y), (p, x), (tp, tx)))(p, x, tp, tx)
  v, t = jax.jit(lambda p, x, tp, tx: jax.jvp(lambda p, x: mp(p, x, y), (p, x), (tp, tx)))(p, x, tp, tx)
  _close(ref_v, v, 2e-2)
  _close(ref_t, t, 5e-2)
  jaxpr = str(jax.make_jaxpr(lambda p, tp: jax.jvp(lambda p: mp(p, x, y), (p,), (tp,)))(p, tp))
  assert "bf16" in jaxpr
  # forward-over-reverse (Hessian-vector product) also goes through the rule
  hvp = jax.jit(lambda p, tp: jax.jvp(jax.grad(lambda p: mp(p, x, y)), (p,), (tp,))[1])(p, tp)
  hvp_ref = jax.jit(lambda p, tp: jax.jvp(jax.grad(lambda p: _loss(p, x, y)), (p,), (tp,))[1])(p, tp)
  _close(hvp_ref["w2"], hvp["w2"], 1e-1)


def test_nnx_scan_and_lax_cond_bodies_are_converted():
  class Block(nnx.Module):
    def __init__(self, rngs):
      self.lin = nnx.Linear(16, 16, rngs=rngs)

    def __call__(self, x):
      return jnp.tanh(self.lin(x))

  blocks = nnx.vmap(lambda key: Block(nnx.Rngs(key)))(jax.random.split(jax.random.key(8), 3))

  def f(model, x):
    h = nnx.scan(lambda h, blk: (blk(h), None), in_axes=(nnx.Carry, 0))(x, model)[0]
    return jax.lax.cond(h.sum() > 0, lambda a: a @ a.T, lambda a: -a @ a.T, h).sum()

  x = jax.random.normal(jax.random.key(9), (4, 16))
  mp = lj.mixed_precision(f)
  rep = mp.explain(blocks, x)
  assert [op.converted for op in rep.ops] == [True, True, True]
  assert "scan" in rep.ops[0].scope and "cond" in rep.ops[1].scope
  _close(f(blocks, x), nnx.jit(mp)(blocks, x), 3e-2)
  g_ref = nnx.grad(f)(blocks, x)
  g = nnx.jit(nnx.grad(mp))(blocks, x)
  for a, b in zip(jax.tree.leaves(g_ref), jax.tree.leaves(g)):
    _close(a, b, 5e-2)
