"""Benchmark lepton_jax.pallas_kernels against plain JAX / XLA (and cuDNN on GPU).

For each kernel: median wall time of repeated runs, interleaved across the implementations
(forward, and forward+backward),
TFLOP/s from an analytic FLOP count, compiled temp memory
(``compiled.memory_analysis().temp_size_in_bytes``), and the ratio to the plain-JAX
baseline measured in the same run. JSON goes to
``benchmarks/results/kernels_<device-kind>.json``.

  python -m benchmarks.kernels --small      # CPU: XLA implementations vs plain JAX
  python -m benchmarks.kernels --gpu        # GPU session: benchmarks/gpu_check.py (< 8 min)
  python -m benchmarks.kernels              # GPU: Pallas vs XLA vs cuDNN (H100 goal:
                                            # flash fwd bf16 d=128 s=4096 >= 0.9x cuDNN)
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import re
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from lepton_jax import pallas_kernels as lpk
from lepton_jax.jaxpr._compiled import read_compiled


def _temp_bytes(f, args):
  try:
    return int(read_compiled(f.lower(*args).compile()).temp_bytes)
  except Exception:  # some backends give no memory analysis
    return None


def _ops_signature(f, args):
  """The compiled program's instructions with names, numbering, metadata and debug tables
  removed, sorted: equal signatures = the same program up to naming and order."""
  try:
    text = f.lower(*args).compile().as_text()
  except Exception:  # noqa: BLE001
    return None
  out, skip = [], False
  for line in text.splitlines():
    if line.strip() in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
      skip = True
      continue
    if skip:
      skip = bool(line.strip())
      continue
    line = re.sub(r", metadata=\{[^}]*\}", "", line)
    line = re.sub(r"^HloModule \S+", "HloModule m", line)
    line = re.sub(r"(%?[A-Za-z_][\w\-]*?)[._]\d+(\.\d+)*", r"\1", line)
    out.append(line.strip())
  return hashlib.sha1("\n".join(sorted(out)).encode()).hexdigest()


def _interleaved(fns, args, repeats):
  """Per function, ``repeats`` wall times taken in turn (one run of each, repeated), so a change
  in the machine's load hits every implementation alike. ``None`` entries are skipped."""
  for f in fns:
    if f is not None:
      jax.block_until_ready(f(*args))     # compile + warm up
  out = [[] for _ in fns]
  for _ in range(repeats):
    for i, f in enumerate(fns):
      if f is None:
        continue
      t0 = time.perf_counter()
      jax.block_until_ready(f(*args))
      out[i].append(time.perf_counter() - t0)
  return out


def _measure_case(name, impls, args, flops, repeats, grad_argnums):
  """Rows for every implementation of one case, forward and forward+backward timed interleaved."""
  rows, fwd, bwd = [], [], []
  for impl, fn in impls:
    row = {"kernel": name, "impl": impl}
    try:
      f = jax.jit(fn)
      jax.block_until_ready(f(*args))
      g = None
      if grad_argnums is not None:
        g = jax.jit(jax.grad(lambda *a, fn=fn: fn(*a).astype(jnp.float32).sum(), argnums=grad_argnums))
        jax.block_until_ready(g(*args))
    except Exception as e:  # keep going: report the failure in the table / JSON
      row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
      f = g = None
    rows.append(row)
    fwd.append(f)
    bwd.append(g)
  for row, f, ts in zip(rows, fwd, _interleaved(fwd, args, repeats)):
    if f is None:
      continue
    row["fwd_s"], row["fwd_min_s"] = statistics.median(ts), min(ts)
    row["fwd_tflops"] = flops / row["fwd_s"] / 1e12
    row["fwd_temp_bytes"] = _temp_bytes(f, args)
    row["fwd_ops_signature"] = _ops_signature(f, args)
  if grad_argnums is not None:
    for row, g, ts in zip(rows, bwd, _interleaved(bwd, args, repeats)):
      if g is None:
        continue
      row["fwd_bwd_s"], row["fwd_bwd_min_s"] = statistics.median(ts), min(ts)
      row["fwd_bwd_tflops"] = 3.5 * flops / row["fwd_bwd_s"] / 1e12  # bwd ~2.5x fwd flops
      row["fwd_bwd_temp_bytes"] = _temp_bytes(g, args)
      row["fwd_bwd_ops_signature"] = _ops_signature(g, args)
  return rows


def _cases(small: bool, on_gpu: bool, dtype):
  key = jax.random.PRNGKey(0)
  ks = jax.random.split(key, 8)
  cases = []
  # attention: [B, S, H, D]
  B, S, H, D = (1, 512, 2, 64) if small else (4, 4096, 16, 128)
  q = jax.random.normal(ks[0], (B, S, H, D), dtype)
  k = jax.random.normal(ks[1], (B, S, H, D), dtype)
  v = jax.random.normal(ks[2], (B, S, H, D), dtype)
  for causal in (False, True):
    flops = 4 * B * H * S * S * D * (0.5 if causal else 1.0)
    base = {"jax.nn.dot_product_attention[xla]":
            lambda q, k, v, c=causal: jax.nn.dot_product_attention(q, k, v, is_causal=c, implementation="xla")}
    if on_gpu:
      base["jax.nn.dot_product_attention[cudnn]"] = (
          lambda q, k, v, c=causal: jax.nn.dot_product_attention(q, k, v, is_causal=c, implementation="cudnn"))
    ours = {"lepton[xla]": lambda q, k, v, c=causal: lpk.flash_attention(q, k, v, is_causal=c, backend="xla")}
    if on_gpu:
      ours["lepton[pallas_gpu]"] = (
          lambda q, k, v, c=causal: lpk.flash_attention(q, k, v, is_causal=c, backend="pallas_gpu"))
    cases.append((f"flash_attention(causal={causal}) B{B} S{S} H{H} D{D}", (q, k, v), flops,
                  (0, 1, 2), base, ours))
  # norms
  R, F = (4096, 1024) if small else (16384, 4096)
  x = jax.random.normal(ks[3], (R, F), dtype)
  s = jnp.ones((F,), dtype)
  b = jnp.zeros((F,), dtype)
  impls = ["xla"] + (["pallas_gpu"] if on_gpu else [])
  cases.append((f"layer_norm R{R} F{F}", (x, s, b), 8 * R * F, (0, 1, 2),
                {"plain_jax": lambda x, s, b: lpk.layer_norm_reference(x, s, b)},
                {f"lepton[{i}]": (lambda x, s, b, i=i: lpk.layer_norm(x, s, b, backend=i)) for i in impls}))
  cases.append((f"rms_norm R{R} F{F}", (x, s), 5 * R * F, (0, 1),
                {"plain_jax": lambda x, s: lpk.rms_norm_reference(x, s)},
                {f"lepton[{i}]": (lambda x, s, i=i: lpk.rms_norm(x, s, backend=i)) for i in impls}))
  # cross entropy
  N, V, Dm = (1024, 8192, 256) if small else (8192, 32768, 1024)
  logits = jax.random.normal(ks[4], (N, V), dtype)
  labels = jax.random.randint(ks[5], (N,), 0, V)
  import optax
  cases.append((f"softmax_cross_entropy N{N} V{V}", (logits,), 4 * N * V, (0,),
                {"optax": lambda lg: optax.softmax_cross_entropy_with_integer_labels(lg.astype(jnp.float32), labels)},
                {f"lepton[{i}]": (lambda lg, i=i: lpk.softmax_cross_entropy(lg, labels, backend=i)) for i in impls}))
  xf = jax.random.normal(ks[6], (N, Dm), dtype)
  w = (jax.random.normal(ks[7], (Dm, V), dtype) * 0.05).astype(dtype)
  cases.append((f"linear_softmax_cross_entropy N{N} D{Dm} V{V}", (xf, w), 2 * N * Dm * V, (0, 1),
                {"plain_jax(x@w + optax)": lambda x, w: optax.softmax_cross_entropy_with_integer_labels(
                    (x @ w).astype(jnp.float32), labels)},
                {f"lepton[{i}]": (lambda x, w, i=i: lpk.linear_softmax_cross_entropy(x, w, labels, backend=i))
                 for i in impls}))
  # matmul + bias + gelu
  M, K, Nn = (512, 512, 512) if small else (8192, 8192, 8192)
  a = jax.random.normal(ks[0], (M, K), dtype)
  bm = (jax.random.normal(ks[1], (K, Nn), dtype) * 0.05).astype(dtype)
  bias = jnp.zeros((Nn,), dtype)
  cases.append((f"matmul+bias+gelu M{M} K{K} N{Nn}", (a, bm, bias), 2 * M * K * Nn, (0, 1, 2),
                {"plain_jax": lambda a, b, c: jax.nn.gelu(a @ b + c)},
                {f"lepton[{i}]": (lambda a, b, c, i=i: lpk.matmul(a, b, bias=c, activation="gelu", backend=i))
                 for i in impls}))
  return cases


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--small", action="store_true", help="small shapes (CPU)")
  p.add_argument("--gpu", action="store_true",
                 help="run benchmarks/gpu_check.py (every kernel vs cuDNN / plain JAX on the GPU; "
                      "JSON under $OUT or --out)")
  p.add_argument("--repeats", type=int, default=None)
  p.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: bf16 on GPU, f32 on CPU)")
  p.add_argument("--out", default=None, help="output JSON path")
  args = p.parse_args(argv)
  if args.gpu:
    from benchmarks import gpu_check
    return gpu_check.run(out=args.out, repeats=args.repeats)
  dev = jax.devices()[0]
  on_gpu = dev.platform == "gpu"
  if not on_gpu and not args.small:
    print("No GPU found: the Pallas GPU kernels and cuDNN cannot be timed here; running with --small "
          "(XLA implementations vs plain JAX). Run on a GPU for the Pallas / cuDNN comparison.")
    args.small = True
  dtype = jnp.dtype(args.dtype or ("bfloat16" if on_gpu else "float32"))
  repeats = args.repeats or (5 if args.small else 20)
  results = []
  print(f"device: {dev.device_kind} ({dev.platform}), jax {jax.__version__}, dtype {dtype.name}, "
        f"repeats {repeats}")
  header = f"{'kernel':<48} {'impl':<38} {'fwd ms':>9} {'TFLOP/s':>8} {'temp MiB':>9} {'f+b ms':>9} {'vs base':>8}"
  print(header)
  print("-" * len(header))
  for name, cargs, flops, argnums, base, ours in _cases(args.small, on_gpu, dtype):
    rows = _measure_case(name, list(base.items()) + list(ours.items()), cargs, flops, repeats,
                         argnums)
    for row in rows:
      row["baseline"] = row["impl"] in base
    ref = next((r for r in rows if r["baseline"] and "fwd_s" in r), None)
    for r in rows:
      if ref is not None and "fwd_s" in r:
        r["speedup_vs_" + ref["impl"]] = ref["fwd_s"] / r["fwd_s"]
        r["min_time_speedup_vs_" + ref["impl"]] = {
            "fwd": ref["fwd_min_s"] / r["fwd_min_s"],
            "fwd_bwd": (ref["fwd_bwd_min_s"] / r["fwd_bwd_min_s"]) if "fwd_bwd_min_s" in r else None}
        r["same_compiled_program_as_" + ref["impl"]] = {
            "fwd": r.get("fwd_ops_signature") is not None
                   and r.get("fwd_ops_signature") == ref.get("fwd_ops_signature"),
            "fwd_bwd": r.get("fwd_bwd_ops_signature") is not None
                       and r.get("fwd_bwd_ops_signature") == ref.get("fwd_bwd_ops_signature")}
        if r.get("fwd_bwd_temp_bytes") is not None and ref.get("fwd_bwd_temp_bytes"):
          r["fwd_bwd_temp_ratio_vs_" + ref["impl"]] = r["fwd_bwd_temp_bytes"] / ref["fwd_bwd_temp_bytes"]
        if r.get("fwd_temp_bytes") and ref.get("fwd_temp_bytes"):
          r["temp_ratio_vs_" + ref["impl"]] = r["fwd_temp_bytes"] / ref["fwd_temp_bytes"]
      if "error" in r:
        print(f"{name:<48} {r['impl']:<38} ERROR {r['error']}")
        continue
      temp = r.get("fwd_temp_bytes")
      sp = r.get("speedup_vs_" + ref["impl"]) if ref else None
      print(f"{name:<48} {r['impl']:<38} {r['fwd_s'] * 1e3:>9.3f} {r['fwd_tflops']:>8.3f} "
            f"{(temp or 0) / 2**20:>9.2f} {r.get('fwd_bwd_s', float('nan')) * 1e3:>9.3f} "
            f"{(sp if sp is not None else float('nan')):>7.2f}x")
    results.extend(rows)
  cudnn_goal = None
  if on_gpu:
    cudnn_goal = "compare 'lepton[pallas_gpu]' vs 'jax.nn.dot_product_attention[cudnn]' fwd rows (goal >= 0.9x)"
  payload = {
      "benchmark": "kernels", "device_kind": dev.device_kind, "platform": dev.platform,
      "jax_version": jax.__version__, "python": platform.python_version(),
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "small": args.small, "dtype": dtype.name, "repeats": repeats, "note_cudnn_goal": cudnn_goal,
      "note": ("speedup_vs_X = baseline fwd median time / this one; min_time_speedup_vs_X uses the "
               "minimum over the repeats (robust to the load of a shared CPU); same_compiled_program_as_X: "
               "the compiled HLO equals the baseline's up to naming/order (then any time difference is "
               "noise); temp_ratio_vs_X = this compiled temp bytes / baseline's. On CPU only the XLA implementations are timed (Pallas interpret "
               "mode is a correctness tool, not a performance path)."),
      "results": results,
  }
  kind = dev.device_kind.lower().replace(" ", "_").replace("/", "_")
  out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"kernels_{kind}.json")
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, "w") as f:
    json.dump(payload, f, indent=1)
  print(f"wrote {out}")
  return payload


if __name__ == "__main__":
  sys.exit(0 if main() else 1)
