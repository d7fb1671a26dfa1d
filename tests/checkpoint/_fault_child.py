"""Crash-test helper: a process that saves checkpoints in a loop until it is ``kill -9``'d.

Run as a *zygote* (``python _fault_child.py zygote``): it imports JAX, Orbax and
lepton_jax once (no JAX backend, a single thread, so forking is safe), then for
every ``run LOCAL PERSISTENT PROGRESS`` line on stdin forks a child and prints
the child's pid. The child resumes from the newest complete step of the two
directories and saves ``state_for_step(step)`` forever; after each committed
``wait()`` it atomically writes the step to the PROGRESS file. The caller kills
the child with SIGKILL at a random moment and sends ``reap PID`` so the zygote
collects it (it prints the wait status). ``quit`` ends the zygote.

Values are a deterministic function of the step so a restore can be checked
exactly (``state_for_step`` is imported by the tests and the benchmark).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import warnings

import numpy as np

SAVE_KWARGS = dict(local_every=1, persistent_every=3, keep_local=2, keep_persistent=3)


def state_for_step(step: int, *, n: int = 256) -> dict:
  """A small train-state-like pytree whose every value depends on ``step``."""
  import jax
  import ml_dtypes

  # Built with NumPy + device_put only, so a freshly started child compiles nothing.
  base = np.arange(n, dtype=np.float32) * np.float32(0.5) + np.float32(step)
  return {
      "params": {"w": jax.device_put(base.reshape(16, n // 16)),
                 "b": jax.device_put((base[:16] * 2).astype(ml_dtypes.bfloat16))},
      "opt": {"count": jax.device_put(np.int32(step)), "mu": jax.device_put(-base)},
      "rng": jax.random.wrap_key_data(jax.device_put(np.array([0, step], np.uint32)), impl="threefry2x32"),
      "meta": {"step": step, "data_pos": 7 * step, "config": {"lr": 0.125, "name": "fault"}},
  }


def _child(local: str, persistent: str, progress: str, mode: str = "loop") -> None:
  from lepton_jax.checkpoint import TieredCheckpointManager

  if mode == "resave":
    _resave_child(local, persistent, progress)
    return
  mngr = TieredCheckpointManager(local, persistent, **SAVE_KWARGS)
  latest = mngr.latest_step()
  step = 1 if latest is None else latest + 1
  while True:
    mngr.save(step, state_for_step(step))
    if step % 2 == 0:
      mngr.wait()
      tmp = progress + ".tmp"
      with open(tmp, "w") as f:
        f.write(str(step))
      os.replace(tmp, progress)
    step += 1


def _resave_child(local: str, persistent: str, progress: str) -> None:
  """Resumes and re-saves the resumed step (both tiers) over and over: ``st = restore(); save(step, st)``."""
  from lepton_jax.checkpoint import TieredCheckpointManager

  n = 0
  while True:
    with TieredCheckpointManager(local, persistent, **SAVE_KWARGS) as mngr:
      step = mngr.latest_step()
      st = mngr.restore(target=state_for_step(0))
      mngr.save(step, st, force=True)
      mngr.wait()
    n += 1
    tmp = progress + ".tmp"
    with open(tmp, "w") as f:
      f.write(str(n))
    os.replace(tmp, progress)


def _zygote() -> None:
  import orbax.checkpoint  # noqa: F401  (import everything before forking)
  import lepton_jax.checkpoint  # noqa: F401

  out = sys.stdout
  out.write("ready\n")
  out.flush()
  for line in sys.stdin:
    cmd = line.split()
    if not cmd:
      continue
    if cmd[0] == "quit":
      break
    if cmd[0] == "run":
      local, persistent, progress = cmd[1:4]
      log = cmd[4] if len(cmd) > 4 else os.devnull
      mode = cmd[5] if len(cmd) > 5 else "loop"
      pid = os.fork()
      if pid == 0:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        try:
          _child(local, persistent, progress, mode)
        except BaseException:  # noqa: BLE001
          import traceback
          traceback.print_exc()
        finally:
          os._exit(3)
      out.write(f"{pid}\n")
      out.flush()
    elif cmd[0] == "reap":
      _, status = os.waitpid(int(cmd[1]), 0)
      out.write(f"{status}\n")
      out.flush()


def check_restored(restored, step: int) -> None:
  """Raises AssertionError unless ``restored`` equals ``state_for_step(step)`` bit for bit."""
  import jax

  want = state_for_step(step)
  assert restored["meta"] == want["meta"], (restored["meta"], want["meta"])
  got_leaves = jax.tree.leaves(restored)
  want_leaves = jax.tree.leaves(want)
  assert len(got_leaves) == len(want_leaves)
  for g, w in zip(got_leaves, want_leaves):
    if hasattr(w, "dtype") and jax.dtypes.issubdtype(w.dtype, jax.dtypes.prng_key):
      g, w = jax.random.key_data(g), jax.random.key_data(w)
    if hasattr(w, "dtype"):
      assert g.dtype == w.dtype and g.shape == w.shape
      np.testing.assert_array_equal(np.asarray(g).reshape(-1).view(np.uint8), np.asarray(w).reshape(-1).view(np.uint8))
    else:
      assert g == w


def _persistent_steps(d: str) -> list[int]:
  p = os.path.join(d, "persistent")
  return sorted(int(n) for n in os.listdir(p) if n.isdigit()) if os.path.isdir(p) else []


def run_faults(root: str, n_runs: int, *, n_dirs: int = 2, seed: int = 0, max_delay: float = 0.4,
               timeout: float = 120.0, log=None, mode: str = "loop") -> list[dict]:
  """Runs ``n_runs`` save-loop children, each ``kill -9``'d at a random moment, and checks each.

  Runs cycle over ``n_dirs`` directory pairs, so later runs resume (and crash)
  on top of earlier crashed runs. After each kill a fresh manager must report
  the newest complete step (at least the last step the child saw committed)
  and restore exactly ``state_for_step(latest)`` without any corruption warning;
  once that manager is closed, the persistent tier must hold a step at least as
  new as the newest step it was due (``persistent_every`` divides it) - a crash
  between the two tiers' commits is caught up.

  ``mode="resave"``: every directory first gets steps 1..4; each child then resumes
  and re-saves the resumed step 4 in both tiers in a loop (``st = restore();
  save(4, st, force=True)``) until killed; step 4 must survive every kill.
  Returns one record per run.
  """
  from lepton_jax.checkpoint import CheckpointCorruptionWarning, TieredCheckpointManager

  rng = random.Random(seed)
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  env["JAX_PLATFORMS"] = "cpu"
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
  zygote = subprocess.Popen([sys.executable, os.path.abspath(__file__), "zygote"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)
  records = []
  try:
    assert zygote.stdout.readline().strip() == "ready"
    last = {}
    for i in range(n_runs):
      d = os.path.join(root, f"d{i % n_dirs}")
      os.makedirs(d, exist_ok=True)
      progress, logf = os.path.join(d, "progress"), os.path.join(d, "child.log")
      prev = last.get(d, 0)
      if mode == "resave":
        if not os.path.isdir(os.path.join(d, "local")):
          with TieredCheckpointManager(f"{d}/local", f"{d}/persistent", **SAVE_KWARGS) as m:
            for s in range(1, 5):
              m.save(s, state_for_step(s), force=True)
        if os.path.exists(progress):
          os.unlink(progress)
        prev = 0
      zygote.stdin.write(f"run {d}/local {d}/persistent {progress} {logf} {mode}\n")
      zygote.stdin.flush()
      pid = int(zygote.stdout.readline())
      t0 = time.monotonic()
      committed = prev
      while committed <= prev:  # wait until this child has committed a step of its own
        if time.monotonic() - t0 > timeout:
          os.kill(pid, signal.SIGKILL)
          raise AssertionError(f"fault run {i}: child made no progress; log:\n" + open(logf).read()[-3000:])
        time.sleep(0.01)
        try:
          committed = int(open(progress).read())
        except (FileNotFoundError, ValueError):
          pass
      delay = rng.uniform(0.0, max_delay)
      time.sleep(delay)
      os.kill(pid, signal.SIGKILL)
      zygote.stdin.write(f"reap {pid}\n")
      zygote.stdin.flush()
      status = int(zygote.stdout.readline())
      killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
      assert killed, f"fault run {i}: child ended on its own (status {status}); log:\n" + open(logf).read()[-3000:]
      try:
        committed = max(committed, int(open(progress).read()))
      except (FileNotFoundError, ValueError):
        pass
      if mode == "resave":
        committed = 4  # the progress file counts completed re-saves of step 4
      t1 = time.monotonic()
      with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with TieredCheckpointManager(f"{d}/local", f"{d}/persistent", **SAVE_KWARGS) as m:
          latest = m.latest_step()
          restored = m.restore(target=state_for_step(0))
      bad = [str(w.message) for w in caught if issubclass(w.category, CheckpointCorruptionWarning)]
      assert not bad, f"fault run {i}: corruption after kill -9: {bad}"
      assert latest is not None and latest >= committed, (i, latest, committed)
      assert restored["meta"]["step"] == latest, (i, restored["meta"]["step"], latest)
      check_restored(restored, latest)
      if mode == "resave":
        assert latest == 4, f"fault run {i}: the re-saved step 4 was lost (latest {latest})"
      every = SAVE_KWARGS["persistent_every"]
      durable = _persistent_steps(d)
      assert durable and durable[-1] >= every * (latest // every), (
          f"fault run {i}: persistent tier {durable} lacks the due step {every * (latest // every)} "
          f"(latest {latest})")
      last[d] = latest
      rec = {"run": i, "dir": i % n_dirs, "kill_delay_s": round(delay, 4), "committed_before_kill": committed,
             "restored_step": latest, "verify_s": round(time.monotonic() - t1, 4)}
      records.append(rec)
      if log is not None:
        log(rec)
  finally:
    try:
      zygote.stdin.write("quit\n")
      zygote.stdin.flush()
    except OSError:
      pass
    zygote.wait(timeout=30)
  return records


if __name__ == "__main__":
  os.environ["JAX_PLATFORMS"] = "cpu"
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
  if sys.argv[1:] == ["zygote"]:
    _zygote()
  elif len(sys.argv) in (5, 6) and sys.argv[1] == "child":
    _child(*sys.argv[2:])
  else:
    raise SystemExit("usage: _fault_child.py zygote | child LOCAL PERSISTENT PROGRESS")
