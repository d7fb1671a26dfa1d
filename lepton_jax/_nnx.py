"""Flax NNX interop shared by every transform (one definition of "a graph node").

Transforms accept NNX objects (``nnx.Module``, ``nnx.Optimizer``, ...) as arguments the way
``nnx.jit`` does. What counts as such an object must be decided the same way everywhere: an
``nnx.Variable`` inside an ``nnx.State`` (what ``nnx.split`` returns) is *not* a module to split,
it is a leaf of a pure pytree.
"""

from __future__ import annotations

from typing import Any

import jax

__all__ = ["nnx_module", "is_graph_node", "leaf_owners", "graphdef_key", "split_nodes", "merged_call",
           "write_back"]


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


def graphdef_key(gdef):
  """A hashable key of an NNX ``GraphDef`` (they compare by structure; a new object per split)."""
  try:
    hash(gdef)
    return gdef
  except TypeError:  # pragma: no cover - older flax
    return id(gdef)


def split_nodes(args, kwargs):
  """``(treedef, nodes, pure)``: ``(args, kwargs)`` flattened with NNX graph nodes as leaves;
  ``nodes`` maps each node's position to ``(node, graphdef)`` and ``pure`` is the leaf list with
  every node replaced by its ``nnx.State`` (so everything is arrays)."""
  nnx = nnx_module()
  leaves, treedef = jax.tree_util.tree_flatten((args, kwargs), is_leaf=is_graph_node)
  nodes, pure = {}, []
  for i, x in enumerate(leaves):
    if is_graph_node(x):
      gdef, state = nnx.split(x)
      nodes[i] = (x, gdef)
      pure.append(state)
    else:
      pure.append(x)
  return treedef, nodes, pure


def merged_call(fun, treedef, nodes):
  """``call(pure_leaves) -> (out, new_states)``: re-merges the nodes of :func:`split_nodes` inside
  (so a trace of ``call`` sees modules), calls ``fun``, and returns each node's state after it."""
  nnx = nnx_module()

  def call(pure_leaves):
    leaves = list(pure_leaves)
    merged = {}
    for i, (_, gdef) in nodes.items():
      merged[i] = nnx.merge(gdef, leaves[i])
      leaves[i] = merged[i]
    args, kwargs = jax.tree_util.tree_unflatten(treedef, leaves)
    out = fun(*args, **kwargs)
    return out, {i: nnx.state(m) for i, m in merged.items()}

  return call


def write_back(nodes, new_states) -> None:
  """Makes the state a call computed visible on the caller's nodes (as ``nnx.jit`` does)."""
  nnx = nnx_module()
  for i, (node, _) in nodes.items():
    nnx.update(node, new_states[i])
