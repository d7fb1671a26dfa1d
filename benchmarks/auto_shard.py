"""lj.auto_shard vs the named baselines (dp / fsdp / tp / replicate) on an MLP and a transformer LM.

For each model, mesh and strategy: per-device memory from ``compiled.memory_analysis()``,
collective bytes parsed from the compiled (SPMD-partitioned) HLO text, the planner's own
estimate, and the median step time. Ratios are against ``replicate`` on the same mesh.

Run: python -m benchmarks.auto_shard [--small]
(--small: 8 simulated CPU devices, set here before JAX is imported.)
Writes benchmarks/results/auto_shard_<platform>.json.
"""

import argparse
import datetime
import json
import os
import re
import statistics
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)

_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1}
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\([^=]*?\)|[a-z][a-z0-9]*\[[0-9,]*\]\S*)\s+([\w\-]+)\((.*)$")
_SHAPE = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_OPERAND = re.compile(r"%([\w.\-]+)")
_COMMENT = re.compile(r"/\*.*?\*/")


def _shape_bytes(text: str) -> int:
  total = 0
  for dt, dims in _SHAPE.findall(text):
    if dt not in _DTYPE_BYTES:
      continue
    n = 1
    for d in filter(None, dims.split(",")):
      n *= int(d)
    total += n * _DTYPE_BYTES[dt]
  return total


def collective_bytes(hlo_text: str) -> dict:
  """Operand bytes of each collective in a compiled HLO module (per device, static count).

  Operands are printed by name, so every instruction's result shape is read first.
  ``total`` sums operand bytes; ``result_total`` the collectives' result bytes.
  ``*-start`` ops are counted, ``*-done`` are not; collectives inside a loop body count once.
  """
  shapes, colls = {}, []
  for line in hlo_text.splitlines():
    m = _INSTR.match(_COMMENT.sub("", line))
    if not m:
      continue
    name, shape, op, rest = m.groups()
    shapes[name] = _shape_bytes(shape)
    base = op[:-len("-start")] if op.endswith("-start") else op
    if base in _COLLECTIVES:
      depth, end = 1, len(rest)   # the operand list ends at the matching ')'
      for i, ch in enumerate(rest):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0:
          end = i
          break
      colls.append((base.replace("-", "_"), name, _OPERAND.findall(rest[:end])))
  out = {k.replace("-", "_"): 0 for k in _COLLECTIVES}
  result = 0
  for kind, name, operands in colls:
    out[kind] += sum(shapes.get(o, 0) for o in operands)
    result += shapes[name]
  out["total"] = sum(out.values())
  out["result_total"] = result   # e.g. an all-gather's gathered size
  out["count"] = len(colls)
  return out


def _parse():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--small", action="store_true", help="small models, 8 simulated CPU devices")
  ap.add_argument("--repeats", type=int, default=None, help="timed calls per case (median reported)")
  return ap.parse_args()


def main():
  a = _parse()
  if a.small:
    flags = os.environ.get("XLA_FLAGS", "")
    if "--xla_force_host_platform_device_count" not in flags:
      os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax
  import numpy as np
  import optax
  from jax.sharding import AxisType

  from lepton_jax.sharding import auto_shard
  from tests.sharding import models as M

  repeats = a.repeats or (5 if a.small else 20)
  n = jax.device_count()
  if n < 8 and n % 2:
    raise SystemExit(f"auto_shard benchmark needs an even number of devices, got {n}")
  if a.small:
    mlp_sizes, mlp_batch = [256, 1024, 1024, 256], 64
    lm_kw, lm_batch = dict(vocab=512, d=128, heads=4, ff=512, layers=2, seq=64), 16
  else:
    mlp_sizes, mlp_batch = [1024, 8192, 8192, 1024], 256
    lm_kw, lm_batch = dict(vocab=32000, d=1024, heads=16, ff=4096, layers=8, seq=512), 32

  rng = np.random.default_rng(0)
  tx = optax.adamw(1e-3)
  mlp_ps = M.mlp_init(0, mlp_sizes)
  mlp_args = (mlp_ps, tx.init(mlp_ps),
              rng.standard_normal((mlp_batch, mlp_sizes[0])).astype(np.float32),
              rng.standard_normal((mlp_batch, mlp_sizes[-1])).astype(np.float32))
  lm_ps, heads = M.lm_params(0, **lm_kw)
  toks = rng.integers(0, lm_kw["vocab"], (lm_batch, lm_kw["seq"])).astype(np.int32)
  lm_args = (lm_ps, tx.init(lm_ps), toks, np.roll(toks, -1, axis=1))
  models = {"mlp": (M.make_mlp_step(tx), mlp_args), "transformer_lm": (M.make_lm_step(tx, heads), lm_args)}
  two_d = (2, n // 2) if n >= 4 else (1, n)
  meshes = {f"({n},) data": (jax.make_mesh((n,), ("data",), axis_types=(AxisType.Explicit,)),
                             ["auto", "dp", "fsdp", "replicate"]),
            f"{two_d} data x model": (jax.make_mesh(two_d, ("data", "model"),
                                                     axis_types=(AxisType.Explicit,) * 2),
                                       ["auto", "dp", "fsdp", "tp", "replicate"])}

  rows = []
  hdr = (f"{'model':<15} {'mesh':<18} {'strategy':<9} {'mem/dev':>11} {'x repl':>7} {'params/dev':>11} "
         f"{'coll HLO':>11} {'coll est':>11} {'#coll':>5} {'step ms':>8} {'x repl':>7}")
  print(hdr)
  print("-" * len(hdr))
  for mname, (step, args) in models.items():
    ref = None
    for meshname, (mesh, strategies) in meshes.items():
      base = None
      case_rows = []
      for strat in strategies:
        f = auto_shard(step, mesh, strategy=strat)
        plan = f.explain(*args)
        t0 = time.perf_counter()
        compiled = f.lower(*args).compile()
        compile_s = time.perf_counter() - t0
        ma = compiled.memory_analysis()
        mem = int(ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes
                  - ma.alias_size_in_bytes)
        coll = collective_bytes(compiled.as_text())
        ins, _ = f.shardings(*args)
        placed = jax.device_put(args, ins)
        out = f(*placed)          # warm-up (and the result check below)
        jax.block_until_ready(out)
        loss = float(out[2])
        if ref is None:
          ref = float(jax.jit(step)(*args)[2])
        times = []
        for _ in range(repeats):
          t0 = time.perf_counter()
          jax.block_until_ready(f(*placed))
          times.append(time.perf_counter() - t0)
        row = dict(model=mname, mesh=meshname, strategy=strat,
                   memory_bytes_per_device=mem, argument_bytes=int(ma.argument_size_in_bytes),
                   output_bytes=int(ma.output_size_in_bytes), temp_bytes=int(ma.temp_size_in_bytes),
                   alias_bytes=int(ma.alias_size_in_bytes),
                   param_opt_bytes_per_device=int(plan.param_bytes_per_device),
                   param_opt_bytes=int(plan.param_bytes),
                   replicated_param_bytes=int(plan.replicated_param_bytes),
                   collective_bytes_hlo=coll, collective_bytes_estimated=dict(plan.collective_bytes),
                   step_time_s_median=statistics.median(times), step_time_s_min=min(times),
                   repeats=repeats, compile_s=compile_s, planning_s=plan.planning_seconds,
                   loss=loss, loss_single_device=ref, plan_hash=plan.plan_hash)
        case_rows.append(row)
        if strat == "replicate":
          base = row
      for row in case_rows:
        row["memory_ratio_vs_replicate"] = row["memory_bytes_per_device"] / base["memory_bytes_per_device"]
        row["param_opt_ratio_vs_replicate"] = (row["param_opt_bytes_per_device"]
                                              / base["param_opt_bytes_per_device"])
        row["collective_ratio_vs_replicate"] = (
            row["collective_bytes_hlo"]["total"] / base["collective_bytes_hlo"]["total"]
            if base["collective_bytes_hlo"]["total"] else None)
        row["step_time_ratio_vs_replicate"] = row["step_time_s_median"] / base["step_time_s_median"]
        print(f"{row['model']:<15} {row['mesh']:<18} {row['strategy']:<9} "
              f"{row['memory_bytes_per_device']:>11,} {row['memory_ratio_vs_replicate']:>7.3f} "
              f"{row['param_opt_bytes_per_device']:>11,} {row['collective_bytes_hlo']['total']:>11,} "
              f"{row['collective_bytes_estimated']['total']:>11,} {row['collective_bytes_hlo']['count']:>5} "
              f"{row['step_time_s_median'] * 1e3:>8.2f} {row['step_time_ratio_vs_replicate']:>7.3f}")
        if not np.isclose(row["loss"], row["loss_single_device"], rtol=1e-4):
          raise SystemExit(f"{row['model']} {row['mesh']} {row['strategy']}: loss {row['loss']} != "
                           f"single-device {row['loss_single_device']}")
      rows.append(case_rows)

  dev = jax.devices()[0]
  result = {"benchmark": "auto_shard", "device": dev.device_kind, "platform": dev.platform,
            "num_devices": n, "jax_version": jax.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "small": a.small,
            "models": {"mlp": {"sizes": mlp_sizes, "batch": mlp_batch},
                       "transformer_lm": dict(lm_kw, batch=lm_batch)},
            "notes": ("memory = argument + output + temp - alias bytes per device from "
                      "compiled.memory_analysis(); collective bytes = operand bytes of all-reduce/"
                      "all-gather/reduce-scatter/all-to-all/collective-permute in the compiled HLO "
                      "(per device, each op counted once); ratios vs strategy='replicate' on the same "
                      "mesh; step time = median of repeated calls on placed inputs."),
            "rows": [r for case in rows for r in case]}
  path = os.path.join(_ROOT, "benchmarks", "results", f"auto_shard_{dev.platform}.json")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as fh:
    json.dump(result, fh, indent=2)
  print(f"\nwrote {path}")


if __name__ == "__main__":
  main()
