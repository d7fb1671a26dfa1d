"""summarize() report."""

import json

import jax.numpy as jnp
import pytest

from lepton_jax import jaxpr as ljx
from tests.jaxpr import _models


def test_summarize_mlp():
  loss, args = _models.mlp_case(batch=8, din=16, dh=32)
  s = ljx.summarize(loss, *args, top=3)
  assert len(s.top_flops) == 3 and len(s.top_bytes) == 3
  assert s.top_flops[0].primitive == "dot_general"
  assert s.top_flops[0].flops >= s.top_flops[1].flops >= s.top_flops[2].flops
  assert s.total == ljx.cost(loss, *args)
  assert s.peak_bytes > 0 and s.grad_peak_bytes is not None and s.grad_peak_bytes > 0
  d = s.to_dict()
  json.dumps(d)
  assert d["top_flops"][0]["id"] == s.top_flops[0].id
  text = str(s)
  assert "top equations by FLOPs" in text and "top equations by bytes" in text and "peak live" in text
  with pytest.raises(Exception):
    s.n_eqns = 0


def test_summarize_non_differentiable_and_errors():
  s = ljx.summarize(lambda i: jnp.arange(4) * i, 3)
  assert s.grad_peak_bytes is None
  with pytest.raises(ValueError, match="top"):
    ljx.summarize(jnp.sin, jnp.ones(2), top=0)
