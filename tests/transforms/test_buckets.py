"""Shape buckets for token models: padding + masking with the true length known at run time.

Every comparison is against ``jax.jit`` of the same function at the true (unpadded) length.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lepton_jax.transforms import adaptive_jit
from lepton_jax.transforms._bucket_mask import build_masked
from tests.transforms import _lm_fixtures as F

POW2 = {"argnum": 1, "axis": 1, "sizes": "pow2"}


def _close(a, b, rtol=2e-4):
  def one(u, v):
    u, v = np.asarray(u), np.asarray(v)
    assert u.shape == v.shape, (u.shape, v.shape)
    atol = rtol * max(1.0, float(np.max(np.abs(v)))) if v.size else 0.0
    np.testing.assert_allclose(u, v, rtol=rtol, atol=atol)
  jax.tree.map(one, a, b)


def _families(w, x):
  """One output per family that mixes positions along axis 1 (the padded axis)."""
  h = jnp.tanh(x @ w)
  return dict(
      mean=h.mean(axis=1), max=h.max(axis=1), min=h.min(axis=1), argmax=h.argmax(axis=1),
      logsumexp=jax.nn.logsumexp(h, axis=1), softmax=jax.nn.softmax(h, axis=1),
      cumsum=jnp.cumsum(h, axis=1), rcumsum=jax.lax.cumsum(h, axis=1, reverse=True),
      last=h[:, -1], shift_right=jnp.pad(h, ((0, 0), (1, 0), (0, 0)))[:, :-1],
      next_diff=((h[:, 1:] - h[:, :-1]) ** 2).mean(),
      attention=jax.nn.softmax(jnp.einsum("btd,bsd->bts", h, h), axis=-1) @ h,
      over_length=h.sum(axis=1) / x.shape[1], total_mean=h.mean())


def _scalar(out):
  return sum(jnp.sum(v) for k, v in out.items() if k != "argmax")


def test_masked_families_forward_and_value_and_grad():
  w = jax.random.normal(jax.random.key(0), (8, 8)) * 0.5
  fwd = adaptive_jit(_families, kernels=None, buckets=POW2)
  vg_fn = jax.value_and_grad(lambda w, x: _scalar(_families(w, x)))
  vg = adaptive_jit(vg_fn, kernels=None, buckets=POW2)
  for n in (5, 7):
    x = jax.random.normal(jax.random.key(n), (2, n, 8))
    _close(fwd(w, x), jax.jit(_families)(w, x))
    _close(vg(w, x), jax.jit(vg_fn)(w, x))
  for g in (fwd, vg):
    info = g.cache_info()
    assert info.compiles == 1 and info.bucket_fallbacks == 0, info   # one bucket: 8


@pytest.mark.parametrize("route", [False, True], ids=["masked", "attention_on_kernel"])
def test_nan_and_inf_in_padding_never_leak(route):
  """The masked program ignores whatever the padded positions hold (values and gradients), also
  when its attention runs on the kernel with the true lengths (forward and backward)."""
  w = jax.random.normal(jax.random.key(0), (8, 8)) * 0.5
  def f(w, x):
    h = jnp.tanh(x @ w)
    q, k, v = h @ w, h @ w.T, jnp.sin(h)
    att = jax.nn.softmax(jnp.einsum("btd,bsd->bts", q, k), axis=-1) @ v
    return att.mean() + jax.nn.logsumexp(h, axis=1).sum() + jnp.cumsum(h, axis=1)[:, -1].sum()

  vg_fn = jax.value_and_grad(f, argnums=(0, 1))
  x = jax.random.normal(jax.random.key(1), (2, 5, 8))
  prog = build_masked(jax.make_jaxpr(vg_fn)(w, jnp.zeros((2, 8, 8))),
                      jax.make_jaxpr(vg_fn)(w, jnp.zeros((2, 6, 8))), 8, 6, [{}, {1: 0}],
                      route_attention="single_block" if route else False)
  assert prog.routed == (1 if route else 0)
  want = jax.jit(vg_fn)(w, x)
  for fill in (np.nan, np.inf, -np.inf):
    xp = jnp.concatenate([x, jnp.full((2, 3, 8), fill)], axis=1)
    outs = jax.jit(lambda n, *a: jax.core.eval_jaxpr(prog.closed.jaxpr, prog.closed.consts, n, *a))(
        5, w, xp)
    loss, gw, gx = outs
    assert np.isfinite(loss) and np.all(np.isfinite(gw)), fill
    _close((loss, gw, gx[:, :5]), (want[0], *want[1]))


@pytest.mark.parametrize("fn,why", [
    (lambda w, x: x.reshape(x.shape[0], -1).sum(-1), "merged with another axis"),
    (lambda w, x: jnp.sort(x, axis=1) @ w, "sorts along the padded axis"),
    (lambda w, x: jnp.flip(x, axis=1) @ w, "reverses the padded axis"),
    (lambda w, x: x + jax.random.uniform(jax.random.key(0), x.shape), "random numbers"),
], ids=["reshape_merge", "sort", "flip", "random"])
def test_refused_once_with_reason_and_source_line(fn, why):
  w = jnp.eye(8)
  g = adaptive_jit(fn, kernels=None, buckets=POW2)
  x = jax.random.normal(jax.random.key(1), (2, 5, 8))
  with pytest.warns(RuntimeWarning, match=why) as rec:
    _close(g(w, x), jax.jit(fn)(w, x))
  assert any("test_buckets.py" in str(r.message) for r in rec)     # the equation's source line
  if why == "sorts along the padded axis":
    with warnings.catch_warnings():
      warnings.simplefilter("error")                  # remembered: no second warning
      x2 = jax.random.normal(jax.random.key(2), (2, 6, 8))
      _close(g(w, x2), jax.jit(fn)(w, x2))
    assert g.cache_info().bucket_fallbacks == 2
  assert len(g._bucket_ctx.cache.refused) == 1 and not g._bucket_ctx.cache.plans


def test_decoder_lm_value_and_grad():
  params = F.decoder_params(jax.random.key(0))
  vg_fn = jax.value_and_grad(F.decoder_loss)
  rng = np.random.default_rng(0)
  g = adaptive_jit(vg_fn, kernels=None, buckets=POW2)
  for n in (17, 29, 40):
    tok = jnp.asarray(rng.integers(0, F.VOCAB, (2, n)), jnp.int32)
    _close(g(params, tok), jax.jit(vg_fn)(params, tok))
  info = g.cache_info()
  assert info.compiles == 2 and info.bucket_fallbacks == 0, info      # buckets 32 and 64
  assert g.explain(params, tok[:, :20]).bucket == {"argnum": 1, "axis": 1, "length": 20,
                                                   "bucket": 32}


@pytest.mark.parametrize("sizes,lengths,buckets", [
    ({"multiple": 24}, (17, 20, 29), 2), ([8, 32], (5, 20, 31), 2)], ids=["multiple", "list"])
def test_bucket_size_forms(sizes, lengths, buckets):
  fn = lambda w, x: jax.nn.softmax(x @ w, axis=1).sum(axis=1)
  g = adaptive_jit(fn, kernels=None, buckets={"argnum": 1, "axis": 1, "sizes": sizes})
  w = jnp.eye(4)
  for n in lengths:
    x = jax.random.normal(jax.random.key(n), (2, n, 4))
    _close(g(w, x), jax.jit(fn)(w, x))
  assert g.cache_info().compiles == buckets and g.cache_info().bucket_fallbacks == 0


def test_nnx_encoder_with_padding_mask():
  """nnx.Embed + nnx.MultiHeadAttention with a [B,1,1,S]-style mask from a bucketed tuple."""

  class Encoder(nnx.Module):
    def __init__(self, rngs):
      self.embed = nnx.Embed(F.VOCAB, 16, rngs=rngs)
      self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=16, decode=False, rngs=rngs)
      self.out = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, tokens, valid):
      x = self.embed(tokens)
      x = x + self.attn(x, mask=nnx.make_attention_mask(valid, valid))
      pooled = (x * valid[..., None]).sum(1) / valid.sum(1, keepdims=True)
      return self.out(pooled)

  model = Encoder(nnx.Rngs(0))
  gdef, state = nnx.split(model)

  def loss(state, batch):
    tokens, valid, labels = batch
    logits = nnx.merge(gdef, state)(tokens, valid)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels[:, 0]).mean()

  def forward(model, batch):
    return model(batch[0], batch[1])

  vg = adaptive_jit(jax.value_and_grad(loss), kernels=None, buckets=POW2)
  fw = adaptive_jit(forward, kernels=None, buckets=POW2)
  rng = np.random.default_rng(1)
  for n in (9, 13):
    tokens = jnp.asarray(rng.integers(1, F.VOCAB, (2, n)), jnp.int32)
    valid = jnp.arange(n)[None, :] < jnp.array([[n], [n - 3]])
    labels = jnp.asarray(rng.integers(0, 3, (2, n)), jnp.int32)
    batch = (tokens, valid, labels)
    _close(vg(state, batch), jax.jit(jax.value_and_grad(loss))(state, batch))
    _close(fw(model, batch), jax.jit(forward)(model, batch))
  assert vg.cache_info().compiles == 1 and fw.cache_info().compiles == 1
  assert vg.cache_info().bucket_fallbacks == 0


def test_lm1b_like_training_through_buckets_matches_unbucketed():
  """A linen lm1b-style model trained with value_and_grad + optax in one bucketed step."""
  model = F.Lm1bLike(layers=1, max_len=128)
  params = model.init(jax.random.key(0), jnp.ones((1, 8), jnp.int32))
  tx = optax.adam(1e-2)

  def step(state, tokens):
    params, opt = state
    loss, grads = jax.value_and_grad(
        lambda p: F.weighted_xent(model.apply(p, tokens), tokens))(params)
    updates, opt = tx.update(grads, opt, params)
    return (optax.apply_updates(params, updates), opt), loss

  bucketed = adaptive_jit(step, kernels=None, buckets=POW2)
  plain = jax.jit(step)
  rng = np.random.default_rng(2)
  sa = sb = (params, tx.init(params))
  lengths = [20, 31, 27]
  for n in lengths:
    tok = rng.integers(1, F.VOCAB, (2, n))
    tok[1, n - 4:] = 0                                       # lm1b-style padding inside a batch
    tok = jnp.asarray(tok, jnp.int32)
    sa, la = bucketed(sa, tok)
    sb, lb = plain(sb, tok)
    _close(la, lb, rtol=2e-4)
  _close(sa[0], sb[0], rtol=2e-3)     # 3 adam steps: float32 reassociation accumulates
  info = bucketed.cache_info()
  assert info.compiles == 1 and info.bucket_fallbacks == 0, info


def _gqa_logits(p, tok):
  """Gemma's grouped-query spelling: queries [B,T,K,G,H], logits einsum('BTKGH,BSKH->BTKGS')."""
  b, t = tok.shape
  x = p["emb"][tok]
  q = jnp.einsum("btd,dkgh->btkgh", x, p["wq"])
  k = jnp.einsum("btd,dkh->btkh", x, p["wk"])
  v = jnp.einsum("btd,dkh->btkh", x, p["wv"])
  s = jnp.einsum("BTKGH,BSKH->BTKGS", q, k) * 0.25
  causal = jnp.tril(jnp.ones((t, t), bool))
  s = jnp.where(causal[None, :, None, None, :], s, -2.3e38)
  o = jnp.einsum("BTKGS,BSKH->BTKGH", jax.nn.softmax(s, axis=-1), v).reshape(b, t, -1)
  return o @ p["emb"][:, :o.shape[-1]].T


def test_gqa_attention_on_kernel_with_true_lengths():
  ks = jax.random.split(jax.random.key(3), 4)
  p = dict(emb=jax.random.normal(ks[0], (32, 16)), wq=jax.random.normal(ks[1], (16, 2, 2, 4)) * 0.3,
           wk=jax.random.normal(ks[2], (16, 2, 4)) * 0.3, wv=jax.random.normal(ks[3], (16, 2, 4)) * 0.3)
  loss = lambda p, tok: jnp.mean(_gqa_logits(p, tok) ** 2)
  n = 11
  tok = jax.random.randint(jax.random.key(4), (2, n), 0, 32)
  padded = jnp.concatenate([tok, jnp.full((2, 16 - n), 5, jnp.int32)], axis=1)
  for fn in (_gqa_logits, jax.value_and_grad(loss)):
    trace = lambda t: jax.make_jaxpr(fn)(p, jnp.zeros((2, t), jnp.int32))
    prog = build_masked(trace(16), trace(12), 16, 12, [{}] * 4 + [{1: 0}],
                        route_attention="single_block")
    assert prog.routed == 1
    outs = jax.jit(lambda n, *a: jax.core.eval_jaxpr(prog.closed.jaxpr, prog.closed.consts, n, *a))(
        n, *jax.tree.leaves(p), padded)
    want = jax.tree.leaves(jax.jit(fn)(p, tok))
    got = [o[:, :n] if t else o for o, t in zip(outs, prog.out_tags)]
    _close(got, want)
