"""Pareto table of lj.remat_plan vs JAX's built-in checkpoint policies.

For each model: activation peak and saved residual bytes (JAX's accounting, inputs
excluded) of the forward + backward pass, both from ``lepton_jax.jaxpr``'s
``grad_memory`` on the function as called -- the same measurement the planner,
``RematPlan.peak_bytes`` and the tests use --, extra FLOPs over plain jax.grad
(shared cost model), and median step time of the jitted gradient, each also as a
ratio to plain jax.grad measured in the same run. Dominance rows: our plan at
each policy's own peak (``budget=<bytes>``) and at its own saved bytes
(``budget_kind="saved"``) must not recompute more FLOPs than the policy.

  python -m benchmarks.remat --small      # CPU-sized models
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import time

import jax
import jax.numpy as jnp

from lepton_jax import jaxpr as ljx
from lepton_jax._errors import BudgetError
from lepton_jax.jaxpr._liveness import grad_memory  # ljx.grad_memory once re-exported
from lepton_jax.transforms import remat_plan


def mlp_loss(params, x):
  for w, b in params:
    x = jnp.tanh(x @ w + b)
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


def tr_unrolled(params, x):
  for p in params:
    x = _block(x, p)
  return jnp.mean(x ** 2)


def tr_scanned(params, x):
  x, _ = jax.lax.scan(lambda c, p: (_block(c, p), None), x, params)
  return jnp.mean(x ** 2)


def conv_loss(params, x):  # a small ResNet-style conv stack (residual blocks)
  for w1, w2 in params:
    y = jax.nn.relu(jax.lax.conv_general_dilated(x, w1, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
    x = jax.nn.relu(x + jax.lax.conv_general_dilated(y, w2, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
  return jnp.mean(x ** 2)


def models(small: bool):
  k = jax.random.key(0)
  L, d, bsz = (16, 64, 32) if small else (32, 1024, 256)
  ks = jax.random.split(k, 8)
  mlp = ([(jax.random.normal(kk, (d, d)) / math.sqrt(d), jnp.zeros(d)) for kk in jax.random.split(ks[0], L)],
         jnp.ones((bsz, d)))
  tl, td, tt = (4, 32, 16) if small else (12, 512, 512)
  def tp(n, stacked):
    p = {"qkv": jax.random.normal(ks[1], (n, td, 3 * td)) * 0.05, "o": jax.random.normal(ks[2], (n, td, td)) * 0.05,
         "w1": jax.random.normal(ks[3], (n, td, 4 * td)) * 0.05, "w2": jax.random.normal(ks[4], (n, 4 * td, td)) * 0.02}
    return p if stacked else [jax.tree.map(lambda a: a[i], p) for i in range(n)]
  x = jax.random.normal(ks[5], (2, tt, td))
  c, hw, nb = (8, 8, 4) if small else (64, 56, 8)
  conv = ([(jax.random.normal(kk, (3, 3, c, c)) * 0.1, jax.random.normal(kk, (3, 3, c, c)) * 0.1)
           for kk in jax.random.split(ks[6], nb)], jax.random.normal(ks[7], (4, hw, hw, c)))
  return {
      "mlp_tower": (mlp_loss, mlp),
      "transformer_unrolled": (tr_unrolled, (tp(tl, False), x)),
      "transformer_scanned": (tr_scanned, (tp(2 * tl, True), x)),
      "resnet_conv": (conv_loss, conv),
  }


def _saved(fun, *args):
  from jax._src.ad_checkpoint import saved_residuals
  return sum(ljx.aval_bytes(a) for a, d in saved_residuals(fun, *args)
             if not d.startswith(("from the argument", "from a literal", "from a constant"))
             and "host" not in str(getattr(a, "memory_space", "")).lower())


def _time(fun, args, repeats):
  g = jax.jit(jax.grad(fun))
  jax.block_until_ready(g(*args))
  ts = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(g(*args))
    ts.append(time.perf_counter() - t)
  return statistics.median(ts)


def _point(name, fun, args, base, repeats, plan=None, plan_time=None):
  mem = grad_memory(fun, *args)
  flops = mem.flops  # forward + backward jaxprs: the same measure as RematPlan.recompute_flops
  row = {"config": name, "peak_bytes": int(mem.peak_bytes), "saved_bytes": int(mem.saved_bytes),
         "jax_saved_bytes_all_args": int(_saved(fun, *args)),
         "extra_flops": float(flops - base["flops"]), "step_s": _time(fun, args, repeats)}
  if jax.default_backend() != "cpu":
    ma = jax.jit(jax.grad(fun)).lower(*args).compile().memory_analysis()
    row["xla_temp_bytes"] = int(getattr(ma, "temp_size_in_bytes", 0))
  if plan is not None:
    row.update(plan_peak_bytes=plan.peak_bytes, plan_saved_bytes=plan.saved_bytes,
               plan_budget_bytes=plan.budget_bytes, plan_model_peak_bytes=plan.model_peak_bytes,
               plan_recompute_flops=plan.recompute_flops, offloaded_bytes=plan.offloaded_bytes,
               solver=plan.solver, segments=plan.num_segments, depth=plan.depth,
               plan_time_s=plan_time,
               peak_matches_plan=int(mem.peak_bytes) == plan.peak_bytes,
               within_budget=int(mem.peak_bytes) <= plan.budget_bytes)
  if base.get("peak_bytes"):
    row["peak_ratio"] = row["peak_bytes"] / base["peak_bytes"]
    row["saved_ratio"] = row["saved_bytes"] / max(base["saved_bytes"], 1)
    row["time_ratio"] = row["step_s"] / base["step_s"]
  return row


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument("--small", action="store_true", help="CPU-sized models")
  ap.add_argument("--repeats", type=int, default=5)
  a = ap.parse_args(argv)
  pols = {"jax:nothing_saveable": jax.checkpoint_policies.nothing_saveable,
          "jax:dots_saveable": jax.checkpoint_policies.dots_saveable,
          "jax:dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
          "jax:everything_saveable": jax.checkpoint_policies.everything_saveable}
  results = []
  for mname, (fun, args) in models(a.small).items():
    base = {"flops": grad_memory(fun, *args).flops}
    b = _point("plain jax.grad", fun, args, base, a.repeats)
    base.update(b)
    rows = [_point("plain jax.grad", fun, args, base, a.repeats)]
    for pname, pol in pols.items():
      rows.append(_point(pname, jax.checkpoint(fun, policy=pol), args, base, a.repeats))
    budgets = [(f"lj.remat_plan({x})", x) for x in (0.25, 0.5, 0.75)]
    # dominance: our plan at each JAX policy's own peak must not recompute more
    budgets += [(f"lj.remat_plan(peak of {r['config'][4:]})", int(r["peak_bytes"]))
                for r in rows[1:] if r["peak_bytes"] < rows[0]["peak_bytes"]]
    # dominance on (saved bytes, recompute FLOPs): a saved-bytes budget at each policy's saved bytes
    budgets += [(f"lj.remat_plan(saved of {r['config'][4:]})", ("saved", int(r["saved_bytes"])))
                for r in rows[1:]]
    for label, budget in budgets:
      kind = "peak"
      if isinstance(budget, tuple):
        kind, budget = budget
      f = remat_plan(fun, budget=budget, budget_kind=kind)
      t0 = time.perf_counter()
      try:
        plan = f.plan(*args)
      except BudgetError as e:
        rows.append({"config": label, "infeasible": str(e)})
        continue
      rows.append(_point(label, f, args, base, a.repeats, plan, time.perf_counter() - t0))
      if isinstance(budget, int):
        axis = "saved" if kind == "saved" else "peak"
        pol_row = next(r for r in rows if r["config"] == "jax:" + label.split(" of ")[1][:-1])
        rows[-1]["dominates_policy"] = bool(rows[-1][f"{axis}_bytes"] <= pol_row[f"{axis}_bytes"]
                                            and rows[-1]["extra_flops"] <= pol_row["extra_flops"] + 1e-6)
        rows[-1]["budget_kind"] = kind
        if kind == "saved":  # the budget bounds the saved bytes, not the peak
          rows[-1]["within_budget"] = rows[-1]["saved_bytes"] <= plan.budget_bytes
    print(f"\n{mname}")
    print(f"  {'config':<52}{'peak':>10}{'peak/plain':>11}{'saved':>10}{'extra FLOPs':>13}{'step ms':>9}"
          f"{'time/plain':>11}  check")
    for r in rows:
      if "infeasible" in r:
        print(f"  {r['config']:<52} infeasible: {r['infeasible'].split(';')[0][-60:]}")
        continue
      check = ""
      if "within_budget" in r:
        check = "ok" if r["within_budget"] and r["peak_matches_plan"] else "MISMATCH"
      if "dominates_policy" in r:
        check += " dominates" if r["dominates_policy"] else " NOT dominating"
      print(f"  {r['config']:<52}{r['peak_bytes']:>10}{r.get('peak_ratio', 1):>11.3f}{r['saved_bytes']:>10}"
            f"{r['extra_flops']:>13.3g}{r['step_s'] * 1e3:>9.2f}{r.get('time_ratio', 1):>11.2f}  {check}")
    results.append({"model": mname, "rows": rows})
  dev = jax.devices()[0]
  kind = dev.device_kind.lower().replace(" ", "_")
  out = {"benchmark": "remat", "device": str(dev), "device_kind": dev.device_kind, "backend": jax.default_backend(),
         "jax_version": jax.__version__, "date": datetime.datetime.now().isoformat(timespec="seconds"),
         "small": a.small, "repeats": a.repeats, "results": results}
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"remat_{kind}.json")
  with open(path, "w") as fh:
    json.dump(out, fh, indent=1)
  print(f"\nwrote {path}")


if __name__ == "__main__":
  main()
