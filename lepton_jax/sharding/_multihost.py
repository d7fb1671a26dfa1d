"""Multi-process helpers: global arrays from process-local batches."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding

from lepton_jax._errors import ShardingError
from lepton_jax.sharding._mesh import resolve_mesh
from lepton_jax.sharding._plan import spec_to_pspec

__all__ = ["make_global_batch"]

_API = "make_global_batch"


def make_global_batch(local_batch, mesh=None, *, batch_axes=None):
  """Builds global arrays from each process's slice of the batch.

  Every process passes its own rows (the same shapes on every process); the
  result is a pytree of global ``jax.Array`` s whose leading dimension is the
  concatenation over processes, split over ``batch_axes`` -- ready to pass to a
  function from :func:`lepton_jax.auto_shard` (which keeps that placement when
  it matches its plan). Works single-process too (then it is a ``device_put``).

  Args:
    local_batch: pytree of process-local arrays (numpy or jax), leading dim = rows.
    mesh: the global mesh (``None``: all devices, 1-D ``"data"`` axis).
    batch_axes: mesh axes to split the batch over; default: every axis that is not
      named ``"tensor"``/``"model"``.

  Returns:
    The pytree of global arrays.

  Raises:
    ShardingError: an axis name not in the mesh, or a batch that cannot be split.

  >>> import numpy as np, lepton_jax as lj
  >>> g = lj.sharding.make_global_batch({"x": np.ones((8, 3))})  # doctest: +SKIP
  """
  mi = resolve_mesh(mesh, api=_API)
  if mi.abstract:
    raise ShardingError(f"{_API}: needs a concrete jax.sharding.Mesh, got an AbstractMesh")
  if batch_axes is None:
    batch_axes = mi.data_axes or mi.names
  if isinstance(batch_axes, str):
    batch_axes = (batch_axes,)
  batch_axes = tuple(batch_axes)
  bad = [a for a in batch_axes if a not in mi.names]
  if bad:
    raise ShardingError(
        f"{_API}: batch_axes={batch_axes} names {bad}, which the mesh does not have; its axes are "
        f"{mi.names}. Pass names from those.")
  n = mi.size(batch_axes)
  sharding = NamedSharding(mi.mesh, spec_to_pspec((batch_axes,)))
  nproc = jax.process_count()

  def one(path, x):
    x = np.asarray(x)
    if x.ndim == 0:
      raise ShardingError(f"{_API}: leaf {jax.tree_util.keystr(path)} is a scalar; a batch leaf needs a "
                          "leading (rows) dimension")
    rows = x.shape[0] * nproc
    if rows % n:
      raise ShardingError(
          f"{_API}: leaf {jax.tree_util.keystr(path)} has {x.shape[0]} local rows x {nproc} processes = "
          f"{rows} global rows, not divisible by the {n} devices of batch_axes={batch_axes}; use a "
          "per-process batch whose global size is a multiple of that")
    return jax.make_array_from_process_local_data(sharding, x, (rows,) + x.shape[1:])

  return jax.tree_util.tree_map_with_path(one, local_batch)
