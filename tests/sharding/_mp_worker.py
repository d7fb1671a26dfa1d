"""One process of the 2-process ``auto_shard`` test (run by test_multiprocess.py).

Usage: python -m tests.sharding._mp_worker PROCESS_ID NUM_PROCESSES PORT OUT_DIR

The parent sets XLA_FLAGS (2 CPU devices per process) and JAX_PLATFORMS=cpu.
Prints a JSON line ``{"process": i, "plan_hash": ..., "loss": ...}``, writes the gathered
parameters to OUT_DIR/params_<i>.npz, then prints ``CKPT_PHASE <name>`` lines and a JSON line
``{"process": i, "checkpoint": ...}``.

After the step, the sharded state (parameters and optimizer state, spread over both processes'
devices) is saved with ``lj.checkpoint.TieredCheckpointManager`` (local tier per process under
OUT_DIR/local_<i>, persistent tier shared in OUT_DIR/persistent) and restored onto the same
shardings; ``"checkpoint"`` reports ``{"ok": true, "max_abs_diff": ...}`` or the exception
(type, message, the phase it happened in) so the parent can say exactly what failed.
"""

import json
import os
import sys

GLOO_UNAVAILABLE = 77


def main(pid: int, nproc: int, port: int, out_dir: str) -> None:
  import jax
  missing = None
  try:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  except Exception as e:  # a jax without the option: go on (gloo may be the default there)
    missing = f"{type(e).__name__}: {e}"
  try:
    _run(jax, pid, nproc, port, out_dir)
  except Exception as e:
    if missing is None:
      raise
    print(f"GLOO_UNAVAILABLE: option jax_cpu_collectives_implementation: {missing}; then "
          f"{type(e).__name__}: {e}", flush=True)
    sys.exit(GLOO_UNAVAILABLE)


def _run(jax, pid, nproc, port, out_dir):
  jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=nproc, process_id=pid,
                             initialization_timeout=40)
  try:
    import numpy as np
    import optax
    from jax.experimental import multihost_utils
    from jax.sharding import AxisType

    from lepton_jax.sharding import auto_shard, make_global_batch
    from tests.sharding import models as M

    n = jax.device_count()
    assert jax.process_count() == nproc and n == 2 * nproc, (jax.process_count(), n)
    mesh = jax.make_mesh((nproc, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    tx = optax.adamw(1e-2)
    step = M.make_mlp_step(tx)
    ps = M.mlp_init(0, [8, 16, 4])
    st = tx.init(ps)
    x, y = M.mp_batch()
    rows = x.shape[0] // nproc
    local = {"x": x[pid * rows:(pid + 1) * rows], "y": y[pid * rows:(pid + 1) * rows]}
    batch = make_global_batch(local, mesh)
    f = auto_shard(step, mesh)
    plan = f.explain(ps, st, batch["x"], batch["y"])
    new_ps, new_st, loss = f(ps, st, batch["x"], batch["y"])
    gathered = multihost_utils.process_allgather(new_ps, tiled=True)
    flat = {jax.tree_util.keystr(p): np.asarray(v)
            for p, v in jax.tree_util.tree_flatten_with_path(gathered)[0]}
    np.savez(os.path.join(out_dir, f"params_{pid}.npz"), **flat)
    print(json.dumps({"process": pid, "plan_hash": plan.plan_hash, "loss": float(loss),
                      "param_sum": float(sum(v.sum() for v in flat.values())),
                      "x_spec": str(plan.inputs[-2].spec)}), flush=True)
    ckpt = _checkpoint_roundtrip(jax, multihost_utils, np, {"params": new_ps, "opt": new_st}, pid, out_dir)
    print(json.dumps({"process": pid, "checkpoint": ckpt}), flush=True)
  finally:
    jax.distributed.shutdown()


def _checkpoint_roundtrip(jax, multihost_utils, np, state, pid, out_dir) -> dict:
  """Save + restore of the sharded ``state`` across the processes; never raises."""
  import traceback

  phase = "import"

  def enter(name):
    print(f"CKPT_PHASE {name}", flush=True)   # the parent reports the last phase if this hangs
    return name

  import faulthandler
  faulthandler.dump_traceback_later(30, exit=False)   # a hang shows where it waits (stderr)
  try:
    from lepton_jax.checkpoint import TieredCheckpointManager
    phase = enter("open")
    mgr, open_error = None, None
    try:
      mgr = TieredCheckpointManager(os.path.join(out_dir, f"local_{pid}"), os.path.join(out_dir, "persistent"),
                                    local_every=1, persistent_every=1, async_save=False)
    except Exception as e:  # noqa: BLE001 - agreed on below, then re-raised
      open_error = e
    # Every process must take part in Orbax's collective save: agree first, so that a process
    # refused here does not leave its peers waiting in the save until the deadline.
    opened = multihost_utils.process_allgather(np.asarray([mgr is not None], np.int32))
    if open_error is not None:
      raise open_error
    if not bool(np.all(opened)):
      mgr.close()
      return {"ok": False, "phase": "open", "error": f"a peer process could not open its manager "
              f"(opened per process: {np.asarray(opened).ravel().tolist()})", "where": []}
    with mgr:
      phase = enter("save")
      saved = mgr.save(1, state, force=True)
      mgr.wait()
      phase = enter("latest_step")
      latest = mgr.latest_step()
      phase = enter("restore")
      target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
      got = mgr.restore(1, target=target)
    phase = enter("compare")
    same_sharding = all(a.sharding == b.sharding for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(state)))
    a = multihost_utils.process_allgather(got, tiled=True)
    b = multihost_utils.process_allgather(state, tiled=True)
    diff = max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) if np.size(x) else 0.0
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    return {"ok": bool(saved) and latest == 1 and same_sharding and diff == 0.0, "saved": bool(saved),
            "latest_step": latest, "same_sharding": same_sharding, "max_abs_diff": diff}
  except Exception as e:  # noqa: BLE001 - reported to the parent test, which says what failed
    tb = traceback.extract_tb(e.__traceback__)
    where = [f"{f.filename.split('lepton_jax/')[-1]}:{f.lineno} {f.name}" for f in tb
             if "lepton_jax/checkpoint" in f.filename][-3:]
    return {"ok": False, "phase": phase, "error": f"{type(e).__name__}: {str(e)[:600]}", "where": where}
  finally:
    faulthandler.cancel_dump_traceback_later()


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
