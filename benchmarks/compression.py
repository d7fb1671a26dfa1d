"""Compression transforms vs plain JAX: a transformer-style MLP block (compiled figures), a tiny
lm1b-like language model and a tiny Gemma-like one (grouped-query attention, RMSNorm, rotary
positions, gated GELU MLP, tied embeddings; ``benchmarks/_gemma_like.py``): mixed-precision loss
curves vs float32 and its run-to-run noise, int8/int4 weight-only eval loss, compiled FLOPs/bytes and
step times.

Run: ``python -m benchmarks.compression [--only mlp|lm|gemma] [--out benchmarks/results/compression_cpu.json]``.
All bytes/FLOPs come from XLA (``jax.jit(f).lower(...).compile()``: ``memory_analysis()`` and
``cost_analysis()``) on the default backend. Step times are best-of-5 on a shared CPU (indicative).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import sys
import time

if __name__ == "__main__":  # run as a script: this file's folder would shadow the stdlib `compression` package
  _here = os.path.dirname(os.path.abspath(__file__))
  sys.path[:] = [q for q in sys.path if os.path.abspath(q or ".") != _here]
  sys.path.insert(0, os.path.dirname(_here))  # the repository root (benchmarks._gemma_like)

import glob

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import lepton_jax as lj
from lepton_jax.jaxpr._compiled import figures_of


def compiled_figures(fun, *args):
  return figures_of(fun, *args).to_dict()

D, H, LAYERS, BATCH, SEQ = 256, 1024, 4, 8, 128


def init(key):
  ks = jax.random.split(key, 2 * LAYERS + 1)
  layers = [{"w_in": jax.random.normal(ks[2 * i], (D, H)) / D ** 0.5, "b_in": jnp.zeros(H),
             "w_out": jax.random.normal(ks[2 * i + 1], (H, D)) / H ** 0.5, "scale": jnp.ones(D)}
            for i in range(LAYERS)]
  return {"layers": layers, "head": jax.random.normal(ks[-1], (D, 16)) / D ** 0.5}


def forward(p, x):
  for lyr in p["layers"]:
    h = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * lyr["scale"]  # RMS norm (float32)
    x = x + jax.nn.gelu(h @ lyr["w_in"] + lyr["b_in"]) @ lyr["w_out"]
  return x.mean(1) @ p["head"]


def loss(p, x, y):
  return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(forward(p, x)), y[:, None], 1))


def _time(f, *a, n=5):
  """Best of ``n`` timed calls after a warm-up (the machine is shared: the minimum is the least noisy)."""
  jax.block_until_ready(f(*a))
  best = float("inf")
  for _ in range(n):
    t = time.perf_counter()
    jax.block_until_ready(f(*a))
    best = min(best, time.perf_counter() - t)
  return best


def _ratio(a, b):
  return {k: (b[k] / a[k] if a[k] else None) for k in a}


# --------------------------------------------------------------------------- lm1b-like LM
# A tiny decoder-only transformer in the shape of Flax's examples/lm1b (token embedding + fixed
# sinusoidal positions, pre-LayerNorm blocks of causal multi-head attention and a ReLU MLP, final
# LayerNorm, a Dense logits head), written here in NNX. Data: the bytes of this repository's own
# Python sources (a real, structured corpus that needs no download); held-out = other files.

LM = dict(vocab=256, d=128, heads=4, mlp=512, layers=2, seq=64, batch=16, steps=200, lr=3e-3)


class _Block(nnx.Module):
  def __init__(self, d, heads, mlp, rngs):
    self.heads = heads
    self.ln1, self.ln2 = nnx.LayerNorm(d, rngs=rngs), nnx.LayerNorm(d, rngs=rngs)
    self.qkv = nnx.Linear(d, 3 * d, use_bias=False, rngs=rngs)
    self.out = nnx.Linear(d, d, use_bias=False, rngs=rngs)
    self.fc1, self.fc2 = nnx.Linear(d, mlp, rngs=rngs), nnx.Linear(mlp, d, rngs=rngs)

  def __call__(self, x):
    b, t, d = x.shape
    q, k, v = jnp.split(self.qkv(self.ln1(x)).reshape(b, t, 3, self.heads, d // self.heads), 3, axis=2)
    q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / (d // self.heads) ** 0.5
    scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, -1e9)
    att = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v).reshape(b, t, d)
    x = x + self.out(att)
    return x + self.fc2(jax.nn.relu(self.fc1(self.ln2(x))))


class _TinyLM(nnx.Module):
  def __init__(self, cfg, rngs):
    self.embed = nnx.Embed(cfg["vocab"], cfg["d"], rngs=rngs)
    pos = np.arange(cfg["seq"])[:, None] / (10000 ** (np.arange(0, cfg["d"], 2) / cfg["d"]))[None]
    self.pos = jnp.asarray(np.concatenate([np.sin(pos), np.cos(pos)], -1), jnp.float32)
    self.blocks = nnx.List([_Block(cfg["d"], cfg["heads"], cfg["mlp"], rngs) for _ in range(cfg["layers"])])
    self.ln = nnx.LayerNorm(cfg["d"], rngs=rngs)
    self.head = nnx.Linear(cfg["d"], cfg["vocab"], rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens) + self.pos[: tokens.shape[1]]
    for blk in self.blocks:
      x = blk(x)
    return self.head(self.ln(x))


def _corpus(seq):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  files = sorted(glob.glob(os.path.join(root, "lepton_jax", "**", "*.py"), recursive=True))
  data = [np.frombuffer(open(f, "rb").read(), np.uint8) for f in files]
  held = np.concatenate(data[::7])
  train = np.concatenate([d for i, d in enumerate(data) if i % 7])
  return train, held


def _batches(data, seq, batch, n, seed):
  rng = np.random.default_rng(seed)
  starts = rng.integers(0, len(data) - seq - 1, size=(n, batch))
  return [np.stack([data[s:s + seq + 1] for s in row]).astype(np.int32) for row in starts]


def lm1b_like():
  """Mixed precision vs float32 loss curves (200 steps) and int8/int4 weight-only eval loss."""
  cfg = LM
  train, held = _corpus(cfg["seq"])
  model = _TinyLM(cfg, nnx.Rngs(0))
  graphdef, params0 = nnx.split(model)
  params0 = nnx.to_pure_dict(params0)

  def loss(params, tokens):
    logits = nnx.merge(graphdef, params)(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

  # 10 warm-up steps, then constant: the curve leaves the unigram plateau (~3.4 nats) near step 100
  tx = optax.adamw(optax.linear_schedule(0.0, cfg["lr"], 10), weight_decay=0.01)

  def run(loss_fn, seed):
    @jax.jit
    def step(p, o, b):
      v, g = jax.value_and_grad(loss_fn)(p, b)
      u, o = tx.update(g, o, p)
      return optax.apply_updates(p, u), o, v
    p, o, curve = params0, tx.init(params0), []
    for b in _batches(train, cfg["seq"], cfg["batch"], cfg["steps"], seed):
      p, o, v = step(p, o, b)
      curve.append(float(v))
    return p, curve, step

  mixed = lj.mixed_precision(loss)
  p32, c32, step32 = run(loss, 0)
  _, c16, step16 = run(mixed, 0)
  _, c32b, _ = run(loss, 1)  # the noise reference: float32 with another batch order
  tail = slice(-20, None)
  smooth = lambda c: float(np.mean(c[tail]))  # noqa: E731
  b0 = _batches(train, cfg["seq"], cfg["batch"], 1, 0)[0]
  o0 = tx.init(params0)
  fig32, fig16 = compiled_figures(step32, params0, o0, b0), compiled_figures(step16, params0, o0, b0)

  evals = _batches(held, cfg["seq"], 64, 4, 123)
  eval_loss = lambda f, p: float(np.mean([float(jax.jit(f)(p, b)) for b in evals]))  # noqa: E731
  ref = eval_loss(loss, p32)
  out = {"config": dict(cfg), "data": "bytes of lepton_jax/**/*.py (every 7th file held out)",
         "train_loss_f32": c32, "train_loss_mixed_bf16": c16, "train_loss_f32_other_order": c32b,
         "last20_mean_f32": smooth(c32), "last20_mean_mixed": smooth(c16), "last20_mean_f32_other_order": smooth(c32b),
         "mixed_vs_f32_gap": abs(smooth(c16) - smooth(c32)), "noise_gap_f32_orders": abs(smooth(c32b) - smooth(c32)),
         "max_stepwise_gap_mixed_vs_f32": float(np.max(np.abs(np.array(c16) - np.array(c32)))),
         "train_step_compiled_f32": fig32, "train_step_compiled_mixed": fig16,
         "step_s_f32": _time(step32, params0, o0, b0), "step_s_mixed": _time(step16, params0, o0, b0),
         "eval_loss_f32": ref}
  for kind in ("int8", "int4"):
    q = lj.quantize(loss, weights=kind)
    frozen = q.freeze(p32)
    before = sum(v.nbytes for v in jax.tree.leaves(p32) if v.ndim >= 2)
    after = sum(v.nbytes for v in jax.tree.leaves(frozen, is_leaf=lambda a: isinstance(a, lj.quantize.QuantizedArray))
                if isinstance(v, lj.quantize.QuantizedArray))
    ql = eval_loss(q, frozen)
    out[f"eval_loss_{kind}"] = ql
    out[f"eval_loss_{kind}_rel_change"] = ql / ref - 1
    out[f"weight_compression_{kind}"] = before / after
  return out


# --------------------------------------------------------------------------- Gemma-like LM
# benchmarks/_gemma_like.py: RMSNorm, rotary positions, grouped-query attention (4 query heads over 2
# key/value heads, einsum 'BTKGH,BSKH->BTKGS'), gated GELU MLP, tied embeddings; the same corpus.

GEMMA = dict(seq=64, batch=16, steps=100, lr=3e-3, warmup=10, eval_batches=4, eval_batch=64)


def gemma_like():
  """bf16 mixed precision vs float32 over 100 steps (two batch orders), int8/int4 weight-only eval
  loss and weight bytes, compiled FLOPs / bytes and step times vs plain JAX."""
  from benchmarks._gemma_like import GemmaLike, GemmaLikeConfig
  run_cfg, mcfg = GEMMA, GemmaLikeConfig()
  train, held = _corpus(run_cfg["seq"])
  graphdef, params0 = nnx.split(GemmaLike(mcfg, nnx.Rngs(0)))
  params0 = nnx.to_pure_dict(params0)

  def loss(params, tokens):
    logits = nnx.merge(graphdef, params)(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

  tx = optax.adamw(optax.linear_schedule(0.0, run_cfg["lr"], run_cfg["warmup"]), weight_decay=0.01)

  def make_step(loss_fn):
    @jax.jit
    def step(p, o, b):
      v, g = jax.value_and_grad(loss_fn)(p, b)
      u, o = tx.update(g, o, p)
      return optax.apply_updates(p, u), o, v
    return step

  step32, step16 = make_step(loss), make_step(lj.mixed_precision(loss))

  def run(step, order):
    p, o, curve = params0, tx.init(params0), []
    for b in _batches(train, run_cfg["seq"], run_cfg["batch"], run_cfg["steps"], order):
      p, o, v = step(p, o, b)
      curve.append(float(v))
    return p, curve

  curves, finals = {}, {}
  for name, step, order in (("f32_order0", step32, 0), ("mixed_order0", step16, 0),
                            ("f32_order1", step32, 1), ("mixed_order1", step16, 1)):
    finals[name], curves[name] = run(step, order)

  evals = _batches(held, run_cfg["seq"], run_cfg["eval_batch"], run_cfg["eval_batches"], 123)
  eval_jit = jax.jit(loss)
  eval_loss = lambda f, p: float(np.mean([float(f(p, b)) for b in evals]))  # noqa: E731
  last10 = {k: float(np.mean(c[-10:])) for k, c in curves.items()}
  held_loss = {k: eval_loss(eval_jit, p) for k, p in finals.items()}
  c = {k: np.array(v) for k, v in curves.items()}
  out = {
      "config": {**run_cfg, **dataclasses.asdict(mcfg)},
      "data": "bytes of lepton_jax/**/*.py (every 7th file held out)",
      "train_loss": {k: [round(x, 5) for x in v] for k, v in curves.items()},
      "last10_mean_train_loss": last10,
      "held_out_loss_after_training": held_loss,
      # the question: is mixed-vs-f32 (same batches) inside the f32 run-to-run spread (other batch order)?
      "final_gap_mixed_vs_f32": {o: abs(last10[f"mixed_{o}"] - last10[f"f32_{o}"]) for o in ("order0", "order1")},
      "final_gap_f32_order0_vs_order1": abs(last10["f32_order0"] - last10["f32_order1"]),
      "held_out_gap_mixed_vs_f32": {o: abs(held_loss[f"mixed_{o}"] - held_loss[f"f32_{o}"])
                                    for o in ("order0", "order1")},
      "held_out_gap_f32_order0_vs_order1": abs(held_loss["f32_order0"] - held_loss["f32_order1"]),
      "max_stepwise_gap_mixed_vs_f32": {o: float(np.max(np.abs(c[f"mixed_{o}"] - c[f"f32_{o}"])))
                                        for o in ("order0", "order1")},
      "max_stepwise_gap_f32_order0_vs_order1": float(np.max(np.abs(c["f32_order0"] - c["f32_order1"]))),
  }
  b0 = _batches(train, run_cfg["seq"], run_cfg["batch"], 1, 0)[0]
  o0 = tx.init(params0)
  out["train_step_compiled_f32"] = compiled_figures(step32, params0, o0, b0)
  out["train_step_compiled_mixed"] = compiled_figures(step16, params0, o0, b0)
  out["train_step_ratio_mixed"] = _ratio(out["train_step_compiled_f32"], out["train_step_compiled_mixed"])
  out["step_s_f32"], out["step_s_mixed"] = _time(step32, params0, o0, b0), _time(step16, params0, o0, b0)
  out["mixed_precision_ops"] = {"converted": (rep := lj.mixed_precision(loss).explain(params0, b0)).converted,
                                "total": len(rep.ops)}

  p32 = finals["f32_order0"]
  ref = held_loss["f32_order0"]
  out["eval_loss_f32"] = ref
  is_q = lambda a: isinstance(a, lj.quantize.QuantizedArray)  # noqa: E731
  eb = evals[0]
  out["eval_forward_compiled_f32"] = compiled_figures(loss, p32, eb)
  out["eval_s_f32"] = _time(eval_jit, p32, eb)
  for kind in ("int8", "int4"):
    q = lj.quantize(loss, weights=kind)
    frozen = q.freeze(p32)
    before = sum(v.nbytes for v in jax.tree.leaves(p32) if v.ndim >= 2)
    after = sum(v.nbytes for v in jax.tree.leaves(frozen, is_leaf=is_q) if is_q(v))
    q_jit = jax.jit(q)
    ql = eval_loss(q_jit, frozen)
    fig = compiled_figures(q, frozen, eb)
    out[f"quantize_{kind}"] = {
        "weight_bytes_before": before, "weight_bytes_after": after, "weight_compression": before / after,
        "eval_loss": ql, "eval_loss_rel_change": ql / ref - 1, "eval_forward_compiled": fig,
        "eval_forward_ratio": _ratio(out["eval_forward_compiled_f32"], fig), "eval_s": _time(q_jit, frozen, eb),
        "compute_paths": sorted({c for w in q.explain(p32, eb).weights for c in w.compute})}
  out.update(_gemma_activation_rows(loss, p32, mcfg, train, evals, eval_loss, ref))
  return out


def _int8_dots(fn, *args) -> int:
  text = fn.lower(*args).as_text()
  return sum(1 for ln in text.splitlines() if "dot_general" in ln and re.search(
      r"\(tensor<[0-9x]+xi8>, tensor<[0-9x]+xi8>\) -> tensor<[0-9x]+xi32>", ln))


def _gemma_activation_rows(loss, p32, mcfg, train, evals, eval_loss, ref):
  """int8 weights + int8 activations (calibrated on 4 training batches), on the per-layer model and
  on the same weights in the scan-over-layers layout (activation sites inside the scan body)."""
  from benchmarks._gemma_like import GemmaLike, GemmaLikeConfig, stack_blocks
  calib_batches = _batches(train, GEMMA["seq"], GEMMA["batch"], 4, 7)
  rows = {}
  gd_scan, _ = nnx.split(GemmaLike(dataclasses.replace(mcfg, scan_layers=True), nnx.Rngs(0)))
  p_scan = stack_blocks(p32)

  def loss_scan(params, tokens):
    logits = nnx.merge(gd_scan, params)(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

  scan_f32 = eval_loss(jax.jit(loss_scan), p_scan)
  for name, fn, params in (("quantize_w8a8", loss, p32), ("quantize_w8a8_scan_layers", loss_scan, p_scan)):
    q = lj.quantize(fn, weights="int8", activations="int8", calibration=[(params, b) for b in calib_batches])
    frozen = q.freeze(params)
    q_jit = jax.jit(q)
    row = {"eval_loss_frozen": eval_loss(q_jit, frozen),
           # int8 x int8 -> int32 dot_generals in the lowered forward (frozen / float weights passed)
           "int8_x_int8_dots_frozen": _int8_dots(q_jit, frozen, evals[0]),
           "int8_x_int8_dots_float_weights": _int8_dots(q_jit, params, evals[0]),
           "compute_paths": sorted({c for w in q.explain(params, evals[0]).weights for c in w.compute})}
    row["eval_loss_frozen_rel_change"] = row["eval_loss_frozen"] / ref - 1
    if name.endswith("scan_layers"):
      # float weights quantized on the fly inside the body: one weight scale set per layer slice
      row["eval_loss_float_weights_on_the_fly"] = eval_loss(q_jit, params)
      row["eval_loss_float_weights_on_the_fly_rel_change"] = row["eval_loss_float_weights_on_the_fly"] / ref - 1
      row["eval_loss_f32_scan_layout"] = scan_f32
      row["note"] = ("activation scales inside the scan body are shared by the layers (absmax over iterations); "
                     "frozen stacked kernels have per-channel scales shared by the layers too and enter the body "
                     "dequantized (activations fake-quantized, float dot: the same numbers, no integer dot); "
                     "float weights are quantized per layer slice inside the body and run int8 x int8 -> int32")
    rows[name] = row
  return rows


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default=None)
  ap.add_argument("--only", default=None, choices=(None, "mlp", "lm", "gemma"))
  args = ap.parse_args()
  out_path = args.out
  result = {}
  if out_path and args.only and os.path.exists(out_path):
    with open(out_path) as fh:
      result = json.load(fh)  # refresh one section, keep the other
  result.update({"device": str(jax.devices()[0]), "backend": jax.default_backend(), "jax": jax.__version__,
                 "date": datetime.date.today().isoformat(),
                 "timing": "step times are the best of 5 calls after a warm-up, on a CPU shared with other jobs: "
                           "indicative only; bytes and FLOPs are XLA's compiled figures",
                 "corpus": "LM sections train on the bytes of this repository's lepton_jax/**/*.py at run time, "
                           "so their losses move a little whenever the sources change"})
  if args.only in (None, "mlp"):
    result["model"] = {"d": D, "hidden": H, "layers": LAYERS, "batch": BATCH, "seq": SEQ}
    result["note"] = ("CPU (jax 0.10.2): a bf16 x bf16 -> f32 dot compiles to a YNNPACK fusion on bf16 operands "
                      "(no upcast), so mixed-precision steps can be faster on CPU too; temp bytes include the "
                      "bf16 operand copies next to the float32 values. Quantized int8/int4 weights are "
                      "dequantized / rescaled around float matmuls on CPU (int8 x int8 -> int32 dots only with "
                      "activations='int8'); the saving is argument (weight) bytes.")
    result["rows"] = mlp_rows()
    _print_rows(result["rows"])
  if args.only in (None, "lm"):
    lm = lm1b_like()
    result["lm1b_like"] = lm
    print(f"lm1b-like: last-20-step mean train loss f32 {lm['last20_mean_f32']:.4f}, bf16 mixed "
          f"{lm['last20_mean_mixed']:.4f} (gap {lm['mixed_vs_f32_gap']:.2e}; f32 batch-order noise "
          f"{lm['noise_gap_f32_orders']:.2e}); eval loss f32 {lm['eval_loss_f32']:.4f}, int8 "
          f"{lm['eval_loss_int8']:.4f} ({100 * lm['eval_loss_int8_rel_change']:+.3f}%, "
          f"{lm['weight_compression_int8']:.2f}x), int4 {lm['eval_loss_int4']:.4f} "
          f"({100 * lm['eval_loss_int4_rel_change']:+.3f}%, {lm['weight_compression_int4']:.2f}x)")
  if args.only in (None, "gemma"):
    t0 = time.perf_counter()
    g = gemma_like()
    g["section_wall_s"] = time.perf_counter() - t0
    result["gemma_like"] = g
    _print_gemma(g)
    _print_w8a8(g)
  if out_path:
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    with open(out_path, "w") as fh:
      json.dump(result, fh, indent=1)
    print("wrote", out_path)


def _rel(ref, got):
  return float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref))


def mlp_rows():
  """The transformer-style MLP block: bf16 train step, int8/int4/fp8 forward, pruning, compiled."""
  k = jax.random.split(jax.random.key(0), 3)
  p = init(k[0])
  x = jax.random.normal(k[1], (BATCH, SEQ, D))
  y = jax.random.randint(k[2], (BATCH,), 0, 16)
  rows = {}

  plain_step = jax.value_and_grad(loss)
  mixed_step = jax.value_and_grad(lj.mixed_precision(loss))
  fp = compiled_figures(plain_step, p, x, y)
  fm = compiled_figures(mixed_step, p, x, y)
  (lp, _), (lm, _) = jax.jit(plain_step)(p, x, y), jax.jit(mixed_step)(p, x, y)
  rows["mixed_precision_bf16_train_step"] = {
      "plain": fp, "mixed": fm, "ratio": _ratio(fp, fm), "loss_plain": float(lp), "loss_mixed": float(lm),
      "step_s_plain": _time(jax.jit(plain_step), p, x, y), "step_s_mixed": _time(jax.jit(mixed_step), p, x, y)}

  ref = jax.jit(forward)(p, x)
  kernels = [v for v in jax.tree.leaves(p) if v.ndim >= 2]
  for kind, group in (("int8", 128), ("int4", 128), ("int4", 64), ("int4", 32), ("fp8", 128)):
    q = lj.quantize(forward, weights=kind, group_size=group)
    frozen = q.freeze(p)
    fq = compiled_figures(q, frozen, x)
    fr = compiled_figures(forward, p, x)
    out = jax.jit(q)(frozen, x)
    packed = [v for v in jax.tree.leaves(frozen, is_leaf=lambda a: isinstance(a, lj.quantize.QuantizedArray))
              if isinstance(v, lj.quantize.QuantizedArray)]
    w_before, w_after = sum(v.nbytes for v in kernels), sum(v.nbytes for v in packed)
    name = f"quantize_{kind}_forward" if group == 128 or kind != "int4" else f"quantize_int4_g{group}_forward"
    rows[name] = {
        "plain": fr, "quantized": fq, "ratio": _ratio(fr, fq), "weight_bytes_before": w_before,
        "weight_bytes_after": w_after, "weight_compression": w_before / w_after,
        "weight_rel_l2_error": float(np.sqrt(sum(float(jnp.sum((v.dequantize() - w) ** 2)) for v, w in zip(packed, kernels))
                                             / sum(float(jnp.sum(w ** 2)) for w in kernels))),
        "output_rel_l2_error": _rel(ref, out)}
    if kind == "int4":
      rows[name]["group_size"] = group

  for structure, s in (("unstructured", 0.5), ("2:4", 0.5)):
    pruned, _ = lj.prune(p, sparsity=s, structure=structure)
    out = jax.jit(forward)(pruned, x)
    rows[f"prune_{structure}_{s}"] = {"output_rel_l2_error": _rel(ref, out),
                                      "note": "no finetuning; dense XLA kernels, so no speed/bytes change"}
  return rows


def _print_gemma(g):
  lt, hl = g["last10_mean_train_loss"], g["held_out_loss_after_training"]
  print("gemma-like (GQA 4q/2kv, RMSNorm, rotary, gated GELU, tied embeddings), 100 steps:")
  for k in lt:
    print(f"  {k:<14} last-10 mean train loss {lt[k]:.4f}   held-out loss {hl[k]:.4f}")
  print(f"  |mixed - f32| last-10: {g['final_gap_mixed_vs_f32']}, f32 order0 vs order1: "
        f"{g['final_gap_f32_order0_vs_order1']:.4f}; held-out: {g['held_out_gap_mixed_vs_f32']} vs "
        f"{g['held_out_gap_f32_order0_vs_order1']:.4f}")
  r = g["train_step_ratio_mixed"]
  print(f"  train step compiled mixed/f32: flops {r['flops']:.3f} temp {r['temp_bytes']:.3f}; step "
        f"{g['step_s_f32'] * 1e3:.1f} ms f32, {g['step_s_mixed'] * 1e3:.1f} ms mixed")
  for kind in ("int8", "int4"):
    q = g[f"quantize_{kind}"]
    print(f"  {kind}: weights {q['weight_compression']:.2f}x, eval loss {g['eval_loss_f32']:.4f} -> "
          f"{q['eval_loss']:.4f} ({100 * q['eval_loss_rel_change']:+.3f}%), compiled flops ratio "
          f"{q['eval_forward_ratio']['flops']:.3f}, argument bytes ratio {q['eval_forward_ratio']['argument_bytes']:.3f}, "
          f"eval {g['eval_s_f32'] * 1e3:.1f} -> {q['eval_s'] * 1e3:.1f} ms")


def _print_w8a8(g):
  for name in ("quantize_w8a8", "quantize_w8a8_scan_layers"):
    r = g[name]
    extra = (f", float weights on the fly {r['eval_loss_float_weights_on_the_fly']:.4f} "
             f"({100 * r['eval_loss_float_weights_on_the_fly_rel_change']:+.3f}%)" if "scan" in name else "")
    print(f"  {name}: eval loss {g['eval_loss_f32']:.4f} -> frozen {r['eval_loss_frozen']:.4f} "
          f"({100 * r['eval_loss_frozen_rel_change']:+.3f}%){extra}; int8 x int8 dots: {r['int8_x_int8_dots_frozen']} "
          f"frozen, {r['int8_x_int8_dots_float_weights']} float weights; compute {r['compute_paths']}")


def _print_rows(rows):
  print(f"{'case':<34}{'metric':<20}{'plain':>16}{'compressed':>16}{'ratio':>8}")
  for name, r in rows.items():
    if "ratio" in r:
      other = r.get("mixed", r.get("quantized"))
      for m in ("temp_bytes", "argument_bytes", "flops"):
        ra = r["ratio"][m]
        print(f"{name:<34}{m:<20}{r['plain'][m]:>16,.0f}{other[m]:>16,.0f}{(f'{ra:.3f}' if ra else '-'):>8}")
    for m in ("weight_compression", "weight_rel_l2_error", "output_rel_l2_error", "loss_plain", "loss_mixed",
              "step_s_plain", "step_s_mixed"):
      if m in r:
        print(f"{name:<34}{m:<20}{r[m]:>14.4g}")


if __name__ == "__main__":
  main()
