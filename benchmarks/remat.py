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
  conv = ([(f32(rng.normal(size=(3, 3, c, c)) * 0.1), f32(rng.normal(size=(3, 3, c, c)) * 0.1)) for _ in range(nb)],
          f32(rng.normal(size=(4, hw, hw, c))))
  return {
      "mlp_tower": (mlp_tower, mlp),
      "gelu_tower": (gelu_tower, gelu),
      "transformer": (transformer, (tp(tl, False), x)),
      "cnn": (cnn, conv),
      "transformer_scanned": (transformer_scanned, (tp(2 * tl, True), x)),
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


def run_model(name, fun, args, budgets=BUDGETS):
  base = compiled(fun, args)
  rows = [_row("plain jax.grad", *base, base)]
  for pol in POLICIES:
    p = getattr(jax.checkpoint_policies, pol)
    rows.append(_row(f"jax.checkpoint({pol}) whole", *compiled(jax.checkpoint(fun, policy=p), args), base,
                     policy=pol))
    per_layer = lambda *a, p=p: fun(*a, wrap=lambda f: jax.checkpoint(f, policy=p))
    rows.append(_row(f"jax.checkpoint({pol}) per layer", *compiled(per_layer, args), base, policy=pol))
  targets = [(f"lj.remat_plan({b})", b) for b in budgets]
  # dominance: at each policy's compiled temp (when below plain's), fit and recompute no more
  targets += [(f"lj.remat_plan(at {r['config']})", r["compiled_temp_bytes"]) for r in rows[1:]
              if r["compiled_temp_bytes"] < base[0]]
  for label, budget in targets:
    f = remat_plan(fun, budget=budget)
    t0 = time.perf_counter()
    try:
      plan = f.plan(*args)
    except BudgetError as e:
      rows.append({"config": label, "budget": budget, "infeasible": True,
                   "smallest_feasible_bytes": e.smallest_feasible_bytes,
                   "smallest_feasible_ratio": e.smallest_feasible_bytes / base[0],
                   "planning_s": time.perf_counter() - t0})
      continue
    plan_s = time.perf_counter() - t0
    temp, flops = compiled(f, args)  # independent of the plan object
    row = _row(label, temp, flops, base, budget=budget, budget_bytes=plan.budget_bytes,
               within_budget=temp <= plan.budget_bytes, matches_plan=temp == plan.compiled_bytes,
               planning_s=plan_s, solver=plan.solver, form=plan.form, segments=plan.num_segments,
               depth=plan.depth, compiles=len(plan.candidates), model_peak_bytes=plan.peak_bytes)
    if isinstance(budget, int):
      pol_row = next(r for r in rows if label.endswith(f"at {r['config']})"))
      row["dominates"] = bool(temp <= pol_row["compiled_temp_bytes"]
                              and flops <= pol_row["compiled_flops"] * (1 + 1e-9) + 1.0)
    rows.append(row)
  fr = [r for r in rows if isinstance(r.get("budget"), float) and not r.get("infeasible")]
  monotone = all(a["compiled_flops"] >= b["compiled_flops"] - 1.0 for a, b in zip(fr, fr[1:]))
  return {"model": name, "platform": jax.default_backend(), "plain_temp_bytes": base[0],
          "plain_flops": base[1], "monotone_in_budget": monotone, "rows": rows}


def print_model(res):
  print(f"\n{res['model']}  (plain jax.grad: {res['plain_temp_bytes']} B temp, {res['plain_flops']:.3g} FLOPs; "
        f"monotone in budget: {res['monotone_in_budget']})")
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
