"""One prepared GPU session check of every lepton_jax Pallas kernel (target: H100/H200, < 8 min).

For each kernel, forward and forward+backward: correctness against the plain-jnp reference
(values and gradients), median wall time against the plain-JAX spelling
(``jax.nn.dot_product_attention`` with the XLA and cuDNN implementations, plain ``jnp``,
``optax``), TFLOP/s (attention, matmul) or GB/s (norms, cross-entropy; with the HBM roofline
fraction), and the compiled temp bytes. Every kernel runs both GPU flavours: Mosaic GPU
(default on sm_90+: attention, norms, cross-entropy, matmul epilogue) and Triton
(``LEPTON_PALLAS_GPU=triton``); each row records which Pallas custom calls its forward and
backward modules actually contain (``custom_calls``), so the JSON shows that the Mosaic GPU
path ran. Every case is guarded: an error is recorded in the JSON and the run goes on; a
wall-clock budget skips what is left (the cases are ordered by priority).

  python -m benchmarks.gpu_check                 # on the GPU machine: writes $OUT/gpu_check.json
  python -m benchmarks.gpu_check --dry-run       # any host: interpret mode, tiny shapes (smoke test)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from lepton_jax import pallas_kernels as lpk
from lepton_jax.jaxpr._compiled import read_compiled
from lepton_jax.pallas_kernels import _registry

# Peak HBM bandwidth (bytes/s) by device kind, for the roofline fraction of the
# memory-bound kernels.
HBM_BYTES_PER_S = {"H200": 4.8e12, "H100": 3.35e12, "H800": 3.35e12, "A100": 2.0e12}


@contextlib.contextmanager
def _env(name, value):
  old = os.environ.get(name)
  if value is None:
    os.environ.pop(name, None)
  else:
    os.environ[name] = value
  try:
    yield
  finally:
    if old is None:
      os.environ.pop(name, None)
    else:
      os.environ[name] = old


def _median_s(f, args, repeats):
  jax.block_until_ready(f(*args))
  ts = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    ts.append(time.perf_counter() - t0)
  return statistics.median(ts)


def _loss(fn):
  def l(*a):
    y = fn(*a).astype(jnp.float32)
    return jnp.sum(y * jnp.sin(y))
  return l


def _max_rel_err(a, b):
  a = np.asarray(jnp.asarray(a, jnp.float32))
  b = np.asarray(jnp.asarray(b, jnp.float32))
  return float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(b)))))


def _roofline_bw(device_kind):
  for k, v in HBM_BYTES_PER_S.items():
    if k in device_kind:
      return v
  return None


def _calls_in(text):
  return sorted(t for t, tag in (("mosaic_gpu", "mosaic_gpu"), ("triton", "__gpu$xla.gpu.triton"))
                if tag in text)


def _time_impl(fn, args, argnums, repeats, work, work_kind, bwd_factor=3.5):
  """Median fwd and fwd+bwd time, throughput, compiled temp bytes and the Pallas custom calls
  of one implementation (each program lowered and compiled once, then timed)."""
  row = {"custom_calls": {}}
  for part, f in (("fwd", fn), ("fwd_bwd", jax.grad(_loss(fn), argnums=argnums))):
    lowered = jax.jit(f).lower(*args)
    row["custom_calls"][part] = _calls_in(lowered.as_text())
    compiled = lowered.compile()
    row[f"{part}_s"] = _median_s(compiled, args, repeats)
    try:
      row[f"{part}_temp_bytes"] = int(read_compiled(compiled).temp_bytes)
    except Exception:   # noqa: BLE001 - some backends give no memory analysis
      row[f"{part}_temp_bytes"] = None
  if work_kind == "flops":
    row["fwd_tflops"] = work / row["fwd_s"] / 1e12
    row["fwd_bwd_tflops"] = bwd_factor * work / row["fwd_bwd_s"] / 1e12   # attention bwd ~ 2.5x fwd
  else:
    row["fwd_gbps"] = work / row["fwd_s"] / 1e9
    row["fwd_bwd_gbps"] = 3 * work / row["fwd_bwd_s"] / 1e9         # read x, dy; write dx
  return row


def _check(ours, ref, args, argnums, tol):
  out, want = jax.jit(ours)(*args), jax.jit(ref)(*args)
  g = jax.jit(jax.grad(_loss(ours), argnums=argnums))(*args)
  gr = jax.jit(jax.grad(_loss(ref), argnums=argnums))(*args)
  errs = {"fwd_rel_err": _max_rel_err(out, want)}
  errs["grad_rel_err"] = max(_max_rel_err(a, b) for a, b in zip(g, gr))
  errs["finite"] = bool(np.all(np.isfinite(np.asarray(jnp.asarray(out, jnp.float32)))))
  errs["ok"] = errs["fwd_rel_err"] <= tol and errs["grad_rel_err"] <= tol and errs["finite"]
  return errs


def _cases(dry, dtype, ours_backend):
  ks = jax.random.split(jax.random.PRNGKey(0), 8)
  be = ours_backend
  cases = []
  # --- flash attention: [B, S, H, D]
  # Mosaic GPU and Triton on the GPU; in the dry run the Mosaic GPU kernels run in Mosaic GPU's
  # interpreter where they serve the shapes (norms, CE), Triton's kernels in the generic one.
  flavors = ("mosaic", "triton")
  attn_shapes = [(1, 256, 2, 64)] if dry else [(4, 4096, 16, 128), (4, 4096, 16, 64), (1, 16384, 16, 128)]
  late = []        # attention shapes after the first run last (priority order under the budget)
  for n_shape, (B, S, H, D) in enumerate(attn_shapes):
    q = jax.random.normal(ks[0], (B, S, H, D), dtype)
    k = jax.random.normal(ks[1], (B, S, H, D), dtype)
    v = jax.random.normal(ks[2], (B, S, H, D), dtype)
    for causal in (True, False):
      flops = 4 * B * H * S * S * D * (0.5 if causal else 1.0)
      base = {}
      if S <= 4096:   # beyond that XLA's [B, H, S, S] scores alone take many GiB
        base["jax.nn.dot_product_attention[xla]"] = (
            lambda q, k, v, c=causal: jax.nn.dot_product_attention(q, k, v, is_causal=c, implementation="xla"))
      if not dry:
        base["jax.nn.dot_product_attention[cudnn]"] = (
            lambda q, k, v, c=causal: jax.nn.dot_product_attention(q, k, v, is_causal=c, implementation="cudnn"))
      ours = {}
      for flavor in (flavors if not dry else ("triton",)):
        ours[f"lepton[{be},{flavor}]"] = (flavor, lambda q, k, v, c=causal: lpk.flash_attention(
            q, k, v, is_causal=c, backend=be))
      ref = lambda q, k, v, c=causal: lpk.flash_attention_reference(q, k, v, is_causal=c)
      (cases if n_shape == 0 else late).append(dict(
                        name=f"flash_attention causal={causal} B{B} S{S} H{H} D{D}", args=(q, k, v),
                        argnums=(0, 1, 2), work=flops, work_kind="flops", base=base, ours=ours, ref=ref,
                        check_args=(q[:, :1024], k[:, :1024], v[:, :1024]) if S > 4096 else None))
  # --- norms
  R, F = (64, 256) if dry else (8192, 4096)
  x = jax.random.normal(ks[3], (R, F), dtype)
  s = (1 + 0.1 * jax.random.normal(ks[4], (F,))).astype(dtype)
  b = (0.1 * jax.random.normal(ks[5], (F,))).astype(dtype)
  nbytes = 2 * R * F * jnp.dtype(dtype).itemsize
  cases.append(dict(name=f"rms_norm R{R} F{F}", args=(x, s), argnums=(0, 1), work=nbytes, work_kind="bytes",
                    base={"plain_jnp": lambda x, s: lpk.rms_norm_reference(x, s)},
                    ours={f"lepton[{be},{fl}]": (fl, lambda x, s: lpk.rms_norm(x, s, backend=be)) for fl in flavors},
                    ref=lambda x, s: lpk.rms_norm_reference(x, s)))
  cases.append(dict(name=f"layer_norm R{R} F{F}", args=(x, s, b), argnums=(0, 1, 2), work=nbytes,
                    work_kind="bytes", base={"plain_jnp": lambda x, s, b: lpk.layer_norm_reference(x, s, b)},
                    ours={f"lepton[{be},{fl}]": (fl, lambda x, s, b: lpk.layer_norm(x, s, b, backend=be))
                          for fl in flavors},
                    ref=lambda x, s, b: lpk.layer_norm_reference(x, s, b)))
  # --- cross-entropy
  N, V = (64, 512) if dry else (8192, 32000)
  logits = (3 * jax.random.normal(ks[6], (N, V))).astype(dtype)
  labels = jax.random.randint(ks[7], (N,), 0, V)
  import optax
  cases.append(dict(name=f"softmax_cross_entropy N{N} V{V}", args=(logits,), argnums=(0,),
                    work=N * V * jnp.dtype(dtype).itemsize, work_kind="bytes",
                    base={"optax": lambda lg: optax.softmax_cross_entropy_with_integer_labels(
                        lg.astype(jnp.float32), labels)},
                    ours={f"lepton[{be},{fl}]": (fl, lambda lg: lpk.softmax_cross_entropy(lg, labels, backend=be))
                          for fl in flavors},
                    ref=lambda lg: lpk.softmax_cross_entropy_reference(lg, labels)))
  # --- matmul + bias + gelu
  # (bfloat16 also in the dry run: the Mosaic GPU matmul is 16-bit only)
  M, K, Nn = (64, 128, 64) if dry else (4096, 4096, 4096)
  a = jax.random.normal(ks[0], (M, K), jnp.bfloat16)
  w = (0.05 * jax.random.normal(ks[1], (K, Nn))).astype(jnp.bfloat16)
  bias = (0.1 * jax.random.normal(ks[2], (Nn,))).astype(jnp.bfloat16)
  cases.append(dict(name=f"matmul+bias+gelu M{M} K{K} N{Nn}", args=(a, w, bias), argnums=(0, 1, 2),
                    work=2 * M * K * Nn, work_kind="flops", bwd_factor=3.0, tol=5e-2,
                    base={"plain_jnp": lambda a, w, c: jax.nn.gelu(a @ w + c)},
                    ours={f"lepton[{be},{fl}]": (fl, lambda a, w, c: lpk.matmul(a, w, bias=c, activation="gelu",
                                                                                backend=be)) for fl in flavors},
                    ref=lambda a, w, c: lpk.matmul_reference(a, w, bias=c, activation="gelu")))
  return cases + late


def run(dry_run: bool = False, out: str | None = None, budget_s: float = 420.0, repeats: int | None = None):
  t_start = time.perf_counter()
  dev = jax.devices()[0]
  on_gpu = dev.platform == "gpu"
  if not on_gpu and not dry_run:
    raise SystemExit("gpu_check: no GPU visible (jax.devices()[0] is "
                     f"{dev.platform}); use --dry-run for the CPU smoke test")
  dtype = jnp.float32 if dry_run else jnp.bfloat16
  backend = "interpret" if dry_run else "pallas_gpu"
  repeats = repeats or (2 if dry_run else 10)
  tol = 5e-2 if dtype == jnp.bfloat16 else 2e-3
  payload = {
      "benchmark": "gpu_check", "dry_run": dry_run, "device_kind": dev.device_kind,
      "platform": dev.platform, "compute_capability": getattr(dev, "compute_capability", None),
      "jax_version": jax.__version__, "dtype": jnp.dtype(dtype).name, "repeats": repeats,
      "gpu_flavor_default": _registry.gpu_flavor(), "hbm_bytes_per_s": _roofline_bw(dev.device_kind),
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "note": ("fwd_bwd_tflops counts 3.5x the forward FLOPs; *_gbps count the bytes of x read and y "
               "written (fwd) and 3x that (fwd+bwd); speedup_vs_<baseline> = baseline time / ours "
               "(> 1 is faster); correctness: max |ours - reference| / max(1, max |reference|)."),
      "results": [], "skipped": [],
  }
  for case in _cases(dry_run, dtype, backend):
    if time.perf_counter() - t_start > budget_s:
      payload["skipped"].append(case["name"])
      continue
    rows = []
    for impl, fn in case["base"].items():
      row = {"kernel": case["name"], "impl": impl, "baseline": True}
      try:
        row.update(_time_impl(fn, case["args"], case["argnums"], repeats, case["work"], case["work_kind"],
                              case.get("bwd_factor", 3.5)))
      except Exception as e:   # noqa: BLE001 - record and go on
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
      rows.append(row)
    for impl, (flavor, fn) in case["ours"].items():
      row = {"kernel": case["name"], "impl": impl, "baseline": False}
      with _env("LEPTON_PALLAS_GPU", flavor):
        try:
          cargs = case.get("check_args") or case["args"]
          row["check"] = _check(fn, case["ref"], cargs, case["argnums"], case.get("tol", tol))
          row.update(_time_impl(fn, case["args"], case["argnums"], repeats, case["work"], case["work_kind"],
                                case.get("bwd_factor", 3.5)))
        except Exception as e:   # noqa: BLE001
          row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
          row["traceback_tail"] = traceback.format_exc().splitlines()[-6:]
      rows.append(row)
    for r in rows:
      for bl in rows:
        if bl["baseline"] and not r["baseline"] and "fwd_s" in bl and "fwd_s" in r:
          r[f"speedup_vs_{bl['impl']}"] = {"fwd": bl["fwd_s"] / r["fwd_s"],
                                            "fwd_bwd": bl["fwd_bwd_s"] / r["fwd_bwd_s"]}
      bw = payload["hbm_bytes_per_s"]
      if bw and "fwd_gbps" in r:
        r["fwd_roofline_fraction"] = r["fwd_gbps"] * 1e9 / bw
      status = r.get("error") or (f"fwd {r['fwd_s'] * 1e3:.3f} ms, f+b {r['fwd_bwd_s'] * 1e3:.3f} ms"
                                  + (f", check {r['check']}" if "check" in r else ""))
      print(f"{r['kernel']:<48} {r['impl']:<40} {status}", flush=True)
    payload["results"].extend(rows)
  # What the GPU run is for: every Mosaic GPU row ran Mosaic GPU kernels only (no Triton call
  # left) in forward and backward, matched the reference, and how fast it was vs the baselines.
  payload["mosaic_gpu_summary"] = [
      {"kernel": r["kernel"], "ok": bool(r.get("check", {}).get("ok")) and "error" not in r,
       "mosaic_only": r.get("custom_calls", {}).get("fwd") == ["mosaic_gpu"]
       and r.get("custom_calls", {}).get("fwd_bwd") == ["mosaic_gpu"],
       "speedups": {k: v for k, v in r.items() if k.startswith("speedup_vs_")},
       "error": r.get("error")}
      for r in payload["results"] if not r["baseline"] and r["impl"].endswith(",mosaic]")]
  payload["wall_s"] = time.perf_counter() - t_start
  out = out or os.path.join(os.environ.get("OUT", "."), "gpu_check.json")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w") as f:
    json.dump(payload, f, indent=1, default=str)
  print(f"wrote {out} ({payload['wall_s']:.0f} s)")
  return payload


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--dry-run", action="store_true", help="interpret mode, tiny shapes, any host")
  p.add_argument("--out", default=None, help="JSON path (default: $OUT/gpu_check.json)")
  p.add_argument("--budget-s", type=float, default=420.0, help="skip remaining cases after this many s")
  p.add_argument("--repeats", type=int, default=None)
  a = p.parse_args(argv)
  payload = run(a.dry_run, a.out, a.budget_s, a.repeats)
  failed = [r for r in payload["results"] if not r["baseline"] and
            ("error" in r or not r.get("check", {}).get("ok", True))]
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
