"""Backend resolution and an explicit record of which implementation ran.

``backend`` accepted by every kernel:

* ``"auto"``: Pallas on GPU / TPU, the memory-efficient XLA implementation on CPU.
* ``"pallas_gpu"``: the Triton-style Pallas GPU kernel (needs a GPU).
* ``"pallas_tpu"``: the Mosaic Pallas TPU kernel (needs a TPU).
* ``"xla"``: the blockwise / chunked pure-XLA implementation (any device).
* ``"interpret"``: the Pallas GPU kernel run with ``interpret=True`` (any device;
  how CPU tests check the kernels).
* ``"interpret_tpu"``: the Pallas TPU kernel run in the TPU interpreter
  (``pltpu.InterpretParams()``; any device).

Which implementation ran is recorded, on request, by :func:`record_dispatches`:

>>> import jax.numpy as jnp
>>> from lepton_jax import pallas_kernels as lpk
>>> with lpk.record_dispatches() as log:
...   _ = lpk.rms_norm(jnp.ones((4, 8)), jnp.ones((8,)), backend="xla")
>>> log.last().backend
'xla'

Records are made when the kernel is *traced* (under ``jax.jit`` a cache hit
does not trace again, so it records nothing).
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from typing import Any, Iterator, Literal

import jax

from lepton_jax._errors import KernelError

__all__ = [
    "BACKENDS", "Backend", "Dispatch", "DispatchLog", "record_dispatches", "resolve_backend",
]

Backend = Literal["auto", "pallas_gpu", "pallas_tpu", "xla", "interpret", "interpret_tpu"]
BACKENDS: tuple[str, ...] = ("auto", "pallas_gpu", "pallas_tpu", "xla", "interpret", "interpret_tpu")


@dataclasses.dataclass(frozen=True)
class Resolved:
  """A concrete implementation choice: ``impl`` in {"xla", "gpu", "tpu"}."""
  backend: str          # the concrete backend name (never "auto")
  impl: str             # "xla" | "gpu" | "tpu"
  interpret: Any        # False, True, or a pltpu.InterpretParams

  @property
  def is_pallas(self) -> bool:
    return self.impl != "xla"


def _platform() -> str:
  return jax.default_backend()


def resolve_backend(backend: str, *, api: str = "pallas_kernels") -> Resolved:
  """Resolves a ``backend`` argument to a concrete implementation.

  Args:
    backend: one of :data:`BACKENDS`.
    api: name used in error messages.

  Returns:
    A ``Resolved`` with the concrete ``backend``, ``impl`` and ``interpret`` flag.

  Raises:
    KernelError: unknown backend, or a Pallas backend requested on a platform
      that cannot run it.

  >>> resolve_backend("xla").impl
  'xla'
  """
  if not isinstance(backend, str) or backend not in BACKENDS:
    raise KernelError(
        f"{api}: backend={backend!r} is not valid; use one of {', '.join(map(repr, BACKENDS))}")
  platform = _platform()
  if backend == "auto":
    if platform in ("gpu", "cuda", "rocm"):
      backend = "pallas_gpu"
    elif platform == "tpu":
      backend = "pallas_tpu"
    else:
      backend = "xla"
  if backend == "xla":
    return Resolved("xla", "xla", False)
  if backend == "interpret":
    return Resolved("interpret", "gpu", True)
  if backend == "interpret_tpu":
    from jax.experimental.pallas import tpu as pltpu
    return Resolved("interpret_tpu", "tpu", pltpu.InterpretParams())
  if backend == "pallas_gpu":
    if platform not in ("gpu", "cuda", "rocm"):
      raise KernelError(
          f"{api}: backend='pallas_gpu' needs a GPU but the default JAX backend is {platform!r}; "
          "use backend='interpret' to run the GPU kernel in interpret mode, or backend='xla'")
    return Resolved("pallas_gpu", "gpu", False)
  # pallas_tpu
  if platform != "tpu":
    raise KernelError(
        f"{api}: backend='pallas_tpu' needs a TPU but the default JAX backend is {platform!r}; "
        "use backend='interpret_tpu' to run the TPU kernel in the TPU interpreter, or backend='xla'")
  return Resolved("pallas_tpu", "tpu", False)


@dataclasses.dataclass(frozen=True)
class Dispatch:
  """One kernel call: which kernel, the requested and the concrete backend, shapes, blocks."""
  kernel: str
  requested: str
  backend: str
  shapes: tuple
  dtypes: tuple
  block_sizes: dict | None = None
  block_sizes_source: str = "default"   # "default" | "explicit" | "autotune-cache"

  def to_dict(self) -> dict:
    return {
        "kernel": self.kernel, "requested": self.requested, "backend": self.backend,
        "shapes": [list(s) for s in self.shapes], "dtypes": list(self.dtypes),
        "block_sizes": self.block_sizes, "block_sizes_source": self.block_sizes_source,
    }


class DispatchLog:
  """Records made inside one :func:`record_dispatches` context (explicit, clearable)."""

  def __init__(self):
    self.records: list[Dispatch] = []

  def last(self) -> Dispatch | None:
    return self.records[-1] if self.records else None

  def clear(self) -> None:
    self.records.clear()

  def backends(self) -> list[str]:
    return [r.backend for r in self.records]

  def __len__(self) -> int:
    return len(self.records)

  def __iter__(self):
    return iter(self.records)

  def __str__(self) -> str:
    rows = [f"{'kernel':<30} {'requested':<12} {'backend':<14} shapes"]
    for r in self.records:
      rows.append(f"{r.kernel:<30} {r.requested:<12} {r.backend:<14} {list(r.shapes)}")
    return "\n".join(rows)


class _Recorders(threading.local):
  def __init__(self):
    self.stack: list[DispatchLog] = []


_RECORDERS = _Recorders()  # only populated inside `record_dispatches` contexts


@contextlib.contextmanager
def record_dispatches() -> Iterator[DispatchLog]:
  """Context manager yielding a :class:`DispatchLog` of kernel calls traced inside it.

  >>> import jax.numpy as jnp
  >>> from lepton_jax import pallas_kernels as lpk
  >>> with lpk.record_dispatches() as log:
  ...   _ = lpk.matmul(jnp.ones((4, 8)), jnp.ones((8, 2)), backend="xla")
  >>> [d.kernel for d in log]
  ['matmul']
  """
  log = DispatchLog()
  _RECORDERS.stack.append(log)
  try:
    yield log
  finally:
    _RECORDERS.stack.remove(log)


def record(d: Dispatch) -> None:
  for log in _RECORDERS.stack:
    log.records.append(d)
