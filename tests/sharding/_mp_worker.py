"""One process of the 2-process ``auto_shard`` test (run by test_multiprocess.py).

Usage: python -m tests.sharding._mp_worker PROCESS_ID NUM_PROCESSES PORT OUT_DIR

The parent sets XLA_FLAGS (2 CPU devices per process) and JAX_PLATFORMS=cpu.
Prints one JSON line ``{"process": i, "plan_hash": ..., "loss": ...}`` and writes
the gathered parameters to OUT_DIR/params_<i>.npz.
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
  finally:
    jax.distributed.shutdown()


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
