"""Compression transforms vs plain JAX on a small transformer-style MLP block, compiled figures.

Run: ``python -m benchmarks.compression [--out benchmarks/results/compression_cpu.json]``.
All bytes/FLOPs come from XLA (``jax.jit(f).lower(...).compile()``: ``memory_analysis()`` and
``cost_analysis()``) on the default backend. On CPU, XLA converts bf16 matmul operands back to
float32, so bf16 is not faster there; the figures show what the compiled program holds (bf16
residuals) and the step time is reported for completeness only.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

if __name__ == "__main__":  # run as a script: this file's folder would shadow the stdlib `compression` package
  _here = os.path.dirname(os.path.abspath(__file__))
  sys.path[:] = [q for q in sys.path if os.path.abspath(q or ".") != _here]

import jax
import jax.numpy as jnp

import lepton_jax as lj
from lepton_jax.compression._common import compiled_figures

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
  jax.block_until_ready(f(*a))
  t = time.perf_counter()
  for _ in range(n):
    jax.block_until_ready(f(*a))
  return (time.perf_counter() - t) / n


def _ratio(a, b):
  return {k: (b[k] / a[k] if a[k] else None) for k in a}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default=None)
  out_path = ap.parse_args().out
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
  for kind in ("int8", "int4", "fp8"):
    q = lj.quantize(forward, weights=kind)
    frozen = lj.quantize.freeze(p, weights=kind)
    fq = compiled_figures(q, frozen, x)
    fr = compiled_figures(forward, p, x)
    out = jax.jit(q)(frozen, x)
    w_before = sum(v.nbytes for v in jax.tree.leaves(p) if v.ndim >= 2)
    w_after = sum(v.nbytes for v in jax.tree.leaves(frozen, is_leaf=lambda a: isinstance(a, lj.quantize.QuantizedArray))
                  if isinstance(v, lj.quantize.QuantizedArray))
    rows[f"quantize_{kind}_forward"] = {
        "plain": fr, "quantized": fq, "ratio": _ratio(fr, fq), "weight_bytes_before": w_before,
        "weight_bytes_after": w_after, "weight_compression": w_before / w_after,
        "output_rel_l2_error": float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))}

  for structure, s in (("unstructured", 0.5), ("2:4", 0.5)):
    pruned, _ = lj.prune(p, sparsity=s, structure=structure)
    out = jax.jit(forward)(pruned, x)
    rows[f"prune_{structure}_{s}"] = {"output_rel_l2_error": float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref)),
                                      "note": "no finetuning; dense XLA kernels, so no speed/bytes change"}

  print(f"{'case':<34}{'metric':<18}{'plain':>16}{'compressed':>16}{'ratio':>8}")
  for name, r in rows.items():
    if "ratio" in r:
      other = r.get("mixed", r.get("quantized"))
      for m in ("temp_bytes", "argument_bytes", "flops"):
        ra = r["ratio"][m]
        print(f"{name:<34}{m:<18}{r['plain'][m]:>16,.0f}{other[m]:>16,.0f}{(f'{ra:.3f}' if ra else '-'):>8}")
    for m in ("weight_compression", "output_rel_l2_error", "loss_plain", "loss_mixed", "step_s_plain", "step_s_mixed"):
      if m in r:
        print(f"{name:<34}{m:<18}{r[m]:>14.4g}")
  result = {"device": str(jax.devices()[0]), "backend": jax.default_backend(), "jax": jax.__version__,
            "date": datetime.date.today().isoformat(),
            "model": {"d": D, "hidden": H, "layers": LAYERS, "batch": BATCH, "seq": SEQ},
            "note": ("CPU: XLA upcasts bf16 matmul operands to float32, so bf16 is not faster here; the bf16 "
                     "saving shows as smaller saved residuals (temp bytes). Quantized runs dequantize into "
                     "float matmuls on CPU; the saving is argument (weight) bytes."),
            "rows": rows}
  if out_path:
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    with open(out_path, "w") as fh:
      json.dump(result, fh, indent=1)
    print("wrote", out_path)


if __name__ == "__main__":
  main()
