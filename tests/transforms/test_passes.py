"""Unit tests of the jaxpr rewrite passes (each compared against the original program)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from lepton_jax.transforms.passes._cond import cond
from lepton_jax.transforms.passes._cse import cse
from lepton_jax.transforms.passes._dce import dce
from lepton_jax.transforms.passes._fold import fold
from lepton_jax.transforms.passes._pipeline import normalize_passes, run_passes
from lepton_jax.transforms.passes._simplify import simplify


def _eval(closed, *args):
  return jax.core.eval_jaxpr(closed.jaxpr, closed.consts, *args)


def _prims(closed):
  out = []

  def rec(j):
    for e in j.eqns:
      out.append(e.primitive.name)
      for v in e.params.values():
        if isinstance(v, jax.extend.core.ClosedJaxpr):
          rec(v.jaxpr)
        elif isinstance(v, jax.extend.core.Jaxpr):
          rec(v)
        elif isinstance(v, (tuple, list)):
          for b in v:
            if isinstance(b, jax.extend.core.ClosedJaxpr):
              rec(b.jaxpr)
  rec(closed.jaxpr)
  return out


def _same(closed, new, *args):
  for a, b in zip(_eval(closed, *args), _eval(new, *args)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


X = jnp.arange(12.0).reshape(3, 4) / 10


def test_dce_removes_dead_and_unused_scan_and_while_outputs():
  def f(x):
    dead = jnp.exp(x) @ x.T
    def body(c, t):
      return (c[0] + t.sum(), c[1] * jnp.cos(t).sum()), jnp.sin(t)
    (a, _), ys = lax.scan(body, (0.0, 1.0), x)
    w = lax.while_loop(lambda c: c[0] < 3, lambda c: (c[0] + 1, c[1] * 2.0, jnp.tanh(c[2])),
                       (0, x, x))
    j = jax.jit(lambda t: (t * 2, jnp.log1p(t)))(x)[0]
    return a + w[1].sum() + j.sum()
  cj = jax.make_jaxpr(f)(X)
  new, recs = dce(cj)
  prims = _prims(new)
  assert "exp" not in prims and "cos" not in prims and "sin" not in prims
  assert "tanh" not in prims and "log1p" not in prims
  pats = {r.pattern for r in recs}
  assert "unused_outputs_of_while" in pats and "unused_outputs_of_scan" in pats
  assert "unused_outputs_of_jit" in pats
  _same(cj, new, X)


def test_dce_keeps_effects():
  def f(x):
    jax.debug.print("x={x}", x=x)
    return x * 2
  cj = jax.make_jaxpr(f)(X)
  new, _ = dce(cj)
  assert "debug_print" in _prims(new) or "debug_callback" in _prims(new)


def test_cse_merges_duplicates_including_nested():
  def f(x):
    a = jnp.tanh(x) @ x.T
    b = jnp.tanh(x) @ x.T
    def body(c, t):
      return c + jnp.sin(t).sum() + jnp.sin(t).sum(), None
    s, _ = lax.scan(body, 0.0, x)
    return a + b, s, x * 3 + 3 * x
  cj = jax.make_jaxpr(f)(X)
  new, recs = cse(cj)
  new, _ = dce(new)
  prims = _prims(new)
  assert prims.count("tanh") == 1 and prims.count("dot_general") == 1
  assert prims.count("sin") == 1
  assert prims.count("mul") == 1  # commutative x*3 == 3*x
  assert any("scan" in r.location or "/jaxpr/" in r.location for r in recs)
  _same(cj, new, X)


def test_cse_never_merges_random_or_effects():
  def f(x):
    a = jax.random.normal(jax.random.key(0), x.shape)
    jax.debug.print("{}", x)
    jax.debug.print("{}", x)
    return a, x
  cj = jax.make_jaxpr(f)(X)
  new, recs = cse(cj)
  assert not any("print" in r.pattern or "callback" in r.pattern or "random" in r.pattern
                 for r in recs)


def test_fold_constants():
  def f(x):
    c = jnp.float32(2.0) * jnp.float32(3.0) + 1.0
    m = jnp.ones((4,)) * 2.0
    return x * c + m
  cj = jax.make_jaxpr(f)(X)
  new, recs = fold(cj)
  assert len(recs) >= 2
  _same(cj, new, X)
  assert len(new.jaxpr.eqns) < len(cj.jaxpr.eqns)


@pytest.mark.parametrize("fn,pattern", [
    (lambda x: x * 1.0, "mul_by_one"),
    (lambda x: 1.0 * x, "mul_by_one"),
    (lambda x: x + 0.0, "add_zero"),
    (lambda x: x - 0.0, "add_zero"),
    (lambda x: x / 1.0, "div_by_one"),
    (lambda x: -(-x), "double_neg"),
    (lambda x: x.T.T, "double_transpose"),
    (lambda x: x.astype(jnp.float64).astype(jnp.float32) if jax.config.jax_enable_x64
     else lax.convert_element_type(x, jnp.float32), "noop_convert"),
    (lambda x: x.reshape(3, 4), "noop_reshape"),
    (lambda x: jnp.broadcast_to(x[:, :, None], (3, 4, 5)).sum(axis=2), "broadcast_then_reduce"),
    (lambda x: jnp.broadcast_to(x[None], (7, 3, 4)).max(axis=0), "broadcast_then_reduce"),
])
def test_simplify_rules(fn, pattern):
  cj = jax.make_jaxpr(fn)(X)
  new, recs = simplify(cj)
  if pattern in ("noop_convert", "noop_reshape") and not cj.jaxpr.eqns:
    pytest.skip("JAX already dropped it at trace time")
  assert pattern in {r.pattern for r in recs}, (recs, cj)
  new, _ = dce(new)
  _same(cj, new, X)
  assert len(new.jaxpr.eqns) <= len(cj.jaxpr.eqns)


def test_transpose_pair_merged_not_identity():
  x = jnp.arange(24.0).reshape(2, 3, 4)
  fn = lambda x: jnp.transpose(jnp.transpose(x, (1, 0, 2)), (0, 2, 1))
  cj = jax.make_jaxpr(fn)(x)
  new, recs = simplify(cj)
  new, _ = dce(new)
  assert _prims(new) == ["transpose"]
  _same(cj, new, x)


def test_mul_by_zero_only_with_flag():
  fn = lambda x: x * 0.0
  cj = jax.make_jaxpr(fn)(X)
  assert not simplify(cj)[1]
  new, recs = simplify(cj, nan_unsafe=True)
  assert [r.pattern for r in recs] == ["mul_by_zero"]
  _same(cj, new, X)
  # NaN inputs are why it is opt-in.
  nan = jnp.full((3, 4), jnp.nan)
  assert np.isnan(np.asarray(_eval(cj, nan)[0])).all()


def test_cond_static_predicate_inlined():
  def f(x):
    return lax.cond(True, lambda t: jnp.sin(t), lambda t: jnp.cos(t), x) + lax.switch(
        2, [jnp.exp, jnp.tanh, jnp.log1p], x)
  cj = jax.make_jaxpr(f)(X)
  new, _ = fold(cj)  # the switch index is clamped first: folding makes it static
  new, recs = cond(new)
  new, _ = dce(new)
  prims = _prims(new)
  assert "cond" not in prims and "cos" not in prims and "exp" not in prims
  assert "sin" in prims and "log1p" in prims
  assert sum(r.count for r in recs) == 3
  _same(cj, new, X)


def test_cond_dynamic_predicate_kept():
  f = lambda p, x: lax.cond(p, jnp.sin, jnp.cos, x)
  cj = jax.make_jaxpr(f)(True, X)
  new, recs = cond(cj)
  assert not recs and "cond" in _prims(new)


def test_normalize_passes_validation():
  assert normalize_passes(None) == ()
  assert normalize_passes("none") == ()
  assert [n for n, _ in normalize_passes(["dce", ("simplify", {"nan_unsafe": True})])] == [
      "dce", "simplify"]
  with pytest.raises(ValueError, match="unknown pass 'dcee'.*valid pass names"):
    normalize_passes(["dcee"])
  with pytest.raises(ValueError, match="unknown options"):
    normalize_passes([("dce", {"bogus": 1})])
  with pytest.raises(TypeError, match="passes must be"):
    normalize_passes(3)


def test_default_pipeline_preserves_values_nested():
  def f(x):
    y = jax.jit(lambda t: (t * 1.0 + 0.0, jnp.exp(t)))(x)[0]
    z = lax.cond(False, jnp.sin, jnp.cos, y)
    return z @ z.T + (z @ z.T)
  cj = jax.make_jaxpr(f)(X)
  new, recs = run_passes(cj, normalize_passes("default"), kernels=None)
  _same(cj, new, X)
  assert {r.pass_name for r in recs} >= {"cond", "cse", "dce", "simplify"}


# ---- regressions: equations built by passes match the installed JAX; open sub-jaxprs ----

@pytest.mark.parametrize("dtype", [jnp.float32, jnp.int32])
def test_broadcast_then_reduce_emits_jax_traced_mul(dtype):
  """The ``x * n`` replacement carries the params JAX's own ``mul`` has (e.g. out_dtype)."""
  f = lambda x: jnp.sum(jnp.broadcast_to(x[None], (3, 2, 4)), 0)
  x = jnp.arange(8, dtype=dtype).reshape(2, 4)
  closed = jax.make_jaxpr(f)(x)
  new, recs = simplify(closed)
  assert "broadcast_then_reduce" in [r.pattern for r in recs]
  (mul,) = [e for e in new.jaxpr.eqns if e.primitive.name == "mul"]
  want = jax.make_jaxpr(lambda v: v * 3)(x).jaxpr.eqns[0].params
  assert dict(mul.params) == dict(want)
  _same(closed, new, x)
  if dtype == jnp.float32:  # transposable: the transpose rule accepts the params
    g = jax.grad(lambda v: jax.core.eval_jaxpr(new.jaxpr, new.consts, v)[0].sum())(x)
    np.testing.assert_allclose(g, jnp.full((2, 4), 3.0))


def test_fold_never_adds_consts_to_open_subjaxpr():
  """Size-1 arrays folded inside remat's open jaxpr used to hit a bare AssertionError."""
  f = lambda x: jax.checkpoint(lambda v: v + jnp.ones((1,)) * 2.0 + jnp.float32(1) * 3.0)(x)
  closed = jax.make_jaxpr(f)(jnp.ones(3))
  new, recs = fold(closed)
  assert not new.consts and not new.jaxpr.constvars
  assert [r.pattern for r in recs] == ["constant_mul"]   # only the scalar one is folded
  _same(closed, new, jnp.arange(3.0))


def test_map_subjaxprs_skips_instead_of_asserting():
  from jax._src import core as jcore

  from lepton_jax.jaxpr._driver import map_subjaxprs
  closed = jax.make_jaxpr(lambda x: jax.checkpoint(jnp.sin)(x))(jnp.ones(2))
  (eqn,) = closed.jaxpr.eqns

  def add_const(cj, _name, _open, val):
    cv = jcore.Var(jax.core.ShapedArray(np.shape(val), jnp.float32))
    return jcore.ClosedJaxpr(cj.jaxpr.replace(constvars=[cv]), [val])

  # A non-scalar const cannot go into an open jaxpr: the rewrite is skipped.
  same = map_subjaxprs(eqn, lambda cj, n, o: add_const(cj, n, o, np.ones(2, np.float32)))
  assert same is eqn
  # A scalar const becomes a literal.
  new = map_subjaxprs(eqn, lambda cj, n, o: add_const(cj, n, o, np.float32(1)))
  assert new is not eqn and not new.params["jaxpr"].constvars


# ---- work XLA does not remove: linear work in loops (accumulate), outer values recomputed in
# cond branches (cse). XLA's cost_analysis() counts a rolled while body once, so a loop saving is
# read from the compiled HLO (what runs per iteration) or from an unrolled scan (where
# cost_analysis counts every iteration).

import re  # noqa: E402

from lepton_jax.jaxpr._compiled import figures_of, read_compiled  # noqa: E402
from lepton_jax.transforms import adaptive_jit  # noqa: E402
from lepton_jax.transforms.passes._accumulate import accumulate  # noqa: E402


def _loop_body_hlo(compiled, trip: int = 6) -> str:
  """The optimized HLO text of the bodies of the ``while`` loops running ``trip`` times (the
  scans under test) and of the computations they call."""
  comps, cur = {}, None
  for line in compiled.as_text().split("\n"):
    m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
    if m:
      cur = m.group(1)
      comps[cur] = []
    elif cur is not None:
      comps[cur].append(line)
  todo = [m for lines in comps.values() for l in lines if f'"known_trip_count":{{"n":"{trip}"}}' in l
          for m in re.findall(r"body=%?([\w.\-]+)", l)]
  seen, out = set(), []
  while todo:
    c = todo.pop()
    if c in seen or c not in comps:
      continue
    seen.add(c)
    out.extend(comps[c])
    todo.extend(m for l in comps[c] for m in re.findall(r"(?:calls|to_apply)=%?([\w.\-]+)", l))
  return "\n".join(out)


def _close(a, b, rtol=1e-5):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    np.testing.assert_allclose(x, y, rtol=rtol, atol=rtol * max(1.0, float(np.abs(y).max())))


_D = 32
_W = jax.random.normal(jax.random.key(0), (_D, _D)) / 8
_XS = jax.random.normal(jax.random.key(1), (6, 4, _D))


def _transform_scan(w, s, xs, unroll=1):
  """A recurrent body using an invariant parameter transform: its gradient's backward applies
  the transform's transpose in every iteration."""
  def body(c, x):
    we = jnp.tanh(w) @ (w * s)
    return c + jnp.tanh(x @ we).sum(), None
  return lax.scan(body, 0.0, xs, unroll=unroll)[0]


_S = jnp.linspace(0.5, 1.5, _D)


def test_accumulate_moves_the_backward_transform_after_the_loop():
  vg = jax.value_and_grad(_transform_scan, argnums=(0, 1))
  cj = jax.make_jaxpr(vg)(_W, _S, _XS)
  new, recs = accumulate(cj)
  assert [r.pattern for r in recs] == ["linear_after_loop"]
  _close(jax.core.eval_jaxpr(new.jaxpr, new.consts, _W, _S, _XS),
         jax.core.eval_jaxpr(cj.jaxpr, cj.consts, _W, _S, _XS), 1e-4)
  # Rolled: the backward loop body of jax.jit holds the [D, D] transpose matmuls, ours not.
  f = adaptive_jit(vg)
  _close(f(_W, _S, _XS), jax.jit(vg)(_W, _S, _XS), 1e-4)
  dots = lambda c: len(re.findall(rf"f32\[{_D},{_D}\]\S* dot\(", _loop_body_hlo(c)))
  assert dots(f.lower(_W, _S, _XS).compile()) < dots(jax.jit(vg).lower(_W, _S, _XS).compile())


def test_accumulate_compiled_flops_drop_unrolled():
  """Unrolled, XLA's own cost_analysis counts every iteration: FLOPs and temp drop."""
  vg = jax.value_and_grad(lambda w, s, xs: _transform_scan(w, s, xs, unroll=True), argnums=(0, 1))
  base = figures_of(vg, _W, _S, _XS)
  f = adaptive_jit(vg)
  ours = read_compiled(f.lower(_W, _S, _XS).compile())
  assert ours.flops < 0.6 * base.flops, (ours, base)
  assert ours.temp_bytes <= base.temp_bytes, (ours, base)
  _close(f(_W, _S, _XS), jax.jit(vg)(_W, _S, _XS), 1e-4)


def test_accumulate_only_when_it_saves_work():
  # Shared weight used directly: ct_w += x_i^T ct_i has no linear work after the seed.
  plain = lambda w, xs: lax.scan(lambda c, x: (c + jnp.tanh(x @ w).sum(), None), 0.0, xs)[0]
  assert accumulate(jax.make_jaxpr(jax.grad(plain))(_W, _XS))[1] == []
  # A forward running sum of projections: sum first, project once (exact up to rounding).
  proj = lambda w, xs: lax.scan(lambda c, x: (c + x @ w, None), jnp.zeros((4, _D)), xs)[0]
  cj = jax.make_jaxpr(proj)(_W, _XS)
  new, recs = accumulate(cj)
  assert [r.pattern for r in recs] == ["linear_after_loop"]
  _close(jax.core.eval_jaxpr(new.jaxpr, new.consts, _W, _XS)[0], proj(_W, _XS), 1e-5)
  # Integer accumulators are left alone.
  ints = lambda xs: lax.scan(lambda c, x: (c + (x * 3).sum(), None), 0, xs)[0]
  assert accumulate(jax.make_jaxpr(ints)(jnp.ones((5, 4), jnp.int32)))[1] == []


def test_run_pipeline_returns_the_figures_it_compiled():
  from lepton_jax.jaxpr._compiled import compiled_figures
  from lepton_jax.transforms.passes._pipeline import PipelineResult, run_pipeline
  cj = jax.make_jaxpr(lambda x: jnp.sin(x) * 1.0)(X)
  res = run_pipeline(cj, normalize_passes("default"), kernels=None)
  assert isinstance(res, PipelineResult) and res.figures is None
  new, recs = res                              # still unpacks as (closed, records)
  assert [r.pattern for r in recs] == ["mul_by_one"]
  res = run_pipeline(cj, normalize_passes("default"), kernels=None, figures=True)
  assert res.figures == compiled_figures(res.closed)


def _branch_dup(w, x, p):
  h = jnp.tanh(x @ w)
  return h + lax.cond(p, lambda: jnp.tanh(x @ w) @ w, lambda: h * jnp.tanh(x @ w))


def test_cse_reuses_outer_values_inside_cond_branches():
  x = _XS[0]
  cj = jax.make_jaxpr(_branch_dup)(_W, x, True)
  new, recs = cse(cj)
  assert sorted(r.pattern for r in recs) == ["duplicate_in_branch_dot_general"] * 2 + [
      "duplicate_in_branch_tanh"] * 2
  assert _prims(new).count("dot_general") == 2 and _prims(new).count("tanh") == 1
  for p in (True, False):
    _same(cj, new, _W, x, p)
  # The compiled program: XLA does not do this itself.
  f = adaptive_jit(_branch_dup)
  base, ours = figures_of(_branch_dup, _W, x, True), read_compiled(f.lower(_W, x, True).compile())
  assert ours.flops < 0.8 * base.flops, (ours, base)
  _close(f(_W, x, False), _branch_dup(_W, x, False))
  g = jax.grad(lambda w, p: adaptive_jit(_branch_dup)(w, x, p).sum())
  _close(g(_W, True), jax.grad(lambda w: _branch_dup(w, x, True).sum())(_W), 1e-4)


def test_cse_into_branches_never_merges_stateful_rng():
  def f(x, p):
    r = lax.rng_uniform(0.0, 1.0, x.shape)
    return lax.cond(p, lambda: lax.rng_uniform(0.0, 1.0, x.shape) + x, lambda: r + x)
  new, recs = cse(jax.make_jaxpr(f)(_XS[0], True))
  assert recs == [] and _prims(new).count("rng_uniform") == 2


def test_accumulate_through_nnx_value_and_grad_of_a_looped_lora_block():
  """A weight-shared block applied in a loop with a LoRA adapter (w + a @ b formed in the body):
  the training step routes the adapter's per-iteration transposes after the loop."""
  from flax import nnx

  class Looped(nnx.Module):
    def __init__(self, rngs):
      init = nnx.initializers.normal(0.1)
      self.w = nnx.Param(init(rngs.params(), (_D, _D)))
      self.a = nnx.Param(init(rngs.params(), (_D, 4)))
      self.b = nnx.Param(init(rngs.params(), (4, _D)))

    def __call__(self, x):
      step = lambda h, _: (h + jnp.tanh(h @ (self.w[...] + self.a[...] @ self.b[...])), None)
      return lax.scan(step, x, None, length=5)[0]

  model = Looped(nnx.Rngs(0))
  x = _XS[0]
  loss = lambda m, x: (m(x) ** 2).mean()
  step = adaptive_jit(nnx.value_and_grad(loss))
  assert "accumulate" in {r.pass_name for r in step.explain(model, x).rewrites}
  (l1, g1), (l0, g0) = step(model, x), nnx.value_and_grad(loss)(model, x)
  _close(l1, l0, 1e-5)
  _close(nnx.state(g1), nnx.state(g0), 1e-4)
