"""``lj.clear_caches()``: forget every process-wide cache lepton_jax keeps.

Role: the one switch over the explicit module caches -- routing's numeric spot-check verdicts and
traced hotspot templates and joint-routing verdicts, the in-memory autotune table (its file stays
on disk), auto_shard's compiled-candidate cache and remat_plan's compiled candidate sets (keyed by
program structure). Per-object caches (an ``adaptive_jit`` / ``remat_plan`` / ``auto_shard``
wrapper's executables and plans) live and die with their object and have their own
``clear_cache()``. JAX's own caches are left alone (``jax.clear_caches()`` clears those).
"""

from __future__ import annotations

from lepton_jax.pallas_kernels import _autotune
from lepton_jax.sharding import _compiled as _shard_compiled
from lepton_jax.transforms import _remat_planner
from lepton_jax.transforms.passes import _route_joint, _route_kernels, _templates

__all__ = ["clear_caches"]


def clear_caches() -> None:
  """Clears lepton_jax's process-wide caches (see module doc).

  >>> import lepton_jax as lj
  >>> lj.clear_caches()
  """
  _route_kernels.clear_spot_check_cache()
  _templates.clear_template_cache()
  _autotune.clear_autotune_cache()
  _shard_compiled._clear_caches()
  _remat_planner._clear_caches()
  _route_joint._clear_caches()
