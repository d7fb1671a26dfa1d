"""TieredCheckpointManager: two Orbax tiers, atomic commits, verified content."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import logging
import os
import re
import shutil
import socket
import threading
import time
import uuid
import warnings
import weakref
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint._src.handlers import json_checkpoint_handler

from lepton_jax.checkpoint import _checksum

__all__ = ["TieredCheckpointManager", "CheckpointCorruptionWarning", "CheckpointLockError",
           "STATE_ITEM", "METADATA_ITEM", "MANIFEST_ITEM"]

_API = "TieredCheckpointManager"
_FORMAT = "lepton_jax.checkpoint/1"
_log = logging.getLogger("lepton_jax.checkpoint")

#: Orbax item holding every array leaf as a nested dict (``ocp.args.StandardSave``).
STATE_ITEM = "state"
#: Orbax item holding every non-array leaf (ints, floats, strings, ...) as JSON (``ocp.args.JsonSave``).
METADATA_ITEM = "metadata"
#: Orbax item holding the content digests (JSON, readable with ``ocp.args.JsonRestore``).
MANIFEST_ITEM = "lepton_manifest"
_COMMIT_FILE = "commit_success.txt"  # written by Orbax just before the atomic rename
_JSON_FILE = "metadata"  # file name JsonCheckpointHandler writes inside its item directory
_SIDE_DIR = ".lepton"  # per-tier lock file and verdicts; Orbax ignores names that are not steps
_NEW_TAG = ".lepton-new-"  # a re-saved step written aside, promoted once complete
_STALE_TAG = ".lepton-stale-"  # a retired step, deleted right after the rename
_ORBAX_TMP = ".orbax-checkpoint-tmp"
_ROOT_KEY = "__lepton_root__"  # storage path of a state that is a single array (no pytree keys)
_ASIDE_RE = re.compile(r"^(\d+)(\.lepton-new-|\.lepton-stale-)[0-9a-f]+$")


class CheckpointCorruptionWarning(UserWarning):
  """A checkpoint failed verification and was skipped in favour of an older one."""


class CheckpointLockError(RuntimeError):
  """Another live TieredCheckpointManager holds the checkpoint directory."""


class _Corrupt(Exception):
  """Internal: a step directory that cannot be trusted (damaged, incomplete, wrong content)."""


def _is_io_error(e: BaseException) -> bool:
  """An environment problem (permissions, disk, network), not damage of the checkpoint."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and not isinstance(e, (FileNotFoundError, IsADirectoryError,
                                                     NotADirectoryError, EOFError)):
      return True
    msg = str(e)
    if any(k in msg for k in ("PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "UNAVAILABLE",
                              "Permission denied", "No space left")):
      return True
    e = e.__cause__ or e.__context__
  return False


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
  # A state that is one bare array has no keys; it is stored under a reserved name.
  return tuple(_segment(k) for k in kp) or (_ROOT_KEY,)


def _leaf_name(kp) -> str:
  return jax.tree_util.keystr(kp) or "<root> (the state itself)"


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
  array_paths: list       # paths of the arrays Orbax writes (non-empty arrays)
  arrays: list            # what Orbax saves (key arrays replaced by their key data)
  entries: list           # manifest entries of every array leaf (without digests)
  meta_pairs: list        # (path, json value)
  meta_types: list        # manifest entries for metadata leaves


def _split(state) -> _Split:
  leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  sp = _Split([], [], [], [], [])
  for kp, x in leaves:
    path, name = _path(kp), _leaf_name(kp)
    if isinstance(x, jax.ShapeDtypeStruct):
      raise TypeError(f"{_API}.save: state leaf {name} is a ShapeDtypeStruct; "
                      "save needs concrete arrays (ShapeDtypeStructs belong in restore(target=...))")
    if isinstance(x, (jax.Array, np.ndarray)):
      key_impl = None
      kind = "numpy" if isinstance(x, np.ndarray) else "jax"
      if kind == "jax" and x.is_deleted():
        raise ValueError(f"{_API}.save: state leaf {name} is a deleted jax.Array (donated to a jitted "
                         "function or deleted); save the state before donating it")
      if kind == "jax" and _is_key_array(x):
        key_impl = str(jax.random.key_impl(x))
        x = jax.random.key_data(x)
      dt = np.dtype(x.dtype)
      if dt.kind in "OUS" or dt.fields is not None or dt.type is np.void:
        raise TypeError(
            f"{_API}.save: state leaf {name} is an array of dtype {dt}; arrays of objects, strings, "
            "bytes or structured records cannot be checkpointed. Store text as a str leaf, records "
            "as a dict of numeric arrays")
      stored = x.size > 0  # Orbax refuses zero-size arrays; shape and dtype say everything
      sp.entries.append({"path": list(path), "shape": list(x.shape), "dtype": dt.name,
                         "kind": kind, "key_impl": key_impl, "stored": stored})
      if kind == "jax" and jax.process_count() > 1:
        # Multi-process: restore without a target (and latest_step's check) places the array as
        # it was saved; the host-local tier can only be read back that way.
        sp.entries[-1]["sharding"] = _describe_sharding(x)
      if stored:
        sp.array_paths.append(path)
        sp.arrays.append(x)
    elif isinstance(x, np.generic):
      if np.dtype(x.dtype).kind in "OUSV" and np.dtype(x.dtype).type in (np.str_, np.bytes_, np.void, np.object_):
        raise TypeError(f"{_API}.save: state leaf {name} is a numpy {x.dtype} scalar; store it as "
                        "a plain Python str/int/float leaf")
      sp.meta_pairs.append((path, x.item()))
      sp.meta_types.append({"path": list(path), "type": f"numpy:{x.dtype.name}"})
    elif x is None or isinstance(x, (bool, int, float, str)):
      sp.meta_pairs.append((path, x))
      sp.meta_types.append({"path": list(path), "type": type(x).__name__})
    else:
      raise TypeError(
          f"{_API}.save: state leaf {name} has type {type(x).__name__}; "
          "valid leaves are jax/numpy arrays and JSON scalars (bool, int, float, str); convert it "
          "(for example to a dict of scalars) or register it as a pytree")
  # Two leaves on one storage path (e.g. keys 1 and "1") are refused before anything is written.
  _nest([(tuple(e["path"]), None) for e in sp.entries] + [(p, None) for p, _ in sp.meta_pairs])
  return sp


def _canonical_json(obj) -> str:
  return json.dumps(obj, sort_keys=True, allow_nan=True)


def _finish_digests(host: list, pending: list) -> list[str]:
  out: list = [None] * len(host)
  big_host = []
  for i, (h, d) in enumerate(zip(host, pending)):
    if d is not None:
      out[i] = _checksum.digest_hex(d)
    elif h.nbytes > _checksum.HOST_DIGEST_MAX_BYTES:
      big_host.append(i)
    else:
      out[i] = _checksum.host_digest(h)
  if big_host:  # NumPy would take seconds per 100 MiB; the jitted digest is ~20x faster
    for i, d in zip(big_host, _checksum._digest_all([_as_device_words(host[i]) for i in big_host])):
      out[i] = _checksum.digest_hex(d)
  return out


def _as_device_words(h: np.ndarray) -> jax.Array:
  """A device array with the same digest as host array ``h`` (64-bit types as uint32 words,
  so that ``jax_enable_x64=False`` cannot narrow them)."""
  h = np.ascontiguousarray(h)
  if h.dtype.itemsize == 8 and not np.issubdtype(h.dtype, np.complexfloating):
    return jnp.asarray(h.view(np.uint32).reshape(h.shape + (2,)))
  if h.dtype == np.complex128:
    return jnp.asarray(h.view(np.uint32).reshape(h.shape + (2, 2)))
  return jnp.asarray(h)


class _LazyManifest:
  """The manifest of one save; digests are finished (once, shared by the tiers) at write time."""

  def __init__(self, job: "_SaveJob"):
    self.job = job
    self._lock = threading.Lock()
    self._value = None

  def resolve(self) -> dict:
    self.job.digests_ready.wait()
    if self.job.pending_digests is None:
      raise RuntimeError(f"{_API}.save: the content digests of step {self.job.step} could not be computed")
    with self._lock:
      if self._value is None:
        job = self.job
        pend = job.pending_digests
        host = [d.x if isinstance(d, _checksum._HostCopy) else None for d in pend]
        digests = iter(_finish_digests(host, [None if h is not None else d for h, d in zip(host, pend)]))
        entries = [dict(e, digest=next(digests) if e["stored"] else None) for e in job.split.entries]
        body = {"format": _FORMAT, "step": job.step, "arrays": entries,
                "metadata_types": job.split.meta_types,
                "metadata_crc32": _checksum.crc32_text(_canonical_json(job.meta))}
        self._value = {"body": body, "crc32": _checksum.crc32_text(_canonical_json(body))}
      return self._value


@dataclasses.dataclass
class _ManifestSave(ocp.args.CheckpointArgs):
  """Save args of the manifest item (registered per checkpointer, not globally)."""

  item: _LazyManifest


class _ManifestHandler(json_checkpoint_handler.JsonCheckpointHandler):
  """JsonCheckpointHandler whose item is resolved while Orbax writes the arrays.

  The digests are finished on a worker thread concurrently with the array writes, so they add
  nothing to the commit time when the write is the slower of the two.
  """

  async def _save_fn(self, x, directory):
    if isinstance(x, _LazyManifest):
      x = await asyncio.to_thread(x.resolve)
    await super()._save_fn(x, directory)

  @classmethod
  def typestr(cls) -> str:
    # On disk it is an ordinary JSON item: plain Orbax restores it with JsonCheckpointHandler.
    return json_checkpoint_handler.JsonCheckpointHandler.typestr()


class _PerProcessStateHandler(ocp.StandardCheckpointHandler):
  """StandardCheckpointHandler that writes *every* addressable shard of this process.

  Orbax's default ``ArrayHandler`` writes only the shards with ``replica_id == 0``, which may
  live on another process; a per-process (host-local) directory then lacks data this process
  needs to restore. This is the array handler of Orbax's own host-local checkpoints
  (``orbax.checkpoint.experimental.emergency``: ``primary_host=None, replica_id=None``). On disk
  it is an ordinary StandardCheckpointHandler item.
  """

  def __init__(self, multiprocessing_options):
    super().__init__(multiprocessing_options=multiprocessing_options)
    registry = ocp.type_handlers.create_type_handler_registry(
        (jax.Array, ocp.type_handlers.ArrayHandler(primary_host=None, replica_id=None,
                                                   use_replica_parallel=False)))
    self._impl = ocp.PyTreeCheckpointHandler(multiprocessing_options=multiprocessing_options,
                                             type_handler_registry=registry)

  @classmethod
  def typestr(cls) -> str:
    return ocp.StandardCheckpointHandler.typestr()


def _this_process_only():
  """Orbax options of a directory only this process uses: it writes everything, waits for nobody."""
  return ocp.options.MultiprocessingOptions(primary_host=None, active_processes={jax.process_index()})


def _make_checkpointer(per_process: bool = False) -> ocp.AsyncCheckpointer:
  """Orbax checkpointer of one tier.

  ``per_process``: the host-local tier of a multi-process job (every process its own directory,
  its own addressable shards, no barriers). Otherwise Orbax's defaults: in a multi-process job the
  save is collective, process 0 (primary) writes the JSON items, the commit file and the rename.
  """
  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  if per_process:
    mp = _this_process_only()
    registry.add(STATE_ITEM, ocp.args.StandardSave, _PerProcessStateHandler(mp))
    registry.add(METADATA_ITEM, ocp.args.JsonSave, ocp.JsonCheckpointHandler(multiprocessing_options=mp))
    registry.add(MANIFEST_ITEM, _ManifestSave, _ManifestHandler(multiprocessing_options=mp))
    # Directories are created before the writes start: Orbax's asynchronous creation signals
    # completion through keys of the job's coordination service that every process shares, so
    # one process's signal would release another process's writes into a missing directory.
    sync_dirs = ocp.options.AsyncOptions(create_directories_asynchronously=False)
    composite = ocp.CompositeCheckpointHandler(
        handler_registry=registry,
        composite_options=ocp.CompositeOptions(multiprocessing_options=mp, async_options=sync_dirs))
    return ocp.AsyncCheckpointer(composite, multiprocessing_options=mp, async_options=sync_dirs)
  registry.add(STATE_ITEM, ocp.args.StandardSave, ocp.StandardCheckpointHandler())
  json_handler = ocp.JsonCheckpointHandler()
  registry.add(METADATA_ITEM, ocp.args.JsonSave, json_handler)
  registry.add(MANIFEST_ITEM, _ManifestSave, _ManifestHandler())
  return ocp.AsyncCheckpointer(ocp.CompositeCheckpointHandler(handler_registry=registry))


# ----------------------------------------------------------------------------
# Multi-process agreement (jax.distributed). Every function here is a collective when
# jax.process_count() > 1 (every process must call it, in the same order) and free otherwise.


def _multi() -> bool:
  return jax.process_count() > 1


def _gather_ints(values) -> list[list[int]]:
  """Every process's list of (64-bit) ints, indexed by process."""
  values = [int(v) for v in values]
  if not _multi():
    return [values]
  from jax.experimental import multihost_utils
  lens = np.asarray(multihost_utils.process_allgather(np.asarray([len(values)], np.int32))).reshape(-1)
  width = 1 << max(0, int(lens.max()) - 1).bit_length()  # powers of two: few compiled shapes
  buf = np.zeros((width,), np.int64)
  buf[:len(values)] = values
  got = np.asarray(multihost_utils.process_allgather(buf.view(np.int32)))  # int32 words: x64 may be off
  got = got.reshape(len(lens), 2 * width)
  return [np.ascontiguousarray(got[i], np.int32).view(np.int64)[:int(n)].tolist()
          for i, n in enumerate(lens)]


def _gather_texts(text: str) -> list[str]:
  return [bytes(v).decode("utf-8", errors="replace") for v in _gather_ints(text.encode("utf-8"))]


def _barrier() -> None:
  if _multi():
    _gather_ints([])


def _agree(exc: BaseException | None, what: str) -> None:
  """Every process learns whether any process failed at ``what`` and raises if one did.

  The worst outcome wins: an error that is not corruption on any process is raised everywhere
  (a process that did not fail raises RuntimeError naming the failed ones), else damage found by
  any process makes the step corrupt (``_Corrupt``) for all of them. No process goes on alone into
  a collective its peers left.
  """
  if not _multi():
    if exc is not None:
      raise exc
    return
  kind = 0 if exc is None else (1 if isinstance(exc, _Corrupt) else 2)
  msg = "" if exc is None else f"{type(exc).__name__}: {exc}"[:500]
  got = [json.loads(t) for t in _gather_texts(json.dumps([kind, msg]))]
  worst = max(k for k, _ in got)
  if worst == 0:
    return
  peers = "; ".join(f"process {i}: {m}" for i, (k, m) in enumerate(got) if k == worst)
  if exc is not None and kind == worst:
    raise exc
  if worst == 1:
    raise _Corrupt(f"{what} found damage on another process ({peers})")
  raise RuntimeError(f"{_API}: {what} failed on another process of the jax.distributed job "
                     f"({peers})") from exc


def _abspath(d) -> str:
  d = os.fspath(d)
  return d if "://" in d else os.path.abspath(d)


def _check_same_config(cfg: dict) -> None:
  """Multi-process: every process must open the manager with the same shared settings."""
  cfgs = [json.loads(t) for t in _gather_texts(json.dumps(cfg, sort_keys=True))]
  diffs = [k for k in cfg if len({json.dumps(c.get(k), sort_keys=True) for c in cfgs}) > 1]
  if diffs:
    per = "; ".join(f"{k}: " + ", ".join(f"process {i} {c.get(k)!r}" for i, c in enumerate(cfgs))
                    for k in diffs)
    raise ValueError(
        f"{_API}: the processes of this jax.distributed job opened the manager with different settings "
        f"({per}); every process must give the same persistent_dir (one directory on storage all "
        "processes share, written by Orbax's collective save), intervals, keep counts and async_save. "
        "Only local_dir is per process")


def _describe_sharding(x) -> dict | None:
  """JSON of a NamedSharding (device ids, mesh shape and axes, spec), to restore it without a target."""
  s = getattr(x, "sharding", None)
  if not isinstance(s, jax.sharding.NamedSharding) or not hasattr(s.mesh, "devices"):
    return None
  spec = [list(p) if isinstance(p, tuple) else p for p in tuple(s.spec)]
  if not all(p is None or isinstance(p, (str, list)) for p in spec):
    return None
  return {"device_ids": [int(d.id) for d in s.mesh.devices.flat], "mesh_shape": list(s.mesh.devices.shape),
          "axis_names": [str(a) for a in s.mesh.axis_names], "spec": spec}


def _saved_sharding(e: dict):
  """The NamedSharding an array was saved with (multi-process manifests), or ``None``."""
  d = e.get("sharding")
  if d is None or not _multi():
    return None
  by_id = {dev.id: dev for dev in jax.devices()}
  if not all(i in by_id for i in d["device_ids"]):
    return None
  devices = np.empty(len(d["device_ids"]), dtype=object)
  devices[:] = [by_id[i] for i in d["device_ids"]]
  mesh = jax.sharding.Mesh(devices.reshape(d["mesh_shape"]), tuple(d["axis_names"]))
  spec = jax.sharding.PartitionSpec(*[tuple(p) if isinstance(p, list) else p for p in d["spec"]])
  return jax.sharding.NamedSharding(mesh, spec)


# ----------------------------------------------------------------------------
# Directories: step listing, fingerprints, verdicts, locks, recovery.


def _is_local(path: epath.Path) -> bool:
  return "://" not in os.fspath(path)


def _fingerprint(step_dir: epath.Path) -> list | None:
  """(file, size, mtime) of every file of a step: any rewrite of a file changes it."""
  if not _is_local(step_dir):
    return None
  root = os.fspath(step_dir)
  out = []
  try:
    for dirpath, _, files in os.walk(root):
      for f in files:
        st = os.stat(os.path.join(dirpath, f))
        out.append([os.path.relpath(os.path.join(dirpath, f), root), st.st_size, st.st_mtime_ns])
  except OSError:
    return None
  if not out:
    return None
  return sorted(out)


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  try:  # a killed child its parent has not reaped yet is dead too
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
  except (OSError, IndexError):
    return True


class _Lock:
  """``<dir>/.lepton/lock``: one writing manager per directory (pid, host, token inside)."""

  def __init__(self, directory: epath.Path):
    self.path = os.path.join(os.fspath(directory), _SIDE_DIR, "lock")
    self.token = uuid.uuid4().hex
    self.held = False

  def _publish(self, me: dict) -> bool:
    """Creates the lock file with its whole content at once (a private file, then ``link``).

    ``O_CREAT|O_EXCL`` followed by a write leaves an empty lock file when the process is killed in
    between, and nobody can tell whose it was; ``link`` either publishes the complete file or fails.
    """
    side = os.path.dirname(self.path)
    tmp = os.path.join(side, f"lock.tmp.{os.getpid()}.{self.token}")
    with open(tmp, "w") as f:
      json.dump(me, f)
      f.flush()
      os.fsync(f.fileno())
    try:
      os.link(tmp, self.path)
      return True
    except FileExistsError:
      return False
    finally:
      try:
        os.unlink(tmp)
      except FileNotFoundError:
        pass

  def _sweep_private_files(self) -> None:
    """Removes ``lock.tmp.<pid>.*`` files left by processes killed inside ``_publish``."""
    side = os.path.dirname(self.path)
    for name in os.listdir(side):
      parts = name.split(".")
      if len(parts) == 4 and parts[:2] == ["lock", "tmp"] and parts[2].isdigit():
        if int(parts[2]) != os.getpid() and not _pid_alive(int(parts[2])):
          try:
            os.unlink(os.path.join(side, name))
          except FileNotFoundError:
            pass

  def acquire(self) -> None:
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    self._sweep_private_files()
    me = {"pid": os.getpid(), "host": socket.gethostname(), "token": self.token,
          "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    deadline = time.monotonic() + 15.0
    while time.monotonic() < deadline:
      if self._publish(me):
        self.held = True
        return
      try:
        with open(self.path) as f:
          other = json.load(f)
      except FileNotFoundError:
        continue
      except (OSError, ValueError):
        # Not written by _publish (which never leaves a partial file): an older version's torn
        # write, or a file being replaced right now. Wait a moment; if it stays unreadable it is dead.
        try:
          age = time.time() - os.path.getmtime(self.path)
        except FileNotFoundError:
          continue
        if age < 2:
          time.sleep(0.05)
          continue
        other = {"pid": -1, "host": socket.gethostname()}
      pid, host = int(other.get("pid", -1)), str(other.get("host", "?"))
      if host == socket.gethostname() and (pid < 0 or not _pid_alive(pid)):
        warnings.warn(
            f"{_API}: taking over the lock {self.path} of a manager that is gone (pid {pid} on "
            f"{host} is not running; it probably crashed)", UserWarning, stacklevel=4)
        try:
          os.unlink(self.path)
        except FileNotFoundError:
          pass
        continue
      who = "this process" if pid == os.getpid() and host == socket.gethostname() else f"pid {pid} on host {host}"
      raise CheckpointLockError(
          f"{_API}: {os.path.dirname(os.path.dirname(self.path))} is already used by another "
          f"TieredCheckpointManager ({who}, since {other.get('since', '?')}); two writers would "
          "delete each other's steps. Close the other manager first (or use another directory); "
          f"if that process no longer exists, delete {self.path}")
    raise CheckpointLockError(f"{_API}: could not acquire {self.path} within 15 s (it keeps changing)")

  def release(self) -> None:
    if not self.held:
      return
    self.held = False
    try:
      with open(self.path) as f:
        if json.load(f).get("token") != self.token:
          return
      os.unlink(self.path)
    except (OSError, ValueError):
      pass


def _release_all(locks) -> None:
  for lock in locks:
    lock.release()


class _Tier:

  def __init__(self, name: str, directory, every: int, keep: int | None, *, shared: bool = False):
    self.name = name
    self.directory = epath.Path(directory)
    self.every = every
    self.keep = keep
    self.saved_this_session: set[int] = set()
    self.lock = _Lock(self.directory) if _is_local(self.directory) else None
    # shared: one directory written by every process of a jax.distributed job (Orbax's collective
    # save); only the primary process (0) holds its lock and renames, deletes or writes verdicts.
    self.shared = shared
    self.writer = not shared or jax.process_index() == 0
    self.per_process = not shared and _multi()  # host-local tier of a multi-process job

  def step_dirs(self) -> dict[int, epath.Path]:
    """Finalised (renamed) step directories; in-flight tmp directories are excluded."""
    out = {}
    if not self.directory.exists():
      return out
    for p in self.directory.iterdir():
      if p.name.isdigit():
        try:
          if p.is_dir():
            out[int(p.name)] = p
        except OSError:  # renamed away meanwhile
          continue
    return out

  def verdict_path(self, step: int) -> str:
    return os.path.join(os.fspath(self.directory), _SIDE_DIR, "verdicts", f"{step}.json")

  def aside(self, step: int, tag: str) -> epath.Path:
    return self.directory / f"{step}{tag}{uuid.uuid4().hex}"

  def recover(self) -> None:
    """Finishes or undoes what a crash interrupted (run while holding the lock).

    A re-save writes ``N.lepton-new-*`` completely, renames ``N`` to
    ``N.lepton-stale-*``, renames the new copy to ``N`` and deletes the stale
    one; after a crash at any point, the newest complete copy becomes ``N``.
    Orbax's unfinished tmp directories are deleted.
    """
    if not self.directory.exists():
      return
    names = [p.name for p in self.directory.iterdir()]
    steps = {n for n in names if n.isdigit()}
    aside: dict[str, list] = {}
    for n in names:
      m = _ASIDE_RE.match(n)
      if m:
        aside.setdefault(m.group(1), []).append((m.group(2), n))
    for step, entries in aside.items():
      entries.sort(key=lambda e: e[0] != _NEW_TAG)  # a complete new copy wins over the stale one
      for tag, n in entries:
        p = self.directory / n
        complete = (p / _COMMIT_FILE).exists()
        if step not in steps and complete:
          p.rename(self.directory / step)
          steps.add(step)
          _log.warning("%s: restored step %s in %s from %s after an interrupted re-save",
                       _API, step, self.directory, n)
        else:
          shutil.rmtree(os.fspath(p), ignore_errors=True)
    for n in names:
      if _ORBAX_TMP in n and (self.directory / n).exists():
        shutil.rmtree(os.fspath(self.directory / n), ignore_errors=True)
    vdir = os.path.join(os.fspath(self.directory), _SIDE_DIR, "verdicts")
    if os.path.isdir(vdir):
      for f in os.listdir(vdir):
        if f.split(".")[0] not in steps:
          try:
            os.unlink(os.path.join(vdir, f))
          except OSError:
            pass


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
    if _is_io_error(e):
      raise
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


def _x64_blocked(dtype) -> bool:
  return (not jax.config.jax_enable_x64
          and np.dtype(dtype) in (np.dtype(np.float64), np.dtype(np.int64), np.dtype(np.uint64),
                                  np.dtype(np.complex128)))


@dataclasses.dataclass
class _SaveJob:
  step: int
  tiers: list
  pending_digests: list
  split: _Split
  meta: dict
  supersede: dict  # tier name -> steps > step left by an earlier run, removed once step commits
  digests_ready: threading.Event = dataclasses.field(default_factory=threading.Event)
  args: Any = None  # the Orbax save args, kept until the save is finished


class TieredCheckpointManager:
  """Two-tier Orbax checkpointing that survives ``kill -9`` and detects corruption.

  A fast *local* tier (local disk or ``/dev/shm``) is written every
  ``local_every`` steps and keeps the newest ``keep_local``; a durable
  *persistent* tier is written every ``persistent_every`` steps and keeps the
  newest ``keep_persistent`` (``None``: all). Either directory may be ``None``
  to use a single tier.

  How it works:

  * Each tier is an ordinary Orbax checkpoint directory with three items per
    step: ``"state"`` (every array leaf, as a nested dict keyed by the pytree
    path, ``StandardCheckpointHandler``), ``"metadata"`` (every non-array leaf -
    step, data-iterator position, config values - as JSON) and
    ``"lepton_manifest"`` (JSON: shape, dtype and a 64-bit content digest of
    every array, a CRC-32 of the metadata, and a CRC-32 of itself). Plain Orbax
    reads the persistent tier::

      mngr = ocp.CheckpointManager(persistent_dir)
      mngr.all_steps()
      mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_nested_dict),
          metadata=ocp.args.JsonRestore()))

  * ``save`` blocks only for the device->host copy of the arrays (started for
    all arrays at once) and for dispatching the digest computation on the
    devices; digests, writes, Orbax's atomic finalisation (tmp directory +
    rename) and retention run on a background thread, one tier after the other
    (a failing tier does not stop the next one; the error is raised by
    ``wait()``, the next ``save`` or, with ``async_save=False``, by ``save``).
  * A step directory appears only by an atomic rename of a complete copy.
    Re-saving a step that exists writes the new copy aside, then swaps it in;
    a crash at any moment leaves the old or the new complete copy, and the
    next manager finishes or undoes the swap. If a crash (or an I/O error)
    kept the persistent tier from a step it was due, the next manager (or the
    next ``save``) copies the newest local step there.
  * Each directory holds a lock (``.lepton/lock``: pid, host); a second manager
    on a directory in use is refused with :class:`CheckpointLockError`; the
    lock of a process that no longer runs is taken over with a warning.
  * ``latest_step`` names only a step whose data verifies: the first time it
    reads and checks the step (digests), then it remembers the verdict next to
    the step (``.lepton/verdicts``) together with the size and mtime of every
    file, so a later change of any file triggers a new check. Steps this
    manager wrote are recorded as verified when committed (their digests come
    from the very bytes handed to Orbax).
  * ``restore`` re-computes every array's digest and compares it with the
    manifest. On a mismatch, a missing or truncated file or an unreadable
    manifest it warns (:class:`CheckpointCorruptionWarning`) and falls back to
    the next newest step in either tier (``step=None``) or raises (explicit
    ``step``); it never returns values that differ from what was saved. Errors
    that are not damage - a target of the wrong shape, dtype or sharding, an
    I/O error - are raised as themselves. The digest is independent of the
    sharding (see ``lepton_jax.checkpoint._checksum``), so restoring onto a
    different mesh is verified too.
  * Saving a step older than steps left on disk by an earlier run (training
    restarted from an older checkpoint) removes those newer steps, in both
    tiers and with a warning, once the new step is committed, so that
    ``latest_step`` and a later ``restore`` follow the new run.

  Multi-process jobs (``jax.distributed``, ``jax.process_count() > 1``): every
  process creates the manager with the same settings and calls ``save``,
  ``latest_step``, ``restore`` and ``close`` in the same order (they are
  collective, like Orbax's own ``CheckpointManager``).

  * The persistent tier is *shared*: one directory on storage that every
    process sees. Orbax's collective save (``MultiprocessingOptions``
    defaults, ``primary_host=0``) has every process write its shards
    (``replica_id == 0``); process 0 writes the JSON items and the commit,
    renames re-saved steps into place, deletes old steps and writes the
    verdicts. Process 0 holds the lock; the others check that its lock file
    is in the directory they were given, so a per-process or mistyped
    directory is refused on every process (:class:`ValueError`, before
    anything is written), as are different intervals or keep counts.
  * The local tier is *host-local*: ``local_dir`` is this process's own
    directory (each process locks its own; processes sharing a host need
    different ones). Every process writes all the shards its devices hold
    (Orbax's host-local array handler, ``primary_host=None, replica_id=None``,
    as in ``orbax.checkpoint.experimental.emergency``) with no barrier, so a
    local step restores only onto the placement it was saved with; a
    ``target`` that puts shards on other processes reads the persistent tier
    (or, with no persistent tier, is refused naming it). Each array's
    ``NamedSharding`` is recorded in the manifest: without a ``target``
    (and in ``latest_step``'s check) arrays come back as they were saved.
  * A step is a candidate only if every process has it; verdicts are agreed
    (a step is good only if it verifies on every process; the digests are
    one collective computation) and so are errors, so no process is left
    waiting in a collective its peers abandoned. The digests run inside
    ``save()`` (a collective may not run on a background thread), and the
    persistent tier is not back-filled from the local tier after a crash
    (local steps hold one process's shards); the next due save writes it.
    A save error of one process (say, its local disk is full) is raised on
    every process: by ``save`` with ``async_save=False``, else by the next
    ``save``, ``latest_step`` or ``restore`` (``wait`` and ``close`` stay
    local, so that a process leaving on its own error cannot hang them). A
    failure inside Orbax's collective write of the shared tier on one process
    leaves the others in Orbax's barrier until its timeout.

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
  arrays on the default device (a state saved as one bare array comes back as
  that array).

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
    self._closed = True  # until the locks are held
    multi = _multi()
    if multi:  # every process must agree, before any collective, or the job would hang
      _check_same_config({
          "persistent_dir": None if persistent_dir is None else _abspath(persistent_dir),
          "local_dir given": local_dir is not None, "local_every": int(local_every),
          "persistent_every": int(persistent_every), "keep_local": int(keep_local),
          "keep_persistent": keep_persistent if keep_persistent is None else int(keep_persistent),
          "async_save": async_save})
    self._tiers: list[_Tier] = []
    if local_dir is not None:
      self._tiers.append(_Tier("local", local_dir, int(local_every), int(keep_local)))
    if persistent_dir is not None:
      self._tiers.append(_Tier("persistent", persistent_dir, int(persistent_every),
                               None if keep_persistent is None else int(keep_persistent), shared=multi))
    locks = []
    err = None
    try:
      for t in self._tiers:
        if not t.writer:
          continue  # a shared tier: the primary creates and locks it, this process checks it below
        t.directory.mkdir(parents=True, exist_ok=True)
        if t.lock is not None:
          try:
            t.lock.acquire()
          except CheckpointLockError as e:
            if t.per_process:
              e.add_note(f"{_API}: in a jax.distributed job local_dir is this process's own (host-local) "
                         "directory; processes that share a host need different ones, e.g. "
                         f"f'{{local_dir}}/{{jax.process_index()}}' (process {jax.process_index()})")
            raise
          locks.append(t.lock)
    except BaseException as e:
      if not multi:
        _release_all(locks)
        raise
      err = e
    self._token = uuid.uuid4().hex  # names of re-saved steps written aside
    if multi:
      try:
        _agree(err, "opening the checkpoint directories")
        self._token = self._check_shared_tiers()
      except BaseException:
        _release_all(locks)
        raise
    self._finalizer = weakref.finalize(self, _release_all, locks)
    self._closed = False
    self._verdicts: dict = {}
    self._fs_lock = threading.RLock()  # renames/deletes vs. verification of the same step
    self._pending: concurrent.futures.Future | None = None
    self._persistent_owed = False
    self._aside_seq = 0
    self._agreed_exists: dict = {}
    for t in self._tiers:
      t.checkpointer = _make_checkpointer(per_process=t.per_process)
    self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lepton-ckpt")
    err = None
    try:
      for t in self._tiers:
        if t.writer:
          t.recover()
    except Exception as e:  # noqa: BLE001 - agreed on (multi-process), then raised
      err = e
    if multi:
      _agree(err, "recovering interrupted saves")
    elif err is not None:
      raise err
    if len(self._tiers) == 2 and not multi:
      # Multi-process: the host-local tier holds only each process's shards, so a persistent step
      # cannot be copied from it; a persistent save that was missed is written by the next due save.
      if async_save:
        self._pending = self._executor.submit(self._catch_up)
      else:
        self._catch_up()

  def _check_shared_tiers(self) -> str:
    """Multi-process: checks that every process sees the directory the primary locked.

    Returns the primary's lock token (the same on every process), used for names all processes
    must agree on.
    """
    primary_token = None
    for t in self._tiers:
      if not t.shared:
        continue
      mine = t.lock.token if (t.writer and t.lock is not None and t.lock.held) else ""
      token = _gather_texts(mine)[0]
      primary_token = primary_token or token or None
      err = None
      if not t.writer and token:
        try:
          with open(t.lock.path) as f:
            held = json.load(f).get("token")
        except (OSError, ValueError):
          held = None
        if held != token:
          err = ValueError(
              f"{_API}: persistent_dir {str(t.directory)!r} of process {jax.process_index()} is not the "
              "directory process 0 opened (process 0's lock file is not in it): in a jax.distributed job the "
              "persistent tier is one directory that every process sees (shared or network storage), "
              "written together by Orbax's collective save; give every process the same shared directory")
      _agree(err, "checking the shared persistent directory")
    if primary_token is None:  # no lock file (remote storage): a token from the primary
      primary_token = _gather_texts(uuid.uuid4().hex)[0]
    return primary_token

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
        included, zero-size allowed) and JSON scalars (``nnx.state(...)``,
        optax states, dicts), or a single array.
      force: save to both tiers regardless of the intervals.

    Returns:
      Whether a save was started (``False`` when no tier is due or the step
      was already saved by this manager).

    Raises:
      TypeError / ValueError: a leaf that cannot be stored (named), before anything is written.
      The error of an earlier asynchronous save, or (``async_save=False``) of this one;
      every due tier is attempted before the error is raised.
    """
    self._check_open("save")
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
      raise (ValueError if isinstance(step, (int, np.integer)) and not isinstance(step, bool) else TypeError)(
          f"{_API}.save: step must be an int >= 0, got {step!r}")
    step = int(step)
    tiers = [t for t in self._tiers
             if (force or step % t.every == 0 or (t.name == "persistent" and self._persistent_owed))
             and step not in t.saved_this_session]
    if not tiers:
      return False
    sp = _split(state)  # bad leaves are refused before anything is written
    meta = _nest(sp.meta_pairs)
    self._wait_together("an earlier save")  # one save in flight at a time: bounded host memory, errors surface here
    supersede = {}
    for t in self._tiers:  # a restarted run supersedes newer steps in every tier
      newer = sorted(s for s in t.step_dirs() if s > step and s not in t.saved_this_session)
      if newer:
        supersede[t.name] = newer
        warnings.warn(
            f"{_API}.save: step {step} is older than {t.name} steps {newer} left by an earlier run "
            f"(training restarted from an older checkpoint); those steps are removed from "
            f"{t.directory} once step {step} is committed, so that the latest step follows the new run",
            UserWarning, stacklevel=2)
    arrays = [np.array(x, copy=True) if isinstance(x, np.ndarray) else x  # the caller may modify
              for x in sp.arrays]                                           # its numpy arrays
    job = _SaveJob(step, tiers, None, sp, meta, supersede)
    items = {METADATA_ITEM: ocp.args.JsonSave(meta), MANIFEST_ITEM: _ManifestSave(_LazyManifest(job))}
    if arrays:
      items[STATE_ITEM] = ocp.args.StandardSave(_nest(list(zip(sp.array_paths, arrays))))
    args = ocp.args.Composite(**items)
    # Orbax's blocking part (device->host copy) runs here; the write then runs in Orbax's
    # background thread. With both tiers due (on local file systems) only the local tier is
    # serialised; the persistent tier gets a file copy of the committed local step (one
    # device->host copy, one serialisation). A tier that fails does not keep the other from
    # being written: if the local tier fails, the persistent one is written from the arrays.
    job.args = args
    multi = _multi()
    # Multi-process: the host-local tier has each process's shards only, so it cannot be copied
    # into the shared tier; both are written by Orbax.
    copy_persistent = (not multi and len(tiers) == 2 and all(_is_local(t.directory) for t in tiers))
    # Whether the step exists decides where Orbax writes (aside, then swapped in): for a shared
    # tier every process must pick the same directory, so the primary's view decides.
    self._agreed_exists = {}
    if multi:
      shared = [t for t in tiers if t.shared]
      primary = _gather_ints([(t.directory / str(step)).exists() for t in shared])[0]
      self._agreed_exists = {t.name: bool(v) for t, v in zip(shared, primary)}
    self._aside_seq += 1
    started = []
    for t in tiers:
      t.saved_this_session.add(step)
      if t.name == "persistent" and copy_persistent and started[0][2] is None:
        started.append((t, None, None, "copy"))
        continue
      try:
        started.append((t, self._start_write(t, step, args), None, "orbax"))
      except Exception as e:  # noqa: BLE001 - re-raised after the other tiers (wait / next save)
        started.append((t, None, e, "orbax"))
    # Digests: large device arrays on their devices (one jit, not awaited), small ones and numpy
    # leaves from host copies; finished while Orbax writes. On accelerators the jit is dispatched
    # here, asynchronously, after Orbax's device->host copies (which must not queue behind it).
    # XLA:CPU runs a multi-device program synchronously in the dispatching thread, so on CPU the
    # background thread dispatches it. The arrays must outlive a donation by the caller's next
    # step until then: zero-copy NumPy views of their shards keep the buffers alive (XLA:CPU
    # does not donate a buffer that has an external reference; the step allocates anew).
    on_cpu = all(isinstance(x, np.ndarray) or all(d.platform == "cpu" for d in x.sharding.device_set)
                 for x in arrays)
    hold = None
    if not on_cpu or not self._async or multi:
      # Multi-process: the digests of arrays that span processes are a collective computation,
      # dispatched here in program order on every process (never from the background thread).
      self._start_digests(job, arrays)
      arrays = None
    else:
      hold = [np.asarray(sh.data) for x in arrays if isinstance(x, jax.Array) and x.is_fully_addressable
              for sh in x.addressable_shards]
    if self._async:
      self._pending = self._executor.submit(self._finish_save, job, started, arrays, hold)
    else:
      err = None
      try:
        self._finish_save(job, started, None, None)
      except Exception as e:  # noqa: BLE001 - agreed on (multi-process), then raised
        if not _multi():
          raise
        err = e
      _agree(err, f"saving step {step}")
    return True

  @staticmethod
  def _start_digests(job: _SaveJob, arrays: list) -> None:
    try:
      job.pending_digests = _checksum.device_digests(arrays)
    finally:
      job.digests_ready.set()

  def _finish_save(self, job: _SaveJob, started: list, arrays: list | None, hold: list | None) -> None:
    if arrays is not None:
      self._start_digests(job, arrays)
      del arrays
      jax.block_until_ready([d for d in job.pending_digests or () if isinstance(d, jax.Array)])
    del hold  # the digests have read the buffers
    errors = []
    committed = []
    results = []
    local_ok = False
    for t, handle, err, mode in started:
      try:
        if mode == "copy" and local_ok:
          self._copy_step(self._tiers[0], t, job.step)
        elif mode == "copy":  # the local tier failed: serialise the arrays (if still alive) here
          self._finish_write(t, job.step, *self._start_write(t, job.step, job.args))
        elif err is None:
          self._finish_write(t, job.step, *handle)
      except Exception as e:  # noqa: BLE001
        err = e
      if t.name == "local":
        local_ok = err is None
      results.append(err)
    job.args = None
    for t, e in zip(job.tiers, results):
      if e is None:
        committed.append(t)
        continue
      t.saved_this_session.discard(job.step)
      errors.append((t, e))
      if t.name == "persistent":
        self._persistent_owed = True  # the next save writes the durable tier again
    if any(t.name == "persistent" for t in committed):
      self._persistent_owed = False
    if committed:
      with self._fs_lock:
        for t in self._tiers:
          for s in job.supersede.get(t.name, ()):
            if t.writer:
              self._remove_step(t, s)
        for t in committed:
          if t.writer:
            self._retain(t)
    if errors:
      t, e = errors[0]
      e.add_note(f"{_API}.save: writing step {job.step} to the {t.name} tier {t.directory} failed"
                 + "".join(f"; the {o.name} tier {'failed too' if any(o is x for x, _ in errors) else 'committed it'}"
                           for o in job.tiers if o is not t))
      raise e

  def _start_write(self, t: _Tier, step: int, args):
    final = t.directory / str(step)
    exists = self._agreed_exists.get(t.name, final.exists()) if t.shared else final.exists()
    # The aside name is the same on every process (the primary's token), as Orbax's collective
    # save of a shared tier needs.
    dest = t.directory / f"{step}{_NEW_TAG}{self._token}{self._aside_seq:x}" if exists else final
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # Orbax's informational warnings (e.g. about host arrays)
      t.checkpointer.save(dest, args=args)
    return dest, exists

  def _finish_write(self, t: _Tier, step: int, dest: epath.Path, exists: bool) -> None:
    t.checkpointer.wait_until_finished()
    if exists and t.writer:  # atomic re-save: the old complete copy is retired only after the new one is complete
      with self._fs_lock:
        self._swap_in(t, step, dest)
    self._record_verdict(t, step, t.directory / str(step), True, "")

  def _copy_step(self, src_tier: _Tier, dst_tier: _Tier, step: int) -> None:
    """Copies a committed step between tiers: aside, commit marker last, then swapped in."""
    src = os.fspath(src_tier.directory / str(step))
    tmp = dst_tier.aside(step, _NEW_TAG)
    shutil.copytree(src, os.fspath(tmp), ignore=lambda d, names: [_COMMIT_FILE] if d == src else [])
    shutil.copy2(os.path.join(src, _COMMIT_FILE), os.fspath(tmp / _COMMIT_FILE))
    with self._fs_lock:
      self._swap_in(dst_tier, step, tmp)
    self._record_verdict(dst_tier, step, dst_tier.directory / str(step), True, "")

  def _swap_in(self, t: _Tier, step: int, new: epath.Path) -> None:
    final = t.directory / str(step)
    stale = t.aside(step, _STALE_TAG)
    if final.exists():
      final.rename(stale)
    new.rename(final)
    if stale.exists():
      shutil.rmtree(os.fspath(stale), ignore_errors=True)

  def _remove_step(self, t: _Tier, step: int) -> None:
    p = t.directory / str(step)
    if not p.exists():
      return
    trash = t.aside(step, _STALE_TAG)
    p.rename(trash)  # atomic: the step stops counting at once
    shutil.rmtree(os.fspath(trash), ignore_errors=True)
    t.saved_this_session.discard(step)
    self._verdicts.pop((t.name, step), None)
    try:
      os.unlink(t.verdict_path(step))
    except OSError:
      pass

  def _retain(self, t: _Tier) -> None:
    if t.keep is None:
      return
    steps = sorted(t.step_dirs())
    for s in steps[:-t.keep]:
      self._remove_step(t, s)

  def _catch_up(self) -> None:
    """Copies the newest local step to the persistent tier if a crash made it miss a due step."""
    local, pers = self._tiers
    try:
      psteps = [s for s, p in pers.step_dirs().items() if self._manifest_ok(p)]
      newest_p = max(psteps, default=-1)
      lsteps = sorted((s for s, p in local.step_dirs().items() if s > newest_p and self._manifest_ok(p)),
                      reverse=True)
      due = (lsteps[0] // pers.every) * pers.every if lsteps else -1
      if due <= newest_p or (due == 0 and 0 not in lsteps):
        return  # no persistent save was due since the newest persistent step
      # The due step itself if the local tier still has it, else the newest local step.
      order = sorted(lsteps, key=lambda s: (s % pers.every != 0, -s))
      for s in order:
        src = local.directory / str(s)
        ok, reason = self._verified(local, s, src)
        if not ok:
          continue
        self._copy_step(local, pers, s)
        with self._fs_lock:
          self._retain(pers)
        _log.warning("%s: the persistent tier %s missed step %d (a crash or error between the two "
                     "tiers); copied local step %d there", _API, pers.directory,
                     due, s)
        return
    except Exception as e:  # noqa: BLE001 - catching up is best effort; saves go on
      _log.warning("%s: could not copy the newest local step to the persistent tier: %s: %s",
                   _API, type(e).__name__, e)
      self._persistent_owed = True

  def wait(self) -> None:
    """Blocks until every started save is committed (and raises its error, if any)."""
    fut, self._pending = self._pending, None
    if fut is not None:
      fut.result()

  def _wait_together(self, what: str) -> None:
    """``wait()``; in a multi-process job an error of any process is raised on every process.

    Used inside the collective methods only: ``wait()`` and ``close()`` themselves stay local, so
    a process leaving on an error of its own cannot make ``close`` hang.
    """
    if not _multi():
      self.wait()
      return
    err = None
    try:
      self.wait()
    except Exception as e:  # noqa: BLE001 - agreed on, then raised
      err = e
    _agree(err, what)

  def close(self) -> None:
    """Waits for pending saves, releases the directories' locks (idempotent)."""
    if self._closed:
      return
    try:
      self.wait()
    finally:
      self._closed = True
      self._executor.shutdown(wait=True)
      for t in self._tiers:
        t.checkpointer.close()
      self._finalizer()

  # -- verification --------------------------------------------------------------

  @staticmethod
  def _manifest_ok(p: epath.Path) -> bool:
    try:
      _read_manifest(p)
      return True
    except _Corrupt:
      return False

  def _record_verdict(self, t: _Tier, step: int, p: epath.Path, ok: bool, reason: str) -> None:
    fp = _fingerprint(p)
    if fp is None:
      return
    v = {"fingerprint": fp, "ok": ok, "reason": reason}
    self._verdicts[(t.name, step)] = v
    if not t.writer:  # a shared tier's verdict files are the primary process's
      return
    path = t.verdict_path(step)
    try:
      os.makedirs(os.path.dirname(path), exist_ok=True)
      tmp = f"{path}.{uuid.uuid4().hex}.tmp"
      with open(tmp, "w") as f:
        json.dump(v, f)
      os.replace(tmp, path)
    except OSError:
      pass

  def _cached_verdict(self, t: _Tier, step: int, p: epath.Path):
    fp = _fingerprint(p)
    if fp is None:
      return None
    v = self._verdicts.get((t.name, step))
    if v is None:
      try:
        with open(t.verdict_path(step)) as f:
          v = json.load(f)
      except (OSError, ValueError):
        return None
    return v if v.get("fingerprint") == fp else None

  def _verified(self, t: _Tier, step: int, p: epath.Path) -> tuple[bool, str]:
    if _multi():
      return self._verified_together(t, step, p)
    with self._fs_lock:
      v = self._cached_verdict(t, step, p)
      if v is not None:
        return bool(v["ok"]), str(v.get("reason", ""))
      if not p.exists():
        return False, "removed"
      return self._check_and_record(t, step, p)

  def _check_and_record(self, t: _Tier, step: int, p: epath.Path) -> tuple[bool, str]:
    """Reads and checks step ``p`` in full, and records the verdict (``self._fs_lock`` held)."""
    try:
      self._restore_dir(p, step, _TargetPlan(None))
      ok, reason = True, ""
    except _Corrupt as e:
      ok, reason = False, str(e)
    self._record_verdict(t, step, p, ok, reason)
    return ok, reason

  def _verified_together(self, t: _Tier, step: int, p: epath.Path) -> tuple[bool, str]:
    """Multi-process ``_verified``: every process reaches the same verdict.

    A step is good when it is good on every process (the host-local tier: each process's own
    copy; the shared tier: one copy). Known verdicts are used when every process has one; else
    all processes read and check the step together (its digests are one collective computation).
    """
    with self._fs_lock:
      v = self._cached_verdict(t, step, p)
    known = 0 if v is None else (1 if v["ok"] else 2)
    states = [x[0] for x in _gather_ints([known])]
    if 2 in states:
      return False, (str(v.get("reason", "")) if known == 2 else
                     f"failed verification on process {states.index(2)}")
    if all(x == 1 for x in states):
      return True, ""
    with self._fs_lock:
      return self._check_and_record(t, step, p)

  # -- reading -----------------------------------------------------------------

  def _candidates(self, step: int | None) -> list[tuple[int, _Tier, epath.Path]]:
    multi = _multi()
    if multi:
      # Every process lists after every process has finished its own background work (the
      # primary's renames and deletions in the shared tier), and only steps that every process
      # has count: the same candidates, in the same order, on every process.
      _barrier()
    cands = []
    for rank, t in enumerate(self._tiers):
      for s, p in t.step_dirs().items():
        if step is None or s == step:
          cands.append((s, rank, t, p))
    if multi:
      common = set.intersection(*(set(c) for c in _gather_ints(2 * s + r for s, r, _, _ in cands)))
      cands = [c for c in cands if 2 * c[0] + c[1] in common]
    cands.sort(key=lambda c: (-c[0], c[1]))
    return [(s, t, p) for s, _, t, p in cands]

  def all_steps(self) -> list[int]:
    """Sorted steps that are committed with an intact manifest in either tier (data not read)."""
    steps = set()
    for s, _, p in self._candidates(None):
      if s not in steps and self._manifest_ok(p):
        steps.add(s)
    if _multi():
      steps = set.intersection(*(set(x) for x in _gather_ints(sorted(steps))))
    return sorted(steps)

  def latest_step(self) -> int | None:
    """Newest step in either tier whose data verifies (never one still being written), or ``None``.

    The first call reads and checks a step it has no verdict for (as ``restore``
    does); the verdict is remembered next to the step, so later calls cost a
    directory listing unless a file of the step changed.
    """
    self._check_open("latest_step")
    self._wait_together("an earlier save")  # every process's view includes its own finished saves
    for s, t, p in self._candidates(None):
      if self._verified(t, s, p)[0]:
        return s
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
        lists why), or ``target`` does not match the saved structure, shape,
        dtype or sharding (the message names the leaf).
      Other errors (I/O, Orbax) that are not damage of the checkpoint, as themselves.
    """
    self._check_open("restore")
    if step is not None and (isinstance(step, bool) or not isinstance(step, (int, np.integer))):
      raise TypeError(f"{_API}.restore: step must be an int or None, got {step!r}")
    self._wait_together("an earlier save")
    cands = self._candidates(None if step is None else int(step))
    where = ", ".join(str(t.directory) for t in self._tiers)
    if not cands:
      raise FileNotFoundError(
          f"{_API}.restore: no checkpoint{'' if step is None else f' for step {step}'} in {where}"
          + ("" if step is None else f"; complete steps: {self.all_steps()}"))
    plan = _TargetPlan(target)
    reasons = []
    skipped = []
    for s, t, p in cands:
      if t.per_process and not self._readable_here(p, plan):
        skipped.append(s)  # the target places shards on other processes than the save did
        continue
      try:
        with self._fs_lock:
          out = self._restore_dir(p, s, plan)
      except _Corrupt as e:
        self._record_verdict(t, s, p, False, str(e))
        reasons.append(f"{t.name} step {s}: {e}")
        warnings.warn(
            f"{_API}.restore: skipping {t.name} checkpoint step {s} at {p}: {e}; "
            + ("falling back to the next newest checkpoint" if step is None else
               "trying the other tier"), CheckpointCorruptionWarning, stacklevel=2)
        continue
      self._record_verdict(t, s, p, True, "")
      return out
    if skipped and not reasons:
      raise ValueError(
          f"{_API}.restore: the target places arrays on other processes' devices than the save of "
          f"step(s) {sorted(set(skipped))} did; in a jax.distributed job the local tier "
          f"{self._tiers[0].directory} holds only this process's own shards, so it restores onto the "
          "saved placement only. Restore onto another mesh from the persistent tier (give "
          "persistent_dir), or give a target with the saved shardings")
    raise ValueError(
        f"{_API}.restore: no valid checkpoint{'' if step is None else f' for step {step}'} in {where}; "
        "every candidate failed verification:\n  " + "\n  ".join(reasons)
        + (f"\n  local steps {sorted(set(skipped))}: hold only each process's shards, not the "
           "target's placement" if skipped else ""))

  @staticmethod
  def _readable_here(p: epath.Path, plan: "_TargetPlan") -> bool:
    """Multi-process, host-local tier: whether ``plan`` puts every shard where it was saved.

    Each process's local copy holds only the shards its devices had; a target that places a
    shard on another process's devices (another mesh, a numpy leaf) must read the shared tier.
    Agreed by all processes.
    """
    usable = True
    try:
      body = _read_manifest(p)
    except _Corrupt:
      body = None  # restore finds and reports the damage
    for e in (body or {}).get("arrays", ()):
      path = tuple(e["path"])
      if not e.get("stored", True) or e.get("sharding") is None or plan.target is None or path not in plan.leaves:
        continue
      target = plan.sharding(path)
      if plan.kind(path, e["kind"]) == "numpy" or target is None:
        usable = False
        break
      if e["key_impl"] is not None:
        target = _key_data_sharding(target, len(e["shape"]) - 1)
      saved = _saved_sharding(e)
      try:
        same = saved is not None and saved.is_equivalent_to(target, len(e["shape"]))
      except Exception:  # noqa: BLE001 - not comparable: not the same placement
        same = False
      if not same:
        usable = False
        break
    usable = all(x[0] for x in _gather_ints([usable]))
    if not usable:
      _log.info("%s.restore: the target places arrays on other processes than the save did; "
                "the host-local copy at %s is skipped", _API, p)
    return usable

  def _read_arrays(self, step_dir: epath.Path, entries: list, abstract_pairs: list) -> list:
    # Multi-process: every process reads what it needs on its own (no barrier in Orbax's
    # restore, which would pair up with unrelated barriers of a process that reads more).
    options = _this_process_only() if _multi() else ocp.options.MultiprocessingOptions()
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      restored = ocp.Checkpointer(ocp.StandardCheckpointHandler(multiprocessing_options=options),
                                  multiprocessing_options=options).restore(
          step_dir / STATE_ITEM, args=ocp.args.StandardRestore(_nest(abstract_pairs)))
    return [_get(restored, tuple(e["path"])) for e in entries]

  def _restore_dir(self, step_dir: epath.Path, step: int, plan: "_TargetPlan"):
    # Multi-process, every process agrees after reading and after checking the digests (one
    # collective computation), so that all of them accept or skip the step together.
    err = read = None
    try:
      read = self._read_step(step_dir, step, plan)
    except BaseException as e:  # noqa: BLE001 - agreed on, then raised (as itself where it happened)
      if not _multi():
        raise
      err = e
    _agree(err, f"reading step {step} at {step_dir}")
    body, meta, entries, stored, restored_flat = read
    if stored:
      bad = None
      got = self._digests_of(restored_flat)
      for e, d in zip(stored, got):
        if d != e["digest"]:
          bad = _Corrupt(f"content digest mismatch for array {'/'.join(e['path'])} "
                         f"(saved {e['digest']}, read {d})")
          break
      _agree(bad, f"checking the digests of step {step} at {step_dir}")
    return self._assemble(body, meta, entries, stored, restored_flat, plan)

  def _read_step(self, step_dir: epath.Path, step: int, plan: "_TargetPlan"):
    """Manifest, metadata and arrays of a step (digests not yet compared)."""
    body = _read_manifest(step_dir)
    if body.get("step") != step:
      raise _Corrupt(f"manifest names step {body.get('step')}, directory is step {step}")
    # Metadata (JSON), verified by CRC-32.
    try:
      meta = json.loads((step_dir / METADATA_ITEM / _JSON_FILE).read_text())
    except Exception as e:  # noqa: BLE001
      if _is_io_error(e):
        raise
      raise _Corrupt(f"metadata item unreadable: {type(e).__name__}: {e}") from e
    if _checksum.crc32_text(_canonical_json(meta)) != body["metadata_crc32"]:
      raise _Corrupt("metadata CRC-32 mismatch")
    entries = body["arrays"]
    plan.check(entries, body["metadata_types"])  # target mismatch: ValueError, before any read
    stored = [e for e in entries if e.get("stored", True)]
    # Arrays: restore with the saved shape/dtype onto the requested placement.
    abstract_pairs = []
    for e in stored:
      path = tuple(e["path"])
      shape, dtype = tuple(e["shape"]), np.dtype(e["dtype"])
      kind = plan.kind(path, e["kind"])
      if kind == "jax" and _x64_blocked(dtype):
        kind = "numpy"  # only reachable without a target for that leaf: 64-bit values stay exact
      if kind == "numpy":
        abstract_pairs.append((path, np.empty(shape, dtype)))
      else:
        sharding = plan.sharding(path)
        if sharding is not None and e["key_impl"] is not None:
          sharding = _key_data_sharding(sharding, len(shape) - 1)
        if sharding is None:  # no target: as saved (multi-process), else the default device
          sharding = _saved_sharding(e) or _default_sharding()
        abstract_pairs.append((path, jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)))
    restored_flat = []
    if stored:
      try:
        restored_flat = self._read_arrays(step_dir, stored, abstract_pairs)
      except Exception as e:  # noqa: BLE001 - damage, or a problem of the target / environment
        if _is_io_error(e):
          e.add_note(f"{_API}.restore: I/O error reading step {step} at {step_dir}")
          raise
        self._probe(step_dir, step, stored, e)  # raises _Corrupt if the data itself is bad
        e.add_note(f"{_API}.restore: step {step} at {step_dir} is intact (its data reads and verifies "
                   "without the target); the error comes from placing it onto the target's "
                   "shardings/devices")
        raise
      for e, x in zip(stored, restored_flat):
        if tuple(x.shape) != tuple(e["shape"]) or np.dtype(x.dtype) != np.dtype(e["dtype"]):
          raise _Corrupt(f"array {'/'.join(e['path'])} restored as {x.shape} {x.dtype}, "
                         f"manifest says {tuple(e['shape'])} {e['dtype']}")
    return body, meta, entries, stored, restored_flat

  @staticmethod
  def _assemble(body, meta, entries, stored, restored_flat, plan: "_TargetPlan"):
    # Re-wrap PRNG keys and assemble.
    values = {}
    by_path = {tuple(e["path"]): x for e, x in zip(stored, restored_flat)}
    for e in entries:
      path = tuple(e["path"])
      if e.get("stored", True):
        x = by_path[path]
      else:  # zero-size: shape and dtype are the whole content
        x = np.zeros(tuple(e["shape"]), np.dtype(e["dtype"]))
        if plan.kind(path, e["kind"]) == "jax" and not _x64_blocked(x.dtype):
          sharding = plan.sharding(path) or _default_sharding()
          if e["key_impl"] is not None:
            sharding = _key_data_sharding(sharding, x.ndim - 1)
          x = jax.device_put(x, sharding)
      if e["key_impl"] is not None:
        x = jax.random.wrap_key_data(x, impl=e["key_impl"])
      values[path] = x
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

  @staticmethod
  def _digests_of(arrays: list) -> list[str]:
    host = [x for x in arrays if isinstance(x, np.ndarray)]
    pending = _checksum.device_digests([x for x in arrays if not isinstance(x, np.ndarray)])
    hd = _finish_digests(host, [None] * len(host))
    it_h, it_d = iter(hd), iter(pending)
    return [next(it_h) if isinstance(x, np.ndarray) else _checksum.digest_hex(next(it_d)) for x in arrays]

  def _probe(self, step_dir: epath.Path, step: int, stored: list, err: Exception) -> None:
    """Reads the arrays without any placement; ``_Corrupt`` unless they read and verify."""
    pairs = [(tuple(e["path"]), np.empty(tuple(e["shape"]), np.dtype(e["dtype"]))) for e in stored]
    try:
      host = self._read_arrays(step_dir, stored, pairs)
    except Exception as e2:  # noqa: BLE001
      if _is_io_error(e2):
        raise
      raise _Corrupt(f"Orbax could not read the arrays: {type(err).__name__}: {str(err)[:300]}") from err
    for e, d in zip(stored, self._digests_of(host)):
      if d != e["digest"]:
        raise _Corrupt(f"content digest mismatch for array {'/'.join(e['path'])} "
                       f"(saved {e['digest']}, read {d})")


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
      name = _leaf_name(kp)
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
        if e["key_impl"] is None and np.dtype(x.dtype) != np.dtype(e["dtype"]):
          raise ValueError(f"{_API}.restore: target leaf {name} has dtype {np.dtype(x.dtype).name} but "
                           f"the checkpoint holds {e['dtype']}; give a {e['dtype']} target leaf "
                           "(and cast after restoring if you want another dtype)")
        is_numpy = isinstance(x, np.ndarray)
        if not is_numpy and _x64_blocked(e["dtype"]):
          raise ValueError(f"{_API}.restore: target leaf {name} is a {e['dtype']} jax array, but "
                           "jax_enable_x64 is off; give a numpy array target leaf (np.empty(shape, "
                           f"{e['dtype']!r})) or enable x64")
        sharding = None if is_numpy else getattr(x, "sharding", None)
        if sharding is not None:
          try:
            sharding.shard_shape(shape)
          except Exception as err:  # noqa: BLE001 - the sharding cannot hold the saved shape
            raise ValueError(f"{_API}.restore: target leaf {name} has sharding {sharding} that "
                             f"cannot hold the saved shape {shape}: {err}; fix the target's "
                             "sharding") from err
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
      if list(values) == [(_ROOT_KEY,)]:  # the state was one bare array
        return values[(_ROOT_KEY,)]
      return _nest(list(values.items()))
    out = []
    for path, (kp, x) in self.leaves.items():
      v = values[path]
      if not _is_arraylike(x) and isinstance(x, np.generic) and not isinstance(v, np.generic):
        v = type(x)(v)
      out.append(v)
    return jax.tree_util.tree_unflatten(self.treedef, out)
