"""Third-party (Flax/optax) models used by tests/test_contract.py.

Nothing here is lepton_jax code: these are plain Flax NNX / linen modules, the kind of code the
acceptance tests run the public API on.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx


class DeepMLP(nnx.Module):
  """A stack of nnx.Linear + nnx.LayerNorm + gelu blocks (deep enough for remat to matter)."""

  def __init__(self, din=16, width=32, depth=6, dout=8, *, rngs):
    self.inp = nnx.Linear(din, width, rngs=rngs)
    self.blocks = nnx.List([nnx.Linear(width, width, rngs=rngs) for _ in range(depth)])
    self.norms = nnx.List([nnx.LayerNorm(width, rngs=rngs) for _ in range(depth)])
    self.out = nnx.Linear(width, dout, rngs=rngs)

  def __call__(self, x):
    h = self.inp(x)
    for lin, norm in zip(self.blocks, self.norms):
      h = h + jax.nn.gelu(lin(norm(h)))
    return self.out(h)


class Block(nnx.Module):
  """Pre-norm transformer block with Flax's own nnx.MultiHeadAttention."""

  def __init__(self, d=16, heads=2, *, rngs):
    self.ln1 = nnx.LayerNorm(d, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(num_heads=heads, in_features=d, qkv_features=d,
                                       decode=False, rngs=rngs)
    self.ln2 = nnx.LayerNorm(d, rngs=rngs)
    self.fc1 = nnx.Linear(d, 2 * d, rngs=rngs)
    self.fc2 = nnx.Linear(2 * d, d, rngs=rngs)

  def __call__(self, x):
    x = x + self.attn(self.ln1(x))
    return x + self.fc2(jax.nn.relu(self.fc1(self.ln2(x))))


class TinyTransformer(nnx.Module):
  def __init__(self, vocab=32, d=16, heads=2, depth=2, *, rngs):
    self.embed = nnx.Embed(vocab, d, rngs=rngs)
    self.blocks = nnx.List([Block(d, heads, rngs=rngs) for _ in range(depth)])
    self.ln = nnx.LayerNorm(d, rngs=rngs)
    self.head = nnx.Linear(d, vocab, rngs=rngs)

  def __call__(self, tokens):
    h = self.embed(tokens)
    for b in self.blocks:
      h = b(h)
    return self.head(self.ln(h))


class ConvBN(nnx.Module):
  """nnx.Conv + nnx.BatchNorm (train mode mutates batch_stats) + pooling + nnx.Linear."""

  def __init__(self, *, rngs):
    self.conv1 = nnx.Conv(3, 8, kernel_size=(3, 3), rngs=rngs)
    self.bn1 = nnx.BatchNorm(8, rngs=rngs)
    self.fc = nnx.Linear(8, 5, rngs=rngs)

  def __call__(self, x):
    x = jax.nn.relu(self.bn1(self.conv1(x)))
    return self.fc(jnp.mean(x, axis=(1, 2)))


class LinenMLP(nn.Module):
  width: int = 32
  depth: int = 2
  out: int = 8

  @nn.compact
  def __call__(self, x):
    for _ in range(self.depth):
      x = nn.tanh(nn.Dense(self.width)(nn.LayerNorm()(x)))
    return nn.Dense(self.out)(x)
