"""lj.prune: exact sparsity, 2:4 structure, leaf rule, apply_masks, error text."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lepton_jax as lj


def _params():
  k = jax.random.split(jax.random.key(0), 3)
  return {"dense": {"kernel": jax.random.normal(k[0], (16, 12)), "bias": jax.random.normal(k[1], (12,))},
          "conv": jax.random.normal(k[2], (3, 3, 8, 4)), "norm_scale": jnp.ones(4)}


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_unstructured_sparsity_is_exact_and_keeps_largest(sparsity):
  p = _params()
  pruned, masks = lj.prune(p, sparsity=sparsity)
  for name in ("kernel",):
    w, m = p["dense"][name], masks["dense"][name]
    assert int((~m).sum()) == round(sparsity * w.size)
    if 0 < sparsity:
      assert jnp.abs(w)[~m].max() <= jnp.abs(w)[m].min()
  assert int((~masks["conv"]).sum()) == round(sparsity * p["conv"].size)
  assert bool(masks["dense"]["bias"].all()) and bool(masks["norm_scale"].all())
  np.testing.assert_array_equal(np.asarray(pruned["dense"]["bias"]), np.asarray(p["dense"]["bias"]))
  np.testing.assert_array_equal(np.asarray(pruned["conv"]), np.asarray(jnp.where(masks["conv"], p["conv"], 0)))


def test_two_four_keeps_two_largest_of_every_four_along_the_input_axis():
  p = _params()
  pruned, masks = lj.prune(p, sparsity=0.5, structure="2:4")
  w, m = p["dense"]["kernel"], masks["dense"]["kernel"]
  groups_m = np.asarray(m).reshape(4, 4, 12)          # (group, 4 along axis -2, out)
  groups_w = np.abs(np.asarray(w)).reshape(4, 4, 12)
  assert (groups_m.sum(1) == 2).all()
  kept_min = np.where(groups_m, groups_w, np.inf).min(1)
  dropped_max = np.where(groups_m, -np.inf, groups_w).max(1)
  assert (kept_min >= dropped_max).all()
  cm = np.asarray(masks["conv"]).reshape(3, 3, 2, 4, 4)
  assert (cm.sum(3) == 2).all()
  assert float((pruned["dense"]["kernel"] == 0).mean()) == 0.5


def test_apply_masks_keeps_training_updates_pruned():
  p = _params()
  pruned, masks = lj.prune(p, sparsity=0.5)
  grads = jax.tree.map(jnp.ones_like, p)
  g = jax.jit(lj.prune.apply_masks)(grads, masks)
  updated = jax.tree.map(lambda a, b: a - 0.1 * b, pruned, g)
  assert bool((updated["dense"]["kernel"][~masks["dense"]["kernel"]] == 0).all())
  assert g["dense"]["bias"].dtype == jnp.float32 and bool((g["dense"]["bias"] == 1).all())


def test_errors_name_the_argument_and_valid_values():
  p = _params()
  with pytest.raises(ValueError, match=r"sparsity=1.0 is outside the valid range \[0, 1\)"):
    lj.prune(p, sparsity=1.0)
  with pytest.raises(ValueError, match=r"sparsity=-0.1 is outside the valid range \[0, 1\)"):
    lj.prune(p, sparsity=-0.1)
  with pytest.raises(ValueError, match=r"structure='4:8' is not supported; valid: 'unstructured', '2:4'"):
    lj.prune(p, sparsity=0.5, structure="4:8")
  with pytest.raises(ValueError, match=r"score='gradient' is not supported; valid: 'magnitude'"):
    lj.prune(p, sparsity=0.5, score="gradient")
  with pytest.raises(ValueError, match=r"leaf \['w'\] has shape \(6, 8\) whose axis -2 \(6\) is not divisible by 4"):
    lj.prune({"w": jnp.ones((6, 8))}, sparsity=0.5, structure="2:4")
  with pytest.raises(ValueError, match="sparsity must be 0.5"):
    lj.prune(p, sparsity=0.3, structure="2:4")
  with pytest.raises(TypeError, match=r"leaf \['ids'\] has dtype int32; only floating leaves"):
    lj.prune({"ids": jnp.ones((4, 4), jnp.int32)}, sparsity=0.5)
  with pytest.raises(ValueError, match="differ in structure"):
    lj.prune.apply_masks({"a": jnp.ones(2)}, {"b": jnp.ones(2, bool)})
