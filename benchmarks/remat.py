"""lj.remat_plan vs plain jax.grad and JAX's checkpoint policies, measured on the compiled program.

For each model and budget: XLA's compiled temp bytes of ``jax.jit(jax.grad(f))``
(``memory_analysis().temp_size_in_bytes``) as a ratio to plain ``jax.grad``'s, the compiled FLOPs
(``cost_analysis()``) as a ratio to plain ``jax.grad``'s (the recompute), planning seconds, and
whether the plan fits its budget. Policy rows: ``jax.checkpoint`` with ``nothing_saveable`` /
``dots_saveable`` around the whole function and around each layer, compiled the same way, with a
dominance check: ``lj.remat_plan`` at each policy's compiled temp bytes must fit and recompute no
more FLOPs.

  python -m benchmarks.remat --small      # CPU-sized models (writes results/remat_<device>.json)
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lepton_jax._errors import BudgetError
from lepton_jax.transforms import remat_plan

BUDGETS = (0.25, 0.5, 0.75, 0.9)
POLICIES = ("nothing_saveable", "dots_saveable")


def _plain(f):
  return f


# ------------------------------------------------------------------ models (wrap: per-layer remat)


def mlp_tower(params, x, wrap=_plain):
  for w, b in params:
    x = wrap(lambda x, w, b: jnp.tanh(x @ w + b))(x, w, b)
  return jnp.mean(x ** 2)


def gelu_tower(params, x, wrap=_plain):
  for w1, w2 in params:
    x = wrap(lambda x, w1, w2: x + jax.nn.gelu(x @ w1) @ w2)(x, w1, w2)
  return jnp.mean(x ** 2)


def _block(x, p):
  b, t, d = x.shape
  h = 4
  y = (x - x.mean(-1, keepdims=True)) * jax.lax.rsqrt(x.var(-1, keepdims=True) + 1e-6)
  q, k, v = (z.reshape(b, t, h, d // h) for z in jnp.split(y @ p["qkv"], 3, axis=-1))
  s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d // h)
  a = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1), v).reshape(b, t, d)
  x = x + a @ p["o"]
  y = (x - x.mean(-1, keepdims=True)) * jax.lax.rsqrt(x.var(-1, keepdims=True) + 1e-6)
  return x + jax.nn.gelu(y @ p["w1"]) @ p["w2"]


def transformer(params, x, wrap=_plain):
  for p in params:
    x = wrap(_block)(x, p)
  return jnp.mean(x ** 2)


def transformer_scanned(params, x, wrap=_plain):
  x, _ = jax.lax.scan(lambda c, p: (wrap(_block)(c, p), None), x, params)
  return jnp.mean(x ** 2)


def cnn(params, x, wrap=_plain):  # ResNet-style residual conv blocks
  conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  for w1, w2 in params:
    x = wrap(lambda x, w1, w2: jax.nn.relu(x + conv(jax.nn.relu(conv(x, w1)), w2)))(x, w1, w2)
  return jnp.mean(x ** 2)


# ------------------------------------------------ Flax NNX language models (lm1b-, Gemma-like)
# Small models written for this benchmark after the structure of Flax's examples/lm1b (pre-norm
# decoder blocks: LayerNorm, multi-head causal attention without biases, ReLU MLP; sinusoidal
# positions; logits through the shared embedding) and examples/gemma (scaled embedding, RMSNorm,
# grouped-query attention with rotary positions and soft-capped logits, gated GELU feed-forward,
# final logit soft-cap). ``remat`` is how a user would checkpoint one block (``nnx.remat``).


def _sinusoid(length, d):
  pos = np.arange(length)[:, None]
  inv = np.exp(-np.log(10000.0) * np.arange(0, d, 2) / d)
  table = np.zeros((length, d), np.float32)
  table[:, 0::2], table[:, 1::2] = np.sin(pos * inv), np.cos(pos * inv)
  return table


class _Lm1bBlock(nnx.Module):
  def __init__(self, d, heads, mlp, rngs):
    self.norm1 = nnx.LayerNorm(d, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(heads, d, use_bias=False, decode=False, rngs=rngs)
    self.norm2 = nnx.LayerNorm(d, rngs=rngs)
    self.up = nnx.Linear(d, mlp, rngs=rngs)
    self.down = nnx.Linear(mlp, d, rngs=rngs)

  def __call__(self, x, mask):
    y = self.norm1(x)
    x = x + self.attn(y, y, y, mask=mask)
    return x + self.down(nnx.relu(self.up(self.norm2(x))))


class Lm1bLike(nnx.Module):
  def __init__(self, rngs, vocab=256, d=64, heads=4, mlp=256, layers=4):
    self.embed = nnx.Embed(vocab, d, rngs=rngs)
    self.blocks = nnx.List([_Lm1bBlock(d, heads, mlp, rngs) for _ in range(layers)])
    self.norm = nnx.LayerNorm(d, rngs=rngs)

  def __call__(self, tokens, remat=_plain):
    t = tokens.shape[1]
    shifted = jnp.pad(tokens, ((0, 0), (1, 0)))[:, :-1]  # predict token i from tokens < i
    x = self.embed(shifted) + _sinusoid(t, x_dim := self.embed.features)[None]  # fixed positions
    mask = nnx.make_causal_mask(tokens)
    for blk in self.blocks:
      x = remat(lambda blk, x, mask: blk(x, mask))(blk, x, mask)
    return self.embed.attend(self.norm(x)) / math.sqrt(x_dim)


def _rms(x, scale):
  return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * (1.0 + scale)


def _rope(x, positions, base=10000.0):
  h = x.shape[-1] // 2
  freq = positions[:, None] / base ** (np.arange(h) / h)
  sin, cos = jnp.sin(freq)[None, :, None, :], jnp.cos(freq)[None, :, None, :]
  a, b = x[..., :h], x[..., h:]
  return jnp.concatenate([a * cos - b * sin, b * cos + a * sin], -1)


class _GemmaBlock(nnx.Module):
  def __init__(self, d, heads, kv_heads, head_dim, ff, rngs):
    init = nnx.initializers.normal(0.05)
    self.heads, self.kv_heads = heads, kv_heads
    self.pre_attn = nnx.Param(jnp.zeros(d))
    self.q = nnx.Param(init(rngs.params(), (heads, d, head_dim)))
    self.kv = nnx.Param(init(rngs.params(), (2, kv_heads, d, head_dim)))
    self.o = nnx.Param(init(rngs.params(), (heads, head_dim, d)))
    self.pre_ff = nnx.Param(jnp.zeros(d))
    self.gate_up = nnx.Param(init(rngs.params(), (2, d, ff)))
    self.down = nnx.Param(init(rngs.params(), (ff, d)))

  def __call__(self, x, mask, positions):
    y = _rms(x, self.pre_attn[...])
    q = _rope(jnp.einsum("btd,ndh->btnh", y, self.q[...]), positions)
    k, v = jnp.einsum("btd,ckdh->cbtkh", y, self.kv[...])
    k = _rope(k, positions)
    b, t, n, hd = q.shape
    g = n // self.kv_heads
    q = q.reshape(b, t, self.kv_heads, g, hd) * hd ** -0.5
    logits = jnp.einsum("btkgh,bskh->btkgs", q, k)
    logits = 50.0 * jnp.tanh(logits / 50.0)  # attention logit soft-cap
    logits = jnp.where(mask[:, :, None, None, :], logits, -2.3819763e38)
    enc = jnp.einsum("btkgs,bskh->btkgh", jax.nn.softmax(logits, -1), v).reshape(b, t, n, hd)
    x = x + jnp.einsum("btnh,nhd->btd", enc, self.o[...])
    y = _rms(x, self.pre_ff[...])
    gate, up = jnp.einsum("btd,cdf->cbtf", y, self.gate_up[...])
    return x + (jax.nn.gelu(gate) * up) @ self.down[...]


class GemmaLike(nnx.Module):
  def __init__(self, rngs, vocab=256, d=64, heads=4, kv_heads=2, head_dim=16, ff=256, layers=4):
    self.embed = nnx.Embed(vocab, d, embedding_init=nnx.initializers.normal(1.0), rngs=rngs)
    self.blocks = nnx.List([_GemmaBlock(d, heads, kv_heads, head_dim, ff, rngs) for _ in range(layers)])
    self.final = nnx.Param(jnp.zeros(d))

  def __call__(self, tokens, remat=_plain):
    t = tokens.shape[1]
    x = self.embed(tokens) * math.sqrt(self.embed.features)
    mask = jnp.tril(jnp.ones((t, t), bool))[None]
    positions = jnp.arange(t, dtype=jnp.float32)
    for blk in self.blocks:
      x = remat(lambda blk, x, mask, pos: blk(x, mask, pos))(blk, x, mask, positions)
    logits = self.embed.attend(_rms(x, self.final[...]))
    return 30.0 * jnp.tanh(logits / 30.0)  # final logit soft-cap


def _nnx_lm(model, tokens):
  """``loss(state, tokens, wrap=...)``: next-token cross-entropy of an NNX LM, differentiated
  w.r.t. its parameters; ``wrap`` checkpoints each block with ``nnx.remat``."""
  gdef, state = nnx.split(model)

  def loss(state, tokens, wrap=_plain):
    m = nnx.merge(gdef, state)
    remat = _plain
    if wrap is not _plain:
      remat = lambda f: nnx.remat(f, policy=wrap.policy)
    logits = m(tokens[:, :-1], remat=remat)
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))
  return loss, (state, tokens)


def models(small: bool):
  rng = np.random.default_rng(0)
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  L, d, bsz = (12, 64, 128) if small else (32, 1024, 256)
  mlp = ([(f32(rng.normal(size=(d, d)) / math.sqrt(d)), jnp.zeros(d)) for _ in range(L)], jnp.ones((bsz, d)))
  gelu = ([(f32(rng.normal(size=(d, 4 * d)) / math.sqrt(d)), f32(rng.normal(size=(4 * d, d)) * 0.5 / math.sqrt(4 * d)))
           for _ in range(L)], f32(rng.normal(size=(bsz, d))))
  tl, td, tt = (4, 32, 32) if small else (12, 512, 512)

  def tp(n, stacked):
    p = {"qkv": rng.normal(size=(n, td, 3 * td)) * 0.05, "o": rng.normal(size=(n, td, td)) * 0.05,
         "w1": rng.normal(size=(n, td, 4 * td)) * 0.05, "w2": rng.normal(size=(n, 4 * td, td)) * 0.02}
    p = jax.tree.map(f32, p)
    return p if stacked else [jax.tree.map(lambda a: a[i], p) for i in range(n)]
  x = f32(rng.normal(size=(2, tt, td)))
  c, hw, nb = (8, 16, 6) if small else (64, 56, 8)
  lm_cfg = dict(vocab=256, d=64, heads=4, mlp=256, layers=4) if small else \
      dict(vocab=32000, d=512, heads=8, mlp=2048, layers=6)
  gemma_cfg = dict(vocab=256, d=64, heads=4, kv_heads=2, head_dim=16, ff=256, layers=4) if small else \
      dict(vocab=32000, d=512, heads=8, kv_heads=4, head_dim=64, ff=2048, layers=6)
  seq = 65 if small else 2049
  tokens = jnp.asarray(rng.integers(0, lm_cfg["vocab"], (4 if small else 8, seq)), jnp.int32)
  conv = ([(f32(rng.normal(size=(3, 3, c, c)) * 0.1), f32(rng.normal(size=(3, 3, c, c)) * 0.1)) for _ in range(nb)],
          f32(rng.normal(size=(4, hw, hw, c))))
  return {
      "mlp_tower": (mlp_tower, mlp),
      "gelu_tower": (gelu_tower, gelu),
      "transformer": (transformer, (tp(tl, False), x)),
      "cnn": (cnn, conv),
      "transformer_scanned": (transformer_scanned, (tp(2 * tl, True), x)),
      "lm1b_like": _nnx_lm(Lm1bLike(nnx.Rngs(0), **lm_cfg), tokens),
      "gemma_like": _nnx_lm(GemmaLike(nnx.Rngs(1), **gemma_cfg), tokens),
  }


# ---------------------------------------------------------------------------- measurement


def compiled(fun, args):
  """(temp bytes, FLOPs) of ``jax.jit(jax.grad(fun))`` compiled with default options."""
  c = jax.jit(jax.grad(fun)).lower(*args).compile()
  cost = c.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return int(c.memory_analysis().temp_size_in_bytes), float(cost.get("flops", 0.0))


def _row(config, temp, flops, base, **extra):
  return {"config": config, "compiled_temp_bytes": temp, "temp_ratio": temp / max(base[0], 1),
          "compiled_flops": flops, "flops_ratio": flops / max(base[1], 1.0), **extra}


def _checkpoint_with(policy):
  """``wrap``: ``jax.checkpoint(f, policy=policy)`` around one layer (NNX models: ``nnx.remat``)."""
  wrap = lambda f: jax.checkpoint(f, policy=policy)
  wrap.policy = policy
  return wrap


def run_model(name, fun, args, budgets=BUDGETS):
  base = compiled(fun, args)
  rows = [_row("plain jax.grad", *base, base)]
  for pol in POLICIES:
    p = getattr(jax.checkpoint_policies, pol)
    rows.append(_row(f"jax.checkpoint({pol}) whole", *compiled(jax.checkpoint(fun, policy=p), args), base,
                     policy=pol))
    per_layer = lambda *a, p=p: fun(*a, wrap=_checkpoint_with(p))
    rows.append(_row(f"jax.checkpoint({pol}) per layer", *compiled(per_layer, args), base, policy=pol))
  targets = [(f"lj.remat_plan({b})", b) for b in budgets]
  # dominance: at each policy's compiled temp (when below plain's), fit and recompute no more
  targets += [(f"lj.remat_plan(at {r['config']})", r["compiled_temp_bytes"]) for r in rows[1:]
              if r["compiled_temp_bytes"] < base[0]]
  for label, budget in targets:
    f = remat_plan(fun, budget=budget)
    t0, c0 = time.perf_counter(), time.process_time()
    try:
      plan = f.plan(*args)
    except BudgetError as e:
      rows.append({"config": label, "budget": budget, "infeasible": True,
                   "smallest_feasible_bytes": e.smallest_feasible_bytes,
                   "smallest_feasible_ratio": e.smallest_feasible_bytes / base[0],
                   "planning_s": time.perf_counter() - t0, "planning_cpu_s": time.process_time() - c0})
      continue
    plan_s, plan_cpu = time.perf_counter() - t0, time.process_time() - c0
    temp, flops = compiled(f, args)  # independent of the plan object
    row = _row(label, temp, flops, base, budget=budget, budget_bytes=plan.budget_bytes,
               within_budget=temp <= plan.budget_bytes, matches_plan=temp == plan.compiled_bytes,
               planning_s=plan_s, planning_cpu_s=plan_cpu, solver=plan.solver, form=plan.form,
               segments=plan.num_segments, depth=plan.depth, candidates=len(plan.candidates),
               model_peak_bytes=plan.peak_bytes, recompute_flops=plan.recompute_flops)
    if isinstance(budget, int):
      pol_row = next(r for r in rows if label.endswith(f"at {r['config']})"))
      row["dominates"] = bool(temp <= pol_row["compiled_temp_bytes"]
                              and flops <= pol_row["compiled_flops"] * (1 + 1e-9) + 1.0)
    rows.append(row)
  fr = [r for r in rows if isinstance(r.get("budget"), float) and not r.get("infeasible")]
  monotone = all(a["compiled_flops"] >= b["compiled_flops"] - 1.0 for a, b in zip(fr, fr[1:]))
  # a JAX policy that fits a plan's budget must not recompute less than the plan
  pol_rows = [r for r in rows if "policy" in r]
  dominated = [[r["config"], q["config"]] for r in rows if "within_budget" in r for q in pol_rows
               if q["compiled_temp_bytes"] <= r["budget_bytes"] and q["compiled_flops"] < r["compiled_flops"] - 1.0]
  # planning time: the first budget pays for the program's candidate set (compiled once per program
  # structure, in this process), later budgets and wrappers select from it
  timed = [r for r in rows if "planning_s" in r]
  first = timed[0] if timed else {}
  later = timed[1:]
  return {"model": name, "platform": jax.default_backend(), "plain_temp_bytes": base[0],
          "plain_flops": base[1], "monotone_in_budget": monotone, "dominated_by_policy": dominated,
          "first_plan_s": first.get("planning_s"), "first_plan_cpu_s": first.get("planning_cpu_s"),
          "later_plan_s_max": max((r["planning_s"] for r in later), default=None),
          "later_plan_cpu_s_max": max((r["planning_cpu_s"] for r in later), default=None),
          "rows": rows}


def print_model(res):
  print(f"\n{res['model']}  (plain jax.grad: {res['plain_temp_bytes']} B temp, {res['plain_flops']:.3g} FLOPs; "
        f"monotone in budget: {res['monotone_in_budget']}; dominated by a policy: "
        f"{res['dominated_by_policy'] or 'never'}; first plan {res['first_plan_s'] or 0:.1f} s "
        f"({res['first_plan_cpu_s'] or 0:.1f} CPU-s), later budgets <= {res['later_plan_s_max'] or 0:.2f} s)")
  print(f"  {'config':<58}{'temp/plain':>11}{'FLOPs/plain':>12}{'plan s':>8}  check")
  for r in res["rows"]:
    if r.get("infeasible"):
      print(f"  {r['config']:<58}  BudgetError: smallest {r['smallest_feasible_ratio']:.3f}x plain"
            f"{r['planning_s']:>8.1f}")
      continue
    check = ""
    if "within_budget" in r:
      check = "fits" if r["within_budget"] and r["matches_plan"] else "OVER BUDGET"
    if "dominates" in r:
      check += " dominates" if r["dominates"] else " DOMINATED"
    ps = f"{r['planning_s']:>8.1f}" if "planning_s" in r else " " * 8
    print(f"  {r['config']:<58}{r['temp_ratio']:>11.3f}{r['flops_ratio']:>12.3f}{ps}  {check}")


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument("--small", action="store_true", help="CPU-sized models")
  ap.add_argument("--models", default="", help="comma-separated subset")
  a = ap.parse_args(argv)
  results = []
  for name, (fun, args) in models(a.small).items():
    if a.models and name not in a.models.split(","):
      continue
    res = run_model(name, fun, args)
    print_model(res)
    results.append(res)
  dev = jax.devices()[0]
  kind = dev.device_kind.lower().replace(" ", "_")
  out = {"benchmark": "remat", "measure": "XLA memory_analysis temp bytes / cost_analysis FLOPs of jax.jit(jax.grad(f))",
         "device": str(dev), "device_kind": dev.device_kind, "backend": jax.default_backend(),
         "jax_version": jax.__version__, "date": datetime.datetime.now().isoformat(timespec="seconds"),
         "small": a.small, "results": results}
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"remat_{kind}.json")
  with open(path, "w") as fh:
    json.dump(out, fh, indent=1)
  print(f"\nwrote {path}")


if __name__ == "__main__":
  main()
