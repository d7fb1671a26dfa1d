"""Benchmark: TieredCheckpointManager vs plain Orbax async save, plus an optional kill -9 fault run.

Measures, in the same run, on the same state (a pytree of float32 arrays, sharded over all
devices), for each state size:

* blocking time of ``save`` (how long the training step is held up), also per GiB,
* time until the save is committed (``save`` + ``wait``), as throughput in GiB/s,
* restore time (ours verifies every array's digest),

for plain ``orbax.checkpoint.CheckpointManager`` (``StandardSave``, async) and for
``TieredCheckpointManager`` with one tier and with both tiers due at every save. Repeats are
interleaved (saver order rotates every round) so that a slow moment of a shared machine hits
every saver alike; the tables show medians and ratios ours / plain Orbax. One warm-up save per
saver (Orbax set-up, digest compilation) is not counted. ``--faults N`` additionally runs N
save-loop children killed with SIGKILL at random moments and checks every restore (see
``tests/checkpoint/_fault_child.py``).

Usage::

  python -m benchmarks.checkpoint --small                       # CPU: 64 MiB + 1 GiB, < 3 min
  python -m benchmarks.checkpoint --sizes=64MiB,256MiB,1GiB --repeats=5 --faults=100
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
import numpy as np
import orbax.checkpoint as ocp

from lepton_jax._utils import format_bytes, parse_bytes
from lepton_jax.checkpoint import TieredCheckpointManager
from lepton_jax.checkpoint import _checksum

_ROOT = pathlib.Path(__file__).resolve().parent.parent


def make_state(total_bytes: int, n_arrays: int = 8, seed: int = 0) -> dict:
  """``n_arrays`` float32 matrices (1024 columns) summing to about ``total_bytes``, row-sharded."""
  per = max(total_bytes // n_arrays // 4, 1024)
  cols = 1024
  n_dev = len(jax.devices())
  rows = -(-max(per // cols, 1) // n_dev) * n_dev
  mesh = jax.make_mesh((n_dev,), ("x",))
  sharding = jax.NamedSharding(mesh, jax.P("x"))
  rng = np.random.default_rng(seed)
  state = {}
  for i in range(n_arrays):
    host = rng.standard_normal((rows, cols), dtype=np.float32)
    state[f"layer{i}"] = {"kernel": jax.device_put(host, sharding)}
  jax.block_until_ready(state)
  return state


def _nbytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


class _Plain:
  name = "orbax_async"

  def __init__(self, root):
    self.m = ocp.CheckpointManager(root, options=ocp.CheckpointManagerOptions(max_to_keep=2))

  def save(self, step, state):
    self.m.save(step, args=ocp.args.StandardSave(state))

  def wait(self):
    self.m.wait_until_finished()

  def restore(self, step, abstract):
    return self.m.restore(step, args=ocp.args.StandardRestore(abstract))

  def close(self):
    self.m.close()


class _Ours:

  def __init__(self, root, both_tiers):
    self.name = "tiered_2_tiers" if both_tiers else "tiered_1_tier"
    local = root / "local" if both_tiers else None
    self.m = TieredCheckpointManager(local, root / "persistent", local_every=1, persistent_every=1,
                                     keep_local=2, keep_persistent=2)

  def save(self, step, state):
    self.m.save(step, state)

  def wait(self):
    self.m.wait()

  def restore(self, step, abstract):
    return self.m.restore(step, target=abstract)

  def close(self):
    self.m.close()


def bench_size(size: int, root: pathlib.Path, repeats: int, restore_repeats: int) -> dict:
  state = make_state(size)
  nbytes = _nbytes(state)
  gib = nbytes / 2**30
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  savers = [_Plain(root / "plain"), _Ours(root / "ours1", False), _Ours(root / "ours2", True)]
  times = {s.name: {"block": [], "commit": [], "restore": []} for s in savers}
  step = 0
  for r in range(repeats + 1):  # round 0 is the warm-up
    order = savers[r % 3:] + savers[:r % 3]
    step += 1
    for s in order:
      t0 = time.perf_counter()
      s.save(step, state)
      t1 = time.perf_counter()
      s.wait()
      t2 = time.perf_counter()
      if r:
        times[s.name]["block"].append(t1 - t0)
        times[s.name]["commit"].append(t2 - t0)
  for r in range(restore_repeats):
    order = savers[r % 3:] + savers[:r % 3]
    for s in order:
      t0 = time.perf_counter()
      jax.block_until_ready(s.restore(step, abstract))
      times[s.name]["restore"].append(time.perf_counter() - t0)
  for s in savers:
    s.close()
  shutil.rmtree(root, ignore_errors=True)
  base = {k: statistics.median(times["orbax_async"][k]) for k in ("block", "commit", "restore")}
  out = {"state_bytes": nbytes, "repeats": repeats, "restore_repeats": restore_repeats, "savers": {}}
  for name, t in times.items():
    b, c, rs = (statistics.median(t[k]) for k in ("block", "commit", "restore"))
    out["savers"][name] = {
        "blocking_s": b, "blocking_s_per_gib": b / gib, "commit_s": c, "throughput_gib_s": gib / c,
        "restore_s": rs, "blocking_ratio_vs_orbax": b / base["block"],
        "commit_ratio_vs_orbax": c / base["commit"], "restore_ratio_vs_orbax": rs / base["restore"],
        "blocking_all_s": t["block"], "commit_all_s": t["commit"], "restore_all_s": t["restore"]}
  del state
  return out


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
  ap.add_argument("--small", action="store_true",
                  help="CPU-sized run: 64 MiB (5 repeats) and 1 GiB (3 repeats), no kill -9 runs")
  ap.add_argument("--sizes", default="64MiB,256MiB,1GiB", help="comma-separated state sizes")
  ap.add_argument("--repeats", type=int, default=5, help="counted saves per saver and size")
  ap.add_argument("--faults", type=int, default=0, help="kill -9 runs (0: none)")
  ap.add_argument("--dir", default=None, help="where to write checkpoints (default: a temp dir)")
  ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/checkpoint_<device>.json)")
  args = ap.parse_args(argv)
  if args.small:
    plan = [(parse_bytes("64MiB"), 5, 3), (parse_bytes("1GiB"), 3, 1)]
  else:
    plan = [(parse_bytes(s, name="--sizes", api="benchmarks.checkpoint"), args.repeats,
             max(args.repeats // 2, 1)) for s in args.sizes.split(",")]
  root = pathlib.Path(args.dir or tempfile.mkdtemp(prefix="lj_ckpt_bench_"))
  t_start = time.perf_counter()
  dev = jax.devices()[0]
  print(f"{len(jax.devices())} x {dev.device_kind} ({dev.platform}), jax {jax.__version__}; "
        f"checkpoints in {root}; medians of interleaved repeats (warm-up save excluded)")
  print(f"{'state':>9} {'saver':<15}{'block s':>9}{'s/GiB':>8}{'x orbax':>8}{'commit s':>10}{'GiB/s':>7}"
        f"{'x orbax':>8}{'restore s':>10}{'x orbax':>8}")
  sizes = []
  for size, repeats, restore_repeats in plan:
    res = bench_size(size, root / f"s{size}", repeats, restore_repeats)
    sizes.append(res)
    for name, r in res["savers"].items():
      print(f"{format_bytes(res['state_bytes']):>9} {name:<15}{r['blocking_s']:>9.4f}"
            f"{r['blocking_s_per_gib']:>8.3f}{r['blocking_ratio_vs_orbax']:>8.2f}{r['commit_s']:>10.3f}"
            f"{r['throughput_gib_s']:>7.2f}{r['commit_ratio_vs_orbax']:>8.2f}{r['restore_s']:>10.3f}"
            f"{r['restore_ratio_vs_orbax']:>8.2f}")
  fault = None
  if args.faults:
    fault = run_faults(args.faults, root / "faults")
    print(f"fault run: {fault['runs']} kill -9 runs, every restore exact and newest complete "
          f"(steps reached {max(fault['restored_steps'])}), {fault['wall_s']:.1f} s")
  out = {
      "benchmark": "checkpoint",
      "command": "python -m benchmarks.checkpoint " + " ".join(sys.argv[1:] if argv is None else argv),
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
      "jax_version": jax.__version__,
      "orbax_version": getattr(ocp, "__version__", None),
      "device": dev.device_kind,
      "platform": dev.platform,
      "n_devices": len(jax.devices()),
      "cpu_count": os.cpu_count(),
      "baseline": "orbax.checkpoint.CheckpointManager async StandardSave (same state, same run, interleaved)",
      "digest_host_max_bytes": _checksum.HOST_DIGEST_MAX_BYTES,
      "sizes": sizes,
      "faults": fault,
      "wall_s": time.perf_counter() - t_start,
  }
  kind = dev.device_kind.lower().replace(" ", "_").replace("/", "_")
  path = pathlib.Path(args.out) if args.out else _ROOT / "benchmarks" / "results" / f"checkpoint_{kind}.json"
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(out, indent=2))
  print(f"wrote {path} ({out['wall_s']:.0f} s)")
  if args.dir is None:
    shutil.rmtree(root, ignore_errors=True)
  return out


if __name__ == "__main__":
  if "XLA_FLAGS" not in os.environ and "--small" in sys.argv:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  main()
