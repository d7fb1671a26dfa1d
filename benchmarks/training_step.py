"""Benchmark: ``lj.adaptive_jit`` on whole training steps vs ``jax.jit`` (compiled figures first).

Each model is a small stand-in written for this benchmark after Flax's example files: an lm1b-like
decoder (``examples/lm1b/models.py``: sinusoidal positions, padding mask combined with the causal
mask, pre-LN blocks with a relu MLP, lm1b's weighted ``common_utils.onehot`` cross-entropy), a
Gemma-like decoder (``examples/gemma``: ``1 + scale`` RMSNorm, grouped-query einsum attention with
logits reshaped to ``[B,T,N,S]``, gelu-gated feed-forward, tied-embedding logits, Gemma's one-hot
cross-entropy with padding weights) and a ViT-like encoder, trained as users write it:
``loss -> jax.value_and_grad -> optax.adamw`` in one function; plus both decoders at a 32k
vocabulary and sequence 128, where the cross-entropy dominates.
Reported per model and sequence length: the routes adaptive_jit applied, XLA's compiled temp bytes
and FLOPs (ours / jax.jit's), and the median step time of interleaved repeats.

Run ``python -m benchmarks.training_step --small`` (CPU). Writes
``benchmarks/results/training_step_<device-kind>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import lepton_jax as lj  # noqa: E402
from lepton_jax.jaxpr._compiled import read_compiled  # noqa: E402


def _sinusoid(length, d):
  """Fixed sinusoidal position table ``[1, length, d]`` (lm1b's default, not learned)."""
  pos = np.arange(length)[:, None]
  freq = np.exp(-np.log(10000.0) * np.arange(0, d, 2) / d)
  table = np.zeros((length, d), np.float32)
  table[:, 0::2], table[:, 1::2] = np.sin(pos * freq), np.cos(pos * freq)
  return jnp.asarray(table[None])


class _LmBlock(nnx.Module):
  """lm1b's decoder block: LayerNorm -> self-attention (no qkv bias) -> residual; LayerNorm ->
  Dense -> relu -> Dense -> residual (dropout off)."""

  def __init__(self, d, heads, mlp, rngs, act=jax.nn.relu):
    self.ln1 = nnx.LayerNorm(d, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(num_heads=heads, in_features=d, qkv_features=d,
                                       use_bias=False, decode=False, rngs=rngs)
    self.ln2 = nnx.LayerNorm(d, rngs=rngs)
    self.up = nnx.Linear(d, mlp, rngs=rngs)
    self.down = nnx.Linear(mlp, d, rngs=rngs)
    self.act = act

  def __call__(self, x, mask):
    h = self.ln1(x)
    x = x + self.attn(h, h, mask=mask)
    return x + self.down(self.act(self.up(self.ln2(x))))


class Lm1bLike(nnx.Module):
  """Flax ``examples/lm1b``'s TransformerLM, small: token embedding + fixed sinusoidal positions,
  a padding mask combined with the causal mask, pre-LN blocks, final LayerNorm, Dense logits."""

  def __init__(self, vocab=512, d=64, heads=4, layers=2, *, rngs):
    self.emb = nnx.Embed(vocab, d, rngs=rngs)
    self.blocks = nnx.List([_LmBlock(d, heads, 4 * d, rngs) for _ in range(layers)])
    self.ln = nnx.LayerNorm(d, rngs=rngs)
    self.out = nnx.Linear(d, vocab, rngs=rngs)

  def __call__(self, tok):
    x = self.emb(tok) + _sinusoid(tok.shape[1], self.emb.features)
    mask = nnx.combine_masks(nnx.make_attention_mask(tok > 0, tok > 0),
                             nnx.make_causal_mask(tok))
    for b in self.blocks:
      x = b(x, mask)
    return self.out(self.ln(x))


def _lm1b_loss(model, tok):
  """lm1b's weighted cross-entropy: ``common_utils.onehot`` targets, padding (id 0) weighted out."""
  inputs, targets = tok[:, :-1], tok[:, 1:]
  logits = model(inputs)
  hit = targets[..., None] == jnp.arange(logits.shape[-1]).reshape(1, 1, -1)
  soft = jax.lax.select(hit, jnp.full(hit.shape, 1.0), jnp.full(hit.shape, 0.0)).astype(jnp.float32)
  loss = -jnp.sum(soft * jax.nn.log_softmax(logits), axis=-1)
  weights = (targets > 0).astype(jnp.float32)
  return jnp.sum(loss * weights) / jnp.sum(weights)


class _GemmaRMSNorm(nnx.Module):
  """Gemma's RMSNorm: float32 statistics, zero-initialised scale applied as ``1 + scale``."""

  def __init__(self, d, rngs):
    self.scale = nnx.Param(jnp.zeros((d,)))

  def __call__(self, x):
    x = jnp.asarray(x, jnp.float32)
    normed = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + 1e-6)
    return normed * (1.0 + self.scale[...])


class _GqaAttention(nnx.Module):
  """Gemma's attention: ``q`` / ``kv`` einsum projections, queries scaled before the logits,
  grouped-query logits reshaped to ``[B,T,N,S]`` around the masked softmax."""

  def __init__(self, d, heads, kv_heads, head_dim, rngs):
    init = nnx.initializers.normal(0.05)
    self.q = nnx.Param(init(rngs.params(), (heads, d, head_dim)))
    self.kv = nnx.Param(init(rngs.params(), (2, kv_heads, d, head_dim)))
    self.o = nnx.Param(init(rngs.params(), (heads, head_dim, d)))
    self.kv_heads = kv_heads

  def __call__(self, x, mask):
    q = jnp.einsum("BTD,NDH->BTNH", x, self.q[...]) * self.q.shape[-1] ** -0.5
    k, v = jnp.einsum("BTD,CKDH->CBTKH", x, self.kv[...])
    b, t, n, h = q.shape
    g = n // self.kv_heads
    logits = jnp.einsum("BTKGH,BSKH->BTKGS", q.reshape(b, t, self.kv_heads, g, h), k)
    logits = logits.reshape(b, t, n, -1)                      # Gemma's [B,T,N,S]
    probs = jax.nn.softmax(jnp.where(mask[:, :, None, :], logits, -2.3819763e38), axis=-1)
    enc = jnp.einsum("BTKGS,BSKH->BTKGH", probs.reshape(b, t, self.kv_heads, g, -1), v)
    return jnp.einsum("BTNH,NHD->BTD", enc.reshape(b, t, n, h), self.o[...])


class GemmaLike(nnx.Module):
  """Flax ``examples/gemma``'s Transformer, small: scaled embedding, pre-norm blocks with Gemma's
  RMSNorm, grouped-query attention, a gelu-gated feed-forward, final norm, logits through the
  tied embedding."""

  def __init__(self, vocab=512, d=64, layers=2, *, rngs):
    self.emb = nnx.Embed(vocab, d, rngs=rngs)
    self.norms = nnx.List([_GemmaRMSNorm(d, rngs) for _ in range(2 * layers + 1)])
    self.attn = nnx.List([_GqaAttention(d, 4, 2, 16, rngs) for _ in range(layers)])
    self.gate = nnx.List([nnx.Linear(d, 2 * d, use_bias=False, rngs=rngs) for _ in range(layers)])
    self.up = nnx.List([nnx.Linear(d, 2 * d, use_bias=False, rngs=rngs) for _ in range(layers)])
    self.down = nnx.List([nnx.Linear(2 * d, d, use_bias=False, rngs=rngs) for _ in range(layers)])

  def __call__(self, tok):
    x = self.emb(tok) * jnp.sqrt(float(self.emb.features))
    t = tok.shape[1]
    mask = jnp.tril(jnp.ones((t, t), bool))[None] & (tok > 0)[:, None, :]   # causal + padding
    for i in range(len(self.attn)):
      x = x + self.attn[i](self.norms[2 * i](x), mask)
      h = self.norms[2 * i + 1](x)
      x = x + self.down[i](jax.nn.gelu(self.gate[i](h)) * self.up[i](h))
    return self.norms[-1](x) @ self.emb.embedding[...].T


def _gemma_loss(model, tok):
  """Gemma's train loop: ``-sum(one_hot * log_softmax)`` per token, padding weighted out."""
  inputs, targets = tok[:, :-1], tok[:, 1:]
  logits = model(inputs)
  loss = -jnp.sum(jax.nn.one_hot(targets, logits.shape[-1]) * jax.nn.log_softmax(logits), axis=-1)
  weights = (targets != 0).astype(jnp.float32)
  return jnp.sum(loss * weights) / jnp.sum(weights)


class VitLike(nnx.Module):
  def __init__(self, patch=4, d=64, heads=4, layers=2, classes=10, *, rngs):
    self.patch = patch
    self.embed = nnx.Linear(patch * patch * 3, d, rngs=rngs)
    self.blocks = nnx.List([_LmBlock(d, heads, 4 * d, rngs, act=jax.nn.gelu)
                            for _ in range(layers)])
    self.head = nnx.Linear(d, classes, rngs=rngs)

  def __call__(self, img):
    b, hgt, wid, c = img.shape
    p = self.patch
    x = img.reshape(b, hgt // p, p, wid // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    x = self.embed(x.reshape(b, -1, p * p * c))
    for blk in self.blocks:
      x = blk(x, None)
    return self.head(x.mean(1))


def _vit_loss(model, batch):
  img, lab = batch
  return optax.softmax_cross_entropy_with_integer_labels(model(img), lab).mean()


def _tokens(seq, vocab):
  """Token ids in [1, vocab) with the last quarter of the second row padded (id 0)."""
  tok = jax.random.randint(jax.random.key(1), (2, seq + 1), 1, vocab)
  return tok.at[1, (3 * (seq + 1)) // 4:].set(0)


def _case(name, seq, vocab=512):
  rngs = nnx.Rngs(0)
  if name == "lm1b_like":
    model, loss = Lm1bLike(vocab=vocab, rngs=rngs), _lm1b_loss
    data = _tokens(seq, vocab)
  elif name == "gemma_like":
    model, loss = GemmaLike(vocab=vocab, rngs=rngs), _gemma_loss
    data = _tokens(seq, vocab)
  else:
    side = int(round((seq ** 0.5))) * 4
    model, loss = VitLike(rngs=rngs), _vit_loss
    data = (jax.random.normal(jax.random.key(1), (2, side, side, 3)),
            jax.random.randint(jax.random.key(2), (2,), 0, 10))
  graphdef, params = nnx.split(model, nnx.Param)
  tx = optax.adamw(1e-3)
  opt_state = tx.init(params)

  def step(p, s, batch):
    l, g = jax.value_and_grad(lambda p: loss(nnx.merge(graphdef, p), batch))(p)
    updates, s = tx.update(g, s, p)
    return optax.apply_updates(p, updates), s, l
  return step, (params, opt_state, data)


def _figures(compiled):
  fig = read_compiled(compiled)
  return fig.temp_bytes, fig.flops


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--small", action="store_true", help="CPU sizes (seq 256 and 1024), few repeats")
  ap.add_argument("--out", default=None)
  ap.add_argument("--only", default="", help="comma-separated model names")
  args = ap.parse_args(argv)
  seqs = (256, 1024) if args.small else (1024, 4096)
  reps = 3 if args.small else 10
  kernels = "auto"
  rows = []
  cases = [(name, seq, 512) for name in ("lm1b_like", "gemma_like", "vit_like") for seq in seqs]
  cases += [(name, 128, 32000) for name in ("lm1b_like", "gemma_like")]   # large vocabulary
  if args.only:
    cases = [c for c in cases if c[0] in args.only.split(",")]
  for name, seq, vocab in cases:
    step, a = _case(name, seq, vocab)
    plain = jax.jit(step)
    ours = lj.adaptive_jit(step, kernels=kernels)
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      t0 = time.perf_counter()
      rep = ours.explain(*a)
      explain_s = time.perf_counter() - t0
      c_ours, c_plain = ours.lower(*a).compile(), plain.lower(*a).compile()
    (t_o, f_o), (t_p, f_p) = _figures(c_ours), _figures(c_plain)
    times = {"ours": [], "plain": []}
    jax.block_until_ready(c_ours(*a))
    jax.block_until_ready(c_plain(*a))
    for _ in range(reps):   # interleaved
      for key, fn in (("plain", c_plain), ("ours", c_ours)):
        t = time.perf_counter()
        jax.block_until_ready(fn(*a))
        times[key].append(time.perf_counter() - t)
    routes = sorted({r.pattern for r in rep.rewrites if r.pass_name == "route_kernels"})
    row = {"model": name, "seq": seq, "vocab": vocab if name != "vit_like" else None,
           "routes": routes, "kept_original": sorted(
               {r.pattern for r in rep.rewrites if r.pass_name == "route_check"}),
           "temp_bytes_plain": t_p, "temp_bytes_ours": t_o, "temp_ratio": t_o / t_p if t_p else 1.0,
           "flops_plain": f_p, "flops_ours": f_o, "flops_ratio": f_o / f_p if f_p else 1.0,
           "time_plain_s": statistics.median(times["plain"]),
           "time_ours_s": statistics.median(times["ours"]),
           "time_ratio": statistics.median(times["ours"]) / statistics.median(times["plain"]),
           "explain_seconds": explain_s}
    rows.append(row)
    print(f"{name:11s} seq {seq:5d} vocab {vocab:6d}  temp {t_p / 2**20:8.1f} -> {t_o / 2**20:8.1f} MiB "
          f"({row['temp_ratio']:.3f}x)  flops {row['flops_ratio']:.3f}x  "
          f"time {row['time_ratio']:.2f}x  routes {','.join(routes) or '-'}", flush=True)
  dev = jax.devices()[0]
  out = {"benchmark": "training_step", "device": f"{dev.platform}:{dev.device_kind}",
         "jax_version": jax.__version__, "date": datetime.date.today().isoformat(),
         "kernels": kernels, "rows": rows,
         "note": ("compiled temp/FLOPs from XLA memory_analysis/cost_analysis of the whole step "
                  "(value_and_grad + optax.adamw); time: median of interleaved repeats")}
  path = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                  f"training_step_{dev.platform}.json")
  with open(path, "w") as f:
    json.dump(out, f, indent=1)
  print("wrote", path)


if __name__ == "__main__":
  main()
