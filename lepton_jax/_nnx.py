"""Flax NNX interop shared by every transform (one definition of "a graph node").

Transforms accept NNX objects (``nnx.Module``, ``nnx.Optimizer``, ...) as arguments the way
``nnx.jit`` does. What counts as such an object must be decided the same way everywhere: an
``nnx.Variable`` inside an ``nnx.State`` (what ``nnx.split`` returns) is *not* a module to split,
it is a leaf of a pure pytree.
"""

from __future__ import annotations

from typing import Any

import jax

__all__ = ["nnx_module", "is_graph_node", "leaf_owners"]


def nnx_module():
  """Returns ``flax.nnx`` or ``None`` when Flax is unavailable."""
  try:
    from flax import nnx
  except ImportError:  # pragma: no cover - flax is a dependency
    return None
  return nnx


def is_graph_node(x: Any) -> bool:
  """True for NNX graph objects (modules, optimizers, Rngs, ...) passed as arguments.

  ``nnx.Variable`` leaves (as found inside ``nnx.State``) and plain containers are not graph
  nodes here, so a State of parameters flows through transforms as an ordinary pytree.
  """
  nnx = nnx_module()
  if nnx is None or isinstance(x, (list, tuple, dict)):
    return False
  try:
    return bool(nnx.graph.is_graph_node(x)) and not isinstance(x, nnx.Variable)
  except Exception:  # pragma: no cover - defensive: odd third-party objects
    return False


def leaf_owners(args, kwargs) -> list:
  """The owning argument (position or keyword) of each leaf of ``(args, kwargs)``, flattened with
  NNX graph nodes as leaves (the order ``jax.tree_util.tree_flatten((args, kwargs))`` gives)."""
  owners: list = []
  for i, a in enumerate(args):
    owners += [i] * len(jax.tree_util.tree_leaves(a, is_leaf=is_graph_node))
  for k in sorted(kwargs):  # dict leaves flatten in sorted key order
    owners += [k] * len(jax.tree_util.tree_leaves(kwargs[k], is_leaf=is_graph_node))
  return owners
