"""Small third-party-style models shared by the jaxpr tests (Flax NNX / Linen, optax)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import nnx


def xla_flops(f, *args):
  """(flops, transcendentals) from XLA's compiled cost analysis (dict or list of dicts)."""
  c = jax.jit(f).lower(*args).compile().cost_analysis()
  if isinstance(c, (list, tuple)):
    c = c[0]
  return float(c.get("flops", 0.0)), float(c.get("transcendentals", 0.0))


def _fill(tree, seed=0):
  """Deterministic numpy parameters for an abstract tree (no RNG compile: fast tests)."""
  rs = np.random.RandomState(seed)

  def leaf(s):
    if jnp.issubdtype(s.dtype, jax.dtypes.extended):
      return jax.random.key(seed)
    return jnp.asarray(rs.standard_normal(s.shape).astype(s.dtype) * (1.0 / np.sqrt(max(s.shape[:1] or (1,)))))
  return jax.tree.map(leaf, tree)


def _nnx_split(ctor):
  g, abstract = nnx.split(nnx.eval_shape(ctor))
  return g, _fill(abstract)


class MLP(nnx.Module):

  def __init__(self, din, dh, dout, rngs):
    self.l1 = nnx.Linear(din, dh, rngs=rngs)
    self.l2 = nnx.Linear(dh, dh, rngs=rngs)
    self.l3 = nnx.Linear(dh, dout, rngs=rngs)

  def __call__(self, x):
    return self.l3(nnx.gelu(self.l2(nnx.relu(self.l1(x)))))


def mlp_case(batch=32, din=64, dh=128):
  g, st = _nnx_split(lambda: MLP(din, dh, 10, nnx.Rngs(0)))
  x = jnp.linspace(-1, 1, batch * din).reshape(batch, din)
  y = jnp.arange(batch, dtype=jnp.int32) % 10

  def loss(st, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(nnx.merge(g, st)(x), y).mean()
  return loss, (st, x, y)


class CNN(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3))(x))
    x = nn.avg_pool(x, (2, 2), (2, 2))
    x = nn.relu(nn.Conv(16, (3, 3), strides=2)(x))
    x = nn.Conv(16, (3, 3), feature_group_count=4, padding="VALID")(x)
    x = nn.max_pool(x, (2, 2), (2, 2))
    return nn.Dense(10)(x.reshape(x.shape[0], -1))


def cnn_case(batch=2, hw=24):
  cnn = CNN()
  img = jnp.linspace(0, 1, batch * hw * hw * 3).reshape(batch, hw, hw, 3)
  p = _fill(jax.eval_shape(cnn.init, jax.random.key(0), img))
  return cnn.apply, (p, img)


class Block(nnx.Module):

  def __init__(self, d, heads, rngs):
    self.ln = nnx.LayerNorm(d, rngs=rngs)
    self.att = nnx.MultiHeadAttention(heads, d, decode=False, rngs=rngs)
    self.ln2 = nnx.LayerNorm(d, rngs=rngs)
    self.ff1 = nnx.Linear(d, 4 * d, rngs=rngs)
    self.ff2 = nnx.Linear(4 * d, d, rngs=rngs)

  def __call__(self, x):
    x = x + self.att(self.ln(x))
    return x + self.ff2(nnx.gelu(self.ff1(self.ln2(x))))


def attention_case(batch=2, seq=16, d=32, heads=4):
  g, st = _nnx_split(lambda: Block(d, heads, nnx.Rngs(0)))
  x = jnp.linspace(-1, 1, batch * seq * d).reshape(batch, seq, d)

  def f(st, x):
    return nnx.merge(g, st)(x)
  return f, (st, x)


def rnn_case(steps=10, batch=4, din=16, dh=32, unroll=True):
  def f(params, xs):
    w, u = params

    def step(h, x):
      h = jnp.tanh(h @ w + x @ u)
      return h, h
    return jax.lax.scan(step, jnp.zeros((batch, dh)), xs, unroll=unroll)[1]
  xs = jnp.linspace(-1, 1, steps * batch * din).reshape(steps, batch, din)
  prm = (jnp.eye(dh) * 0.5, jnp.ones((din, dh)) * 0.1)
  return f, (prm, xs)


def mlp_tower(depth=12, width=64, act=jnp.tanh):
  """Plain-jnp MLP tower: params list of (w, b), loss = mean square of output."""
  rs = np.random.RandomState(1)
  params = [(jnp.asarray(rs.standard_normal((width, width)).astype(np.float32) / np.sqrt(width)),
             jnp.zeros((width,), jnp.float32)) for _ in range(depth)]

  def layer(p, h):
    w, b = p
    return act(h @ w + b)

  def loss(params, x, remat_policy=None):
    h = x
    for p in params:
      fn = layer if remat_policy is None else jax.checkpoint(layer, policy=remat_policy)
      h = fn(p, h)
    return jnp.mean(h ** 2)
  return loss, params
