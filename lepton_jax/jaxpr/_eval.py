"""The one jaxpr evaluator of lepton_jax.

Role: evaluates a jaxpr equation by equation (binding each primitive with its own params, its
source info and its context, as ``jax.core.eval_jaxpr`` does), optionally replacing chosen
equations by Python functions or skipping them. Under a trace this *is* re-tracing, so
:func:`retrace` builds a rewritten jaxpr with the same interface. Every transform that runs or
rebuilds a jaxpr (``adaptive_jit``, routing, spot checks, the rule interpreter) uses this module.
"""

from __future__ import annotations

from typing import Callable, Mapping

import jax

from lepton_jax.jaxpr import _compat as jc

__all__ = ["bind_eqn", "eval_jaxpr", "retrace", "jaxpr_fn", "in_specs"]

#: ``replace[i](read) -> list | dict``: equation ``i``'s outputs (or ``{var: value}``) from ``read(atom)``.
Replacement = Callable[[Callable], list]


def bind_eqn(eqn, invals, params=None) -> list:
  """Binds ``eqn``'s primitive on ``invals`` (with ``params`` overriding its own); a list of outputs."""
  bind_params = eqn.primitive.get_bind_params(eqn.params if params is None else params)
  if isinstance(bind_params, tuple):
    subfuns, bind_params = bind_params
  else:  # pragma: no cover - older JAX returned only params
    subfuns = []
  name_stack = jc.source_info_util.current_name_stack() + eqn.source_info.name_stack
  with jc.source_info_util.user_context(eqn.source_info.traceback, name_stack=name_stack), \
      eqn.ctx.manager:
    outs = eqn.primitive.bind(*subfuns, *invals, **bind_params)
  return list(outs) if eqn.primitive.multiple_results else [outs]


def eval_jaxpr(jaxpr, consts, *args, replace: Mapping[int, Replacement] | None = None,
               skip=frozenset()) -> list:
  """Evaluates ``jaxpr`` on ``consts`` and ``args``; a list of its outputs.

  Args:
    jaxpr: an open ``Jaxpr``.
    consts: values of its constvars.
    *args: values of its invars.
    replace: equation index -> ``fn(read)`` returning that equation's outputs (``read`` maps
      an atom of the jaxpr to its value), or a dict ``{var: value}`` of any variables it
      computes (a joint replacement standing for several equations).
    skip: equation indices not evaluated at all (their outputs must be unused or replaced).
  """
  env: dict = {}
  replace = replace or {}

  def read(a):
    return a.val if isinstance(a, jc.Literal) else env[a]

  for v, c in zip(jaxpr.constvars, consts):
    env[v] = c
  for v, a in zip(jaxpr.invars, args):
    env[v] = a
  for i, eqn in enumerate(jaxpr.eqns):
    if i in replace:
      outs = replace[i](read)
      if isinstance(outs, dict):  # a joint replacement: writes any variables it names
        for v, o in outs.items():
          env[v] = o
        continue
    elif i in skip:
      continue
    else:
      outs = bind_eqn(eqn, [read(a) for a in eqn.invars])
    for v, o in zip(eqn.outvars, outs):
      if not isinstance(v, jc.DropVar):
        env[v] = o
  return [read(a) for a in jaxpr.outvars]


def jaxpr_fn(closed) -> Callable:
  """``fn(*args) -> list`` evaluating a ``ClosedJaxpr``."""
  return lambda *args: eval_jaxpr(closed.jaxpr, closed.consts, *args)


def in_specs(jaxpr) -> list:
  """``ShapeDtypeStruct``s of ``jaxpr``'s inputs (weak types kept), for re-tracing."""
  return [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype,
                               weak_type=getattr(v.aval, "weak_type", False))
          for v in jaxpr.invars]


def retrace(closed, *, replace: Mapping[int, Replacement] | None = None, skip=frozenset()):
  """A new ``ClosedJaxpr`` with ``closed``'s interface, equations replaced/skipped as given."""
  jaxpr = closed.jaxpr
  return jax.make_jaxpr(
      lambda *a: eval_jaxpr(jaxpr, closed.consts, *a, replace=replace, skip=skip))(*in_specs(jaxpr))
