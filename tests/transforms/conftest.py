"""Shared fixtures of the transform tests."""

import pytest


@pytest.fixture
def wrong_attention_kernel(monkeypatch):
  """Makes every routed attention replacement subtly wrong (x1.01), to exercise the spot check."""
  from lepton_jax.transforms.passes import _route_kernels as rk
  real = rk._attention_replacement

  def wrong(m, backend):
    f = real(m, backend)
    return lambda *a: f(*a) * 1.01
  monkeypatch.setattr(rk, "_attention_replacement", wrong)
