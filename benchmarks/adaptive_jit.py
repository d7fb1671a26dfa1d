"""Benchmark: adaptive_jit vs jax.jit on the test corpus (time + compiled memory + FLOPs).

Run ``python -m benchmarks.adaptive_jit --small`` (CPU) or without ``--small`` on an
accelerator. Writes ``benchmarks/results/adaptive_jit_<device-kind>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from lepton_jax.transforms import adaptive_jit  # noqa: E402


def _corpus(small: bool):
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests",
                                  "transforms"))
  import test_adaptive_jit_corpus as c  # the same 20 programs the tests use
  progs = list(c.CORPUS)
  seq = 256 if small else 2048
  d = 64
  r = np.random.default_rng(0)
  n = lambda *s: jnp.asarray(r.normal(size=s), jnp.float32) * 0.1
  att = {"wq": n(d, d), "wk": n(d, d), "wv": n(d, d), "wo": n(d, d)}

  def split(p, x):
    b, t, _ = x.shape
    return [(x @ p[w]).reshape(b, t, 4, d // 4) for w in ("wq", "wk", "wv")]

  def big_attention(p, x):
    q, k, v = split(p, x)
    return x + jax.nn.dot_product_attention(q, k, v, is_causal=True).reshape(x.shape) @ p["wo"]

  progs.append((f"attention_seq{seq}", big_attention, att, n(1, seq, d)))
  return progs


def _time(fn, *args, reps):
  jax.block_until_ready(fn(*args))
  ts = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    ts.append(time.perf_counter() - t)
  return statistics.median(ts)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--small", action="store_true", help="small sizes and few repeats (CPU)")
  ap.add_argument("--out", default=None)
  args = ap.parse_args(argv)
  reps = 25 if args.small else 20   # medians; many repeats because CPU hosts are shared
  dev = jax.devices()[0]
  rows = []
  for name, fn, p, x in _corpus(args.small):
    ours = adaptive_jit(fn, kernels="auto")
    base = jax.jit(fn)
    m_ours = ours.lower(p, x).compile().memory_analysis()
    m_base = base.lower(p, x).compile().memory_analysis()
    rep = ours.explain(p, x)
    t_ours = _time(ours, p, x, reps=reps)
    t_base = _time(base, p, x, reps=reps)
    err = float(np.max(np.abs(np.asarray(ours(p, x), np.float32) - np.asarray(base(p, x), np.float32))))
    row = {
        "program": name,
        "time_s": t_ours, "time_s_jax_jit": t_base, "time_ratio": t_ours / t_base,
        "temp_bytes": int(m_ours.temp_size_in_bytes),
        "temp_bytes_jax_jit": int(m_base.temp_size_in_bytes),
        "temp_ratio": (m_ours.temp_size_in_bytes / m_base.temp_size_in_bytes
                       if m_base.temp_size_in_bytes else 1.0),
        "flops_before": rep.flops_before, "flops_after": rep.flops_after,
        "rewrites": len(rep.rewrites), "max_abs_err": err,
        "compiles": ours.cache_info().compiles,
    }
    rows.append(row)
  hdr = f"{'program':<22}{'time x':>8}{'temp x':>8}{'flops x':>9}{'rewrites':>9}{'err':>10}"
  print(hdr)
  print("-" * len(hdr))
  for r in rows:
    fr = r["flops_after"] / r["flops_before"] if r["flops_before"] else 1.0
    print(f"{r['program']:<22}{r['time_ratio']:>8.2f}{r['temp_ratio']:>8.2f}{fr:>9.2f}"
          f"{r['rewrites']:>9}{r['max_abs_err']:>10.1e}")
  kind = dev.device_kind.lower().replace(" ", "_")
  out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                 f"adaptive_jit_{kind}.json")
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, "w") as f:
    json.dump({"benchmark": "adaptive_jit", "device": str(dev), "device_kind": dev.device_kind,
               "jax_version": jax.__version__, "date": datetime.datetime.now().isoformat(),
               "small": args.small, "repeats": reps, "rows": rows,
               "baseline": "jax.jit of the same function, same run"}, f, indent=2)
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
