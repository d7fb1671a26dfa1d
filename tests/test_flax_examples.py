"""Flax's REAL lm1b example model (examples/lm1b/models.py, loaded at run time from the Flax git
mirror by benchmarks/_flax_examples.py) through ``lj.adaptive_jit`` in the training form."""

import os

import jax
import numpy as np
import pytest

import lepton_jax as lj
from benchmarks import _flax_examples as FE
from lepton_jax.jaxpr._compiled import read_compiled

_REPO = os.environ.get(FE.REPO_ENV) or FE.DEFAULT_REPO


@pytest.fixture(scope="module")
def lm1b():
  if not os.path.isdir(_REPO):
    pytest.skip(f"Flax git mirror {_REPO} is absent (set ${FE.REPO_ENV} to a Flax clone)")
  return FE.load_lm1b(_REPO, num_layers=1, max_len=1024)


def test_lm1b_training_form_equals_jit_and_routes_attention(lm1b):
  tok = lm1b.tokens(1024)   # row 1 ends with 256 pad tokens (masked); > 512: attention routes
  vg = jax.value_and_grad(lm1b.loss)
  ours = lj.adaptive_jit(vg)
  ref = jax.jit(vg)(lm1b.params, tok)
  out = ours(lm1b.params, tok)
  assert jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(ref)
  for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(ref)):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * max(float(np.abs(b).max()), 1e-6))
  # The routed program (attention + cross-entropy on the memory-efficient kernels, forward and
  # backward) is what runs: its compiled temp bytes are well below jax.jit's.
  temp = read_compiled(ours.lower(lm1b.params, tok).compile()).temp_bytes
  jit_temp = read_compiled(jax.jit(vg).lower(lm1b.params, tok).compile()).temp_bytes
  assert temp < 0.6 * jit_temp, (temp, jit_temp)


def test_missing_mirror_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="repo=.*does not exist"):
    FE.load_lm1b(str(tmp_path / "no_such_repo"))
