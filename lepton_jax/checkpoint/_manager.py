"""TieredCheckpointManager: two Orbax tiers, atomic commits, verified content."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import uuid
import warnings
from typing import Any, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint._src.handlers import json_checkpoint_handler

from lepton_jax.checkpoint import _checksum

__all__ = ["TieredCheckpointManager", "CheckpointCorruptionWarning", "STATE_ITEM",
           "METADATA_ITEM", "MANIFEST_ITEM"]

_API = "TieredCheckpointManager"
_FORMAT = "lepton_jax.checkpoint/1"

#: Orbax item holding every array leaf as a nested dict (``ocp.args.StandardSave``).
STATE_ITEM = "state"
#: Orbax item holding every non-array leaf (ints, floats, strings, ...) as JSON (``ocp.args.JsonSave``).
METADATA_ITEM = "metadata"
#: Orbax item holding the content digests (JSON, readable with ``ocp.args.JsonRestore``).
MANIFEST_ITEM = "lepton_manifest"
_COMMIT_FILE = "commit_success.txt"  # written by Orbax just before the atomic rename
_JSON_FILE = "metadata"  # file name JsonCheckpointHandler writes inside its item directory


class CheckpointCorruptionWarning(UserWarning):
  """A checkpoint failed verification and was skipped in favour of an older one."""


class _Corrupt(Exception):
  """Internal: a step directory that cannot be trusted."""


# ----------------------------------------------------------------------------
# Pytree <-> (arrays, JSON metadata) with string paths.


def _segment(k) -> str:
  if isinstance(k, jax.tree_util.DictKey):
    key = k.key
  elif isinstance(k, jax.tree_util.GetAttrKey):
    key = k.name
  elif isinstance(k, jax.tree_util.SequenceKey):
    key = k.idx
  elif isinstance(k, jax.tree_util.FlattenedIndexKey):
    key = k.key
  else:
    key = getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))
  s = str(key)
  if not s or "/" in s or "." in s:
    raise ValueError(
        f"{_API}: pytree key {key!r} cannot be stored: keys must be non-empty and contain no "
        "'/' or '.' (Orbax uses them as separators); rename the key")
  return s


def _path(kp) -> tuple[str, ...]:
  return tuple(_segment(k) for k in kp)


def _is_key_array(x) -> bool:
  return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _is_arraylike(x) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, jax.ShapeDtypeStruct))


def _nest(pairs) -> dict:
  out: dict = {}
  for path, value in pairs:
    d = out
    for seg in path[:-1]:
      nxt = d.setdefault(seg, {})
      if not isinstance(nxt, dict):
        raise ValueError(f"{_API}: two pytree leaves map to the same storage path {'/'.join(path)}")
      d = nxt
    if path[-1] in d:
      raise ValueError(f"{_API}: two pytree leaves map to the same storage path {'/'.join(path)}")
    d[path[-1]] = value
  return out


def _get(nested: dict, path: Sequence[str]):
  for seg in path:
    nested = nested[seg]
  return nested


@dataclasses.dataclass
class _Split:
  array_paths: list
  arrays: list            # what Orbax saves (key arrays replaced by their key data)
  entries: list           # manifest entries (without digests)
  meta_pairs: list        # (path, json value)
  meta_types: list        # manifest entries for metadata leaves


def _split(state) -> _Split:
  leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  sp = _Split([], [], [], [], [])
  for kp, x in leaves:
    path = _path(kp)
    if isinstance(x, jax.ShapeDtypeStruct):
      raise TypeError(f"{_API}.save: state leaf {jax.tree_util.keystr(kp)} is a ShapeDtypeStruct; "
                      "save needs concrete arrays (ShapeDtypeStructs belong in restore(target=...))")
    if isinstance(x, (jax.Array, np.ndarray)):
      key_impl = None
      kind = "numpy" if isinstance(x, np.ndarray) else "jax"
      if kind == "jax" and _is_key_array(x):
        key_impl = str(jax.random.key_impl(x))
        x = jax.random.key_data(x)
      if kind == "numpy" and x.dtype == object:
        raise TypeError(f"{_API}.save: state leaf {jax.tree_util.keystr(kp)} is an object array")
      sp.array_paths.append(path)
      sp.arrays.append(x)
      sp.entries.append({"path": list(path), "shape": list(x.shape), "dtype": np.dtype(x.dtype).name,
                         "kind": kind, "key_impl": key_impl})
    elif isinstance(x, np.generic):
      sp.meta_pairs.append((path, x.item()))
      sp.meta_types.append({"path": list(path), "type": f"numpy:{x.dtype.name}"})
    elif x is None or isinstance(x, (bool, int, float, str)):
      sp.meta_pairs.append((path, x))
      sp.meta_types.append({"path": list(path), "type": type(x).__name__})
    else:
      raise TypeError(
          f"{_API}.save: state leaf {jax.tree_util.keystr(kp)} has type {type(x).__name__}; "
          "valid leaves are jax/numpy arrays and JSON scalars (bool, int, float, str); convert it "
          "(for example to a dict of scalars) or register it as a pytree")
  return sp


def _canonical_json(obj) -> str:
  return json.dumps(obj, sort_keys=True, allow_nan=True)


# ----------------------------------------------------------------------------
# The manifest item: JSON written inside Orbax's atomic commit, digests fetched
# from the device in the background.


class _LazyManifest:

  def __init__(self, body: dict, digests: list):
    self.body = body
    self.digests = digests

  def resolve(self) -> dict:
    body = dict(self.body)
    body["arrays"] = [dict(e, digest=_checksum.digest_hex(d))
                      for e, d in zip(self.body["arrays"], self.digests)]
    return {"body": body, "crc32": _checksum.crc32_text(_canonical_json(body))}


@dataclasses.dataclass
class _ManifestSave(ocp.args.CheckpointArgs):
  """Save args of the manifest item (registered per manager, not globally)."""

  item: _LazyManifest


class _ManifestHandler(json_checkpoint_handler.JsonCheckpointHandler):
  """JsonCheckpointHandler whose item is resolved (digests fetched) at commit time."""

  async def _save_fn(self, x, directory):
    if isinstance(x, _LazyManifest):
      x = await asyncio.to_thread(x.resolve)
    await super()._save_fn(x, directory)

  @classmethod
  def typestr(cls) -> str:
    # On disk it is an ordinary JSON item: plain Orbax restores it with JsonCheckpointHandler.
    return json_checkpoint_handler.JsonCheckpointHandler.typestr()


# ----------------------------------------------------------------------------


class _Tier:

  def __init__(self, name: str, directory, every: int, keep: int | None, async_save: bool):
    self.name = name
    self.directory = epath.Path(directory)
    self.every = every
    self.keep = keep
    self.saved_this_session: set[int] = set()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,
        create=True,
    )
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    registry.add(STATE_ITEM, ocp.args.StandardSave, ocp.StandardCheckpointHandler())
    json_handler = ocp.JsonCheckpointHandler()
    registry.add(METADATA_ITEM, ocp.args.JsonSave, json_handler)
    registry.add(METADATA_ITEM, ocp.args.JsonRestore, json_handler)
    registry.add(MANIFEST_ITEM, _ManifestSave, _ManifestHandler())
    self.mngr = ocp.CheckpointManager(self.directory, options=options, handler_registry=registry)

  def step_dirs(self) -> dict[int, epath.Path]:
    """Finalised (renamed) step directories; in-flight tmp directories are excluded."""
    out = {}
    if not self.directory.exists():
      return out
    for p in self.directory.iterdir():
      if p.name.isdigit() and p.is_dir():
        out[int(p.name)] = p
    return out


def _read_manifest(step_dir: epath.Path) -> dict:
  """The verified manifest of a committed step directory, else raises ``_Corrupt``."""
  if not (step_dir / _COMMIT_FILE).exists():
    raise _Corrupt(f"{step_dir} has no {_COMMIT_FILE} (not committed, or damaged)")
  f = step_dir / MANIFEST_ITEM / _JSON_FILE
  try:
    env = json.loads(f.read_text())
    body = env["body"]
    ok = env["crc32"] == _checksum.crc32_text(_canonical_json(body)) and body["format"] == _FORMAT
  except FileNotFoundError as e:
    raise _Corrupt(f"manifest {f} is missing (incomplete or damaged checkpoint)") from e
  except Exception as e:  # noqa: BLE001 - any parse problem means damage
    raise _Corrupt(f"manifest {f} is unreadable: {type(e).__name__}: {e}") from e
  if not ok:
    raise _Corrupt(f"manifest {f} fails its own CRC-32 check")
  return body


def _default_sharding():
  return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def _key_data_sharding(sharding, ndim: int):
  if isinstance(sharding, jax.sharding.NamedSharding):
    spec = tuple(sharding.spec) + (None,) * (ndim - len(tuple(sharding.spec)))
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec, None))
  if isinstance(sharding, jax.sharding.SingleDeviceSharding):
    return sharding
  return _default_sharding()


class TieredCheckpointManager:
  """Two-tier Orbax checkpointing that survives ``kill -9`` and detects corruption.

  A fast *local* tier (local disk or ``/dev/shm``) is written every
  ``local_every`` steps and keeps the newest ``keep_local``; a durable
  *persistent* tier is written every ``persistent_every`` steps and keeps the
  newest ``keep_persistent`` (``None``: all). Either directory may be ``None``
  to use a single tier.

  How it works:

  * Each tier is an ordinary ``orbax.checkpoint.CheckpointManager`` with three
    items per step: ``"state"`` (every array leaf, as a nested dict keyed by
    the pytree path, via ``StandardCheckpointHandler``), ``"metadata"`` (every
    non-array leaf - step, data-iterator position, config values - as JSON) and
    ``"lepton_manifest"`` (JSON: shape, dtype and a 64-bit content digest of
    every array, a CRC-32 of the metadata, and a CRC-32 of itself). Plain Orbax
    reads the persistent tier::

      mngr = ocp.CheckpointManager(persistent_dir)
      mngr.all_steps()
      mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_nested_dict),
          metadata=ocp.args.JsonRestore()))

  * ``save`` is asynchronous (``async_save=True``): it returns once the arrays
    are copied device->host and the digest computation is dispatched; the
    writes, the manifest and Orbax's atomic finalisation (tmp directory +
    rename) run in the background. A step is visible to ``latest_step`` and
    ``restore`` only after that rename, with the manifest inside it, so a crash
    at any moment leaves the newest complete step of each tier intact.
  * ``restore`` re-computes every array's digest on the restored arrays and
    compares it with the manifest. On a mismatch, a missing or truncated file
    or an unreadable manifest it warns (:class:`CheckpointCorruptionWarning`)
    and falls back to the next newest step in either tier; it never returns
    values that differ from what was saved. The digest is independent of the
    sharding (see ``lepton_jax.checkpoint._checksum``), so restoring onto a
    different mesh is verified too.
  * Saving a step that is not newer than steps already on disk from an earlier
    run (training restarted from an older checkpoint) removes those steps
    (``>= step``, in both tiers) with a warning, so that ``latest_step`` and a
    later ``restore`` follow the new run rather than the abandoned one.

  Checkpoint/resume of a Flax NNX model, its optax optimizer and metadata:

  >>> import optax, tempfile
  >>> from flax import nnx
  >>> model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
  >>> opt = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)
  >>> def train_state(step):
  ...   return {"model": nnx.state(model), "opt": nnx.state(opt),
  ...           "meta": {"step": step, "data_pos": 32 * step, "config": {"lr": 1e-3}}}
  >>> d = tempfile.mkdtemp()
  >>> with TieredCheckpointManager(f"{d}/local", f"{d}/persistent",
  ...                              local_every=10, persistent_every=100) as mngr:
  ...   for step in range(1, 31):
  ...     saved = mngr.save(step, train_state(step))   # True at 10, 20, 30
  ...   mngr.wait()
  ...   latest = mngr.latest_step()
  ...   restored = mngr.restore(target=train_state(0))  # same structure, target's shardings
  >>> nnx.update(model, restored["model"]); nnx.update(opt, restored["opt"])
  >>> latest, restored["meta"]["step"], restored["meta"]["data_pos"]
  (30, 30, 960)

  ``target`` may hold concrete arrays or ``jax.ShapeDtypeStruct``s with
  shardings (e.g. from ``nnx.eval_shape`` / ``jax.eval_shape`` plus a
  ``NamedSharding``); restored arrays take the target's sharding (any mesh),
  non-array target leaves are replaced by the saved values. Without
  ``target``, ``restore`` returns nested dicts keyed by the pytree path with
  arrays on the default device.

  Args:
    local_dir: directory of the fast tier, or ``None``.
    persistent_dir: directory of the durable tier (a standard Orbax
      checkpoint directory), or ``None``.
    local_every: save to the local tier when ``step % local_every == 0``.
    persistent_every: save to the persistent tier when ``step % persistent_every == 0``.
    keep_local: number of newest local steps to keep (>= 1).
    keep_persistent: number of newest persistent steps to keep, ``None`` for all.
    async_save: write in the background (``True``) or block until committed.
  """

  def __init__(self, local_dir, persistent_dir, *, local_every: int, persistent_every: int,
               keep_local: int = 2, keep_persistent: int | None = None, async_save: bool = True):
    def check_int(name, v, allow_none=False):
      if v is None and allow_none:
        return
      if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        valid = "an int >= 1" + (" or None" if allow_none else "")
        raise (TypeError if not isinstance(v, (int, np.integer)) or isinstance(v, bool) else ValueError)(
            f"{_API}: {name} must be {valid}, got {v!r}")

    check_int("local_every", local_every)
    check_int("persistent_every", persistent_every)
    check_int("keep_local", keep_local)
    check_int("keep_persistent", keep_persistent, allow_none=True)
    if not isinstance(async_save, bool):
      raise TypeError(f"{_API}: async_save must be a bool, got {async_save!r}")
    for name, d in (("local_dir", local_dir), ("persistent_dir", persistent_dir)):
      if d is not None and not isinstance(d, (str, os.PathLike)):
        raise TypeError(f"{_API}: {name} must be a path (str or os.PathLike) or None, "
                        f"got {type(d).__name__} {d!r}")
      if isinstance(d, str) and not d:
        raise ValueError(f"{_API}: {name} must be a non-empty path or None, got ''")
    if local_dir is None and persistent_dir is None:
      raise ValueError(f"{_API}: local_dir and persistent_dir are both None; give at least one directory")
    if local_dir is not None and persistent_dir is not None:
      a = os.path.abspath(os.fspath(local_dir))
      b = os.path.abspath(os.fspath(persistent_dir))
      if a == b or a.startswith(b + os.sep) or b.startswith(a + os.sep):
        raise ValueError(f"{_API}: local_dir={os.fspath(local_dir)!r} and persistent_dir="
                         f"{os.fspath(persistent_dir)!r} overlap; give two separate directories")
    self._async = async_save
    self._closed = False
    self._tiers: list[_Tier] = []
    if local_dir is not None:
      self._tiers.append(_Tier("local", local_dir, int(local_every), int(keep_local), async_save))
    if persistent_dir is not None:
      self._tiers.append(_Tier("persistent", persistent_dir, int(persistent_every),
                               None if keep_persistent is None else int(keep_persistent), async_save))

  # -- context manager -------------------------------------------------------

  def __enter__(self) -> "TieredCheckpointManager":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __repr__(self) -> str:
    tiers = ", ".join(f"{t.name}={str(t.directory)!r} every {t.every} keep {t.keep}" for t in self._tiers)
    return f"TieredCheckpointManager({tiers}, async_save={self._async})"

  @property
  def directories(self) -> dict[str, epath.Path]:
    """``{"local": path, "persistent": path}`` for the configured tiers."""
    return {t.name: t.directory for t in self._tiers}

  # -- saving ----------------------------------------------------------------

  def _check_open(self, what: str):
    if self._closed:
      raise ValueError(f"{_API}.{what}: the manager is closed; create a new one")

  def save(self, step: int, state: Any, *, force: bool = False) -> bool:
    """Saves ``state`` at ``step`` to every tier whose interval divides ``step``.

    Args:
      step: non-negative training step.
      state: a pytree of arrays (jax or numpy, sharded or not, PRNG keys
        included) and JSON scalars (``nnx.state(...)``, optax states, dicts).
      force: save to both tiers regardless of the intervals.

    Returns:
      Whether a save was started (``False`` when no tier is due or the step
      was already saved by this manager).
    """
    self._check_open("save")
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
      raise (ValueError if isinstance(step, (int, np.integer)) and not isinstance(step, bool) else TypeError)(
          f"{_API}.save: step must be an int >= 0, got {step!r}")
    step = int(step)
    tiers = [t for t in self._tiers
             if (force or step % t.every == 0) and step not in t.saved_this_session]
    if not tiers:
      return False
    sp = _split(state)
    meta = _nest(sp.meta_pairs)
    body = {"format": _FORMAT, "step": step, "arrays": sp.entries, "metadata_types": sp.meta_types,
            "metadata_crc32": _checksum.crc32_text(_canonical_json(meta))}
    _nest([(p, None) for p in sp.array_paths] + [(p, None) for p, _ in sp.meta_pairs])  # collisions
    arrays_tree = _nest(list(zip(sp.array_paths, sp.arrays)))
    digests = _checksum.device_digests(sp.arrays)
    for t in self._tiers:  # a restarted run supersedes newer steps in every tier
      self._drop_stale(t, step)
    for t in tiers:
      items = {METADATA_ITEM: ocp.args.JsonSave(meta),
               MANIFEST_ITEM: _ManifestSave(_LazyManifest(body, digests))}
      if arrays_tree:
        items[STATE_ITEM] = ocp.args.StandardSave(arrays_tree)
      t.mngr.save(step, args=ocp.args.Composite(**items), force=True)
      t.saved_this_session.add(step)
    return True

  def _drop_stale(self, t: _Tier, step: int):
    def stale_steps():
      return sorted(s for s in t.step_dirs()
                    if s > step or (s == step and s not in t.saved_this_session))
    if not stale_steps():
      return
    t.mngr.wait_until_finished()
    stale = stale_steps()
    if not stale:
      return
    warnings.warn(
        f"{_API}.save: step {step} is not newer than {t.name} steps {stale} left by an earlier run "
        f"(training restarted from an older checkpoint); removing those steps from "
        f"{t.directory} so that the latest step follows the new run", UserWarning, stacklevel=3)
    for s in stale:
      p = t.directory / str(s)
      trash = t.directory / f"{s}.lepton-stale-{uuid.uuid4().hex}"
      p.rename(trash)  # atomic: the step stops counting at once
      trash.rmtree()
      t.saved_this_session.discard(s)
    t.mngr.reload()

  def wait(self) -> None:
    """Blocks until every started save is committed (and raises its error, if any)."""
    for t in self._tiers:
      t.mngr.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases Orbax's resources (idempotent)."""
    if self._closed:
      return
    try:
      self.wait()
    finally:
      self._closed = True
      for t in self._tiers:
        t.mngr.close()

  # -- reading -----------------------------------------------------------------

  def _candidates(self, step: int | None) -> list[tuple[int, _Tier, epath.Path]]:
    cands = []
    for rank, t in enumerate(self._tiers):
      for s, p in t.step_dirs().items():
        if step is None or s == step:
          cands.append((s, rank, t, p))
    cands.sort(key=lambda c: (-c[0], c[1]))
    return [(s, t, p) for s, _, t, p in cands]

  def all_steps(self) -> list[int]:
    """Sorted steps that are complete (committed, manifest intact) in either tier."""
    steps = set()
    for s, _, p in self._candidates(None):
      if s in steps:
        continue
      try:
        _read_manifest(p)
        steps.add(s)
      except _Corrupt:
        pass
    return sorted(steps)

  def latest_step(self) -> int | None:
    """Newest complete step in either tier (never one still being written), or ``None``."""
    for s, _, p in self._candidates(None):
      try:
        _read_manifest(p)
        return s
      except _Corrupt:
        continue
    return None

  def restore(self, step: int | None = None, *, target: Any = None) -> Any:
    """Restores the newest complete, verified checkpoint (or ``step``).

    Args:
      step: the step to restore, or ``None`` for the newest valid one. With an
        explicit step both tiers are tried, but no other step.
      target: optional pytree with the state's structure; array leaves
        (``jax.Array``, ``np.ndarray`` or ``jax.ShapeDtypeStruct`` with a
        sharding) give shape, dtype and placement, other leaves are replaced
        by the saved metadata.

    Returns:
      The restored state: ``target``'s structure, or nested dicts.

    Raises:
      FileNotFoundError: no checkpoint at all (or none at ``step``).
      ValueError: every candidate checkpoint failed verification (the message
        lists why), or ``target`` does not match the saved structure.
    """
    self._check_open("restore")
    if step is not None and (isinstance(step, bool) or not isinstance(step, (int, np.integer))):
      raise TypeError(f"{_API}.restore: step must be an int or None, got {step!r}")
    self.wait()
    cands = self._candidates(None if step is None else int(step))
    where = ", ".join(str(t.directory) for t in self._tiers)
    if not cands:
      raise FileNotFoundError(
          f"{_API}.restore: no checkpoint{'' if step is None else f' for step {step}'} in {where}"
          + ("" if step is None else f"; complete steps: {self.all_steps()}"))
    plan = _TargetPlan(target)
    reasons = []
    for s, t, p in cands:
      try:
        out = self._restore_dir(p, s, plan)
      except _Corrupt as e:
        reasons.append(f"{t.name} step {s}: {e}")
        warnings.warn(
            f"{_API}.restore: skipping {t.name} checkpoint step {s} at {p}: {e}; falling back to "
            "the next newest checkpoint", CheckpointCorruptionWarning, stacklevel=2)
        continue
      return out
    raise ValueError(
        f"{_API}.restore: no valid checkpoint{'' if step is None else f' for step {step}'} in {where}; "
        "every candidate failed verification:\n  " + "\n  ".join(reasons))

  def _restore_dir(self, step_dir: epath.Path, step: int, plan: "_TargetPlan"):
    body = _read_manifest(step_dir)
    if body.get("step") != step:
      raise _Corrupt(f"manifest names step {body.get('step')}, directory is step {step}")
    # Metadata (JSON), verified by CRC-32.
    try:
      meta = json.loads((step_dir / METADATA_ITEM / _JSON_FILE).read_text())
    except Exception as e:  # noqa: BLE001
      raise _Corrupt(f"metadata item unreadable: {type(e).__name__}: {e}") from e
    if _checksum.crc32_text(_canonical_json(meta)) != body["metadata_crc32"]:
      raise _Corrupt("metadata CRC-32 mismatch")
    entries = body["arrays"]
    plan.check(entries, body["metadata_types"])
    # Arrays: restore with the saved shape/dtype onto the requested placement.
    abstract_pairs = []
    for e in entries:
      path = tuple(e["path"])
      shape, dtype = tuple(e["shape"]), np.dtype(e["dtype"])
      kind = plan.kind(path, e["kind"])
      if kind == "numpy":
        abstract_pairs.append((path, np.empty(shape, dtype)))
      else:
        sharding = plan.sharding(path) or _default_sharding()
        if e["key_impl"] is not None:
          sharding = _key_data_sharding(sharding, len(shape) - 1)
        abstract_pairs.append((path, jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)))
    restored_flat = []
    if entries:
      abstract = _nest(abstract_pairs)
      try:
        with warnings.catch_warnings():
          warnings.simplefilter("ignore")
          restored = ocp.Checkpointer(ocp.StandardCheckpointHandler()).restore(
              step_dir / STATE_ITEM, args=ocp.args.StandardRestore(abstract))
        restored_flat = [_get(restored, tuple(e["path"])) for e in entries]
      except _Corrupt:
        raise
      except Exception as e:  # noqa: BLE001 - missing / truncated / undecodable files
        raise _Corrupt(f"Orbax could not read the arrays: {type(e).__name__}: {str(e)[:300]}") from e
      for e, x in zip(entries, restored_flat):
        if tuple(x.shape) != tuple(e["shape"]) or np.dtype(x.dtype) != np.dtype(e["dtype"]):
          raise _Corrupt(f"array {'/'.join(e['path'])} restored as {x.shape} {x.dtype}, "
                         f"manifest says {tuple(e['shape'])} {e['dtype']}")
      got = _checksum.device_digests(restored_flat)
      for e, d in zip(entries, got):
        if _checksum.digest_hex(d) != e["digest"]:
          raise _Corrupt(f"content digest mismatch for array {'/'.join(e['path'])} "
                         f"(saved {e['digest']}, read {_checksum.digest_hex(d)})")
    # Re-wrap PRNG keys and assemble.
    values = {}
    for e, x in zip(entries, restored_flat):
      if e["key_impl"] is not None:
        x = jax.random.wrap_key_data(x, impl=e["key_impl"])
      values[tuple(e["path"])] = x
    for m in body["metadata_types"]:
      path = tuple(m["path"])
      try:
        v = _get(meta, path)
      except (KeyError, TypeError) as err:
        raise _Corrupt(f"metadata leaf {'/'.join(path)} missing") from err
      if m["type"].startswith("numpy:"):
        v = np.dtype(m["type"][6:]).type(v)
      values[path] = v
    return plan.assemble(values)


class _TargetPlan:
  """Maps a restore ``target`` onto saved paths (or builds nested dicts without one)."""

  def __init__(self, target):
    self.target = target
    self.leaves = {}
    self.treedef = None
    if target is None:
      return
    flat, self.treedef = jax.tree_util.tree_flatten_with_path(target)
    for kp, x in flat:
      self.leaves[_path(kp)] = (kp, x)

  def check(self, entries, meta_types):
    if self.target is None:
      return
    saved = {tuple(e["path"]): e for e in entries}
    saved_meta = {tuple(m["path"]) for m in meta_types}
    for path, (kp, x) in self.leaves.items():
      name = jax.tree_util.keystr(kp)
      if path in saved:
        e = saved[path]
        if not _is_arraylike(x):
          raise ValueError(f"{_API}.restore: target leaf {name} is {type(x).__name__} but the "
                           "checkpoint holds an array there; give an array or ShapeDtypeStruct")
        shape = tuple(e["shape"][:-1]) if e["key_impl"] else tuple(e["shape"])
        if tuple(x.shape) != shape:
          raise ValueError(f"{_API}.restore: target leaf {name} has shape {tuple(x.shape)} but the "
                           f"checkpoint holds shape {shape}; fix the target's shape")
        if (e["key_impl"] is not None) != _is_key_array(x):
          raise ValueError(f"{_API}.restore: target leaf {name} has dtype {x.dtype} but the checkpoint "
                           f"holds {'a PRNG key array' if e['key_impl'] else e['dtype']}")
      elif path in saved_meta:
        if _is_arraylike(x):
          raise ValueError(f"{_API}.restore: target leaf {name} is an array but the checkpoint "
                           "holds a non-array value there")
      else:
        raise ValueError(f"{_API}.restore: target leaf {name} is not in the checkpoint; saved "
                         f"leaves: {sorted('/'.join(p) for p in list(saved) + list(saved_meta))[:20]}")

  def kind(self, path, saved_kind):
    if self.target is None or path not in self.leaves:
      return saved_kind
    x = self.leaves[path][1]
    return "numpy" if isinstance(x, np.ndarray) else "jax"

  def sharding(self, path):
    if self.target is None or path not in self.leaves:
      return None
    return getattr(self.leaves[path][1], "sharding", None)

  def assemble(self, values: dict):
    if self.target is None:
      return _nest(list(values.items()))
    out = []
    for path, (kp, x) in self.leaves.items():
      v = values[path]
      if _is_arraylike(x) and not _is_key_array(x) and np.dtype(v.dtype) != np.dtype(x.dtype):
        v = v.astype(x.dtype)
      elif not _is_arraylike(x) and isinstance(x, np.generic) and not isinstance(v, np.generic):
        v = type(x)(v)
      out.append(v)
    return jax.tree_util.tree_unflatten(self.treedef, out)
