"""Shared plumbing for the jaxpr rewrite passes (records, sub-jaxpr mapping, inlining).

Every pass is a function ``ClosedJaxpr -> (ClosedJaxpr, list[Rewrite])`` that keeps
the interface (input and output avals) of the jaxpr unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

from jax._src import core
from jax._src import source_info_util

__all__ = ["Rewrite", "known_consts", "map_subjaxprs", "subjaxpr_params", "location", "substitute",
           "inline_closed", "trace_eqns", "is_literal", "literal_value", "new_var", "aval_equal"]


def known_consts(closed: core.ClosedJaxpr) -> dict:
  """Maps each constvar of ``closed`` whose value is concrete (not a tracer) to a numpy array."""
  known: dict = {}
  for v, c in zip(closed.jaxpr.constvars, closed.consts):
    if not isinstance(c, core.Tracer):
      try:
        known[v] = np.asarray(c)
      except Exception:  # e.g. extended dtypes (PRNG keys) have no numpy view
        pass
  return known


@dataclasses.dataclass(frozen=True)
class Rewrite:
  """One rewrite applied by a pass.

  Attributes:
    pass_name: the pass that applied it (``"dce"``, ``"cse"``, ...).
    pattern: what was matched (``"mul_by_one"``, ``"attention"``, ...).
    location: equation path in the jaxpr, e.g. ``"12"`` or ``"4/jaxpr/2"``, plus the
      user source line when known.
    count: how many equations the rewrite covers (removed, merged or replaced).
  """
  pass_name: str
  pattern: str
  location: str
  count: int = 1

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def location(path: str, eqn: core.JaxprEqn | None = None) -> str:
  """A readable location: the equation path plus the user's source line."""
  if eqn is None:
    return path
  try:
    src = source_info_util.summarize(eqn.source_info)
  except Exception:  # pragma: no cover - source info is best effort
    src = ""
  return f"{path} ({src})" if src and src != "unknown" else path


def subjaxpr_params(eqn: core.JaxprEqn) -> list[tuple[str, int | None, Any]]:
  """(param name, index in a tuple or None, jaxpr) for every sub-jaxpr in ``eqn.params``."""
  out = []
  for k, v in eqn.params.items():
    if isinstance(v, (core.ClosedJaxpr, core.Jaxpr)):
      out.append((k, None, v))
    elif isinstance(v, (tuple, list)) and v and all(
        isinstance(b, (core.ClosedJaxpr, core.Jaxpr)) for b in v):
      out.extend((k, i, b) for i, b in enumerate(v))
  return out


def map_subjaxprs(eqn: core.JaxprEqn, fn: Callable[[core.ClosedJaxpr, str, bool], core.ClosedJaxpr]
                  ) -> core.JaxprEqn:
  """Applies ``fn(closed_jaxpr, param_path, open)`` to every sub-jaxpr of ``eqn``.

  ``fn`` must keep the interface (in/out avals) unchanged. ``open`` is True when the
  parameter is an open ``Jaxpr``: no consts may be added to it, so scalar consts a pass
  added become literals and otherwise the rewrite of that sub-jaxpr is skipped (the
  original is kept, which is always correct).
  """
  subs = subjaxpr_params(eqn)
  if not subs:
    return eqn
  params = dict(eqn.params)
  changed = False
  for k, i, j in subs:
    is_open = isinstance(j, core.Jaxpr)
    closed = core.ClosedJaxpr(j, ()) if is_open else j
    name = k if i is None else f"{k}[{i}]"
    new = fn(closed, name, is_open)
    if new is closed:
      continue
    if is_open:
      if new.consts or new.jaxpr.constvars:
        new = _consts_to_literals(new)
        if new is None:  # cannot apply inside an open sub-jaxpr: skip it
          continue
      new_val = new.jaxpr
    else:
      new_val = new
    changed = True
    if i is None:
      params[k] = new_val
    else:
      seq = list(params[k])
      seq[i] = new_val
      params[k] = type(eqn.params[k])(seq)
  if not changed:
    return eqn
  return eqn.replace(params=params)


def _consts_to_literals(closed: core.ClosedJaxpr) -> core.ClosedJaxpr | None:
  """``closed`` with its scalar consts inlined as literals, or None if any is not scalar."""
  env = {}
  for v, c in zip(closed.jaxpr.constvars, closed.consts):
    if isinstance(c, core.Tracer):
      return None
    try:
      val = np.asarray(c)
    except Exception:  # pylint: disable=broad-except
      return None
    if val.ndim != 0 or len(getattr(v.aval, "shape", (None,))) != 0:
      return None
    env[v] = core.Literal(val, v.aval)
  if len(env) != len(closed.jaxpr.constvars):
    return None
  return core.ClosedJaxpr(_substitute_jaxpr(closed.jaxpr, env), ())


def is_literal(a) -> bool:
  return isinstance(a, core.Literal)


def literal_value(a) -> np.ndarray | None:
  if isinstance(a, core.Literal):
    try:
      return np.asarray(a.val)
    except Exception:
      return None
  return None


def new_var(aval) -> core.Var:
  return core.Var(aval)


def aval_equal(a, b) -> bool:
  """Same shape and dtype (weak types and shardings may differ)."""
  return (getattr(a, "shape", None) == getattr(b, "shape", None)
          and getattr(a, "dtype", None) == getattr(b, "dtype", None))


def substitute(atom, env: dict):
  """Follows the substitution map ``env`` (Var -> Atom) to the final atom."""
  while isinstance(atom, core.Var) and atom in env:
    atom = env[atom]
  return atom


def inline_closed(closed: core.ClosedJaxpr, in_atoms: list) -> tuple[list[core.JaxprEqn], list] | None:
  """Copies ``closed``'s equations with fresh variables, reading ``in_atoms``.

  Returns ``(eqns, out_atoms)``, or ``None`` when the jaxpr has consts (callers keep
  the original equation then).
  """
  if closed.consts or closed.jaxpr.constvars:
    return None
  env: dict = dict(zip(closed.jaxpr.invars, in_atoms))

  def read(a):
    if isinstance(a, core.Literal):
      return a
    return env[a]

  eqns = []
  for e in closed.jaxpr.eqns:
    outs = []
    for v in e.outvars:
      if isinstance(v, core.DropVar):
        outs.append(core.DropVar(v.aval))
      else:
        nv = core.Var(v.aval)
        env[v] = nv
        outs.append(nv)
    eqns.append(e.replace(invars=[read(a) for a in e.invars], outvars=outs))
  return eqns, [read(a) for a in closed.jaxpr.outvars]


def trace_eqns(fn: Callable, in_atoms: list) -> tuple[list[core.JaxprEqn], list] | None:
  """Equations computing ``fn(*in_atoms)``, traced by JAX itself (so params match it).

  ``fn`` is traced with ``jax.make_jaxpr`` on the atoms' avals (weak types kept) and the
  resulting equations are copied with fresh variables reading ``in_atoms``. Scalar
  constants the trace captured become literals. Returns ``(eqns, out_atoms)``, or
  ``None`` when the trace fails or captures a non-scalar constant (callers skip then).
  """
  import jax  # local: keep module import light
  try:
    specs = [jax.ShapeDtypeStruct(a.aval.shape, a.aval.dtype,
                                  weak_type=getattr(a.aval, "weak_type", False))
             for a in in_atoms]
    closed = jax.make_jaxpr(fn)(*specs)
  except Exception:  # pylint: disable=broad-except
    return None
  if closed.consts or closed.jaxpr.constvars:
    closed = _consts_to_literals(closed)
    if closed is None:
      return None
  return inline_closed(closed, list(in_atoms))


def _substitute_jaxpr(jaxpr: core.Jaxpr, env: dict) -> core.Jaxpr:
  def rd(a):
    return env.get(a, a) if isinstance(a, core.Var) else a
  eqns = [e.replace(invars=[rd(a) for a in e.invars]) for e in jaxpr.eqns]
  return jaxpr.replace(constvars=[], eqns=eqns, outvars=[rd(a) for a in jaxpr.outvars])


def rebuild(closed: core.ClosedJaxpr, eqns: list, outvars: list, *, constvars=None,
            consts=None) -> core.ClosedJaxpr:
  """A new ClosedJaxpr with the given equations/outvars (effects recomputed)."""
  jaxpr = closed.jaxpr
  constvars = list(jaxpr.constvars) if constvars is None else constvars
  consts = list(closed.consts) if consts is None else consts
  effects = core.join_effects(*(e.effects for e in eqns)) if eqns else core.no_effects
  # Keep only effects that are not input effects referring to removed vars.
  new_jaxpr = jaxpr.replace(constvars=constvars, eqns=eqns, outvars=outvars,
                            effects=_filter_effects(jaxpr, effects))
  return core.ClosedJaxpr(new_jaxpr, consts)


def _filter_effects(jaxpr: core.Jaxpr, effects):
  # Effects are a superset check in JAX's type checker; the original jaxpr's effects
  # stay valid when equations are only removed or replaced by pure ones.
  return jaxpr.effects if effects is None else (jaxpr.effects | effects
                                               if hasattr(jaxpr.effects, "__or__") else effects)
