"""lj.auto_shard vs the named baselines on Flax-style gemma / lm1b train steps, a ViT and a ResNet.

For each model (train step: loss + grads + optax.adamw), mesh and strategy, XLA's figures of the
compiled program: argument + temp bytes per device (outputs in donated buffers; the acceptance
figure), memory = argument + output + temp - alias bytes of ``compiled.memory_analysis()``, and
collective bytes = operand bytes of all-reduce / all-gather / reduce-scatter / all-to-all /
collective-permute in the optimized HLO (per device, each op once). Ratios are against the best
named baseline (least compiled argument + temp) on the same mesh; planning seconds include auto's
compiled validation of its candidates (wall and CPU seconds). The loss of auto's sharded step is
checked against single-device ``jax.jit``. Meshes: (n,), (2, n/2), (n/2, 2) data x model, and
(2, 2, n/4) data x fsdp x tensor.

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
  ap.add_argument("--models", default="gemma,lm1b,vit,resnet,scanned_lm")
  ap.add_argument("--meshes", default="1d,2xn,nx2,3d", help="comma list of 1d, 2xn, nx2, 3d")
  return ap.parse_args()


def _figures(compiled):
  from lepton_jax.jaxpr._compiled import read_compiled
  f = read_compiled(compiled)
  return dict(arg_temp_bytes_per_device=int(f.argument_bytes + f.temp_bytes),
              memory_bytes_per_device=int(f.device_bytes),
              argument_bytes=int(f.argument_bytes), output_bytes=int(f.output_bytes),
              temp_bytes=int(f.temp_bytes), alias_bytes=int(f.alias_bytes),
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
  from lepton_jax.sharding._compiled import _REMAT, _captured_stderr
  from tests.sharding import models as M

  n = jax.device_count()
  if n % 2:
    raise SystemExit(f"auto_shard benchmark needs an even number of devices, got {n}")
  if a.small:
    sizes = {"gemma": dict(layers=2), "lm1b": dict(layers=2), "vit": dict(layers=2), "resnet": {},
             "scanned_lm": dict(layers=2)}
  else:
    sizes = {"gemma": dict(vocab=32000, d=1024, heads=8, kv_heads=2, head_dim=128, ff=4096, layers=4,
                           batch=4 * n, seq=256),
             "lm1b": dict(vocab=32000, d=1024, heads=16, ff=4096, layers=4, batch=4 * n, seq=256),
             "vit": dict(image=224, d=768, heads=12, ff=3072, layers=4, batch=4 * n),
             "resnet": dict(channels=(64, 128), batch=4 * n, image=64),
             "scanned_lm": dict(vocab=32000, d=1024, heads=16, ff=4096, layers=4, batch=4 * n, seq=256)}
  ex = lambda k: (AxisType.Explicit,) * k
  all_meshes = {"1d": (f"({n},) data", lambda: jax.make_mesh((n,), ("data",), axis_types=ex(1))),
                "2xn": (f"(2, {n // 2}) data x model",
                        lambda: jax.make_mesh((2, n // 2), ("data", "model"), axis_types=ex(2))),
                "nx2": (f"({n // 2}, 2) data x model",
                        lambda: jax.make_mesh((n // 2, 2), ("data", "model"), axis_types=ex(2))),
                "3d": (f"(2, 2, {n // 4}) data x fsdp x tensor",
                       lambda: jax.make_mesh((2, 2, n // 4), ("data", "fsdp", "tensor"), axis_types=ex(3)))}
  meshes = {all_meshes[k][0]: all_meshes[k][1]() for k in a.meshes.split(",")
            if k != "3d" or n % 4 == 0}
  rows = []
  hdr = (f"{'model':<10} {'mesh':<30} {'strategy':<9} {'arg+temp':>10} {'x best':>7} {'temp':>10} "
         f"{'coll HLO':>10} {'x best':>7} {'#coll':>5} {'remat':>5} {'plan s':>7}")
  print(hdr)
  print("-" * len(hdr))
  for mname in a.models.split(","):
    step, args = M.CASES[mname](**sizes[mname])
    ref_loss = float(jax.jit(step)(*args)[2])
    for meshname, mesh in meshes.items():
      f = auto_shard(step, mesh)
      t0, c0 = time.perf_counter(), time.process_time()
      plan = f.explain(*args)
      plan_s, plan_cpu = time.perf_counter() - t0, time.process_time() - c0
      loss = float(f(*args)[2])
      if not np.isclose(loss, ref_loss, rtol=1e-4):
        raise SystemExit(f"{mname} {meshname}: auto loss {loss} != single-device {ref_loss}")
      case = [dict(model=mname, mesh=meshname, strategy="auto", **_figures(f.lower(*args).compile()),
                   remat_warnings=plan.compiled["remat_warnings"], chosen_candidate=next(
                       c["name"] for c in plan.candidates if c["chosen"]),
                   planning_s=plan_s, planning_cpu_s=plan_cpu,
                   compiled_candidates=sum(c["compiled"] is not None for c in plan.candidates),
                   candidates=len(plan.candidates), loss=loss, loss_single_device=ref_loss,
                   estimated_memory_bytes=plan.memory_bytes_per_device,
                   estimated_collective_bytes=plan.collective_bytes["total"])]
      remat = {p: c["compiled"]["remat_warnings"] for c in plan.candidates if c["compiled"]
               for p in c["name"].split("=")}
      screened = {p for c in plan.candidates if not c["compiled"] for p in c["name"].split("=")}
      for strat in ("dp", "fsdp", "tp", "replicate"):
        if strat == "tp" and len(mesh.axis_names) == 1:
          continue
        g = auto_shard(step, mesh, strategy=strat)
        t0 = time.perf_counter()
        bplan = g.explain(*args)
        bplan_s = time.perf_counter() - t0
        lowered = g.lower(*args)
        with _captured_stderr() as box:
          compiled = lowered.compile()
        rw = remat.get(strat)
        if rw is None:
          rw = sum(_REMAT in line for line in (box[0] if box else "").splitlines())
        case.append(dict(model=mname, mesh=meshname, strategy=strat, **_figures(compiled),
                         remat_warnings=rw, screened_out_by_auto=strat in screened, planning_s=bplan_s,
                         estimated_memory_bytes=bplan.memory_bytes_per_device,
                         estimated_collective_bytes=bplan.collective_bytes["total"]))
      best = min(case[1:], key=lambda r: (r["arg_temp_bytes_per_device"], r["collective_bytes_hlo"]["total"]))
      for r in case:
        r["best_baseline"] = best["strategy"]
        r["arg_temp_ratio_vs_best_baseline"] = r["arg_temp_bytes_per_device"] / best["arg_temp_bytes_per_device"]
        r["memory_ratio_vs_best_baseline"] = r["memory_bytes_per_device"] / best["memory_bytes_per_device"]
        bc = best["collective_bytes_hlo"]["total"]
        r["collective_ratio_vs_best_baseline"] = (r["collective_bytes_hlo"]["total"] / bc) if bc else None
        cr = r["collective_ratio_vs_best_baseline"]
        print(f"{r['model']:<10} {r['mesh']:<30} {r['strategy']:<9} {r['arg_temp_bytes_per_device']:>10,} "
              f"{r['arg_temp_ratio_vs_best_baseline']:>7.3f} {r['temp_bytes']:>10,} "
              f"{r['collective_bytes_hlo']['total']:>10,} {cr if cr is None else round(cr, 3)!s:>7} "
              f"{r['collective_bytes_hlo']['count']:>5} {r['remat_warnings']!s:>5} {r['planning_s']:>7.2f}")
      rows.extend(case)

  dev = jax.devices()[0]
  result = {"benchmark": "auto_shard", "device": dev.device_kind, "platform": dev.platform,
            "num_devices": n, "jax_version": jax.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "small": a.small,
            "models": sizes,
            "notes": ("arg_temp = argument + temp bytes per device (the acceptance figure: outputs in "
                      "donated buffers); memory = argument + output + temp - alias bytes per device from "
                      "compiled.memory_analysis(); collective bytes = operand bytes of all-reduce/"
                      "all-gather/reduce-scatter/all-to-all/collective-permute in the optimized HLO "
                      "(per device, each op counted once); ratios vs the named baseline with the least "
                      "compiled argument + temp on the same mesh; planning_s / planning_cpu_s of auto "
                      "include compiling those of its candidates that the argument-bytes bound does not "
                      "screen out (compiled_candidates of candidates); remat_warnings = XLA 'Involuntary full "
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
