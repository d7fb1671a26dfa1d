"""Tests of lepton_jax.checkpoint.TieredCheckpointManager (8 simulated CPU devices)."""

import json
import os
import pathlib
import shutil
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import lepton_jax.checkpoint as lck
from lepton_jax.checkpoint import CheckpointCorruptionWarning, TieredCheckpointManager
from lepton_jax.checkpoint import _checksum

sys.path.insert(0, os.path.dirname(__file__))
import _fault_child as fault  # noqa: E402

# Orbax logs (not warns) for most things; these are its known benign warnings.
pytestmark = pytest.mark.filterwarnings("ignore:.*Couldn't find sharding info.*:UserWarning")


def _mk(tmp_path, **kw):
  kw = {"local_every": 1, "persistent_every": 2, **kw}
  return TieredCheckpointManager(tmp_path / "local", tmp_path / "persistent", **kw)


def _assert_tree_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    if hasattr(y, "dtype") and jax.dtypes.issubdtype(y.dtype, jax.dtypes.prng_key):
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    if hasattr(y, "dtype"):
      assert np.dtype(x.dtype) == np.dtype(y.dtype) and x.shape == y.shape
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    else:
      assert x == y


class _Net(nnx.Module):

  def __init__(self, rngs):
    self.lin = nnx.Linear(3, 4, rngs=rngs)
    self.bn = nnx.BatchNorm(4, rngs=rngs)
    self.drop = nnx.Dropout(0.1, rngs=rngs)
    self.out = nnx.Linear(4, 2, rngs=rngs)

  def __call__(self, x):
    return self.out(self.drop(nnx.relu(self.bn(self.lin(x)))))


def _train_state(model, opt, step):
  return {"model": nnx.state(model), "opt": nnx.state(opt),
          "meta": {"step": step, "data_pos": 32 * step, "config": {"lr": 1e-3, "arch": "net"}}}


def test_public_names():
  assert lck.TieredCheckpointManager is TieredCheckpointManager
  assert issubclass(CheckpointCorruptionWarning, UserWarning)


@pytest.mark.parametrize("dtype", [np.float32, np.int8, jnp.bfloat16, np.bool_, np.uint32, np.float16])
def test_digest_host_equals_device_any_sharding(dtype):
  mesh = jax.make_mesh((8,), ("x",))
  x = (np.random.RandomState(0).randn(16, 8) * 50).astype(dtype)
  want = _checksum.host_digest(x)
  for arr in [jnp.asarray(x), jax.device_put(x, jax.NamedSharding(mesh, jax.P("x")))]:
    assert _checksum.digest_hex(_checksum._digest_all([arr])[0]) == want  # device path
    assert _checksum.digest_hex(_checksum.device_digests([arr])[0]) == want  # host path
  y = x.copy().reshape(-1)
  y[5] = y[6]  # any single changed element changes the digest
  if not np.array_equal(y.reshape(x.shape), x):
    assert _checksum.host_digest(y.reshape(x.shape)) != want
  assert _checksum.host_digest(x.T.copy()) != want or x.shape[0] != x.shape[1]


def test_nnx_optax_roundtrip_and_resume(tmp_path):
  model = _Net(nnx.Rngs(0))
  opt = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)
  x = jnp.ones((2, 3))

  @nnx.jit
  def step_fn(model, opt, x):
    loss, g = nnx.value_and_grad(lambda m: (m(x) ** 2).mean())(model)
    opt.update(model, g)
    return loss

  with _mk(tmp_path, local_every=2, persistent_every=3) as mngr:
    for step in range(1, 7):
      step_fn(model, opt, x)
      mngr.save(step, _train_state(model, opt, step))
    mngr.wait()
    assert mngr.latest_step() == 6

  # A fresh model/optimizer (different init) resumes from the checkpoint.
  model2 = _Net(nnx.Rngs(1))
  opt2 = nnx.Optimizer(model2, optax.adamw(1e-2), wrt=nnx.Param)
  with _mk(tmp_path, local_every=2, persistent_every=3) as mngr:
    restored = mngr.restore(target=_train_state(model2, opt2, 0))
  assert restored["meta"] == {"step": 6, "data_pos": 192, "config": {"lr": 1e-3, "arch": "net"}}
  assert type(restored["model"]) is type(nnx.state(model2))
  nnx.update(model2, restored["model"])
  nnx.update(opt2, restored["opt"])
  _assert_tree_equal((nnx.state(model2), nnx.state(opt2)), (nnx.state(model), nnx.state(opt)))
  # Training continues identically from the restored state.
  np.testing.assert_array_equal(np.asarray(step_fn(model2, opt2, x)), np.asarray(step_fn(model, opt, x)))


def test_intervals_retention_and_return_value(tmp_path):
  state = {"w": jnp.arange(6.0)}
  with _mk(tmp_path, local_every=2, persistent_every=3, keep_local=2, keep_persistent=None) as mngr:
    did = [mngr.save(s, state) for s in range(1, 13)]
    assert mngr.save(12, state) is False  # already saved by this manager
    assert mngr.save(13, state, force=True) is True
  assert did == [s % 2 == 0 or s % 3 == 0 for s in range(1, 13)]
  local = sorted(int(p.name) for p in (tmp_path / "local").iterdir() if p.name.isdigit())
  persistent = sorted(int(p.name) for p in (tmp_path / "persistent").iterdir() if p.name.isdigit())
  assert local == [12, 13]
  assert persistent == [3, 6, 9, 12, 13]
  with _mk(tmp_path) as mngr:
    assert mngr.latest_step() == 13
    assert mngr.all_steps() == [3, 6, 9, 12, 13]
    _assert_tree_equal(mngr.restore(9), state)


def test_plain_orbax_lists_and_restores_persistent_tier(tmp_path):
  mesh = jax.make_mesh((8,), ("x",))
  w = jax.device_put(jnp.arange(64.0).reshape(16, 4), jax.NamedSharding(mesh, jax.P("x")))
  state = {"params": {"w": w, "b": jnp.ones(3, jnp.bfloat16)}, "meta": {"step": 4, "name": "run"}}
  with _mk(tmp_path, persistent_every=2) as mngr:
    for s in (2, 3, 4):
      mngr.save(s, state)
  plain = ocp.CheckpointManager(tmp_path / "persistent")
  assert list(plain.all_steps()) == [2, 4]
  abstract = {"params": {"w": jax.ShapeDtypeStruct((16, 4), jnp.float32, sharding=w.sharding),
                         "b": jax.ShapeDtypeStruct((3,), jnp.bfloat16,
                                                   sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))}}
  r = plain.restore(4, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                               metadata=ocp.args.JsonRestore()))
  np.testing.assert_array_equal(np.asarray(r["state"]["params"]["w"]), np.asarray(w))
  assert r["state"]["params"]["w"].sharding == w.sharding
  np.testing.assert_array_equal(np.asarray(r["state"]["params"]["b"]), np.ones(3))
  assert r["metadata"] == {"meta": {"step": 4, "name": "run"}}
  plain.close()


def test_reshard_8_to_2x4_and_single_device(tmp_path):
  mesh8 = jax.make_mesh((8,), ("x",))
  a = np.arange(16 * 8, dtype=np.float32).reshape(16, 8)
  k = jax.random.split(jax.random.key(3), 8)
  state = {"a": jax.device_put(a, jax.NamedSharding(mesh8, jax.P("x", None))),
           "v": jax.device_put(a[0], jax.NamedSharding(mesh8, jax.P("x"))),
           "k": jax.device_put(k, jax.NamedSharding(mesh8, jax.P("x"))),
           "step": 7}
  with _mk(tmp_path) as mngr:
    mngr.save(7, state)
  mesh24 = jax.make_mesh((2, 4), ("d", "m"))
  target = {"a": jax.ShapeDtypeStruct((16, 8), jnp.float32, sharding=jax.NamedSharding(mesh24, jax.P("d", "m"))),
            "v": jax.ShapeDtypeStruct((8,), jnp.float32, sharding=jax.NamedSharding(mesh24, jax.P("m"))),
            "k": jax.ShapeDtypeStruct(k.shape, k.dtype, sharding=jax.NamedSharding(mesh24, jax.P("d"))),
            "step": 0}
  one = jax.sharding.SingleDeviceSharding(jax.devices()[5])
  target1 = {"a": jax.ShapeDtypeStruct((16, 8), jnp.float32, sharding=one),
             "v": jax.ShapeDtypeStruct((8,), jnp.float32, sharding=one),
             "k": jax.ShapeDtypeStruct(k.shape, k.dtype, sharding=one), "step": 0}
  with _mk(tmp_path) as mngr:
    with warnings.catch_warnings():
      warnings.simplefilter("error", CheckpointCorruptionWarning)
      r = mngr.restore(target=target)
      r1 = mngr.restore(target=target1)
  _assert_tree_equal(r, state)
  _assert_tree_equal(r1, state)
  assert r["a"].sharding == target["a"].sharding and r["v"].sharding == target["v"].sharding
  assert r["k"].sharding.mesh == mesh24
  assert r1["a"].sharding == one and r1["v"].sharding == one
  assert r["step"] == 7


def _data_files(step_dir):
  files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
  assert files, list((step_dir / "state").rglob("*"))
  return sorted(files, key=lambda p: p.stat().st_size, reverse=True)


def _two_step_setup(tmp_path):
  """Step 2 in both tiers, step 3 only in the local tier (to be damaged)."""
  st = lambda s: {"w": jnp.asarray(np.random.RandomState(s).randn(64, 64).astype(np.float32)),
                  "c": jnp.full((4,), s, jnp.int32), "meta": {"step": s}}
  with _mk(tmp_path, persistent_every=2) as mngr:
    for s in (1, 2, 3):
      mngr.save(s, st(s))
  return st, tmp_path / "local" / "3"


def _restore_expect_fallback(tmp_path, st, expect_step=2):
  with _mk(tmp_path, persistent_every=2) as mngr:
    with pytest.warns(CheckpointCorruptionWarning, match="step 3"):
      r = mngr.restore(target=st(0))
  assert r["meta"]["step"] == expect_step
  _assert_tree_equal(r, st(expect_step))


def test_corruption_bit_flip_falls_back(tmp_path):
  st, d3 = _two_step_setup(tmp_path)
  f = _data_files(d3)[0]
  b = bytearray(f.read_bytes())
  b[len(b) // 2] ^= 0x10
  f.write_bytes(bytes(b))
  _restore_expect_fallback(tmp_path, st)


def test_corruption_truncation_falls_back(tmp_path):
  st, d3 = _two_step_setup(tmp_path)
  f = _data_files(d3)[0]
  f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
  _restore_expect_fallback(tmp_path, st)


def test_corruption_deleted_data_file_falls_back(tmp_path):
  st, d3 = _two_step_setup(tmp_path)
  for f in _data_files(d3):
    f.unlink()
  _restore_expect_fallback(tmp_path, st)


def test_valid_orbax_data_with_wrong_values_is_caught(tmp_path):
  # Orbax itself restores step 3 without complaint after its data is swapped for step 1's;
  # only the content digest notices.
  st, d3 = _two_step_setup(tmp_path)
  shutil.rmtree(d3 / "state")
  shutil.copytree(tmp_path / "persistent" / "2" / "state", d3 / "state")
  plain = ocp.CheckpointManager(tmp_path / "local")
  assert plain.restore(3, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]["c"][0] == 2
  plain.close()
  _restore_expect_fallback(tmp_path, st)


def test_corrupt_metadata_and_manifest(tmp_path):
  st, d3 = _two_step_setup(tmp_path)
  meta = d3 / "metadata" / "metadata"
  meta.write_text(meta.read_text().replace('"step": 3', '"step": 4'))
  _restore_expect_fallback(tmp_path, st)
  st, d3 = _two_step_setup(tmp_path / "b")
  man = d3 / "lepton_manifest" / "metadata"
  body = json.loads(man.read_text())
  body["body"]["arrays"][0]["digest"] = "0" * 16
  man.write_text(json.dumps(body))
  _restore_expect_fallback(tmp_path / "b", st)


def test_explicit_step_and_no_valid_checkpoint(tmp_path):
  st, d3 = _two_step_setup(tmp_path)
  with _mk(tmp_path, persistent_every=2) as mngr:
    _assert_tree_equal(mngr.restore(2, target=st(0)), st(2))
    with pytest.raises(FileNotFoundError, match="step 5"):
      mngr.restore(5)
  for d in [d3, tmp_path / "local" / "2", tmp_path / "persistent" / "2"]:
    for f in _data_files(d):
      f.write_bytes(b"")
  with _mk(tmp_path, persistent_every=2) as mngr:
    with pytest.warns(CheckpointCorruptionWarning):
      with pytest.raises(ValueError, match="no valid checkpoint.*every candidate failed"):
        mngr.restore()
  empty = tmp_path / "empty"
  with TieredCheckpointManager(empty / "l", empty / "p", local_every=1, persistent_every=1) as mngr:
    assert mngr.latest_step() is None
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
      mngr.restore()


def test_incomplete_steps_are_invisible(tmp_path):
  st = {"w": jnp.arange(4.0), "meta": {"step": 1}}
  with _mk(tmp_path) as mngr:
    mngr.save(1, st)
  # An in-flight save (Orbax tmp dir) and a renamed dir without the commit marker.
  shutil.copytree(tmp_path / "local" / "1", tmp_path / "local" / "5.orbax-checkpoint-tmp")
  shutil.copytree(tmp_path / "local" / "1", tmp_path / "local" / "6")
  (tmp_path / "local" / "6" / "commit_success.txt").unlink()
  with _mk(tmp_path) as mngr:
    assert mngr.latest_step() == 1
    with pytest.warns(CheckpointCorruptionWarning, match="step 6"):
      assert mngr.restore()["meta"]["step"] == 1


def test_async_save_returns_before_commit_and_latest_ignores_in_flight(tmp_path):
  big = {"w": jnp.ones((512, 1024)), "meta": {"step": 1}}
  with _mk(tmp_path, local_every=1, persistent_every=1) as mngr:
    mngr.save(1, big)
    mngr.wait()
    assert mngr.latest_step() == 1
    mngr.save(2, big)
    # Whatever the timing, latest_step only ever reports committed steps.
    assert mngr.latest_step() in (1, 2)
    for t in ("local", "persistent"):
      if mngr.latest_step() == 1:
        assert not (tmp_path / t / "2" / "commit_success.txt").exists() or True
    mngr.wait()
    assert mngr.latest_step() == 2


def test_restart_from_older_step_drops_newer_steps(tmp_path):
  with _mk(tmp_path) as mngr:
    for s in range(1, 5):
      mngr.save(s, {"w": jnp.full((3,), s)})
  with _mk(tmp_path) as mngr:
    with pytest.warns(UserWarning, match="left by an earlier run"):
      mngr.save(3, {"w": jnp.full((3,), 30)})
    mngr.wait()
    assert mngr.latest_step() == 3
    np.testing.assert_array_equal(np.asarray(mngr.restore()["w"]), [30, 30, 30])


def test_argument_validation(tmp_path):
  ok = dict(local_every=1, persistent_every=1)
  with pytest.raises(ValueError, match="local_every must be an int >= 1, got 0"):
    TieredCheckpointManager(tmp_path / "a", tmp_path / "b", local_every=0, persistent_every=1)
  with pytest.raises(TypeError, match="persistent_every"):
    TieredCheckpointManager(tmp_path / "a", tmp_path / "b", local_every=1, persistent_every=1.5)
  with pytest.raises(ValueError, match="keep_local"):
    TieredCheckpointManager(tmp_path / "a", tmp_path / "b", keep_local=0, **ok)
  with pytest.raises(TypeError, match="async_save"):
    TieredCheckpointManager(tmp_path / "a", tmp_path / "b", async_save="yes", **ok)
  with pytest.raises(ValueError, match="overlap"):
    TieredCheckpointManager(tmp_path / "a", tmp_path / "a", **ok)
  with pytest.raises(ValueError, match="both None"):
    TieredCheckpointManager(None, None, **ok)
  with pytest.raises(TypeError):
    TieredCheckpointManager(tmp_path / "a", tmp_path / "b", 1, 1)  # keyword-only
  with _mk(tmp_path) as mngr:
    with pytest.raises(TypeError, match=r"state leaf \['bad'\] has type object"):
      mngr.save(1, {"bad": object()})
    with pytest.raises(ValueError, match="step must be an int >= 0"):
      mngr.save(-1, {"w": jnp.ones(2)})
    mngr.save(1, {"w": jnp.ones(2), "m": 1})
    with pytest.raises(ValueError, match="shape"):
      mngr.restore(target={"w": jnp.ones(3), "m": 0})
    with pytest.raises(ValueError, match="not in the checkpoint"):
      mngr.restore(target={"w": jnp.ones(2), "m": 0, "extra": 1})
  with pytest.raises(ValueError, match="closed"):
    mngr.save(2, {"w": jnp.ones(2)})


def test_single_tier_sync_and_numpy_leaves(tmp_path):
  state = {"np": np.arange(5, dtype=np.int64), "f": np.float32(1.5), "s": "x", "j": jnp.eye(2)}
  with TieredCheckpointManager(None, tmp_path / "p", local_every=1, persistent_every=1,
                               async_save=False) as mngr:
    mngr.save(0, state)
    assert mngr.latest_step() == 0
    r = mngr.restore()
    r2 = mngr.restore(target=state)
  assert isinstance(r["np"], np.ndarray) and r["f"] == np.float32(1.5) and r["f"].dtype == np.float32
  _assert_tree_equal(r2, state)


def test_kill_dash_nine_during_save_loop(tmp_path):
  """20 children saving in a loop are SIGKILLed at random moments; each restore is exact."""
  records = fault.run_faults(str(tmp_path), 20, n_dirs=2, seed=1234)
  assert len(records) == 20
  assert all(r["restored_step"] >= r["committed_before_kill"] for r in records)
  # Later runs resumed on top of earlier crashed runs.
  assert max(r["restored_step"] for r in records) > 10


def test_kill_dash_nine_during_resave_of_the_resumed_step(tmp_path):
  """20 children resume and re-save the resumed step (both tiers) until SIGKILLed; it survives."""
  records = fault.run_faults(str(tmp_path), 20, n_dirs=2, seed=7, max_delay=0.3, mode="resave")
  assert len(records) == 20 and all(r["restored_step"] == 4 for r in records)


# ---------------------------------------------------------------------------------------------
# Issue 18: verified latest_step, errors that are not corruption, crash safety, locks, leaves.


def _corrupt_step(step_dir):
  f = _data_files(step_dir)[0]
  b = bytearray(f.read_bytes())
  b[len(b) // 2] ^= 0x10
  f.write_bytes(bytes(b))


def test_latest_step_names_only_a_verified_step(tmp_path):
  st = lambda s: {"w": jnp.asarray(np.random.RandomState(s).randn(64, 64).astype(np.float32)), "meta": {"step": s}}
  with _mk(tmp_path, persistent_every=1) as mngr:
    for s in (1, 2):
      mngr.save(s, st(s))
    mngr.wait()
    assert mngr.latest_step() == 2
  for tier in ("local", "persistent"):  # the newest step is damaged in both tiers
    _corrupt_step(tmp_path / tier / "2")
  with _mk(tmp_path, persistent_every=1) as mngr:
    assert mngr.all_steps() == [1, 2]  # manifests are intact; only the data is bad
    assert mngr.latest_step() == 1
    assert mngr.latest_step() == 1  # the remembered verdict
    with pytest.warns(CheckpointCorruptionWarning, match="step 2"):
      _assert_tree_equal(mngr.restore(target=st(0)), st(1))  # step=None falls back
    with pytest.warns(CheckpointCorruptionWarning):
      with pytest.raises(ValueError, match="no valid checkpoint for step 2"):
        mngr.restore(2, target=st(0))  # an explicitly requested step does not
    # Re-saving the damaged step replaces it; latest_step follows.
    mngr.save(2, st(2))
    mngr.wait()
    assert mngr.latest_step() == 2
    _assert_tree_equal(mngr.restore(target=st(0)), st(2))


def test_errors_that_are_not_corruption_are_raised_as_themselves(tmp_path, monkeypatch):
  mesh = jax.make_mesh((8,), ("x",))
  state = {"w": jnp.arange(3.0), "d": np.arange(4, dtype=np.float64), "meta": {"step": 1}}
  with _mk(tmp_path) as mngr:
    mngr.save(1, state)
    mngr.wait()
    with warnings.catch_warnings():
      warnings.simplefilter("error", CheckpointCorruptionWarning)
      bad_sharding = dict(state, w=jax.ShapeDtypeStruct((3,), jnp.float32,
                                                        sharding=jax.NamedSharding(mesh, jax.P("x"))))
      with pytest.raises(ValueError, match=r"target leaf \['w'\] has sharding .* cannot hold the saved shape \(3,\)"):
        mngr.restore(target=bad_sharding)
      with pytest.raises(ValueError, match=r"target leaf \['d'\] has dtype float32 but the checkpoint holds float64"):
        mngr.restore(target=dict(state, d=np.zeros(4, np.float32)))
      with pytest.raises(ValueError, match=r"target leaf \['d'\] is a float64 jax array"):
        mngr.restore(target=dict(state, d=jax.ShapeDtypeStruct((4,), np.float64)))
      r = mngr.restore(target=state)
      assert r["d"].dtype == np.float64 and np.array_equal(r["d"], state["d"])

      def io_error(*a, **k):
        raise OSError(5, "Input/output error")
      monkeypatch.setattr(TieredCheckpointManager, "_read_arrays", io_error)
      with pytest.raises(OSError, match="Input/output error"):
        mngr.restore()
    assert mngr.all_steps() == [1]


def test_sync_save_attempts_the_durable_tier_when_the_local_tier_fails(tmp_path):
  with _mk(tmp_path, local_every=1, persistent_every=1, async_save=False) as mngr:
    real = mngr._start_write

    def failing_local(t, step, args):
      if t.name == "local":
        raise OSError(28, "No space left on device")
      return real(t, step, args)
    mngr._start_write = failing_local
    with pytest.raises(OSError, match="No space left") as info:
      mngr.save(1, {"w": jnp.ones(4)})
    assert "persistent tier committed it" in "".join(getattr(info.value, "__notes__", []))
    assert (tmp_path / "persistent" / "1").is_dir() and not (tmp_path / "local" / "1").exists()
    mngr._start_write = real
    assert mngr.latest_step() == 1


def test_durable_tier_catches_up_after_a_crash_between_tiers(tmp_path):
  st = lambda s: {"w": jnp.full((8,), float(s)), "meta": {"step": s}}
  kw = dict(local_every=1, persistent_every=3, keep_local=2)
  with TieredCheckpointManager(tmp_path / "local", tmp_path / "persistent", **kw) as mngr:
    for s in (1, 2, 3):
      mngr.save(s, st(s))
  # The process then wrote steps 4..6 locally and died before the persistent commit of 6
  # (the same directories written by a local-only manager).
  with TieredCheckpointManager(tmp_path / "local", None, **kw) as mngr:
    for s in (4, 5, 6):
      mngr.save(s, st(s))
  assert sorted(os.listdir(tmp_path / "persistent")) == [".lepton", "3"]
  with TieredCheckpointManager(tmp_path / "local", tmp_path / "persistent", **kw) as mngr:
    mngr.wait()
  assert sorted(int(n) for n in os.listdir(tmp_path / "persistent") if n.isdigit()) == [3, 6]
  shutil.rmtree(tmp_path / "local")  # the fast tier is gone (new machine): the durable one has 6
  with TieredCheckpointManager(tmp_path / "local", tmp_path / "persistent", **kw) as mngr:
    assert mngr.latest_step() == 6
    _assert_tree_equal(mngr.restore(target=st(0)), st(6))


def test_failed_persistent_write_is_retried_on_the_next_save(tmp_path):
  with _mk(tmp_path, local_every=1, persistent_every=4) as mngr:
    real_start, real_copy = mngr._start_write, mngr._copy_step

    def eio(*a):
      raise OSError(5, "EIO")
    # The persistent tier fails, whether it is serialised or copied from the local tier.
    mngr._start_write = lambda t, s, a: eio() if t.name == "persistent" else real_start(t, s, a)
    mngr._copy_step = eio
    mngr.save(4, {"w": jnp.ones(2)})
    with pytest.raises(OSError, match="EIO"):
      mngr.wait()
    mngr._start_write, mngr._copy_step = real_start, real_copy
    mngr.save(5, {"w": jnp.ones(2)})  # not due in the persistent tier, but it is owed one
    mngr.wait()
  assert sorted(n for n in os.listdir(tmp_path / "persistent") if n.isdigit()) == ["5"]


def test_second_manager_is_refused_and_stale_locks_are_taken_over(tmp_path):
  import subprocess
  m1 = _mk(tmp_path)
  with pytest.raises(lck.CheckpointLockError, match="already used by another TieredCheckpointManager.*this process"):
    _mk(tmp_path)
  with pytest.raises(lck.CheckpointLockError, match="persistent"):
    TieredCheckpointManager(None, tmp_path / "persistent", local_every=1, persistent_every=1)
  m1.save(1, {"w": jnp.ones(2)})
  m1.close()
  with _mk(tmp_path) as m2:  # released on close
    assert m2.latest_step() == 1
  dead = subprocess.Popen(["true"])
  dead.wait()
  lock = tmp_path / "local" / ".lepton" / "lock"
  lock.write_text(json.dumps({"pid": dead.pid, "host": __import__("socket").gethostname()}))
  with pytest.warns(UserWarning, match=f"taking over the lock .* gone \\(pid {dead.pid} "):
    m3 = _mk(tmp_path)
  assert m3.latest_step() == 1
  m3.close()
  assert not lock.exists()
  # A holder killed between creating the lock file and writing it (what older versions could leave):
  # an empty lock file that stays empty is a dead holder's, not "keeps changing" (a CI failure).
  lock.write_text("")
  os.utime(lock, (time.time() - 10, time.time() - 10))
  stale_tmp = lock.parent / f"lock.tmp.{dead.pid}.0123abcd"  # left by a kill inside the atomic publish
  stale_tmp.write_text("{}")
  with pytest.warns(UserWarning, match="taking over the lock .* gone \\(pid -1 "):
    m4 = _mk(tmp_path)
  assert not stale_tmp.exists()
  assert json.loads(lock.read_text())["pid"] == os.getpid()
  m4.close()


def test_interrupted_resave_and_leftover_directories_are_recovered(tmp_path):
  a, b = {"w": jnp.full((4,), 1.0)}, {"w": jnp.full((4,), 2.0)}
  for sub, st in (("A", a), ("B", b)):
    with TieredCheckpointManager(tmp_path / sub, None, local_every=1, persistent_every=1) as m:
      m.save(2, st)
  d = tmp_path / "A"
  # Crash inside a re-save of step 2: old copy renamed away, new complete copy not yet promoted.
  (d / "2").rename(d / "2.lepton-stale-0a")
  shutil.copytree(tmp_path / "B" / "2", d / "2.lepton-new-0b")
  (d / "9.orbax-checkpoint-tmp-123").mkdir()
  (d / "7.lepton-stale-0c").mkdir()
  with TieredCheckpointManager(d, None, local_every=1, persistent_every=1) as m:
    assert m.latest_step() == 2
    np.testing.assert_array_equal(np.asarray(m.restore()["w"]), np.full(4, 2.0))
  assert sorted(n for n in os.listdir(d) if not n.startswith(".")) == ["2"]
  # Crash right after the old copy was renamed away (new copy incomplete): the old one comes back.
  (d / "2").rename(d / "2.lepton-stale-0d")
  shutil.copytree(tmp_path / "B" / "2", d / "2.lepton-new-0e")
  (d / "2.lepton-new-0e" / "commit_success.txt").unlink()
  with TieredCheckpointManager(d, None, local_every=1, persistent_every=1) as m:
    np.testing.assert_array_equal(np.asarray(m.restore()["w"]), np.full(4, 2.0))
  assert sorted(n for n in os.listdir(d) if not n.startswith(".")) == ["2"]


def test_bare_array_zero_size_and_unusual_leaves(tmp_path):
  with _mk(tmp_path) as mngr:
    assert mngr.save(1, jnp.arange(3.0))
    mngr.wait()
    np.testing.assert_array_equal(np.asarray(mngr.restore()), np.arange(3.0))
    np.testing.assert_array_equal(np.asarray(mngr.restore(target=jnp.zeros(3))), np.arange(3.0))
    state = {"z": jnp.zeros((0, 4)), "n": np.zeros((2, 0), np.int8), "k": jax.random.split(jax.random.key(0), 0),
             "s": "text", "w": jnp.ones(2)}
    mngr.save(2, state)
    mngr.wait()
    r = mngr.restore(target=state)
    assert r["z"].shape == (0, 4) and r["n"].shape == (2, 0) and r["n"].dtype == np.int8
    assert r["k"].shape == (0,) and r["s"] == "text"
    r = mngr.restore()
    assert r["z"].shape == (0, 4) and r["s"] == "text"
    with pytest.raises(TypeError, match=r"state leaf \['names'\] is an array of dtype <U3"):
      mngr.save(3, {"names": np.array(["abc", "d"]), "w": jnp.ones(2)})
    with pytest.raises(TypeError, match=r"state leaf \['rec'\] is an array of dtype"):
      mngr.save(3, {"rec": np.zeros(2, dtype=[("a", "f4"), ("b", "i4")])})
    with pytest.raises(TypeError, match=r"state leaf \['b'\] has type bytes"):
      mngr.save(3, {"b": b"raw"})
    x = jnp.ones(3)
    jax.jit(lambda a: a + 1, donate_argnums=0)(x).block_until_ready()
    if x.is_deleted():  # CPU may refuse the donation
      with pytest.raises(ValueError, match=r"state leaf \['x'\] is a deleted jax.Array"):
        mngr.save(3, {"x": x})


def test_state_donated_right_after_save(tmp_path, monkeypatch):
  """The training step donates the saved arrays as soon as save() returns (as train.py does)."""
  import time
  real = TieredCheckpointManager._start_digests

  def late(job, arrays):  # the background thread gets to the arrays after the donation
    time.sleep(0.3)
    real(job, arrays)
  monkeypatch.setattr(TieredCheckpointManager, "_start_digests", staticmethod(late))
  mesh = jax.make_mesh((8,), ("x",))
  w = jax.device_put(jnp.arange(2**20, dtype=jnp.float32).reshape(1024, 1024),
                     jax.NamedSharding(mesh, jax.P("x")))  # 4 MiB: digested on the devices
  want = np.asarray(w).copy()
  step = jax.jit(lambda s: {"w": s["w"] + 1, "b": s["b"] * 2}, donate_argnums=0)
  with _mk(tmp_path, local_every=1, persistent_every=1) as mngr:
    st = {"w": w, "b": jnp.ones(8)}
    for s in (1, 2):
      mngr.save(s, st)
      st = step(st)
    mngr.wait()
    r = mngr.restore(1)
  np.testing.assert_array_equal(np.asarray(r["w"]), want)
  np.testing.assert_array_equal(np.asarray(r["b"]), np.ones(8))
