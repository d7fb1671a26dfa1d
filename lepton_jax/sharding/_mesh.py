"""Mesh resolution and axis roles for auto_shard."""

from __future__ import annotations

import dataclasses
import itertools
import math

import jax
import numpy as np
from jax.sharding import AbstractMesh, AxisType, Mesh

from lepton_jax._errors import ShardingError

__all__ = ["MeshInfo", "resolve_mesh", "TENSOR_AXIS_NAMES", "auto_typed"]

TENSOR_AXIS_NAMES = ("tensor", "model")


@dataclasses.dataclass(frozen=True)
class MeshInfo:
  """Axis names, sizes and roles of a mesh (concrete or abstract)."""
  mesh: object
  names: tuple
  sizes: tuple
  explicit: bool            # any axis of Explicit type
  abstract: bool            # an AbstractMesh (plan only, cannot run)
  tensor_axes: tuple        # axes named "tensor"/"model"
  data_axes: tuple          # the others

  def size(self, axes) -> int:
    d = dict(zip(self.names, self.sizes))
    return int(math.prod(d[a] for a in axes))

  def describe(self) -> list:
    return [[n, int(s)] for n, s in zip(self.names, self.sizes)]

  def best_subset(self, axes: tuple, dim: int) -> tuple:
    """Largest-product subset of ``axes`` (kept in mesh order) dividing ``dim``."""
    best, best_n = (), 1
    for r in range(len(axes), 0, -1):
      for sub in itertools.combinations(axes, r):
        n = self.size(sub)
        if n > best_n and dim % n == 0:
          best, best_n = sub, n
    return best


def resolve_mesh(mesh, *, api: str = "auto_shard", model_axes=None) -> MeshInfo:
  """Validates ``mesh`` (``None`` -> all devices on a 1-D ``"data"`` axis).

  ``model_axes``: the tensor-parallel axes (``None``: those named ``"tensor"``/``"model"``);
  every other axis is a data (batch / FSDP) axis.
  """
  if mesh is None:
    devs = np.asarray(jax.devices())
    mesh = Mesh(devs, ("data",), axis_types=(AxisType.Auto,))
  if not isinstance(mesh, (Mesh, AbstractMesh)):
    raise TypeError(
        f"{api}: mesh must be a jax.sharding.Mesh, a jax.sharding.AbstractMesh or None (all "
        f"devices, 1-D), got {type(mesh).__name__} {mesh!r}; build one with jax.make_mesh((8,), ('data',))")
  names = tuple(str(n) for n in mesh.axis_names)
  if isinstance(mesh, Mesh):
    sizes = tuple(int(s) for s in mesh.devices.shape)
  else:
    sizes = tuple(int(s) for s in mesh.axis_sizes)
  types = tuple(getattr(mesh, "axis_types", ()) or ())
  if any(t == AxisType.Manual for t in types):
    raise ShardingError(f"{api}: mesh axes {names} include Manual axes (types {types}); auto_shard "
                        "needs Auto or Explicit axes. Call it outside shard_map.")
  explicit = any(t == AxisType.Explicit for t in types)
  if model_axes is None:
    tensor = tuple(n for n in names if n in TENSOR_AXIS_NAMES)
  else:
    bad = [a for a in model_axes if a not in names]
    if bad:
      raise ShardingError(
          f"{api}: model_axes={tuple(model_axes)} names {bad[0]!r}, which is not an axis of the mesh; "
          f"its axes are {names} (sizes {sizes}). Pass names from those, or model_axes=() for no "
          "tensor parallelism.")
    tensor = tuple(n for n in names if n in model_axes)
  data = tuple(n for n in names if n not in tensor)
  return MeshInfo(mesh, names, sizes, explicit, isinstance(mesh, AbstractMesh), tensor, data)


def auto_typed(mesh):
  """The same mesh with every axis of Auto type."""
  n = len(mesh.axis_names)
  if all(t == AxisType.Auto for t in mesh.axis_types):
    return mesh
  if isinstance(mesh, AbstractMesh):
    return AbstractMesh(tuple(mesh.axis_sizes), tuple(mesh.axis_names), axis_types=(AxisType.Auto,) * n)
  return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * n)
