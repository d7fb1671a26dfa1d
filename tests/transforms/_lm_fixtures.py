"""Small token models for the bucketing tests and benchmark (written for lepton_jax).

``decoder_*``: a plain-JAX decoder LM (embedding, causal attention, gelu MLP, tied output,
mean next-token loss). ``Lm1bLike``: a Flax linen decoder with the features of Flax's
``examples/lm1b`` model that matter for padding -- right shift by pad + dynamic slice, a fixed
sinusoidal position table sliced to the length, a padding mask from ``tokens > 0`` combined with
a causal mask, ``nn.MultiHeadDotProductAttention``, pre-LayerNorm blocks, logits through the
embedding, and a weighted cross-entropy normalised by the number of real tokens.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

VOCAB, WIDTH, HEADS = 64, 32, 4


def decoder_params(key, vocab=VOCAB, width=WIDTH):
  ks = jax.random.split(key, 6)
  n = lambda k, s: jax.random.normal(k, s) * 0.1
  return dict(emb=n(ks[0], (vocab, width)), wq=n(ks[1], (width, width)),
              wk=n(ks[2], (width, width)), wv=n(ks[3], (width, width)),
              w1=n(ks[4], (width, 4 * width)), w2=n(ks[5], (4 * width, width)),
              g=jnp.ones(width))


def _norm(x, g):
  m = x.mean(-1, keepdims=True)
  v = ((x - m) ** 2).mean(-1, keepdims=True)
  return (x - m) * jax.lax.rsqrt(v + 1e-5) * g


def decoder_logits(p, tokens):
  b, t = tokens.shape
  d = p["emb"].shape[1]
  x = p["emb"][tokens]
  h = _norm(x, p["g"])
  split = lambda y: y.reshape(b, t, HEADS, d // HEADS)
  q, k, v = split(h @ p["wq"]), split(h @ p["wk"]), split(h @ p["wv"])
  s = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(d // HEADS)
  s = jnp.where(jnp.arange(t)[:, None] >= jnp.arange(t)[None, :], s, -1e9)
  o = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(s, axis=-1), v).reshape(b, t, d)
  x = x + o
  x = x + jax.nn.gelu(_norm(x, p["g"]) @ p["w1"]) @ p["w2"]
  return x @ p["emb"].T


def decoder_loss(p, tokens):
  logits = decoder_logits(p, tokens)[:, :-1]
  logp = jax.nn.log_softmax(logits)
  return -jnp.take_along_axis(logp, tokens[:, 1:, None], -1).mean()


def _sinusoid(max_len, width):
  pos = np.arange(max_len)[:, None]
  rate = np.exp(np.arange(width // 2) * -(np.log(10000.0) / (width // 2 - 1)))
  table = np.concatenate([np.sin(pos * rate), np.cos(pos * rate)], axis=-1)
  return table[None].astype(np.float32)


class _Block(nn.Module):
  heads: int
  mlp: int

  @nn.compact
  def __call__(self, x, mask):
    h = nn.MultiHeadDotProductAttention(num_heads=self.heads, use_bias=False,
                                        deterministic=True)(nn.LayerNorm()(x), mask=mask)
    x = x + h
    z = nn.Dense(x.shape[-1])(nn.relu(nn.Dense(self.mlp)(nn.LayerNorm()(x))))
    return x + z


class Lm1bLike(nn.Module):
  vocab: int = VOCAB
  width: int = WIDTH
  heads: int = HEADS
  layers: int = 2
  max_len: int = 1024

  @nn.compact
  def __call__(self, tokens):
    shifted = jnp.pad(tokens, ((0, 0), (1, 0)))
    shifted = jax.lax.dynamic_slice_in_dim(shifted, 0, shifted.shape[1] - 1, axis=1)
    embed = nn.Embed(self.vocab, self.width, embedding_init=nn.initializers.normal(1.0))
    y = embed(shifted) + _sinusoid(self.max_len, self.width)[:, :tokens.shape[1]]
    mask = nn.combine_masks(nn.make_attention_mask(tokens > 0, tokens > 0),
                            nn.make_causal_mask(tokens))
    for _ in range(self.layers):
      y = _Block(self.heads, 2 * self.width)(y, mask)
    return embed.attend(nn.LayerNorm()(y)) / np.sqrt(self.width)


def weighted_xent(logits, targets):
  """lm1b-style loss: one-hot cross-entropy weighted by ``targets > 0``, mean over real tokens."""
  weights = (targets > 0).astype(jnp.float32)
  onehot = jax.nn.one_hot(targets, logits.shape[-1])
  loss = -jnp.sum(onehot * jax.nn.log_softmax(logits), axis=-1)
  return jnp.sum(loss * weights) / jnp.maximum(jnp.sum(weights), 1.0)
