"""Common-subexpression elimination across a jaxpr and inside every nested jaxpr.

Two equations are merged when they apply the same primitive with equal parameters to
the same inputs. Equations with effects (IO, ordered callbacks, state) and stateful or
random primitives are never merged. Commutative binary primitives are matched with
their operands in either order.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lepton_jax.jaxpr import _compat as core
from lepton_jax.jaxpr._driver import LevelBuilder, Rewrite, location, rewrite_nested, substitute
from lepton_jax.jaxpr._registry import primitive_info

__all__ = ["cse"]



class _Unhashable(Exception):
  pass


def _freeze(v: Any):
  """A hashable key for a parameter value (raises _Unhashable)."""
  if isinstance(v, (core.ClosedJaxpr, core.Jaxpr)):
    return ("jaxpr", id(v))
  if isinstance(v, (list, tuple)):
    return (type(v).__name__, tuple(_freeze(x) for x in v))
  if isinstance(v, dict):
    return ("dict", tuple(sorted((k, _freeze(x)) for k, x in v.items())))
  if isinstance(v, np.ndarray):
    return ("nd", v.dtype.str, v.shape, v.tobytes())
  if callable(v) and not isinstance(v, type):
    return ("callable", id(v))
  try:
    hash(v)
  except TypeError as e:
    raise _Unhashable() from e
  return v


def _atom_key(a, env):
  a = substitute(a, env)
  if isinstance(a, core.Literal):
    try:
      val = np.asarray(a.val)
      return ("lit", val.dtype.str, val.shape, val.tobytes(), getattr(a.aval, "weak_type", False))
    except Exception as e:  # pragma: no cover
      raise _Unhashable() from e
  return ("var", id(a))


def _cse_jaxpr(closed: core.ClosedJaxpr, path: str, records: list[Rewrite]) -> core.ClosedJaxpr:
  jaxpr = closed.jaxpr
  b = LevelBuilder(closed)
  env = b.env           # Var -> replacement atom
  seen: dict = {}       # key -> outvars
  for i, eqn in enumerate(jaxpr.eqns):
    here = f"{path}{i}"
    eqn = b.read(eqn)
    key = None
    info = primitive_info(eqn)
    if not eqn.effects and info.cse_safe and not any(
        isinstance(v, core.DropVar) for v in eqn.outvars):
      try:
        ins = [_atom_key(a, env) for a in eqn.invars]
        if info.commutative and len(ins) == 2:
          ins = sorted(ins, key=repr)
        key = (eqn.primitive, tuple(ins), _freeze(eqn.params),
               tuple((v.aval.shape, str(v.aval.dtype)) if hasattr(v.aval, "shape") else str(v.aval)
                     for v in eqn.outvars))
        hash(key)
      except (_Unhashable, TypeError):
        key = None
    if key is not None and key in seen:
      prev = seen[key]
      for v, p in zip(eqn.outvars, prev):
        b.alias(v, p)
      records.append(Rewrite("cse", f"duplicate_{eqn.primitive.name}", location(here, eqn), 1))
      continue
    if key is not None:
      seen[key] = eqn.outvars
    b.emit(eqn)
  return b.build()


def cse(closed: core.ClosedJaxpr, **_) -> tuple[core.ClosedJaxpr, list[Rewrite]]:
  """Merges duplicate pure computations (see module doc).

  Args:
    closed: the jaxpr to rewrite; its interface is kept.

  Returns:
    ``(new_closed_jaxpr, rewrites)``.

  >>> import jax, jax.numpy as jnp
  >>> cj = jax.make_jaxpr(lambda x: jnp.sin(x) + jnp.sin(x))(1.0)
  >>> [r.pattern for r in cse(cj)[1]]
  ['duplicate_sin']
  """
  records: list[Rewrite] = []
  return rewrite_nested(closed, _cse_jaxpr, records), records
