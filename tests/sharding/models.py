"""Small models and train steps shared by the auto_shard tests and benchmark."""

import jax
import jax.numpy as jnp
import numpy as np
import optax


def mlp_init(seed, sizes, dtype=np.float32):
  """MLP parameters from a numpy RNG (no jax.random: nothing to compile)."""
  rng = np.random.default_rng(seed)
  ps = {}
  for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
    ps[f"l{i}"] = {"w": jnp.asarray(rng.standard_normal((a, b)) / np.sqrt(a), dtype),
                   "b": jnp.zeros((b,), dtype)}
  return ps


def mlp_apply(ps, x):
  n = len(ps)
  for i in range(n):
    x = x @ ps[f"l{i}"]["w"] + ps[f"l{i}"]["b"]
    if i < n - 1:
      x = jax.nn.relu(x)
  return x


def make_mlp_step(tx):
  def step(ps, st, x, y):
    loss, g = jax.value_and_grad(lambda p: jnp.mean((mlp_apply(p, x) - y) ** 2))(ps)
    up, st = tx.update(g, st, ps)
    return optax.apply_updates(ps, up), st, loss
  return step


def lm_init(seed, vocab=64, d=32, heads=4, ff=64, layers=2, seq=16, dtype=jnp.float32):
  """Transformer LM parameters from a numpy RNG (plus ``"heads"``)."""
  rng = np.random.default_rng(seed)
  n = lambda shape, s: jnp.asarray(rng.standard_normal(shape) * s, dtype)
  ps = {"embed": n((vocab, d), 0.02), "pos": n((seq, d), 0.02), "ln_f": jnp.ones((d,), dtype),
        "unembed": n((d, vocab), d ** -0.5), "layers": []}
  for _ in range(layers):
    ps["layers"].append({
        "ln1": jnp.ones((d,), dtype), "ln2": jnp.ones((d,), dtype),
        "wq": n((d, d), d ** -0.5), "wk": n((d, d), d ** -0.5), "wv": n((d, d), d ** -0.5),
        "wo": n((d, d), d ** -0.5), "w1": n((d, ff), d ** -0.5), "w2": n((ff, d), ff ** -0.5)})
  ps["heads"] = heads
  return ps


def _rms(x, s):
  return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * s


def lm_apply(ps, tokens, heads):
  b, t = tokens.shape
  x = ps["embed"][tokens] + ps["pos"][:t]
  mask = jnp.tril(jnp.ones((t, t), bool))
  for lp in ps["layers"]:
    h = _rms(x, lp["ln1"])
    d = h.shape[-1]
    q, k, v = (jnp.reshape(h @ lp[w], (b, t, heads, d // heads)) for w in ("wq", "wk", "wv"))
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d // heads)
    s = jnp.where(mask, s, -1e9)
    a = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1), v).reshape(b, t, d)
    x = x + a @ lp["wo"]
    h = _rms(x, lp["ln2"])
    x = x + jax.nn.gelu(h @ lp["w1"]) @ lp["w2"]
  return _rms(x, ps["ln_f"]) @ ps["unembed"]


def make_lm_step(tx, heads):
  def loss_fn(p, tokens, targets):
    logits = lm_apply(p, tokens, heads)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

  def step(p, st, tokens, targets):
    loss, g = jax.value_and_grad(loss_fn)(p, tokens, targets)
    up, st = tx.update(g, st, p)
    return optax.apply_updates(p, up), st, loss
  return step


def lm_params(seed, **kw):
  ps = lm_init(seed, **kw)
  heads = ps.pop("heads")
  return ps, heads


def make_resnet_and_optimizer(seed=0, channels=8, classes=10, lr=1e-2):
  """A small NNX ResNet and its AdamW ``nnx.Optimizer``, built in one ``nnx.jit`` call.

  The ``unsafe_rbg`` PRNG compiles ~6x faster on CPU than threefry.
  """
  from flax import nnx

  @nnx.jit
  def build():
    m = make_resnet(seed, channels, classes, impl="unsafe_rbg")
    return m, nnx.Optimizer(m, optax.adamw(lr), wrt=nnx.Param)
  return build()


def make_resnet(seed=0, channels=8, classes=10, impl="threefry2x32"):
  from flax import nnx

  class Block(nnx.Module):
    def __init__(self, c, rngs):
      self.conv1 = nnx.Conv(c, c, (3, 3), use_bias=False, rngs=rngs)
      self.bn1 = nnx.BatchNorm(c, rngs=rngs)
      self.conv2 = nnx.Conv(c, c, (3, 3), use_bias=False, rngs=rngs)
      self.bn2 = nnx.BatchNorm(c, rngs=rngs)

    def __call__(self, x):
      y = nnx.relu(self.bn1(self.conv1(x)))
      return nnx.relu(x + self.bn2(self.conv2(y)))

  class ResNet(nnx.Module):
    def __init__(self, rngs):
      self.stem = nnx.Conv(3, channels, (3, 3), use_bias=False, rngs=rngs)
      self.bn = nnx.BatchNorm(channels, rngs=rngs)
      self.block = Block(channels, rngs)
      self.head = nnx.Linear(channels, classes, rngs=rngs)

    def __call__(self, x):
      x = nnx.relu(self.bn(self.stem(x)))
      x = self.block(x)
      return self.head(x.mean((1, 2)))

  return ResNet(nnx.Rngs(jax.random.key(seed, impl=impl)))


def resnet_step(model, opt, x, y):
  from flax import nnx

  def loss_fn(m):
    return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

  loss, g = nnx.value_and_grad(loss_fn)(model)
  opt.update(model, g)
  return loss


def mp_batch(rows=8):
  """The global batch of the 2-process test (the same on every process)."""
  rng = np.random.default_rng(3)
  return (rng.standard_normal((rows, 8)).astype(np.float32),
          rng.standard_normal((rows, 4)).astype(np.float32))
