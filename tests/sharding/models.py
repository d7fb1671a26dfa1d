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


# ---------------------------------------------------------------------------------------------
# Train-step fixtures in the style of Flax's examples (gemma, lm1b), a ViT and a ResNet.
# Pure functions of pytrees (no NNX: faster to trace); tiny sizes that divide 8 devices.
# Each ``*_case(seed)`` returns ``(step, (params, opt_state, x, y))`` with an optax.adamw step.
# ---------------------------------------------------------------------------------------------


def _normal(rng, shape, scale, dtype=jnp.float32):
  return jnp.asarray(rng.standard_normal(shape) * scale, dtype)


def _train_step(loss_fn, tx):
  def step(p, st, x, y):
    loss, g = jax.value_and_grad(loss_fn)(p, x, y)
    up, st = tx.update(g, st, p)
    return optax.apply_updates(p, up), st, loss
  return step


def _rms_norm(x, scale):
  return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * (1 + scale)


def _layer_norm(x, scale, bias):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) * jax.lax.rsqrt(var + 1e-6) * scale + bias


def gemma_init(seed, vocab=128, d=32, heads=4, kv_heads=2, head_dim=8, ff=64, layers=2):
  """Gemma-like: tied embedding, q_einsum [N,D,H], stacked kv_einsum [2,K,D,H], gated MLP."""
  rng = np.random.default_rng(seed)
  p = {"embedder": {"input_embedding": _normal(rng, (vocab, d), 0.02)},
       "final_norm": jnp.zeros((d,)), "layers": []}
  for _ in range(layers):
    p["layers"].append({
        "pre_attention_norm": jnp.zeros((d,)), "pre_ffw_norm": jnp.zeros((d,)),
        "attn": {"q_einsum": _normal(rng, (heads, d, head_dim), d ** -0.5),
                 "kv_einsum": _normal(rng, (2, kv_heads, d, head_dim), d ** -0.5),
                 "attn_vec_einsum": _normal(rng, (heads, head_dim, d), (heads * head_dim) ** -0.5)},
        "mlp": {"gate": _normal(rng, (d, ff), d ** -0.5), "up": _normal(rng, (d, ff), d ** -0.5),
                "down": _normal(rng, (ff, d), ff ** -0.5)}})
  return p


def gemma_apply(p, tokens):
  table = p["embedder"]["input_embedding"]
  b, t = tokens.shape
  x = table[tokens] * jnp.sqrt(table.shape[1]).astype(table.dtype)
  causal = jnp.tril(jnp.ones((t, t), bool))
  for lp in p["layers"]:
    a = lp["attn"]
    h = _rms_norm(x, lp["pre_attention_norm"])
    q = jnp.einsum("BTD,NDH->BTNH", h, a["q_einsum"])
    k, v = jnp.einsum("BTD,CKDH->CBTKH", h, a["kv_einsum"])
    n, kh = q.shape[2], k.shape[2]
    qg = q.reshape(b, t, kh, n // kh, q.shape[-1]) * q.shape[-1] ** -0.5
    s = jnp.einsum("BTKGH,BSKH->BTKGS", qg, k)
    s = jnp.where(causal[:, None, None, :], s, -1e9)
    o = jnp.einsum("BTKGS,BSKH->BTKGH", jax.nn.softmax(s, -1), v).reshape(b, t, n, -1)
    x = x + jnp.einsum("BTNH,NHD->BTD", o, a["attn_vec_einsum"])
    h = _rms_norm(x, lp["pre_ffw_norm"])
    m = lp["mlp"]
    x = x + (jax.nn.gelu(h @ m["gate"]) * (h @ m["up"])) @ m["down"]
  x = _rms_norm(x, p["final_norm"])
  return x @ table.T


def lm1b_init(seed, vocab=128, d=32, heads=4, ff=64, layers=2, max_len=16):
  """lm1b-like decoder: shared embedding (logits via attend), learned positions, LayerNorm, MHA."""
  rng = np.random.default_rng(seed)
  hd = d // heads
  p = {"embed": _normal(rng, (vocab, d), 1.0), "pos": _normal(rng, (1, max_len, d), 0.02),
       "ln_f": {"scale": jnp.ones((d,)), "bias": jnp.zeros((d,))}, "blocks": []}
  for _ in range(layers):
    p["blocks"].append({
        "ln1": {"scale": jnp.ones((d,)), "bias": jnp.zeros((d,))},
        "ln2": {"scale": jnp.ones((d,)), "bias": jnp.zeros((d,))},
        # no key bias: it shifts every score of a query row equally, so its gradient is 0 in exact
        # arithmetic and Adam would turn float noise into +-lr updates (incomparable across shardings)
        "attn": {w: {"kernel": _normal(rng, (d, heads, hd), d ** -0.5)} for w in ("query", "key", "value")}
        | {"out": {"kernel": _normal(rng, (heads, hd, d), d ** -0.5), "bias": jnp.zeros((d,))}},
        "mlp": {"w1": _normal(rng, (d, ff), d ** -0.5), "b1": jnp.zeros((ff,)),
                "w2": _normal(rng, (ff, d), ff ** -0.5), "b2": jnp.zeros((d,))}})
  return p


def lm1b_apply(p, tokens):
  b, t = tokens.shape
  shifted = jnp.pad(tokens, ((0, 0), (1, 0)))[:, :-1]
  x = p["embed"][shifted] + p["pos"][:, :t]
  causal = jnp.tril(jnp.ones((t, t), bool))
  for blk in p["blocks"]:
    h = _layer_norm(x, blk["ln1"]["scale"], blk["ln1"]["bias"])
    a = blk["attn"]
    q, k, v = (jnp.einsum("btd,dnh->btnh", h, a[w]["kernel"]) for w in ("query", "key", "value"))
    s = jnp.einsum("bqnh,bknh->bnqk", q, k) / np.sqrt(q.shape[-1])
    s = jnp.where(causal, s, -1e9)
    o = jnp.einsum("bnqk,bknh->bqnh", jax.nn.softmax(s, -1), v)
    x = x + jnp.einsum("btnh,nhd->btd", o, a["out"]["kernel"]) + a["out"]["bias"]
    h = _layer_norm(x, blk["ln2"]["scale"], blk["ln2"]["bias"])
    m = blk["mlp"]
    x = x + jax.nn.relu(h @ m["w1"] + m["b1"]) @ m["w2"] + m["b2"]
  x = _layer_norm(x, p["ln_f"]["scale"], p["ln_f"]["bias"])
  return x @ p["embed"].T


def vit_init(seed, image=16, patch=4, channels=3, d=32, heads=4, ff=64, layers=2, classes=10):
  rng = np.random.default_rng(seed)
  n = (image // patch) ** 2
  p = {"patch": {"kernel": _normal(rng, (patch, patch, channels, d), (patch * patch * channels) ** -0.5),
                 "bias": jnp.zeros((d,))},
       "cls": jnp.zeros((1, 1, d)), "pos": _normal(rng, (1, n + 1, d), 0.02),
       "ln_f": {"scale": jnp.ones((d,)), "bias": jnp.zeros((d,))},
       "head": {"kernel": _normal(rng, (d, classes), d ** -0.5), "bias": jnp.zeros((classes,))},
       "blocks": []}
  for _ in range(layers):
    p["blocks"].append({
        "ln1": {"scale": jnp.ones((d,)), "bias": jnp.zeros((d,))},
        "ln2": {"scale": jnp.ones((d,)), "bias": jnp.zeros((d,))},
        "qkv": _normal(rng, (d, 3 * d), d ** -0.5), "proj": _normal(rng, (d, d), d ** -0.5),
        "fc1": _normal(rng, (d, ff), d ** -0.5), "fc2": _normal(rng, (ff, d), ff ** -0.5)})
  p["heads"] = heads
  return p


def vit_apply(p, images, heads):
  ph = p["patch"]["kernel"].shape[0]
  x = jax.lax.conv_general_dilated(images, p["patch"]["kernel"], (ph, ph), "VALID",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC")) + p["patch"]["bias"]
  b = x.shape[0]
  x = x.reshape(b, -1, x.shape[-1])
  x = jnp.concatenate([jnp.broadcast_to(p["cls"], (b, 1, x.shape[-1])), x], axis=1) + p["pos"]
  t, d = x.shape[1], x.shape[2]
  for blk in p["blocks"]:
    h = _layer_norm(x, blk["ln1"]["scale"], blk["ln1"]["bias"])
    q, k, v = jnp.split((h @ blk["qkv"]).reshape(b, t, 3 * heads, d // heads), 3, axis=2)
    s = jnp.einsum("bqnh,bknh->bnqk", q, k) / np.sqrt(d // heads)
    o = jnp.einsum("bnqk,bknh->bqnh", jax.nn.softmax(s, -1), v).reshape(b, t, d)
    x = x + o @ blk["proj"]
    h = _layer_norm(x, blk["ln2"]["scale"], blk["ln2"]["bias"])
    x = x + jax.nn.gelu(h @ blk["fc1"]) @ blk["fc2"]
  x = _layer_norm(x[:, 0], p["ln_f"]["scale"], p["ln_f"]["bias"])
  return x @ p["head"]["kernel"] + p["head"]["bias"]


def resnet_init(seed, channels=(8, 16), classes=10, in_ch=3):
  """A small pre-activation-free ResNet: stem conv, per stage one residual block of two convs."""
  rng = np.random.default_rng(seed)
  conv = lambda i, o: _normal(rng, (3, 3, i, o), (9 * i) ** -0.5)
  p = {"stem": conv(in_ch, channels[0]), "stem_bn": {"scale": jnp.ones((channels[0],)),
                                                     "bias": jnp.zeros((channels[0],))}, "stages": []}
  c_in = channels[0]
  for c in channels:
    st = {"conv1": conv(c_in, c), "bn1": {"scale": jnp.ones((c,)), "bias": jnp.zeros((c,))},
          "conv2": conv(c, c), "bn2": {"scale": jnp.ones((c,)), "bias": jnp.zeros((c,))}}
    if c != c_in:
      st["proj"] = _normal(rng, (1, 1, c_in, c), c_in ** -0.5)
    p["stages"].append(st)
    c_in = c
  p["head"] = {"kernel": _normal(rng, (c_in, classes), c_in ** -0.5), "bias": jnp.zeros((classes,))}
  return p


def _conv(x, w, stride=1):
  return jax.lax.conv_general_dilated(x, w, (stride, stride), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _batch_norm(x, bn):
  mu = x.mean((0, 1, 2))
  var = ((x - mu) ** 2).mean((0, 1, 2))
  return (x - mu) * jax.lax.rsqrt(var + 1e-5) * bn["scale"] + bn["bias"]


def resnet_apply(p, images):
  x = jax.nn.relu(_batch_norm(_conv(images, p["stem"]), p["stem_bn"]))
  for i, st in enumerate(p["stages"]):
    stride = 1 if i == 0 else 2
    y = jax.nn.relu(_batch_norm(_conv(x, st["conv1"], stride), st["bn1"]))
    y = _batch_norm(_conv(y, st["conv2"]), st["bn2"])
    sc = _conv(x, st["proj"], stride) if "proj" in st else x
    x = jax.nn.relu(y + sc)
  return x.mean((1, 2)) @ p["head"]["kernel"] + p["head"]["bias"]


def _lm_loss(apply):
  def loss(p, tokens, targets):
    return optax.softmax_cross_entropy_with_integer_labels(apply(p, tokens), targets).mean()
  return loss


def _tokens(seed, batch, seq, vocab):
  rng = np.random.default_rng(seed)
  toks = jnp.asarray(rng.integers(0, vocab, (batch, seq)), jnp.int32)
  return toks, jnp.roll(toks, -1, axis=1)


def gemma_case(seed=0, batch=8, seq=16, **kw):
  p = gemma_init(seed, **kw)
  tx = optax.adamw(1e-3, weight_decay=0.1)
  x, y = _tokens(seed + 1, batch, seq, p["embedder"]["input_embedding"].shape[0])
  return _train_step(_lm_loss(gemma_apply), tx), (p, tx.init(p), x, y)


def lm1b_case(seed=0, batch=8, seq=16, **kw):
  p = lm1b_init(seed, max_len=seq, **kw)
  tx = optax.adamw(1e-3, weight_decay=0.1)
  x, y = _tokens(seed + 1, batch, seq, p["embed"].shape[0])
  return _train_step(_lm_loss(lm1b_apply), tx), (p, tx.init(p), x, y)


def vit_case(seed=0, batch=8, image=16, **kw):
  p = vit_init(seed, image=image, **kw)
  heads = p.pop("heads")
  tx = optax.adamw(1e-3, weight_decay=0.1)
  rng = np.random.default_rng(seed + 1)
  x = jnp.asarray(rng.standard_normal((batch, image, image, 3)), jnp.float32)
  y = jnp.asarray(rng.integers(0, p["head"]["bias"].shape[0], (batch,)), jnp.int32)

  def loss(p, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(vit_apply(p, x, heads), y).mean()
  return _train_step(loss, tx), (p, tx.init(p), x, y)


def resnet_case(seed=0, batch=8, image=8, **kw):
  p = resnet_init(seed, **kw)
  tx = optax.adamw(1e-3, weight_decay=0.1)
  rng = np.random.default_rng(seed + 1)
  x = jnp.asarray(rng.standard_normal((batch, image, image, 3)), jnp.float32)
  y = jnp.asarray(rng.integers(0, p["head"]["bias"].shape[0], (batch,)), jnp.int32)

  def loss(p, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(resnet_apply(p, x), y).mean()
  return _train_step(loss, tx), (p, tx.init(p), x, y)


CASES = {"gemma": gemma_case, "lm1b": lm1b_case, "vit": vit_case, "resnet": resnet_case}


def scanned_lm_case(seed=0, batch=8, seq=8, vocab=64, d=32, heads=4, ff=64, layers=2):
  """A decoder whose layers are stacked on a leading axis and run with ``jax.lax.scan``
  (every weight is ``[layers, ...]``), with an optax.adamw train step."""
  rng = np.random.default_rng(seed)
  hd = d // heads
  p = {"embed": _normal(rng, (vocab, d), 0.02), "ln_f": jnp.zeros((d,)),
       "layers": {"ln1": jnp.zeros((layers, d)), "ln2": jnp.zeros((layers, d)),
                  "wq": _normal(rng, (layers, d, heads, hd), d ** -0.5),
                  "wk": _normal(rng, (layers, d, heads, hd), d ** -0.5),
                  "wv": _normal(rng, (layers, d, heads, hd), d ** -0.5),
                  "wo": _normal(rng, (layers, heads, hd, d), d ** -0.5),
                  "w1": _normal(rng, (layers, d, ff), d ** -0.5),
                  "w2": _normal(rng, (layers, ff, d), ff ** -0.5)}}

  def apply(p, tokens):
    t = tokens.shape[1]
    causal = jnp.tril(jnp.ones((t, t), bool))

    def layer(x, lp):
      h = _rms_norm(x, lp["ln1"])
      q, k, v = (jnp.einsum("btd,dnh->btnh", h, lp[w]) for w in ("wq", "wk", "wv"))
      s = jnp.where(causal, jnp.einsum("bqnh,bknh->bnqk", q, k) * hd ** -0.5, -1e9)
      o = jnp.einsum("bnqk,bknh->bqnh", jax.nn.softmax(s, -1), v)
      x = x + jnp.einsum("btnh,nhd->btd", o, lp["wo"])
      h = _rms_norm(x, lp["ln2"])
      return x + jax.nn.gelu(h @ lp["w1"]) @ lp["w2"], None

    x, _ = jax.lax.scan(layer, p["embed"][tokens], p["layers"])
    return _rms_norm(x, p["ln_f"]) @ p["embed"].T

  tx = optax.adamw(1e-3, weight_decay=0.1)
  x, y = _tokens(seed + 1, batch, seq, vocab)
  return _train_step(_lm_loss(apply), tx), (p, tx.init(p), x, y)


CASES["scanned_lm"] = scanned_lm_case
