"""lj.clear_caches() empties every process-wide cache and changes no result."""

import jax
import jax.numpy as jnp
import numpy as np

import lepton_jax as lj
from lepton_jax.pallas_kernels import _autotune
from lepton_jax.transforms.passes import _route_kernels, _templates


def test_clear_caches_empties_spot_checks_templates_and_autotune():
  def f(x, s):
    return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * s
  x, s = jnp.ones((4, 64)), jnp.ones((64,))
  want = lj.adaptive_jit(f, kernels="xla")(x, s)
  _autotune.default_autotune_cache()
  assert _route_kernels._SPOT_CACHE and _templates._TRACE_CACHE
  assert _autotune._DEFAULT.cache is not None
  lj.clear_caches()
  assert not _route_kernels._SPOT_CACHE and not _templates._TRACE_CACHE
  assert _autotune._DEFAULT.cache is None
  np.testing.assert_allclose(lj.adaptive_jit(f, kernels="xla")(x, s), want, rtol=1e-6)
