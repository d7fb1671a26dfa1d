"""Backend resolution and an explicit record of which implementation ran.

``backend`` accepted by every kernel:

* ``"auto"``: Pallas on GPU / TPU, the memory-efficient XLA implementation on CPU.
* ``"pallas_gpu"``: the Pallas GPU kernel (Mosaic GPU on Hopper and newer where the kernel
  has a Mosaic GPU implementation, Triton otherwise; see :func:`gpu_flavor`). Built on any
  host, so a CPU machine can lower it: ``jax.jit(f).trace(*a).lower(lowering_platforms=("cuda",))``.
  From jax 0.11 a Triton kernel lowers on a host without a GPU only under an abstract GPU device
  (JAX no longer assumes sm_90): wrap tracing and lowering in
  ``with jax.sharding.use_abstract_mesh(abstract_gpu_mesh("NVIDIA H100")):`` (works on 0.10 too).
* ``"pallas_tpu"``: the Mosaic Pallas TPU kernel. Built on any host; from a CPU machine lower it
  under an abstract TPU mesh (:func:`abstract_tpu_mesh`) or with
  ``jax.export.export(jax.jit(f), platforms=["tpu"])``.
* ``"xla"``: the blockwise / chunked pure-XLA implementation (any device).
* ``"interpret"``: the Pallas GPU kernel run with ``interpret=True`` (any device;
  how CPU tests check the kernels). With ``LEPTON_PALLAS_GPU=mosaic`` set explicitly, the
  Mosaic GPU kernels run in Mosaic GPU's own interpreter instead (:func:`use_mosaic`).
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
from lepton_jax.jaxpr import _compat

__all__ = [
    "BACKENDS", "GPU_FLAVORS", "abstract_gpu_mesh", "abstract_tpu_mesh", "gpu_flavor", "use_mosaic", "Backend", "Dispatch", "DispatchLog", "record_dispatches", "resolve_backend",
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
    # Built whatever the host: on a CPU machine the kernel can be lowered for "cuda"
    # (cross-lowering); running it still needs a GPU.
    return Resolved("pallas_gpu", "gpu", False)
  # pallas_tpu (built whatever the host; lowering for TPU from a CPU host needs an abstract
  # TPU device, see abstract_tpu_mesh).
  return Resolved("pallas_tpu", "tpu", False)


GPU_FLAVORS = ("mosaic", "triton")
_GPU_FLAVOR_ENV = "LEPTON_PALLAS_GPU"


def gpu_flavor() -> str:
  """The Pallas GPU backend for kernels that have both: ``"mosaic"`` or ``"triton"``.

  ``LEPTON_PALLAS_GPU=mosaic|triton`` overrides. Otherwise Mosaic GPU for compute
  capability >= 9.0 (Hopper, Blackwell) and Triton before (Mosaic GPU's wgmma/TMA
  kernels need sm_90). On a host without a GPU (cross-lowering) the target is the
  abstract mesh's device if it names a compute capability, else sm_90 -- the same
  default Mosaic GPU itself assumes when no GPU is visible.

  >>> gpu_flavor() in GPU_FLAVORS
  True
  """
  import os
  env = os.environ.get(_GPU_FLAVOR_ENV, "").strip().lower()
  if env:
    if env not in GPU_FLAVORS:
      raise KernelError(f"{_GPU_FLAVOR_ENV}={env!r} is not valid; use one of {GPU_FLAVORS}")
    return env
  cc = None
  dev = jax.sharding.get_abstract_mesh().abstract_device
  if dev is None and _platform() in ("gpu", "cuda"):
    dev = jax.devices()[0]
  if dev is not None:
    cc = getattr(dev, "compute_capability", None)
    if cc is None and getattr(dev, "platform", None) in ("gpu", "cuda"):   # an AbstractDevice
      cc = _compat.gpu_compute_capability(dev.device_kind)
  if cc is None:
    return "mosaic"
  try:
    major = int(str(cc).split(".")[0])
  except ValueError:   # ROCm "gfx..." names: Mosaic GPU does not support AMD
    return "triton"
  return "mosaic" if major >= 9 else "triton"


def use_mosaic(interpret) -> bool:
  """Whether a GPU kernel with a Mosaic GPU implementation should use it.

  Compiled (``backend="pallas_gpu"`` / ``"auto"`` on a GPU): :func:`gpu_flavor` decides.
  ``backend="interpret"``: the Triton kernels in the generic interpreter, unless
  ``LEPTON_PALLAS_GPU=mosaic`` is set explicitly, which runs the Mosaic GPU kernels in
  Mosaic GPU's own interpreter (how CPU tests check their values).
  """
  import os
  if interpret is False:
    return gpu_flavor() == "mosaic"
  return os.environ.get(_GPU_FLAVOR_ENV, "").strip().lower() == "mosaic"


def mosaic_tiles_fixed(kwargs, supported: bool) -> bool:
  """Autotune: whether ``kwargs["backend"]`` runs a Mosaic GPU kernel that ignores block sizes
  (then sweeping candidates would time one kernel many times)."""
  if "backend" not in kwargs or not supported:
    return False
  r = resolve_backend(kwargs["backend"])
  return r.impl == "gpu" and use_mosaic(r.interpret)


def abstract_tpu_mesh(device_kind: str = "TPU v5p", num_cores: int | None = None):
  """An abstract one-device TPU mesh: ``with jax.sharding.use_abstract_mesh(abstract_tpu_mesh()):``
  makes Pallas TPU lowering on a CPU host target ``device_kind`` (its tiling and VMEM rules).

  ``num_cores`` defaults to 2 for the megacore chips (v4, v5p) and 1 otherwise.

  >>> abstract_tpu_mesh("TPU v5e").abstract_device.platform
  'tpu'
  """
  if num_cores is None:
    num_cores = 2 if device_kind in ("TPU v4", "TPU v5", "TPU v5p") else 1
  dev = jax.sharding.AbstractDevice(device_kind=device_kind, num_cores=num_cores, platform="tpu")
  return jax.sharding.AbstractMesh((1,), ("lepton_tpu",), abstract_device=dev)


def abstract_gpu_mesh(device_kind: str = "NVIDIA H100"):
  """An abstract one-device GPU mesh: ``with jax.sharding.use_abstract_mesh(abstract_gpu_mesh()):``
  makes Pallas GPU lowering (``lowering_platforms=("cuda",)``) on a host without a GPU target
  ``device_kind``. Needed for Triton kernels from jax 0.11, which reads the target GPU from
  the abstract device instead of assuming sm_90; :func:`gpu_flavor` follows its compute
  capability where JAX knows the kind (Mosaic GPU from sm_90, Triton before).

  >>> abstract_gpu_mesh("NVIDIA A100").abstract_device.device_kind
  'NVIDIA A100'
  """
  if not isinstance(device_kind, str) or not device_kind:
    raise KernelError(f"abstract_gpu_mesh: device_kind must be a GPU device kind such as 'NVIDIA H100', "
                      f"got {device_kind!r}")
  dev = jax.sharding.AbstractDevice(device_kind=device_kind, num_cores=None, platform="gpu")
  return jax.sharding.AbstractMesh((1,), ("lepton_gpu",), abstract_device=dev)


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
