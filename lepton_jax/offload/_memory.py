"""Moving pytrees of arrays between device memory and host memory kinds."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

__all__ = ["to_host", "to_device", "memory_kinds", "device_bytes", "HOST_KIND", "DEVICE_KIND"]

HOST_KIND = "pinned_host"
DEVICE_KIND = "device"


def _is_array(x) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic)) or isinstance(x, jax.core.Tracer)


def _check_kind_supported(kind: str, api: str) -> None:
  dev = jax.devices()[0]
  kinds = [m.kind for m in dev.addressable_memories()]
  if kind not in kinds:
    raise ValueError(
        f"{api}: memory kind {kind!r} is not available on {dev.platform} device {dev}; "
        f"available kinds are {kinds}. Host offload needs a backend with a 'pinned_host' "
        "memory space (GPU, TPU, or CPU in jax>=0.5).")


def _move(x, kind: str, space, api: str, path):
  if isinstance(x, jax.core.Tracer):
    # Inside a trace (jit, grad, scan): ask for the memory space; sharding is kept.
    return jax.device_put(x, space)
  if isinstance(x, jax.Array):
    if x.sharding.memory_kind == kind:
      return x
    return jax.device_put(x, x.sharding.with_memory_kind(kind))
  if isinstance(x, (np.ndarray, np.generic)):
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind=kind)
    return jax.device_put(x, sharding)
  raise TypeError(
      f"{api}: leaf at {jax.tree_util.keystr(path)} is {type(x).__name__}, not an array; "
      "pass a pytree whose leaves are jax.Array or numpy arrays (use None for empty leaves)")


def to_host(tree: Any) -> Any:
  """Moves every array of ``tree`` to host memory (``memory_kind="pinned_host"``).

  Sharding (mesh and partition spec) is kept; only the memory kind changes. Works
  eagerly and inside ``jax.jit`` (there it inserts a device-to-host transfer).

  Args:
    tree: a pytree of arrays.

  Returns:
    The same pytree with arrays in ``pinned_host`` memory.

  >>> import jax.numpy as jnp, lepton_jax as lj
  >>> x = lj.offload.to_host({"w": jnp.ones(4)})
  >>> x["w"].sharding.memory_kind
  'pinned_host'
  """
  _check_kind_supported(HOST_KIND, "lj.offload.to_host")
  return jax.tree_util.tree_map_with_path(
      lambda p, x: _move(x, HOST_KIND, jax.memory.Space.Host, "lj.offload.to_host", p), tree)


def to_device(tree: Any) -> Any:
  """Moves every array of ``tree`` to device memory (``memory_kind="device"``).

  The inverse of :func:`to_host`; sharding is kept.

  >>> import jax.numpy as jnp, lepton_jax as lj
  >>> x = lj.offload.to_device(lj.offload.to_host(jnp.ones(4)))
  >>> x.sharding.memory_kind
  'device'
  """
  return jax.tree_util.tree_map_with_path(
      lambda p, x: _move(x, DEVICE_KIND, jax.memory.Space.Device, "lj.offload.to_device", p), tree)


def memory_kinds(tree: Any) -> Any:
  """The memory kind of each array leaf of ``tree`` (e.g. ``'device'``, ``'pinned_host'``)."""
  return jax.tree.map(lambda x: x.sharding.memory_kind, tree)


def device_bytes(tree: Any) -> int:
  """Bytes of the array leaves of ``tree`` that live in device memory (all shards, one copy)."""
  total = 0
  for x in jax.tree.leaves(tree):
    kind = x.sharding.memory_kind if isinstance(x, jax.Array) else DEVICE_KIND
    if kind in (None, DEVICE_KIND):
      total += int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
  return total
