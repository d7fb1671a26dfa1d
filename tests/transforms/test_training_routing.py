"""adaptive_jit routes attention in the training form: the gradient program's forward *and*
backward are replaced by the kernel's forward and its own VJP (checked numerically), and the
compiled program is the judge: memory only goes down, values and gradients equal plain JAX."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from benchmarks.training_step import _GqaAttention
from lepton_jax.transforms import adaptive_jit



def _close(a, b, tol=2e-4):
  def one(u, w):
    u, w = np.asarray(u, np.float32), np.asarray(w, np.float32)
    scale = max(1.0, float(np.abs(w).max(initial=0.0)))
    np.testing.assert_allclose(u, w, rtol=tol, atol=tol * scale)
  jax.tree.map(one, a, b)


def _routes(f, *args):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    rep = f.explain(*args)
  return [r.pattern for r in rep.rewrites if r.pass_name == "route_kernels"], rep


def _einsum_attn(q, k, v):
  p = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / 8.0, axis=-1)
  return jnp.einsum("bhqk,bkhd->bqhd", p, v)


def _where_causal(q, k, v):
  s = jnp.einsum("bqhd,bkhd->bhqk", q, k) * 0.125
  mask = jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool))
  return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(jnp.where(mask, s, -1e10), -1), v)


SPELLINGS = {
    "einsum": _einsum_attn,
    "where_causal": _where_causal,
    "dot_product_attention": lambda q, k, v: jax.nn.dot_product_attention(q, k, v),
    "dot_product_attention_causal": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True),
}


@pytest.mark.parametrize("name,shared", [(n, False) for n in sorted(SPELLINGS)] + [("einsum", True)])
def test_value_and_grad_routes_forward_and_backward(name, shared):
  attn = SPELLINGS[name]
  keys = jax.random.split(jax.random.key(0), 3)
  q, k, v = (jax.random.normal(kk, (2, 24, 2, 16)) for kk in keys)
  if shared:
    k = v = q
  loss = lambda q, k, v: jnp.sum(jnp.tanh(attn(q, k, v)))
  vg = jax.value_and_grad(loss, argnums=(0, 1, 2))
  f = adaptive_jit(vg, kernels="xla")
  routes, _ = _routes(f, q, k, v)
  if routes == ["rejected_by_compiled_memory"] and name in ("einsum", "where_causal"):
    # At seq 24 the einsum spellings' win is marginal and compiler-dependent (jaxlib 0.11's XLA:CPU
    # compiles the unrouted step to fewer temp bytes: the judge keeps it); routing checked without it.
    routes, _, got = _route_and_eval(vg, q, k, v)
    _close(got, jax.tree.leaves(jax.jit(vg)(q, k, v)))
  assert routes == ["attention_fwd_bwd"], routes
  _close(f(q, k, v), jax.jit(vg)(q, k, v))


def test_bf16_grad_routes():
  """bf16 attention routes jointly (checked against a float32 reference); the routed program's
  values and gradients are within bf16 error of plain JAX's."""
  q, k, v = (jax.random.normal(jax.random.key(i), (2, 32, 2, 16), jnp.bfloat16) for i in range(3))
  loss = lambda q, k, v: jnp.sum(jax.nn.dot_product_attention(q, k, v).astype(jnp.float32) ** 2)
  vg = jax.value_and_grad(loss, argnums=(0, 1, 2))
  routes, _, got = _route_and_eval(vg, q, k, v)
  assert routes == ["attention_fwd_bwd"], routes
  _close(got, jax.tree.leaves(jax.jit(vg)(q, k, v)), tol=5e-2)


def test_compiled_memory_drops_at_long_sequence():
  """Compile-only: at seq 1024 the training step's temp bytes fall below 0.35x of jax.jit's."""
  mha = nnx.MultiHeadAttention(num_heads=4, in_features=64, qkv_features=64, decode=False,
                               rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(mha, nnx.Param)
  x = jax.ShapeDtypeStruct((2, 1024, 64), jnp.float32)

  def loss(p, x):
    return jnp.mean(nnx.merge(graphdef, p)(x, x) ** 2)
  vg = jax.value_and_grad(loss)
  ours = adaptive_jit(vg, kernels="xla")
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    rep = ours.explain(params, x)
  assert "attention_fwd_bwd" in [r.pattern for r in rep.rewrites]
  # explain's "before" is jax.jit's compiled program; the program adaptive_jit runs is its "after"
  plain = rep.compiled_temp_bytes_before
  mine = ours.lower(params, x).compile().memory_analysis().temp_size_in_bytes
  assert mine < 0.35 * plain, (mine, plain)
  assert rep.compiled_temp_bytes_after == pytest.approx(mine, rel=0.01)


# Gemma-style grouped-query attention (einsum projections, logits merged to [B,T,N,S] around the
# masked softmax): the same module the training-step benchmark measures.
_GroupedAttention = _GqaAttention


class _TinyLM(nnx.Module):
  def __init__(self, vocab, d, rngs):
    self.emb = nnx.Embed(vocab, d, rngs=rngs)
    self.ln = nnx.RMSNorm(d, rngs=rngs)
    self.attn = _GroupedAttention(d, 4, 2, 8, rngs)
    self.out = nnx.Linear(d, vocab, rngs=rngs)

  def __call__(self, tok):
    x = self.emb(tok)
    t = tok.shape[1]
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (tok.shape[0], t, t))
    x = x + self.attn(self.ln(x), mask)
    return self.out(x)


def test_optax_train_step_with_gqa_and_has_aux():
  """The whole step in one adaptive_jit: nnx.value_and_grad(has_aux) + optax.adamw update."""
  model = _TinyLM(64, 32, nnx.Rngs(0))
  tok = jax.random.randint(jax.random.key(1), (2, 17), 0, 64)
  graphdef, params = nnx.split(model, nnx.Param)
  tx = optax.adamw(1e-2)
  opt_state = tx.init(params)

  def loss_fn(p, tok):
    logits = nnx.merge(graphdef, p)(tok[:, :-1])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, tok[:, 1:]).mean()
    return ce, {"logit_norm": jnp.abs(logits).mean()}

  def step(p, s, tok):
    (loss, aux), g = jax.value_and_grad(loss_fn, has_aux=True)(p, tok)
    updates, s = tx.update(g, s, p)
    return optax.apply_updates(p, updates), s, loss, aux

  # The grouped attention's forward+backward is replaced, and the routed program equals plain JAX
  # (at these tiny shapes XLA:CPU may compile the blockwise kernel larger than plain attention, so
  # adaptive_jit's whole-program check may then run the original: both are compared below).
  want = jax.jit(step)(params, opt_state, tok)
  routes, _, routed = _route_and_eval(step, params, opt_state, tok)
  assert "attention_fwd_bwd" in routes, routes
  _close(routed, jax.tree.leaves(want), tol=5e-4)
  _close(adaptive_jit(step, kernels="xla")(params, opt_state, tok), want, tol=5e-4)


def test_nnx_value_and_grad_with_module_argument():
  mha = nnx.MultiHeadAttention(num_heads=2, in_features=16, qkv_features=16, decode=False,
                               rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(2), (2, 20, 16))

  def loss(m, x):
    return jnp.mean(m(x, x) ** 2)
  f = adaptive_jit(nnx.value_and_grad(loss), kernels="xla")
  routes, _ = _routes(f, mha, x)
  assert routes == ["attention_fwd_bwd"], routes
  (l1, g1) = f(mha, x)
  (l2, g2) = nnx.jit(nnx.value_and_grad(loss))(mha, x)
  _close(l1, l2)
  _close(nnx.state(g1), nnx.state(g2))


def test_routing_that_would_grow_compiled_memory_is_rejected(monkeypatch):
  """A routed program that compiles larger than the unrouted one is not applied."""
  from lepton_jax.jaxpr import _compiled
  from lepton_jax.transforms.passes import _pipeline
  real = _pipeline.compile_both

  def fake(fn, routed, plain):   # the pipeline's decision: make the routed program "worse"
    a, b = real(fn, routed, plain)
    if fn is _pipeline.compiled_figures:
      a = _compiled.CompiledFigures(a.temp_bytes + 10**9, a.argument_bytes, a.output_bytes, a.flops)
    return a, b
  monkeypatch.setattr(_pipeline, "compile_both", fake)
  q = jax.random.normal(jax.random.key(0), (2, 16, 2, 16))
  vg = jax.value_and_grad(lambda q: jnp.sum(jnp.tanh(_einsum_attn(q, q, q))))
  f = adaptive_jit(vg, kernels="xla")
  routes, rep = _routes(f, q)
  assert routes == ["rejected_by_compiled_memory"], routes
  assert "attention_fwd_bwd" in rep.rewrites[-1].location
  _close(f(q), jax.jit(vg)(q))


@pytest.mark.parametrize("name", ["onehot", "flax_onehot_eq", "optax_dense"])
def test_one_hot_cross_entropy_spellings_route(name):
  """Flax examples' ``-sum(onehot * log_softmax)`` and optax's dense-label CE reach the kernel."""
  v = 64
  fns = {
      "onehot": lambda l, y: -jnp.sum(jax.nn.one_hot(y, v) * jax.nn.log_softmax(l), -1),
      "flax_onehot_eq": lambda l, y: -jnp.sum(
          jnp.asarray(y[..., None] == jnp.arange(v), jnp.float32) * jax.nn.log_softmax(l), axis=-1),
      "optax_dense": lambda l, y: optax.softmax_cross_entropy(l, jax.nn.one_hot(y, v)),
  }
  fn = fns[name]
  logits = jax.random.normal(jax.random.key(0), (3, 5, v))
  labels = jax.random.randint(jax.random.key(1), (3, 5), 0, v)
  f = adaptive_jit(fn, kernels="xla", passes=["fold", "simplify", "cse", "dce", "route_kernels"])
  from lepton_jax.transforms.passes._pipeline import run_passes
  closed, _ = f.rewritten_jaxpr(logits, labels)
  routed = [r.pattern for r in run_passes(closed, f._passes, kernels="xla")[1]
            if r.pass_name == "route_kernels"]
  assert routed == ["softmax_cross_entropy"], routed
  _close(f(logits, labels), jax.jit(fn)(logits, labels))
  loss = lambda l: jnp.mean(fn(l, labels))
  _close(jax.grad(lambda l: jnp.mean(f(l, labels)))(logits), jax.jit(jax.grad(loss))(logits))


def test_gemma_grouped_attention_spelling_routes_forward():
  """Gemma merges (kv head, group) into heads around the softmax; the merged mask is split back."""
  attn = _GroupedAttention(32, 4, 2, 8, nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(3), (2, 12, 32))
  mask = jnp.broadcast_to(jnp.tril(jnp.ones((12, 12), bool)), (2, 12, 12))
  f = adaptive_jit(lambda m, x, mask: m(x, mask), kernels="xla")
  from lepton_jax.transforms.passes._pipeline import normalize_passes, run_passes
  closed, _ = f.rewritten_jaxpr(attn, x, mask)
  routed = [r.pattern for r in run_passes(closed, normalize_passes("default"), kernels="xla")[1]
            if r.pass_name == "route_kernels"]
  assert routed == ["attention"], routed
  _close(f(attn, x, mask), nnx.jit(lambda m, x, mask: m(x, mask))(attn, x, mask))


def test_jax_grad_of_a_model_routes_attention_jointly():
  """jax.grad alone: the attention output is a residual of the layers after it, so it anchors."""
  model = _TinyLM(64, 32, nnx.Rngs(1))
  tok = jax.random.randint(jax.random.key(4), (2, 17), 0, 64)
  graphdef, params = nnx.split(model, nnx.Param)
  g = jax.grad(lambda p, t: optax.softmax_cross_entropy_with_integer_labels(
      nnx.merge(graphdef, p)(t[:, :-1]), t[:, 1:]).mean())
  f = adaptive_jit(g, kernels="xla")
  from lepton_jax.transforms.passes._pipeline import normalize_passes, run_passes
  closed, _ = f.rewritten_jaxpr(params, tok)
  routed = [r.pattern for r in run_passes(closed, normalize_passes("default"), kernels="xla")[1]
            if r.pass_name == "route_kernels"]
  assert "attention_fwd_bwd" in routed, routed
  _close(f(params, tok), jax.jit(g)(params, tok), tol=5e-4)


# --------------------------------------------------------------------------- norms, CE, matmul
# The routed program itself (before adaptive_jit's whole-program compiled decision) is evaluated
# and compared with plain JAX, so these tests see the joint replacement even where XLA:CPU would
# not keep it.

def _route_and_eval(fn, *args):
  """``(route patterns, route_check patterns, routed outputs)`` of ``fn``'s default pass list."""
  from lepton_jax.jaxpr._eval import jaxpr_fn
  from lepton_jax.transforms.passes._pipeline import normalize_passes, run_passes
  closed = jax.make_jaxpr(fn)(*args)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    new, recs = run_passes(closed, normalize_passes("default"), kernels="xla")
  out = jax.jit(jaxpr_fn(new))(*jax.tree.leaves(args))
  return ([r.pattern for r in recs if r.pass_name == "route_kernels"],
          [r.pattern for r in recs if r.pass_name == "route_check"], out)


class _NormMlp(nnx.Module):
  """Pre-LN residual block (Flax LayerNorm), an RMS-normed silu MLP, one-hot cross-entropy."""

  def __init__(self, d, vocab, rngs):
    self.ln = nnx.LayerNorm(d, rngs=rngs)
    self.up = nnx.Linear(d, 2 * d, rngs=rngs)
    self.down = nnx.Linear(2 * d, d, rngs=rngs)
    self.rms = nnx.RMSNorm(d, rngs=rngs)
    self.gate = nnx.Param(jax.random.normal(rngs.params(), (d, d)) * d ** -0.5)
    self.out = nnx.Linear(d, vocab, rngs=rngs)

  def __call__(self, x, labels):
    x = x + self.down(jax.nn.gelu(self.up(self.ln(x))))
    x = x + jax.nn.silu(self.rms(x) @ self.gate[...])
    logits = self.out(x)
    onehot = jax.nn.one_hot(labels, logits.shape[-1])
    return jnp.mean(-jnp.sum(onehot * jax.nn.log_softmax(logits), axis=-1))


def _norm_mlp_case():
  """``(value_and_grad, params, x, labels)`` of the norm / matmul / cross-entropy block."""
  model = _NormMlp(16, 32, nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  x = jax.random.normal(jax.random.key(1), (2, 6, 16))
  labels = jax.random.randint(jax.random.key(2), (2, 6), 0, 32)
  vg = jax.value_and_grad(lambda p, x, y: nnx.merge(graphdef, p)(x, y), argnums=(0, 1))
  return vg, params, x, labels


def test_joint_norms_matmul_and_cross_entropy_match_plain_jax(monkeypatch):
  """Layer norm, RMS norm, matmul+bias+gelu, matmul+silu and one-hot CE: forward and backward
  replaced together (the compiled judge accepting everything), values and gradients unchanged."""
  from lepton_jax.transforms.passes import _route_joint
  monkeypatch.setattr(_route_joint, "_judge", lambda *a, **k: None)
  vg, params, x, labels = _norm_mlp_case()
  routes, _, got = _route_and_eval(vg, params, x, labels)
  assert sorted(routes) == ["layer_norm_fwd_bwd", "matmul_bias_gelu_fwd_bwd", "matmul_silu_fwd_bwd",
                            "rms_norm_fwd_bwd", "softmax_cross_entropy_fwd_bwd"], routes
  _close(got, jax.tree.leaves(jax.jit(vg)(params, x, labels)))


def test_template_joint_routes_are_judged_on_the_compiled_program():
  """With XLA's own implementations (CPU) a norm's kernel backward is JAX's: not better, so the
  original is kept and a ``route_check`` record says why; the program still equals plain JAX."""
  vg, params, x, labels = _norm_mlp_case()
  routes, checks, got = _route_and_eval(vg, params, x, labels)
  assert "layer_norm_fwd_bwd_kept_original" in checks, (routes, checks)
  assert not {"layer_norm", "rms_norm"} & set(routes), routes   # no forward-only duplicate
  _close(got, jax.tree.leaves(jax.jit(vg)(params, x, labels)))


def test_one_hot_cross_entropy_training_compiled_memory_drops():
  """Flax's ``-sum(onehot * log_softmax)`` in a training step keeps the [N, V] log-probabilities
  and one-hot for the backward; the joint route keeps only the logits' statistics (XLA:CPU)."""
  v = 1024
  def loss(w, x, y):
    return jnp.mean(-jnp.sum(jax.nn.one_hot(y, v) * jax.nn.log_softmax(x @ w), axis=-1))
  w = jax.random.normal(jax.random.key(0), (16, v)) * 0.1
  x = jax.random.normal(jax.random.key(1), (32, 16))
  y = jax.random.randint(jax.random.key(2), (32,), 0, v)
  vg = jax.value_and_grad(loss, argnums=(0, 1))
  ours = adaptive_jit(vg)
  routes, rep = _routes(ours, w, x, y)
  assert routes == ["softmax_cross_entropy_fwd_bwd"], routes
  plain = jax.jit(vg).lower(w, x, y).compile().memory_analysis().temp_size_in_bytes
  assert rep.compiled_temp_bytes_after < 0.75 * plain, (rep.compiled_temp_bytes_after, plain)
  _close(ours(w, x, y), jax.jit(vg)(w, x, y))


_B, _T = 2, 16
_PAD = jnp.arange(_T)[None, :] < jnp.array([[9], [16]])          # [B, S] valid keys


def _pv(p, v):
  return jnp.einsum("bhqk,bkhd->bqhd", p, v)


def _scores(q, k):
  return jnp.einsum("bqhd,bkhd->bhqk", q, k) * 0.25


_CAUSAL = jnp.tril(jnp.ones((_T, _T), bool))[None, None]
MASKED = {   # a [B,1,1,S] padding mask combined with a causal mask, as real code writes it
    "jax_mask_is_causal": lambda q, k, v, pm: jax.nn.dot_product_attention(q, k, v, mask=pm,
                                                                            is_causal=True),
    "nested_where": lambda q, k, v, pm: _pv(jax.nn.softmax(
        jnp.where(pm, jnp.where(_CAUSAL, _scores(q, k), -1e9), -1e9), -1), v),
    "flax_combine_masks": lambda q, k, v, pm: _pv(jax.nn.softmax(jnp.where(
        nnx.combine_masks(pm, _CAUSAL, dtype=jnp.float32), _scores(q, k), -1e9), -1), v),
    "padding_bias_then_causal": lambda q, k, v, pm: _pv(jax.nn.softmax(jnp.where(
        _CAUSAL, _scores(q, k) + jnp.where(pm, 0.0, -1e9), -1e9), -1), v),
}


@pytest.mark.parametrize("name", sorted(MASKED))
def test_padding_and_causal_masks_route_forward_and_jointly(name):
  attn = MASKED[name]
  q, k, v = (jax.random.normal(jax.random.key(i), (_B, _T, 2, 8)) for i in range(3))
  pm = _PAD[:, None, None, :]
  routes, _, got = _route_and_eval(attn, q, k, v, pm)
  assert routes == ["attention"], routes
  _close(got, [attn(q, k, v, pm)])
  vg = jax.value_and_grad(lambda q, k, v: jnp.sum(jnp.tanh(attn(q, k, v, pm))), argnums=(0, 1, 2))
  routes, _, got = _route_and_eval(vg, q, k, v)
  assert routes == ["attention_fwd_bwd"], routes
  _close(got, jax.tree.leaves(jax.jit(vg)(q, k, v)))


def test_grad_of_a_loss_linear_in_attention_is_left_alone():
  """``jax.grad`` of ``sum(w * attention)``: the output ``P.V`` is dead in the gradient program,
  so there is no forward to anchor the kernel on; nothing is routed and the gradient is exact."""
  q, k, v = (jax.random.normal(jax.random.key(i), (2, 16, 2, 8)) for i in range(3))
  w = jax.random.normal(jax.random.key(5), (2, 16, 2, 8))
  g = jax.grad(lambda q, k, v: jnp.sum(w * _einsum_attn(q, k, v)), argnums=(0, 1, 2))
  routes, _, got = _route_and_eval(g, q, k, v)
  assert routes == [], routes
  _close(got, jax.tree.leaves(jax.jit(g)(q, k, v)))
