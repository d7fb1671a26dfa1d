"""Benchmark: ``lj.adaptive_jit`` on whole training steps vs ``jax.jit`` (compiled figures first).

Each model is a small stand-in written for this benchmark in the style of Flax's examples (an
lm1b-like causal decoder on ``nnx.MultiHeadAttention``, a Gemma-like decoder with grouped-query
einsum attention -- Gemma's own spelling, logits reshaped to ``[B,T,N,S]`` --, a ViT-like encoder),
trained as users write it: ``loss -> jax.value_and_grad -> optax.adamw`` in one function.
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
import optax
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import lepton_jax as lj  # noqa: E402


class _LmBlock(nnx.Module):
  def __init__(self, d, heads, rngs):
    self.ln1 = nnx.LayerNorm(d, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(num_heads=heads, in_features=d, qkv_features=d,
                                       decode=False, rngs=rngs)
    self.ln2 = nnx.LayerNorm(d, rngs=rngs)
    self.up = nnx.Linear(d, 4 * d, rngs=rngs)
    self.down = nnx.Linear(4 * d, d, rngs=rngs)

  def __call__(self, x, mask):
    h = self.ln1(x)
    x = x + self.attn(h, h, mask=mask)
    return x + self.down(jax.nn.gelu(self.up(self.ln2(x))))


class Lm1bLike(nnx.Module):
  def __init__(self, vocab=512, d=64, heads=4, layers=2, *, rngs):
    self.emb = nnx.Embed(vocab, d, rngs=rngs)
    self.blocks = nnx.List([_LmBlock(d, heads, rngs) for _ in range(layers)])
    self.ln = nnx.LayerNorm(d, rngs=rngs)
    self.out = nnx.Linear(d, vocab, rngs=rngs)

  def __call__(self, tok):
    x = self.emb(tok)
    mask = nnx.make_causal_mask(tok)
    for b in self.blocks:
      x = b(x, mask)
    return self.out(self.ln(x))


class _GqaAttention(nnx.Module):
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
  def __init__(self, vocab=512, d=64, layers=2, *, rngs):
    self.emb = nnx.Embed(vocab, d, rngs=rngs)
    self.norms = nnx.List([nnx.RMSNorm(d, rngs=rngs) for _ in range(2 * layers)])
    self.attn = nnx.List([_GqaAttention(d, 4, 2, 16, rngs) for _ in range(layers)])
    self.gate = nnx.List([nnx.Linear(d, 2 * d, use_bias=False, rngs=rngs) for _ in range(layers)])
    self.up = nnx.List([nnx.Linear(d, 2 * d, use_bias=False, rngs=rngs) for _ in range(layers)])
    self.down = nnx.List([nnx.Linear(2 * d, d, use_bias=False, rngs=rngs) for _ in range(layers)])

  def __call__(self, tok):
    x = self.emb(tok)
    t = tok.shape[1]
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (tok.shape[0], t, t))
    for i in range(len(self.attn)):
      x = x + self.attn[i](self.norms[2 * i](x), mask)
      h = self.norms[2 * i + 1](x)
      x = x + self.down[i](jax.nn.gelu(self.gate[i](h)) * self.up[i](h))
    return x @ self.emb.embedding[...].T


class VitLike(nnx.Module):
  def __init__(self, patch=4, d=64, heads=4, layers=2, classes=10, *, rngs):
    self.patch = patch
    self.embed = nnx.Linear(patch * patch * 3, d, rngs=rngs)
    self.blocks = nnx.List([_LmBlock(d, heads, rngs) for _ in range(layers)])
    self.head = nnx.Linear(d, classes, rngs=rngs)

  def __call__(self, img):
    b, hgt, wid, c = img.shape
    p = self.patch
    x = img.reshape(b, hgt // p, p, wid // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    x = self.embed(x.reshape(b, -1, p * p * c))
    for blk in self.blocks:
      x = blk(x, None)
    return self.head(x.mean(1))


def _lm_loss(model, tok):
  logits = model(tok[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, tok[:, 1:]).mean()


def _vit_loss(model, batch):
  img, lab = batch
  return optax.softmax_cross_entropy_with_integer_labels(model(img), lab).mean()


def _case(name, seq, small):
  rngs = nnx.Rngs(0)
  if name == "lm1b_like":
    model, loss = Lm1bLike(rngs=rngs), _lm_loss
    data = jax.random.randint(jax.random.key(1), (2, seq + 1), 0, 512)
  elif name == "gemma_like":
    model, loss = GemmaLike(rngs=rngs), _lm_loss
    data = jax.random.randint(jax.random.key(1), (2, seq + 1), 0, 512)
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
  mem = compiled.memory_analysis()
  ca = compiled.cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  return int(mem.temp_size_in_bytes), float((ca or {}).get("flops", 0.0))


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--small", action="store_true", help="CPU sizes (seq 256 and 1024), few repeats")
  ap.add_argument("--out", default=None)
  args = ap.parse_args(argv)
  seqs = (256, 1024) if args.small else (1024, 4096)
  reps = 3 if args.small else 10
  kernels = "auto"
  rows = []
  for name in ("lm1b_like", "gemma_like", "vit_like"):
    for seq in seqs:
      step, a = _case(name, seq, args.small)
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
      row = {"model": name, "seq": seq, "routes": routes,
             "temp_bytes_plain": t_p, "temp_bytes_ours": t_o, "temp_ratio": t_o / t_p if t_p else 1.0,
             "flops_plain": f_p, "flops_ours": f_o, "flops_ratio": f_o / f_p if f_p else 1.0,
             "time_plain_s": statistics.median(times["plain"]),
             "time_ours_s": statistics.median(times["ours"]),
             "time_ratio": statistics.median(times["ours"]) / statistics.median(times["plain"]),
             "explain_seconds": explain_s}
      rows.append(row)
      print(f"{name:11s} seq {seq:5d}  temp {t_p / 2**20:8.1f} -> {t_o / 2**20:8.1f} MiB "
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
