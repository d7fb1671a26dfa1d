"""``lj.prune``: magnitude pruning of a parameter pytree (unstructured or 2:4).

Which leaves are pruned: floating leaves with ``ndim >= 2`` (matrices and conv/einsum kernels).
Biases, norm scales and other 1-D/0-D leaves are left dense (their mask is all ones). Integer leaves
are an error (they cannot be magnitude-pruned meaningfully).

* ``"unstructured"``: the ``round(sparsity * n)`` smallest-magnitude entries of each leaf are zeroed
  (per leaf, so every matrix has the requested sparsity; ties broken by position).
* ``"2:4"``: in every group of 4 consecutive entries along the contraction (input) axis, axis ``-2``
  (the ``in`` axis of Flax ``(..., in, out)`` kernels), the 2 largest-magnitude entries are kept. The
  sparsity is 0.5 by construction; ``sparsity`` must be 0.5 (or left at 0.5).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["prune", "apply_masks"]

_API = "lj.prune"
_STRUCTURES = ("unstructured", "2:4")
_SCORES = ("magnitude",)


def _prunable(path, x) -> bool:
  dtype = jnp.result_type(x)
  if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.complexfloating)):
    raise TypeError(f"{_API}: leaf {jax.tree_util.keystr(path)} has dtype {dtype.name}; only floating leaves can "
                    "be pruned by magnitude (drop integer leaves from the tree or prune a sub-tree of weights)")
  return np.ndim(x) >= 2


def _unstructured_mask(x, sparsity):
  n = x.size
  k = int(round(sparsity * n))
  if k == 0:
    return jnp.ones(x.shape, bool)
  order = jnp.argsort(jnp.abs(x).reshape(-1), stable=True)
  mask = jnp.ones((n,), bool).at[order[:k]].set(False)
  return mask.reshape(x.shape)


def _two_four_mask(x):
  moved = jnp.moveaxis(jnp.abs(x), -2, -1)  # groups along the contraction axis
  groups = moved.reshape(*moved.shape[:-1], moved.shape[-1] // 4, 4)
  rank = jnp.argsort(jnp.argsort(-groups, axis=-1, stable=True), axis=-1, stable=True)
  keep = (rank < 2).reshape(moved.shape)
  return jnp.moveaxis(keep, -1, -2)


def apply_masks(tree, masks):
  """``tree * masks`` leaf by leaf (masks from :func:`prune`); keeps grads/params pruned in training.

  Leaves of ``tree`` keep their dtype; ``masks`` must have the same structure (extra optimizer
  wrappers around ``tree`` are not unwrapped).

  >>> import jax.numpy as jnp, lepton_jax as lj
  >>> p, m = lj.prune({"w": jnp.arange(1.0, 9.0).reshape(2, 4)}, sparsity=0.5)
  >>> lj.prune.apply_masks({"w": jnp.ones((2, 4))}, m)["w"].tolist()
  [[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]]
  """
  t_tree = jax.tree_util.tree_structure(tree)
  m_tree = jax.tree_util.tree_structure(masks)
  if t_tree != m_tree:
    raise ValueError(f"lj.prune.apply_masks: tree and masks differ in structure: {t_tree} vs {m_tree}; pass the "
                     "masks returned by lj.prune for this same pytree")

  def one(x, m):
    if np.shape(x) != np.shape(m):
      raise ValueError(f"lj.prune.apply_masks: leaf of shape {np.shape(x)} got a mask of shape {np.shape(m)}")
    return jnp.where(m, x, jnp.zeros((), jnp.result_type(x)))

  return jax.tree_util.tree_map(one, tree, masks)


def _prune(params, *, sparsity, structure="unstructured", score="magnitude"):
  """Magnitude-prunes the matrices/kernels of ``params``; returns ``(pruned_params, masks)``.

  Args:
    params: a pytree of arrays. Floating leaves with ``ndim >= 2`` are pruned; 0-D/1-D leaves
      (biases, norm scales) are kept dense with an all-ones mask.
    sparsity: fraction of entries zeroed in each pruned leaf, in ``[0, 1)``; must be 0.5 with
      ``structure="2:4"``.
    structure: ``"unstructured"`` or ``"2:4"`` (2 of every 4 consecutive entries along axis -2 kept).
    score: ``"magnitude"``.

  Returns:
    ``(pruned_params, masks)``; masks are bool arrays of the leaves' shapes.

  >>> import jax.numpy as jnp, lepton_jax as lj
  >>> p, m = lj.prune({"w": jnp.arange(8.0).reshape(4, 2), "b": jnp.ones(2)}, sparsity=0.5, structure="2:4")
  >>> p["w"].tolist(), m["b"].tolist()
  ([[0.0, 0.0], [0.0, 0.0], [4.0, 5.0], [6.0, 7.0]], [True, True])
  """
  if structure not in _STRUCTURES:
    raise ValueError(f"{_API}: structure={structure!r} is not supported; valid: {', '.join(map(repr, _STRUCTURES))}")
  if score not in _SCORES:
    raise ValueError(f"{_API}: score={score!r} is not supported; valid: {', '.join(map(repr, _SCORES))}")
  if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float, np.integer, np.floating)):
    raise TypeError(f"{_API}: sparsity must be a number in [0, 1), got {type(sparsity).__name__} {sparsity!r}")
  sparsity = float(sparsity)
  if not (0.0 <= sparsity < 1.0) or math.isnan(sparsity):
    raise ValueError(f"{_API}: sparsity={sparsity!r} is outside the valid range [0, 1)")
  if structure == "2:4" and sparsity != 0.5:
    raise ValueError(f"{_API}: structure='2:4' keeps 2 of every 4 entries, so sparsity must be 0.5; got "
                     f"sparsity={sparsity!r}")
  with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
  masks = []
  for path, x in with_path:
    if not hasattr(x, "shape"):
      raise TypeError(f"{_API}: leaf {jax.tree_util.keystr(path)} is a {type(x).__name__}, not an array")
    if not _prunable(path, x):
      masks.append(jnp.ones(np.shape(x), bool))
      continue
    if structure == "2:4":
      if x.shape[-2] % 4:
        raise ValueError(f"{_API}: structure='2:4' groups 4 entries along axis -2 (the input axis), but leaf "
                         f"{jax.tree_util.keystr(path)} has shape {tuple(x.shape)} whose axis -2 ({x.shape[-2]}) is "
                         "not divisible by 4; use structure='unstructured' for it or prune a sub-tree")
      masks.append(_two_four_mask(x))
    else:
      masks.append(_unstructured_mask(x, sparsity))
  masks = jax.tree_util.tree_unflatten(treedef, masks)
  return apply_masks(params, masks), masks


class _PruneAPI:
  """``lj.prune``: a function with an ``apply_masks`` attribute (no state)."""

  apply_masks = staticmethod(apply_masks)

  def __call__(self, params, *, sparsity, structure="unstructured", score="magnitude"):
    return _prune(params, sparsity=sparsity, structure=structure, score=score)

  __call__.__doc__ = _prune.__doc__

  def __repr__(self) -> str:
    return "lj.prune"


prune = _PruneAPI()
prune.__doc__ = _prune.__doc__
