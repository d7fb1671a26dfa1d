"""Block-size autotuning with a persistent JSON cache.

Block sizes are tuned per (kernel, device kind, backend, shapes, dtypes, static
options) by timing every *legal* candidate, and the winner is persisted to a JSON
file. Later calls with the same key replay the stored choice (deterministically:
the cache is the only input) when ``block_sizes`` is not given explicitly.

Cache path: ``AutotuneCache(path)``; the default cache reads ``$LEPTON_AUTOTUNE_CACHE``,
else ``$XDG_CACHE_HOME/lepton_jax/autotune.json``, else ``~/.cache/lepton_jax/autotune.json``.

>>> import jax.numpy as jnp, tempfile, os
>>> from lepton_jax import pallas_kernels as lpk
>>> cache = lpk.AutotuneCache(os.path.join(tempfile.mkdtemp(), "tune.json"))
>>> res = lpk.autotune(lpk.rms_norm, jnp.ones((64, 32)), jnp.ones((32,)), backend="xla", cache=cache)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import tempfile
import threading
import time
from typing import Any, Callable, Sequence

import jax

from lepton_jax._errors import KernelError
from lepton_jax.pallas_kernels._common import device_kind
from lepton_jax.pallas_kernels._registry import resolve_backend

__all__ = [
    "AutotuneCache", "AutotuneResult", "TuneSpec", "autotune", "default_autotune_cache",
    "clear_autotune_cache", "make_key", "default_cache_path",
]

ENV_VAR = "LEPTON_AUTOTUNE_CACHE"


def default_cache_path() -> str:
  """Default autotune cache file (env ``LEPTON_AUTOTUNE_CACHE`` wins)."""
  env = os.environ.get(ENV_VAR)
  if env:
    return os.path.expanduser(env)
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "lepton_jax", "autotune.json")


def make_key(kernel: str, device_kind: str, backend: str, shapes, dtypes, static=None) -> str:
  """The cache key: a stable string of everything the choice depends on."""
  payload = {
      "kernel": kernel, "device_kind": device_kind, "backend": backend,
      "shapes": [list(map(int, s)) for s in shapes], "dtypes": list(map(str, dtypes)),
      "static": static or {},
  }
  return json.dumps(payload, sort_keys=True, separators=(",", ":"))


class AutotuneCache:
  """A JSON file of tuned block sizes (explicit, clearable).

  Args:
    path: file to read/write; ``None`` uses :func:`default_cache_path`.
  """

  def __init__(self, path: str | os.PathLike | None = None):
    self.path = os.fspath(path) if path is not None else default_cache_path()
    self._entries: dict[str, dict] | None = None
    self._lock = threading.Lock()

  def _load(self) -> dict[str, dict]:
    if self._entries is None:
      entries: dict[str, dict] = {}
      if os.path.exists(self.path):
        try:
          with open(self.path) as f:
            data = json.load(f)
          if isinstance(data, dict) and isinstance(data.get("entries"), dict):
            entries = data["entries"]
        except (OSError, json.JSONDecodeError):
          entries = {}
      self._entries = entries
    return self._entries

  def get(self, key: str) -> dict | None:
    with self._lock:
      return self._load().get(key)

  def put(self, key: str, entry: dict, *, save: bool = True) -> None:
    with self._lock:
      self._load()[key] = entry
      if save:
        self._save_locked()

  def _save_locked(self) -> None:
    d = os.path.dirname(self.path) or "."
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".autotune-", suffix=".json")
    with os.fdopen(fd, "w") as f:
      json.dump({"version": 1, "entries": self._entries}, f, indent=1, sort_keys=True)
    os.replace(tmp, self.path)

  def save(self) -> None:
    with self._lock:
      self._load()
      self._save_locked()

  def entries(self) -> dict[str, dict]:
    with self._lock:
      return dict(self._load())

  def clear(self, *, delete_file: bool = False) -> None:
    """Forgets the in-memory entries (and deletes the file if asked)."""
    with self._lock:
      self._entries = None
      if delete_file and os.path.exists(self.path):
        os.remove(self.path)

  def __len__(self) -> int:
    return len(self.entries())

  def __repr__(self) -> str:
    return f"AutotuneCache(path={self.path!r})"


class _DefaultHolder:
  def __init__(self):
    self.cache: AutotuneCache | None = None


_DEFAULT = _DefaultHolder()  # explicit clearable cache (clear_autotune_cache)


def default_autotune_cache() -> AutotuneCache:
  """The cache kernels replay from when ``block_sizes`` is not given."""
  path = default_cache_path()
  if _DEFAULT.cache is None or _DEFAULT.cache.path != path:
    _DEFAULT.cache = AutotuneCache(path)
  return _DEFAULT.cache


def clear_autotune_cache() -> None:
  """Drops the in-memory default cache (the file is re-read on next use)."""
  _DEFAULT.cache = None


@dataclasses.dataclass(frozen=True)
class TuneSpec:
  """How to tune one kernel family (attached to the public kernel function)."""
  name: str
  block_cls: type
  # (args, kwargs) -> (shapes, dtypes, static dict)
  describe: Callable[[tuple, dict], tuple]
  # (args, kwargs) -> list of candidate block sizes
  candidates: Callable[[tuple, dict], list]
  # (block_sizes, args, kwargs) -> (ok, reason)
  is_legal: Callable[[Any, tuple, dict], tuple]
  # (args, kwargs with "backend") -> True when the kernel that runs ignores block sizes (the
  # Mosaic GPU norms / cross-entropy / matmul: fixed tiles); then one candidate is timed
  fixed_tiles: Callable[[tuple, dict], bool] | None = None


@dataclasses.dataclass(frozen=True)
class AutotuneResult:
  """Outcome of :func:`autotune`: the winner, all timings, skipped candidates."""
  kernel: str
  key: str
  best: Any
  timings: tuple  # ((block_sizes dict, median seconds), ...)
  illegal: tuple  # ((block_sizes dict, reason), ...)
  from_cache: bool

  def to_dict(self) -> dict:
    return {
        "kernel": self.kernel, "key": self.key, "best": dataclasses.asdict(self.best),
        "timings": [[b, t] for b, t in self.timings], "illegal": [[b, r] for b, r in self.illegal],
        "from_cache": self.from_cache,
    }

  def __str__(self) -> str:
    rows = [f"autotune {self.kernel} ({'cached' if self.from_cache else 'timed'})",
            f"{'candidate':<60} {'median ms':>10}"]
    for b, t in self.timings:
      rows.append(f"{json.dumps(b, sort_keys=True):<60} {t * 1e3:>10.3f}")
    for b, r in self.illegal:
      rows.append(f"{json.dumps(b, sort_keys=True):<60} illegal: {r}")
    rows.append(f"best: {self.best}")
    return "\n".join(rows)


def cache_key_for(spec: TuneSpec, args: tuple, kwargs: dict, backend: str) -> str:
  shapes, dtypes, static = spec.describe(args, kwargs)
  return make_key(spec.name, device_kind(), backend, shapes, dtypes, static)


def lookup(spec: TuneSpec, args: tuple, kwargs: dict, backend: str, cache: AutotuneCache | None = None):
  """Replays a cached choice, or returns None."""
  cache = cache if cache is not None else default_autotune_cache()
  entry = cache.get(cache_key_for(spec, args, kwargs, backend))
  if entry is None:
    return None
  try:
    return spec.block_cls(**entry["block_sizes"])
  except (TypeError, KeyError):
    return None


def autotune(kernel: Callable, *args, candidates: Sequence[Any] | None = None,
             backend: str = "auto", cache: AutotuneCache | None = None, repeats: int = 5,
             include_backward: bool = False, force: bool = False, **kwargs) -> AutotuneResult:
  """Times the legal block-size candidates of ``kernel`` on ``args`` and caches the best.

  Args:
    kernel: a public kernel of ``lepton_jax.pallas_kernels`` (``flash_attention``, ...).
    *args: its array arguments (real arrays: they are run).
    candidates: block sizes to try; default: the family's candidate list.
    backend: the backend to tune for (as the kernel's ``backend``).
    cache: where to persist; default :func:`default_autotune_cache`.
    repeats: timed runs per candidate (median is used).
    include_backward: time ``jax.grad`` of the summed output too.
    force: re-time even if the key is cached.
    **kwargs: the kernel's keyword options (``is_causal=True``, ...).

  Returns:
    An :class:`AutotuneResult`; its ``best`` is replayed by later kernel calls.

  >>> import jax.numpy as jnp
  >>> from lepton_jax import pallas_kernels as lpk
  >>> r = lpk.autotune(lpk.matmul, jnp.ones((32, 32)), jnp.ones((32, 32)), backend="xla",
  ...                  cache=lpk.AutotuneCache("/tmp/_lj_doctest_tune.json"), force=True)
  >>> isinstance(r.best, lpk.MatmulBlockSizes)
  True
  """
  spec: TuneSpec | None = getattr(kernel, "_lepton_tune_spec", None)
  if spec is None:
    raise KernelError(
        f"autotune: kernel={getattr(kernel, '__name__', kernel)!r} is not a tunable "
        "lepton_jax.pallas_kernels kernel (flash_attention, rms_norm, layer_norm, "
        "softmax_cross_entropy, linear_softmax_cross_entropy, matmul)")
  resolved = resolve_backend(backend, api=f"autotune({spec.name})")
  if resolved.is_pallas and resolved.interpret is False:
    want = {"gpu": ("gpu", "cuda", "rocm"), "tpu": ("tpu",)}[resolved.impl]
    if jax.default_backend() not in want:
      raise KernelError(
          f"autotune({spec.name}): backend={resolved.backend!r} can only be timed on a "
          f"{resolved.impl.upper()}, but the default JAX backend is {jax.default_backend()!r}; "
          "tune on the target device (the defaults are valid there), or use backend='xla'")
  cache = cache if cache is not None else default_autotune_cache()
  key = cache_key_for(spec, args, kwargs, resolved.backend)
  if not force:
    entry = cache.get(key)
    if entry is not None:
      best = spec.block_cls(**entry["block_sizes"])
      return AutotuneResult(spec.name, key, best, tuple(map(tuple, entry.get("timings", []))), (), True)
  cands = list(candidates) if candidates is not None else spec.candidates(args, kwargs)
  legal, illegal = [], []
  for c in cands:
    ok, reason = spec.is_legal(c, args, dict(kwargs, backend=resolved.backend))
    (legal if ok else illegal).append((c, reason))
  if not legal:
    raise KernelError(f"autotune({spec.name}): none of the {len(cands)} candidates is legal for these "
                      f"shapes: {[r for _, r in illegal][:3]}")
  if spec.fixed_tiles is not None and spec.fixed_tiles(args, dict(kwargs, backend=resolved.backend)):
    illegal += [(c, "the Mosaic GPU kernel that serves these shapes has fixed tiles (block sizes do "
                 "not change it): one candidate timed") for c, _ in legal[1:]]
    legal = legal[:1]
  timings = []
  for c, _ in legal:
    def run(*a, _c=c):
      return kernel(*a, backend=resolved.backend, block_sizes=_c, **kwargs)
    if include_backward:
      f = jax.jit(jax.grad(lambda *a: run(*a).astype("float32").sum(),
                           argnums=tuple(i for i, a in enumerate(args)
                                         if hasattr(a, "dtype") and jax.numpy.issubdtype(a.dtype, jax.numpy.floating))))
    else:
      f = jax.jit(run)
    jax.block_until_ready(f(*args))  # compile + warm up
    ts = []
    for _ in range(max(1, repeats)):
      t0 = time.perf_counter()
      jax.block_until_ready(f(*args))
      ts.append(time.perf_counter() - t0)
    timings.append((c, statistics.median(ts)))
  best, best_t = min(timings, key=lambda ct: ct[1])  # first minimum: deterministic order
  entry = {"block_sizes": dataclasses.asdict(best), "median_s": best_t,
           "timings": [[dataclasses.asdict(c), t] for c, t in timings]}
  cache.put(key, entry)
  return AutotuneResult(spec.name, key, best, tuple((dataclasses.asdict(c), t) for c, t in timings),
                        tuple((dataclasses.asdict(c), r) for c, r in illegal), False)
