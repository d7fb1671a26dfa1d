"""Shared helpers of the compression transforms: argument flattening (with NNX graph nodes),
trace-cache keys, compiled-program measurements."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lepton_jax._nnx import graphdef_key, merged_call, split_nodes, write_back
from lepton_jax.jaxpr._compat import Tracer
from lepton_jax.jaxpr._compiled import figures_of

__all__ = ["Flat", "flatten_call", "spec_of", "compiled_figures", "has_tracer"]


@dataclasses.dataclass
class Flat:
  """``(args, kwargs)`` with NNX graph nodes replaced by their state."""
  treedef: Any
  nodes: dict          # position in the node-level leaves -> (node, graphdef)
  pure: list           # node-level leaves with nodes replaced by nnx.State
  leaves: list         # array leaves of ``pure``
  pure_tree: Any       # treedef of ``pure``

  def key(self):
    gdefs = tuple((i, graphdef_key(g)) for i, (_, g) in sorted(self.nodes.items()))
    avals = tuple((tuple(np.shape(x)), jnp.result_type(x), _weak(x)) for x in self.leaves)
    return (self.treedef, self.pure_tree, gdefs, avals)


def _weak(x) -> bool:
  aval = getattr(x, "aval", None)
  if aval is not None:
    return bool(getattr(aval, "weak_type", False))
  return isinstance(x, (bool, int, float, complex))


def flatten_call(args, kwargs) -> Flat:
  treedef, nodes, pure = split_nodes(args, kwargs)
  flat, pure_tree = jax.tree_util.tree_flatten(pure)
  return Flat(treedef, nodes, pure, flat, pure_tree)


def pure_function(fun, flat: Flat):
  """``f(*array_leaves) -> (out_leaves, out_tree_store)``: re-merges NNX nodes inside."""
  call = merged_call(fun, flat.treedef, flat.nodes)
  store = []

  def f(*arrays):
    out, states = call(jax.tree_util.tree_unflatten(flat.pure_tree, arrays))
    outs, tree = jax.tree_util.tree_flatten((out, states))
    store.append(tree)
    return outs

  return f, store


def update_nodes(flat: Flat, states: dict) -> None:
  write_back(flat.nodes, states)


def spec_of(x):
  return jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x), weak_type=_weak(x))


def has_tracer(values) -> bool:
  return any(isinstance(v, Tracer) for v in values)


def compiled_figures(fun, *args, **kwargs) -> dict:
  """Bytes and FLOPs of ``jax.jit(fun)`` compiled for these arguments (the backend's numbers).

  A dict (``temp_bytes``, ``argument_bytes``, ``output_bytes``, ``flops``, ``bytes_accessed``,
  ``alias_bytes``) read by the core's one reader, :func:`lepton_jax.jaxpr._compiled.figures_of`.
  """
  return figures_of(fun, *args, **kwargs).to_dict()
