"""Benchmark: TieredCheckpointManager vs plain Orbax async save, plus a kill -9 fault run.

Measures, in the same run and on the same state (a pytree of float32 arrays):

* blocking time of ``save`` (how long the training step is held up),
* time until the save is committed (``wait``), as throughput in GiB/s,
* restore time (ours verifies every array's digest),

for plain ``orbax.checkpoint.CheckpointManager`` (``StandardSave``, async) and
for ``TieredCheckpointManager`` with one tier and with both tiers due, as
medians over ``--repeats`` saves; ratios are ours / plain Orbax. ``--faults N``
additionally runs N save-loop children killed with SIGKILL at random moments and
checks every restore (see ``tests/checkpoint/_fault_child.py``).

Usage::

  python -m benchmarks.checkpoint --small            # CPU: 64 MiB state, 20 kills
  python -m benchmarks.checkpoint --size=1GiB --faults=100
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import shutil
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from lepton_jax._utils import format_bytes, parse_bytes
from lepton_jax.checkpoint import TieredCheckpointManager

_ROOT = pathlib.Path(__file__).resolve().parent.parent


def make_state(total_bytes: int, n_arrays: int = 8, seed: int = 0) -> dict:
  per = max(total_bytes // n_arrays // 4, 1024)
  cols = 1024
  rows = max(per // cols, 1)
  mesh = jax.make_mesh((len(jax.devices()),), ("x",))
  rows = -(-rows // len(jax.devices())) * len(jax.devices())
  sharding = jax.NamedSharding(mesh, jax.P("x"))
  key = jax.random.key(seed)
  state = {}
  for i in range(n_arrays):
    state[f"layer{i}"] = {"kernel": jax.device_put(jax.random.normal(jax.random.fold_in(key, i), (rows, cols)),
                                                   sharding)}
  jax.block_until_ready(state)
  return state


def _nbytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _bench_plain(state, root, repeats):
  mngr = ocp.CheckpointManager(root, options=ocp.CheckpointManagerOptions(max_to_keep=2))
  block, total, restore = [], [], []
  for s in range(repeats + 1):
    t0 = time.perf_counter()
    mngr.save(s, args=ocp.args.StandardSave(state))
    t1 = time.perf_counter()
    mngr.wait_until_finished()
    t2 = time.perf_counter()
    if s:  # first save includes one-time setup
      block.append(t1 - t0)
      total.append(t2 - t0)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  for _ in range(max(repeats // 2, 1)):
    t0 = time.perf_counter()
    r = mngr.restore(repeats, args=ocp.args.StandardRestore(abstract))
    jax.block_until_ready(r)
    restore.append(time.perf_counter() - t0)
  mngr.close()
  return block, total, restore


def _bench_ours(state, root, repeats, both_tiers):
  local, persistent = root / "local", root / "persistent"
  if both_tiers:
    mngr = TieredCheckpointManager(local, persistent, local_every=1, persistent_every=1, keep_persistent=2)
  else:
    mngr = TieredCheckpointManager(None, persistent, local_every=1, persistent_every=1, keep_persistent=2)
  block, total, restore = [], [], []
  for s in range(repeats + 1):
    t0 = time.perf_counter()
    mngr.save(s, state)
    t1 = time.perf_counter()
    mngr.wait()
    t2 = time.perf_counter()
    if s:
      block.append(t1 - t0)
      total.append(t2 - t0)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  for _ in range(max(repeats // 2, 1)):
    t0 = time.perf_counter()
    r = mngr.restore(target=abstract)
    jax.block_until_ready(r)
    restore.append(time.perf_counter() - t0)
  mngr.close()
  return block, total, restore


def run_faults(n: int, root: pathlib.Path) -> dict:
  sys.path.insert(0, str(_ROOT / "tests" / "checkpoint"))
  import _fault_child  # pylint: disable=import-error

  t0 = time.perf_counter()
  records = _fault_child.run_faults(str(root), n, n_dirs=4, seed=0)
  return {
      "runs": len(records),
      "all_exact": True,  # run_faults raises on the first inexact / missing restore
      "restored_steps": [r["restored_step"] for r in records],
      "committed_before_kill": [r["committed_before_kill"] for r in records],
      "median_verify_s": statistics.median(r["verify_s"] for r in records),
      "wall_s": time.perf_counter() - t0,
  }


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--small", action="store_true", help="CPU-sized run (64 MiB, 3 repeats, 20 kills)")
  ap.add_argument("--size", default="1GiB", help="state size, e.g. 256MiB, 4GiB")
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--faults", type=int, default=None, help="kill -9 runs (default 100, 20 with --small)")
  ap.add_argument("--dir", default=None, help="where to write checkpoints (default: a temp dir)")
  ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/checkpoint_<device>.json)")
  args = ap.parse_args(argv)
  size = parse_bytes("64MiB" if args.small else args.size, name="--size", api="benchmarks.checkpoint")
  repeats = 3 if args.small else args.repeats
  faults = args.faults if args.faults is not None else (20 if args.small else 100)

  root = pathlib.Path(args.dir or tempfile.mkdtemp(prefix="lj_ckpt_bench_"))
  state = make_state(size)
  nbytes = _nbytes(state)
  gib = nbytes / 2**30
  rows = {}
  rows["orbax_async"] = _bench_plain(state, root / "plain", repeats)
  rows["tiered_1_tier"] = _bench_ours(state, root / "ours1", repeats, both_tiers=False)
  rows["tiered_2_tiers"] = _bench_ours(state, root / "ours2", repeats, both_tiers=True)
  base_block = statistics.median(rows["orbax_async"][0])
  base_total = statistics.median(rows["orbax_async"][1])
  base_restore = statistics.median(rows["orbax_async"][2])
  results = {}
  print(f"state: {format_bytes(nbytes)} in {len(jax.tree.leaves(state))} arrays over "
        f"{len(jax.devices())} {jax.devices()[0].device_kind} device(s); medians of {repeats}")
  print(f"{'saver':<16}{'blocking s':>12}{'x orbax':>9}{'commit s':>11}{'GiB/s':>8}{'x orbax':>9}"
        f"{'restore s':>11}{'x orbax':>9}")
  for name, (block, total, restore) in rows.items():
    b, t, r = statistics.median(block), statistics.median(total), statistics.median(restore)
    results[name] = {
        "blocking_s": b, "commit_s": t, "restore_s": r, "throughput_gib_s": gib / t,
        "blocking_s_per_gib": b / gib,
        "blocking_ratio_vs_orbax": b / base_block, "commit_ratio_vs_orbax": t / base_total,
        "restore_ratio_vs_orbax": r / base_restore,
        "blocking_all_s": block, "commit_all_s": total, "restore_all_s": restore,
    }
    print(f"{name:<16}{b:>12.4f}{b / base_block:>9.2f}{t:>11.4f}{gib / t:>8.2f}{t / base_total:>9.2f}"
          f"{r:>11.4f}{r / base_restore:>9.2f}")
  fault = None
  if faults:
    fault = run_faults(faults, root / "faults")
    print(f"fault run: {fault['runs']} kill -9 runs, every restore exact and newest complete "
          f"(steps reached {max(fault['restored_steps'])}), {fault['wall_s']:.1f} s")
  out = {
      "benchmark": "checkpoint",
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
      "jax_version": jax.__version__,
      "orbax_version": ocp.__version__ if hasattr(ocp, "__version__") else None,
      "device": jax.devices()[0].device_kind,
      "platform": jax.devices()[0].platform,
      "n_devices": len(jax.devices()),
      "state_bytes": nbytes,
      "repeats": repeats,
      "baseline": "orbax.checkpoint.CheckpointManager async StandardSave (same state, same run)",
      "results": results,
      "faults": fault,
  }
  kind = jax.devices()[0].device_kind.lower().replace(" ", "_").replace("/", "_")
  path = pathlib.Path(args.out) if args.out else _ROOT / "benchmarks" / "results" / f"checkpoint_{kind}.json"
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(out, indent=2))
  print(f"wrote {path}")
  if args.dir is None:
    shutil.rmtree(root, ignore_errors=True)
  return out


if __name__ == "__main__":
  if "XLA_FLAGS" not in os.environ and "--small" in sys.argv:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  main()
