"""``lj.remat_plan``: choose save / recompute / host-offload per activation under a budget.

Role: the public API (a thin module): option validation, the wrapper returned by
:func:`remat_plan`, and the re-export of the plan records. The work is done by private modules:

* ``_remat_graph``  -- graph extraction: the traced jaxpr as the planner's model;
* ``_remat_search`` -- search / planning on the model (segment trees, ``_remat_solver``,
  save sets via ``_remat_closure``);
* ``_remat_apply``  -- application: a plan as a function JAX differentiates (per-region
  ``custom_vjp`` whose recomputation waits for the cotangent);
* ``_remat_measure`` -- compiled measurement (``memory_analysis`` / ``cost_analysis``);
* ``_remat_planner`` -- the planner: model-ranked candidates, judged by the compiler;
* ``_remat_types``  -- ``RematPlan``, ``TensorDecision``, ``CostModel`` (frozen dataclasses).
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Literal

import jax
import numpy as np

from lepton_jax._nnx import write_back
from lepton_jax._utils import parse_bytes
from lepton_jax.transforms._remat_planner import _Planner, _split_nodes
from lepton_jax.transforms._remat_types import Candidate, CostModel, RematPlan, TensorDecision

__all__ = ["remat_plan", "RematPlan", "TensorDecision", "CostModel", "Candidate"]

_API = "lj.remat_plan"
_SOLVERS = ("auto", "greedy", "milp")
_BUDGET_KINDS = ("peak", "saved")


def _validate_budget(budget):
  if isinstance(budget, bool) or budget is None:
    raise TypeError(f"{_API}: budget must be bytes (int), a size string like '512MiB', or a float "
                    f"fraction in (0, 1] of plain jax.grad's compiled temp bytes; got {budget!r}")
  if isinstance(budget, float):
    if not (0.0 < budget <= 1.0) or math.isnan(budget):
      raise ValueError(f"{_API}: budget={budget!r} as a float is a fraction of plain jax.grad's "
                       "compiled temp bytes and must be in (0, 1]; pass bytes (int) or a string "
                       "like '512MiB' for an absolute budget")
    return budget
  if isinstance(budget, (int, np.integer)):
    return parse_bytes(int(budget), name="budget", api=_API)
  if isinstance(budget, str):
    return parse_bytes(budget, name="budget", api=_API)
  raise TypeError(f"{_API}: budget must be bytes (int), a size string like '512MiB', or a float "
                  f"fraction in (0, 1]; got {type(budget).__name__} {budget!r}")


class _RematPlanned:
  """The callable returned by :func:`remat_plan`."""

  def __init__(self, fun, planner: _Planner):
    functools.update_wrapper(self, fun)
    self._fun = fun
    self._planner = planner

  def __call__(self, *args, **kwargs):
    treedef, nodes, pure, n_first = _split_nodes(args, kwargs)
    comp = self._planner.compiled(treedef, nodes, pure, n_first)
    flat = jax.tree_util.tree_leaves(pure)
    outs = comp.flat_fun(*flat)
    out, new_states = jax.tree_util.tree_unflatten(comp.out_tree, outs)
    write_back(nodes, new_states)
    return out

  def plan(self, *args, **kwargs) -> RematPlan:
    """The :class:`RematPlan` for these arguments (arrays or ``jax.ShapeDtypeStruct``)."""
    treedef, nodes, pure, n_first = _split_nodes(args, kwargs)
    return self._planner.compiled(treedef, nodes, pure, n_first).plan

  def clear_cache(self) -> None:
    self._planner.clear_cache()

  def __get__(self, obj, objtype=None):
    if obj is None:
      return self
    return functools.partial(self, obj)


def remat_plan(fun: Callable | None = None, /, *, budget, offload: bool = False,
               solver: Literal["auto", "greedy", "milp"] = "auto",
               cost_model: CostModel | None = None,
               budget_kind: Literal["peak", "saved"] = "peak"):
  """Plans activation rematerialisation of ``fun`` under a compiled-memory budget.

  Each intermediate that ``jax.grad`` would save is kept on device, recomputed in
  the backward pass, or (``offload=True``) offloaded to ``pinned_host`` memory.
  The judge is the compiled program: a candidate set that does not depend on the
  budget (segment trees ranked by the planner's jaxpr model, JAX's own
  ``dots_saveable`` / ``nothing_saveable`` policies per repeated layer, per scan
  iteration and per balanced segment, whole-function ``jax.checkpoint`` off CPU,
  a recompute-everything floor) is compiled once per program structure as
  ``jax.jit(jax.grad(planned))`` on the default backend and shared by every
  budget and wrapper of that program; the least-recompute candidate whose XLA
  temp bytes (``memory_analysis().temp_size_in_bytes``) fit ``budget`` is
  returned. So a plan the compiler does not keep within the budget is never
  returned, a larger budget never recomputes more, and a JAX policy in the set
  that fits the budget never recomputes less than the plan. Recomputation runs in per-region ``custom_vjp`` backward
  passes tied to the incoming cotangent (``optimization_barrier``; on XLA:CPU,
  which drops barriers, inside a ``lax.cond`` on the cotangent). Values and
  gradients equal those of ``fun``.

  Args:
    fun: the function to differentiate (arrays, pytrees, Flax NNX modules); the
      gradient is taken w.r.t. its first argument, as ``jax.grad`` does.
    budget: compiled temp bytes (``int``), a size string (``"512MiB"``), or a float
      in (0, 1]: that fraction of plain ``jax.grad``'s compiled temp bytes.
    offload: allow offloading residuals to host memory.
    solver: ``"auto"`` (MILP for small graphs, else greedy), ``"greedy"``, ``"milp"``:
      the solver of the segment-tree plans.
    cost_model: device FLOP/s and host bandwidth (default by backend), to price
      recompute against offload.
    budget_kind: ``"peak"`` (default): ``budget`` bounds the compiled temp bytes.
      ``"saved"``: ``budget`` bounds the residuals kept between forward and
      backward in JAX's saved-residual accounting (a float is then a fraction of
      plain ``jax.grad``'s saved bytes): the exact least-recompute save set over
      every forward intermediate, applied with ``jax.checkpoint``; compiled
      numbers are reported but not bounded then.

  Returns:
    A function with ``fun``'s signature, plus ``.plan(*args) -> RematPlan``.

  Raises:
    BudgetError: (when planning) no candidate compiles within the budget; the
      message names the smallest compiled temp bytes found.

  >>> import jax, jax.numpy as jnp, lepton_jax as lj
  >>> @lj.remat_plan(budget=0.5)
  ... def loss(w, x):
  ...   for _ in range(8):
  ...     x = jnp.tanh(x @ w)
  ...   return jnp.sum(x)
  >>> g = jax.grad(loss)(jnp.eye(16) * 0.5, jnp.ones((4, 16)))
  """
  budget = _validate_budget(budget)
  if not isinstance(offload, bool):
    raise TypeError(f"{_API}: offload must be True or False, got {offload!r}")
  if solver not in _SOLVERS:
    raise ValueError(f"{_API}: solver={solver!r} is not one of {_SOLVERS}")
  if budget_kind not in _BUDGET_KINDS:
    raise ValueError(f"{_API}: budget_kind={budget_kind!r} is not one of {_BUDGET_KINDS} "
                     "('peak' bounds the activation peak, 'saved' the saved residual bytes)")
  if cost_model is not None and not isinstance(cost_model, CostModel):
    raise TypeError(f"{_API}: cost_model must be a lj.transforms.CostModel, got {type(cost_model).__name__}")
  if offload:
    kinds = [m.kind for m in jax.devices()[0].addressable_memories()]
    if "pinned_host" not in kinds:
      raise ValueError(f"{_API}: offload=True needs a 'pinned_host' memory space; "
                       f"{jax.devices()[0].platform} offers {kinds}. Use offload=False.")

  def wrap(f):
    if not callable(f):
      raise TypeError(f"{_API}: fun must be callable, got {type(f).__name__}")
    return _RematPlanned(f, _Planner(f, budget, offload, solver, cost_model, budget_kind))

  if fun is None:
    return wrap
  return wrap(fun)
