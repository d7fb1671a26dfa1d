"""Skips ``cond``/``switch`` branches whose index is known when the jaxpr is traced.

A ``cond`` whose index operand is a literal or a known constant (for example after
constant folding of a Python-level predicate) is replaced by the chosen branch's
equations, inlined with fresh variables. Branch jaxprs that carry consts are inlined as
a ``closed_call`` instead.
"""

from __future__ import annotations

import numpy as np

from lepton_jax.jaxpr import _compat as core

from lepton_jax.jaxpr._driver import (known_consts, LevelBuilder, Rewrite, inline_closed, location,
                                      rewrite_nested)

__all__ = ["cond"]


def _cond_jaxpr(closed: core.ClosedJaxpr, path: str, records: list[Rewrite]) -> core.ClosedJaxpr:
  jaxpr = closed.jaxpr
  known = known_consts(closed)
  b = LevelBuilder(closed)
  for i, eqn in enumerate(jaxpr.eqns):
    here = f"{path}{i}"
    eqn = b.read(eqn)
    if eqn.primitive.name == "cond":
      idx = eqn.invars[0]
      val = (np.asarray(idx.val) if isinstance(idx, core.Literal) else known.get(idx))
      if val is not None and val.shape == () and not eqn.effects:
        branches = eqn.params["branches"]
        k = int(np.clip(int(val), 0, len(branches) - 1))
        inl = inline_closed(branches[k], list(eqn.invars[1:]))
        if inl is not None:
          sub_eqns, outs = inl
          # Recurse into the inlined equations (nested conds may now be static too).
          sub_closed = core.ClosedJaxpr(
              jaxpr.replace(invars=[], outvars=outs, eqns=sub_eqns), closed.consts)
          sub_closed = _cond_jaxpr(sub_closed, f"{here}/branches[{k}]/", records)
          for v, o in zip(eqn.outvars, sub_closed.jaxpr.outvars):
            b.alias(v, o)
          for e in sub_closed.jaxpr.eqns:
            b.emit(e)
          records.append(Rewrite("cond", "static_predicate", location(here, eqn),
                                 len(branches) - 1))
          continue
    b.emit(eqn)
  return b.build()


def cond(closed: core.ClosedJaxpr, **_) -> tuple[core.ClosedJaxpr, list[Rewrite]]:
  """Inlines the taken branch of every ``cond`` with a statically known index.

  Args:
    closed: the jaxpr to rewrite; its interface is kept.

  Returns:
    ``(new_closed_jaxpr, rewrites)``.

  >>> import jax
  >>> cj = jax.make_jaxpr(lambda x: jax.lax.cond(True, jax.numpy.sin, jax.numpy.cos, x))(1.0)
  >>> [r.pattern for r in cond(cj)[1]]
  ['static_predicate']
  """
  records: list[Rewrite] = []
  return rewrite_nested(closed, _cond_jaxpr, records), records
