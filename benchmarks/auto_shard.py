"""lj.auto_shard vs the named baselines on Flax-style gemma / lm1b train steps, a ViT and a ResNet.

For each model (train step: loss + grads + optax.adamw), mesh and strategy, XLA's figures of the
compiled program: per-device memory = argument + output + temp - alias bytes of
``compiled.memory_analysis()``, and collective bytes = operand bytes of all-reduce / all-gather /
reduce-scatter / all-to-all / collective-permute in the optimized HLO (per device, each op once).
Ratios are against the best named baseline (least compiled memory) on the same mesh; planning
seconds include auto's compiled validation of its candidates. The loss of auto's sharded step is
checked against single-device ``jax.jit``.

Run: python -m benchmarks.auto_shard [--small]
(--small: 8 simulated CPU devices, set here before JAX is imported.)
Writes benchmarks/results/auto_shard_<platform>.json.
"""

import argparse
import datetime
import json
import os
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)


def collective_bytes(hlo_text: str) -> dict:
  """Operand bytes of each collective kind in an optimized HLO module (see lepton_jax.sharding)."""
  from lepton_jax.sharding._compiled import collective_bytes as cb
  return cb(hlo_text)


def _parse():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--small", action="store_true", help="small models, 8 simulated CPU devices")
  ap.add_argument("--models", default="gemma,lm1b,vit,resnet")
  return ap.parse_args()


def _figures(compiled):
  ma = compiled.memory_analysis()
  return dict(memory_bytes_per_device=int(ma.argument_size_in_bytes + ma.output_size_in_bytes
                                          + ma.temp_size_in_bytes - ma.alias_size_in_bytes),
              argument_bytes=int(ma.argument_size_in_bytes), output_bytes=int(ma.output_size_in_bytes),
              temp_bytes=int(ma.temp_size_in_bytes), alias_bytes=int(ma.alias_size_in_bytes),
              collective_bytes_hlo=collective_bytes(compiled.as_text()))


def main():
  a = _parse()
  if a.small:
    flags = os.environ.get("XLA_FLAGS", "")
    if "--xla_force_host_platform_device_count" not in flags:
      os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax
  import numpy as np
  from jax.sharding import AxisType

  from lepton_jax.sharding import auto_shard
  from tests.sharding import models as M

  n = jax.device_count()
  if n % 2:
    raise SystemExit(f"auto_shard benchmark needs an even number of devices, got {n}")
  if a.small:
    sizes = {"gemma": dict(layers=2), "lm1b": dict(layers=2), "vit": dict(layers=2), "resnet": {}}
  else:
    sizes = {"gemma": dict(vocab=32000, d=1024, heads=8, kv_heads=2, head_dim=128, ff=4096, layers=4,
                           batch=4 * n, seq=256),
             "lm1b": dict(vocab=32000, d=1024, heads=16, ff=4096, layers=4, batch=4 * n, seq=256),
             "vit": dict(image=224, d=768, heads=12, ff=3072, layers=4, batch=4 * n),
             "resnet": dict(channels=(64, 128), batch=4 * n, image=64)}
  two_d = (2, n // 2)
  meshes = {f"({n},) data": jax.make_mesh((n,), ("data",), axis_types=(AxisType.Explicit,)),
            f"{two_d} data x model": jax.make_mesh(two_d, ("data", "model"),
                                                   axis_types=(AxisType.Explicit,) * 2)}
  rows = []
  hdr = (f"{'model':<7} {'mesh':<18} {'strategy':<9} {'mem/dev':>11} {'x best':>7} {'temp':>10} "
         f"{'coll HLO':>10} {'x best':>7} {'#coll':>5} {'remat':>5} {'plan s':>7}")
  print(hdr)
  print("-" * len(hdr))
  for mname in a.models.split(","):
    step, args = M.CASES[mname](**sizes[mname])
    ref_loss = float(jax.jit(step)(*args)[2])
    for meshname, mesh in meshes.items():
      f = auto_shard(step, mesh)
      t0 = time.perf_counter()
      plan = f.explain(*args)
      plan_s = time.perf_counter() - t0
      loss = float(f(*args)[2])
      if not np.isclose(loss, ref_loss, rtol=1e-4):
        raise SystemExit(f"{mname} {meshname}: auto loss {loss} != single-device {ref_loss}")
      case = [dict(model=mname, mesh=meshname, strategy="auto", **_figures(f.lower(*args).compile()),
                   remat_warnings=plan.compiled["remat_warnings"], chosen_candidate=next(
                       c["name"] for c in plan.candidates if c["chosen"]),
                   planning_s=plan_s, loss=loss, loss_single_device=ref_loss,
                   estimated_memory_bytes=plan.memory_bytes_per_device,
                   estimated_collective_bytes=plan.collective_bytes["total"])]
      remat = {p: c["compiled"]["remat_warnings"] for c in plan.candidates for p in c["name"].split("=")}
      for strat in ("dp", "fsdp", "tp", "replicate"):
        if strat == "tp" and len(mesh.axis_names) == 1:
          continue
        g = auto_shard(step, mesh, strategy=strat)
        t0 = time.perf_counter()
        bplan = g.explain(*args)
        bplan_s = time.perf_counter() - t0
        case.append(dict(model=mname, mesh=meshname, strategy=strat, **_figures(g.lower(*args).compile()),
                         remat_warnings=remat.get(strat), planning_s=bplan_s,
                         estimated_memory_bytes=bplan.memory_bytes_per_device,
                         estimated_collective_bytes=bplan.collective_bytes["total"]))
      best = min(case[1:], key=lambda r: (r["memory_bytes_per_device"], r["collective_bytes_hlo"]["total"]))
      for r in case:
        r["best_baseline"] = best["strategy"]
        r["memory_ratio_vs_best_baseline"] = r["memory_bytes_per_device"] / best["memory_bytes_per_device"]
        bc = best["collective_bytes_hlo"]["total"]
        r["collective_ratio_vs_best_baseline"] = (r["collective_bytes_hlo"]["total"] / bc) if bc else None
        cr = r["collective_ratio_vs_best_baseline"]
        print(f"{r['model']:<7} {r['mesh']:<18} {r['strategy']:<9} {r['memory_bytes_per_device']:>11,} "
              f"{r['memory_ratio_vs_best_baseline']:>7.3f} {r['temp_bytes']:>10,} "
              f"{r['collective_bytes_hlo']['total']:>10,} {cr if cr is None else round(cr, 3)!s:>7} "
              f"{r['collective_bytes_hlo']['count']:>5} {r['remat_warnings']!s:>5} {r['planning_s']:>7.2f}")
      rows.extend(case)

  dev = jax.devices()[0]
  result = {"benchmark": "auto_shard", "device": dev.device_kind, "platform": dev.platform,
            "num_devices": n, "jax_version": jax.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "small": a.small,
            "models": sizes,
            "notes": ("memory = argument + output + temp - alias bytes per device from "
                      "compiled.memory_analysis(); collective bytes = operand bytes of all-reduce/"
                      "all-gather/reduce-scatter/all-to-all/collective-permute in the optimized HLO "
                      "(per device, each op counted once); ratios vs the named baseline with the least "
                      "compiled memory on the same mesh; planning_s of auto includes compiling its "
                      "candidates and the baselines (then cached: the baselines' own planning_s "
                      "excludes compilation); remat_warnings = XLA 'Involuntary full "
                      "rematerialization' lines while compiling. Train step = loss + grads + "
                      "optax.adamw. XLA:CPU, simulated devices."),
            "rows": rows}
  path = os.path.join(_ROOT, "benchmarks", "results", f"auto_shard_{dev.platform}.json")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as fh:
    json.dump(result, fh, indent=2)
  print(f"\nwrote {path}")


if __name__ == "__main__":
  main()
