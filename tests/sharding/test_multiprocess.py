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
_DEADLINE_S = 90.0   # a guard against hangs: a normal run takes ~30 s on 2 loaded cores


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_workers(nproc, out_dir):
  """Runs the workers; returns ``[(returncode or None if killed, stdout, stderr)]``."""
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
  for p in procs:
    try:
      out, err = p.communicate(timeout=max(1.0, end - time.monotonic()))
      results.append((p.returncode, out, err))
    except subprocess.TimeoutExpired:
      p.kill()
      out, err = p.communicate()
      results.append((None, out, err))
  return results


def _stack_of_interest(err):
  """The lines of a worker's stderr that name lepton_jax / orbax frames or an error, else its tail."""
  keep = [l.strip() for l in err.splitlines()
          if "lepton_jax" in l or "orbax" in l or "Error" in l or "Check failed" in l or "Thread" in l]
  return "\n".join(keep[-40:]) or err[-800:]


def _json_lines(out, key):
  return [json.loads(l) for l in out.splitlines() if l.startswith("{") and key in l]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
  """One 2-process run shared by the tests below (the auto_shard step, then the checkpoint)."""
  nproc = 2
  tmp = tmp_path_factory.mktemp("mp")
  results = _run_workers(nproc, tmp)
  if any(rc == _mp_worker.GLOO_UNAVAILABLE for rc, _, _ in results):
    pytest.skip("gloo CPU collectives are not available in this jaxlib: "
                + " ".join(o.strip() for _, o, _ in results))
  return nproc, tmp, results


def test_two_process_gloo_plan_and_result(two_process_run):
  nproc, tmp_path, results = two_process_run
  reports = []
  for i, (rc, out, err) in enumerate(results):
    got = _json_lines(out, '"plan_hash"')
    assert got, f"process {i} (exit {rc}) printed no step result:\n{out}\n{err[-3000:]}"
    reports.append(got[-1])
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


def test_two_process_tiered_checkpoint_of_sharded_state(two_process_run):
  """TieredCheckpointManager across both processes: the state sharded over their devices is saved
  (host-local tier per process, shared persistent tier written by Orbax's collective save),
  restored equal, re-saved (new step and an existing step) after a restore by a new manager,
  restored onto another placement (from the shared tier, no corruption warning) and from the
  persistent tier alone; a save failing on one process is raised on both; different persistent
  directories per process are refused on both."""
  nproc, tmp_path, results = two_process_run
  problems = []
  for i, (rc, out, err) in enumerate(results):
    got = _json_lines(out, '"checkpoint"')
    if not got:
      phases = [l.split(" ", 1)[1] for l in out.splitlines() if l.startswith("CKPT_PHASE ")]
      problems.append(f"process {i}: no checkpoint result ({'killed after the deadline' if rc is None else f'exit {rc}'}"
                      f", last phase {phases[-1] if phases else 'none'}); stderr: {_stack_of_interest(err)}")
      continue
    res = got[-1]["checkpoint"]
    failed = [k for k, v in res.get("checks", {}).items() if not v]
    if not res["ok"]:
      problems.append(f"process {i}: failed checks {failed}; {res}")
  assert not problems, "\n".join(problems)
  assert all(rc == 0 for rc, _, _ in results), [rc for rc, _, _ in results]
  # The shared tier is one standard Orbax directory holding every process's shards: plain Orbax
  # (one process) lists its steps and reads step 2's parameters, 2 * (the reference step) + 1.
  import orbax.checkpoint as ocp
  with ocp.CheckpointManager(tmp_path / "persistent") as m:
    assert list(m.all_steps()) == [1, 2, 3]
  manifest = json.loads((tmp_path / "persistent" / "2" / "lepton_manifest" / "metadata").read_text())
  abstract = {}
  for e in manifest["body"]["arrays"]:
    d = abstract
    for k in e["path"][:-1]:
      d = d.setdefault(k, {})
    d[e["path"][-1]] = np.empty(e["shape"], e["dtype"])
  with ocp.StandardCheckpointer() as c:
    saved = c.restore(tmp_path / "persistent" / "2" / "state", abstract)
  tx = optax.adamw(1e-2)
  ps = M.mlp_init(0, [8, 16, 4])
  x, y = M.mp_batch()
  ref_ps = jax.jit(M.make_mlp_step(tx))(ps, tx.init(ps), x, y)[0]
  for layer, leaves in ref_ps.items():
    for k, v in leaves.items():
      np.testing.assert_allclose(saved["params"][layer][k], 2 * np.asarray(v) + 1, rtol=1e-5, atol=1e-6)
  # The misconfigured job named both processes' directories on every process.
  for _, out, _ in results:
    msg = _json_lines(out, '"checkpoint"')[-1]["checkpoint"]["different_dirs_error"]
    assert "persistent_0" in msg and "persistent_1" in msg, msg
