"""auto_shard under jax.distributed: 2 processes on localhost, CPU collectives via gloo."""

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import optax
import pytest

from tests.sharding import _mp_worker
from tests.sharding import models as M

_ROOT = pathlib.Path(__file__).resolve().parents[2]
_DEADLINE_S = 55.0


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_workers(nproc, out_dir):
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"   # overrides the conftest's 8
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join([str(_ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, "-m", "tests.sharding._mp_worker", str(i), str(nproc),
                             str(port), str(out_dir)], cwd=_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(nproc)]
  end = time.monotonic() + _DEADLINE_S
  results = []
  try:
    for p in procs:
      out, err = p.communicate(timeout=max(1.0, end - time.monotonic()))
      results.append((p.returncode, out, err))
  except subprocess.TimeoutExpired:
    for p in procs:
      if p.poll() is None:
        p.kill()
    logs = "\n".join((p.communicate()[1] or "")[-2000:] for p in procs)
    pytest.fail(f"2-process auto_shard run took longer than {_DEADLINE_S} s; stderr:\n{logs}")
  return results


def test_two_process_gloo_plan_and_result(tmp_path):
  nproc = 2
  results = _run_workers(nproc, tmp_path)
  if any(rc == _mp_worker.GLOO_UNAVAILABLE for rc, _, _ in results):
    pytest.skip("gloo CPU collectives are not available in this jaxlib: "
                + " ".join(o.strip() for _, o, _ in results))
  for i, (rc, out, err) in enumerate(results):
    assert rc == 0, f"process {i} exited with {rc}:\n{out}\n{err[-3000:]}"
  reports = [json.loads([l for l in out.splitlines() if l.startswith("{")][-1]) for _, out, _ in results]
  assert [r["process"] for r in reports] == list(range(nproc))
  assert len({r["plan_hash"] for r in reports}) == 1, reports       # the same plan on every process
  assert "data" in reports[0]["x_spec"]                               # batch split across processes

  # Single-process reference: the same step on the full global batch with plain jax.jit.
  tx = optax.adamw(1e-2)
  step = M.make_mlp_step(tx)
  ps = M.mlp_init(0, [8, 16, 4])
  x, y = M.mp_batch()
  ref_ps, _, ref_loss = jax.jit(step)(ps, tx.init(ps), x, y)
  ref = {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(ref_ps)[0]}
  for r in reports:
    np.testing.assert_allclose(r["loss"], float(ref_loss), rtol=1e-5)
  for i in range(nproc):
    got = np.load(tmp_path / f"params_{i}.npz")
    assert sorted(got.files) == sorted(ref)
    for k in ref:
      np.testing.assert_allclose(got[k], ref[k], rtol=1e-5, atol=1e-6, err_msg=k)
