"""The shared NNX predicate: modules are graph nodes, State leaves are not."""

import jax
import optax
from flax import nnx

from lepton_jax._nnx import is_graph_node


def test_graph_node_predicate():
  m = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
  _, state = nnx.split(m)
  assert is_graph_node(m)
  assert is_graph_node(nnx.Optimizer(m, optax.sgd(0.1), wrt=nnx.Param))
  assert not is_graph_node(state)
  assert not is_graph_node(m.kernel)
  assert not any(is_graph_node(l) for l in jax.tree_util.tree_leaves(state, is_leaf=is_graph_node))
  assert not is_graph_node([m]) and not is_graph_node({"m": m}) and not is_graph_node(1.0)
