"""One process of the 2-process ``auto_shard`` test (run by test_multiprocess.py).

Usage: python -m tests.sharding._mp_worker PROCESS_ID NUM_PROCESSES PORT OUT_DIR

The parent sets XLA_FLAGS (2 CPU devices per process) and JAX_PLATFORMS=cpu.
Prints a JSON line ``{"process": i, "plan_hash": ..., "loss": ...}``, writes the gathered
parameters to OUT_DIR/params_<i>.npz, then prints ``CKPT_PHASE <name>`` lines and a JSON line
``{"process": i, "checkpoint": ...}``.

After the step, the sharded state (parameters and optimizer state, spread over both processes'
devices) is saved with ``lj.checkpoint.TieredCheckpointManager`` (local tier per process under
OUT_DIR/local_<i>, persistent tier shared in OUT_DIR/persistent), restored, re-saved and restored
onto another placement, and a manager with a different persistent directory per process is
refused; ``"checkpoint"`` reports ``{"ok": ..., "checks": {name: bool}}`` or the exception (type,
message, the phase it happened in) so the parent can say exactly what failed.
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
  """Save / restore / re-save of the sharded ``state`` across the processes; never raises.

  Local tier per process (OUT_DIR/local_<i>, host-local: each process its own shards), persistent
  tier shared (OUT_DIR/persistent). Returns ``{"ok": bool, "checks": {name: bool}, ...}``.
  """
  import traceback
  import warnings

  phase = "import"

  def enter(name):
    print(f"CKPT_PHASE {name}", flush=True)   # the parent reports the last phase if this hangs
    return name

  def same(got, want):
    """Equal values (gathered over the processes) and the same shardings."""
    if jax.tree.structure(got) != jax.tree.structure(want):
      return False
    shard_ok = all(a.sharding.is_equivalent_to(b.sharding, a.ndim)
                   for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
    a = multihost_utils.process_allgather(got, tiled=True)
    b = multihost_utils.process_allgather(want, tiled=True)
    return shard_ok and all(np.array_equal(np.asarray(x), np.asarray(y))
                            for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

  def same_by_path(nested, want):
    """``restore`` without a target gives nested dicts keyed by the pytree path."""
    ok = True
    for kp, x in jax.tree_util.tree_flatten_with_path(want)[0]:
      got = nested
      for k in kp:
        got = got[str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))]
      ok = ok and same(got, x)
    return ok

  import faulthandler
  import shutil
  faulthandler.dump_traceback_later(40, exit=False)   # a hang shows where it waits (stderr)
  checks = {}
  caught = []
  warnings.showwarning = lambda message, category, *a, **k: caught.append(category)
  warnings.simplefilter("always")
  try:
    from lepton_jax.checkpoint import CheckpointCorruptionWarning, TieredCheckpointManager
    local = os.path.join(out_dir, f"local_{pid}")
    persistent = os.path.join(out_dir, "persistent")
    kw = dict(local_every=1, persistent_every=1)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)

    phase = enter("save")
    with TieredCheckpointManager(local, persistent, async_save=False, **kw) as mgr:
      checks["save"] = mgr.save(1, state, force=True) is True
      checks["latest_step"] = mgr.latest_step() == 1
      phase = enter("restore")
      checks["restore"] = same(mgr.restore(1, target=target), state)

    # A new manager on the same directories: verdicts from disk, restore, then save a new step and
    # re-save step 1 (written aside, then swapped in) with the restored, updated state.
    phase = enter("resave")
    with TieredCheckpointManager(local, persistent, async_save=True, **kw) as mgr:
      checks["reopen_latest_step"] = mgr.latest_step() == 1
      restored = mgr.restore(target=target)
      checks["reopen_restore"] = same(restored, state)
      state2 = jax.tree.map(lambda x: x * 2 + 1, restored)
      checks["resave_new_step"] = mgr.save(2, state2)
      checks["resave_existing_step"] = mgr.save(1, state2, force=True)
      mgr.wait()
      checks["resave_latest_step"] = mgr.latest_step() == 2
      checks["resave_restore_1"] = same(mgr.restore(1, target=target), state2)
      checks["resave_restore_2"] = same(mgr.restore(2, target=target), state2)

    # Another placement (every array replicated on all devices): the host-local copies do not hold
    # it, so the shared tier is read, without any corruption warning. Persistent tier alone too.
    phase = enter("other_sharding")
    mesh_all = jax.sharding.Mesh(np.array(jax.devices()), ("all",))
    rep = jax.sharding.NamedSharding(mesh_all, jax.sharding.PartitionSpec())
    target_rep = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), state)
    with TieredCheckpointManager(local, persistent, **kw) as mgr:
      got = mgr.restore(1, target=target_rep)
    checks["other_sharding_restore"] = same(got, jax.tree.map(lambda x: jax.device_put(x, rep), state2))
    with TieredCheckpointManager(None, persistent, **kw) as mgr:
      checks["persistent_only_latest_step"] = mgr.latest_step() == 2
      checks["persistent_only_restore"] = same(mgr.restore(2, target=target), state2)
    # The host-local tier alone: restored where it was saved (with or without a target); another
    # placement is refused with a message that names the persistent tier.
    phase = enter("local_only")
    with TieredCheckpointManager(local, None, **kw) as mgr:
      checks["local_only_restore"] = same(mgr.restore(1, target=target), state2)
      checks["local_only_restore_without_target"] = same_by_path(mgr.restore(2), state2)
      try:
        mgr.restore(1, target=target_rep)
        checks["local_only_other_sharding_refused"] = False
      except ValueError as e:
        checks["local_only_other_sharding_refused"] = "persistent" in str(e)
    # Verdicts lost: latest_step reads and checks the steps again, all processes together.
    phase = enter("reverify")
    if pid == 0:
      shutil.rmtree(os.path.join(persistent, ".lepton", "verdicts"))
    shutil.rmtree(os.path.join(local, ".lepton", "verdicts"))
    multihost_utils.sync_global_devices("verdicts removed")
    with TieredCheckpointManager(local, persistent, **kw) as mgr:
      checks["reverified_latest_step"] = mgr.latest_step() == 2          # the local copies of step 2
    with TieredCheckpointManager(None, persistent, **kw) as mgr:
      checks["reverified_persistent_latest_step"] = mgr.latest_step() == 2
    multihost_utils.sync_global_devices("verdicts written")   # by the primary, for the shared tier
    checks["reverified_verdict_files"] = (
        sorted(os.listdir(os.path.join(persistent, ".lepton", "verdicts"))) == ["2.json"]
        and sorted(os.listdir(os.path.join(local, ".lepton", "verdicts"))) == ["2.json"])
    checks["no_corruption_warning"] = not any(issubclass(c, CheckpointCorruptionWarning) for c in caught)
    checks["no_leftovers"] = sorted(os.listdir(persistent)) == [".lepton", "1", "2"] and sorted(
        os.listdir(local)) == [".lepton", "1", "2"]

    # A save that fails on one process (its local tier) is raised on every process; the shared tier
    # committed the step, which is then the newest one (process 1 has no local copy of it).
    phase = enter("save_error")
    with TieredCheckpointManager(local, persistent, async_save=False, **kw) as mgr:
      if pid == 1:
        real = mgr._start_write

        def failing(t, step, args):
          if t.name == "local":
            raise OSError(28, "No space left on device (injected)")
          return real(t, step, args)
        mgr._start_write = failing
      try:
        mgr.save(3, state2)
        err = "no error"
      except (OSError, RuntimeError) as e:
        err = f"{type(e).__name__}: {e}"
      checks["save_error_raised_everywhere"] = ("No space left" in err
                                                and err.startswith("OSError" if pid == 1 else "RuntimeError"))
      checks["save_error_latest_step"] = mgr.latest_step() == 3
      checks["save_error_restore"] = same(mgr.restore(3, target=target), state2)

    # Misconfigured job: each process gives its own persistent directory.
    phase = enter("different_dirs")
    try:
      TieredCheckpointManager(local, os.path.join(out_dir, f"persistent_{pid}"), **kw).close()
      different = "no error"
    except ValueError as e:
      different = str(e)
    checks["different_dirs_error"] = ("different settings" in different
                                      and all(f"persistent_{i}" in different for i in range(2)))
    return {"ok": all(checks.values()), "checks": checks, "different_dirs_error": different[:600]}
  except Exception as e:  # noqa: BLE001 - reported to the parent test, which says what failed
    tb = traceback.extract_tb(e.__traceback__)
    where = [f"{f.filename.split('lepton_jax/')[-1]}:{f.lineno} {f.name}" for f in tb
             if "lepton_jax/checkpoint" in f.filename][-3:]
    return {"ok": False, "phase": phase, "checks": checks, "error": f"{type(e).__name__}: {str(e)[:600]}",
            "where": where}
  finally:
    faulthandler.cancel_dump_traceback_later()


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
