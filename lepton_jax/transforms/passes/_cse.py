"""Common-subexpression elimination across a jaxpr and inside every nested jaxpr.

Two equations are merged when they apply the same primitive with equal parameters to
the same inputs. Equations with effects (IO, ordered callbacks, state) and stateful or
random primitives are never merged. Commutative binary primitives are matched with
their operands in either order.

Across the ``cond`` boundary (``duplicate_in_branch``): an equation inside a branch that
recomputes a value already computed before the ``cond`` -- same primitive and params, inputs
that are the branch operands (or literals, or such recomputed values) -- is replaced by that
value, passed in as a new operand of the ``cond``. XLA does not do this: measured on XLA:CPU,
``h = tanh(x @ w); h + cond(p, lambda: tanh(x @ w) @ w, lambda: h)`` compiles to 1.5x the
FLOPs and 2x the temp bytes of the version that reuses ``h`` (XLA's CSE works within one
computation; a branch is another). Inside loops XLA's invariant code motion plus CSE already
reuse outer values, so loop bodies are left to it.
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


def _no_names(dbg):
  """``dbg`` without per-argument/result names (they no longer line up after a rewrite that
  changes a jaxpr's interface; JAX treats ``None`` as unknown)."""
  try:
    return dbg._replace(arg_names=None, result_paths=None)
  except Exception:  # pylint: disable=broad-except
    return dbg


def _eqn_key(eqn, atom_key):
  """The merge key of ``eqn`` with inputs keyed by ``atom_key`` (None when not mergeable)."""
  info = primitive_info(eqn)
  if eqn.effects or not info.cse_safe or any(isinstance(v, core.DropVar) for v in eqn.outvars):
    return None
  try:
    ins = [atom_key(a) for a in eqn.invars]
    if any(k is None for k in ins):
      return None
    if info.commutative and len(ins) == 2:
      ins = sorted(ins, key=repr)
    key = (eqn.primitive, tuple(ins), _freeze(eqn.params),
           tuple((v.aval.shape, str(v.aval.dtype)) if hasattr(v.aval, "shape") else str(v.aval)
                 for v in eqn.outvars))
    hash(key)
  except (_Unhashable, TypeError):
    return None
  return key


def _cse_into_branches(eqn, env, seen, here, records):
  """``eqn`` (a ``cond``) with branch equations that recompute an outer value replaced by that
  value as a new operand; the same equation when nothing matches."""
  branches = eqn.params["branches"]
  if eqn.effects or any(b.consts or b.jaxpr.constvars for b in branches):
    return eqn
  extra: list = []          # outer atoms passed in, in order
  per_branch = []           # (branch, {branch var: index into extra}, matched eqn indices)
  for br in branches:
    outer_of = dict(zip(br.jaxpr.invars, eqn.invars[1:]))
    repl: dict = {}

    def key_of(a, outer_of=outer_of):
      if isinstance(a, core.Literal):
        return _atom_key(a, env)
      if a in outer_of:
        return _atom_key(outer_of[a], env)
      return None

    matched = []
    for k, be in enumerate(br.jaxpr.eqns):
      key = _eqn_key(be, key_of)
      if key is None or key not in seen:
        continue
      prev = seen[key]
      matched.append(k)
      for v, p in zip(be.outvars, prev):
        if p not in extra:
          extra.append(p)
        repl[v] = extra.index(p)
        outer_of[v] = p
    per_branch.append((br, repl, matched))
  if not extra:
    return eqn
  built = []
  for br, repl, matched in per_branch:
    fresh = [core.Var(a.aval) for a in extra]
    sub = {v: fresh[i] for v, i in repl.items()}
    rd = lambda a, sub=sub: sub.get(a, a) if isinstance(a, core.Var) else a
    drop = set(matched)
    eqns = [e.replace(invars=[rd(a) for a in e.invars])
            for k, e in enumerate(br.jaxpr.eqns) if k not in drop]
    built.append((br, fresh, eqns, [rd(a) for a in br.jaxpr.outvars], matched))
  # Pass in only the outer values some branch still reads (a matched intermediate is not).
  read = {a for _, _, eqns, outs, _ in built for a in [x for e in eqns for x in e.invars] + outs
          if isinstance(a, core.Var)}
  keep = [i for i in range(len(extra)) if any(f[i] in read for _, f, _, _, _ in built)]
  new_branches = []
  for br, fresh, eqns, outs, matched in built:
    j = br.jaxpr.replace(invars=list(br.jaxpr.invars) + [fresh[i] for i in keep], eqns=eqns,
                         outvars=outs, debug_info=_no_names(br.jaxpr.debug_info))
    new_branches.append(core.ClosedJaxpr(j, ()))
    for k in matched:
      records.append(Rewrite("cse", f"duplicate_in_branch_{br.jaxpr.eqns[k].primitive.name}",
                             location(here, br.jaxpr.eqns[k]), 1))
  return eqn.replace(invars=list(eqn.invars) + [extra[i] for i in keep],
                     params=dict(eqn.params, branches=tuple(new_branches)))


def _cse_jaxpr(closed: core.ClosedJaxpr, path: str, records: list[Rewrite]) -> core.ClosedJaxpr:
  jaxpr = closed.jaxpr
  b = LevelBuilder(closed)
  env = b.env           # Var -> replacement atom
  seen: dict = {}       # key -> outvars
  for i, eqn in enumerate(jaxpr.eqns):
    here = f"{path}{i}"
    eqn = b.read(eqn)
    if eqn.primitive.name == "cond" and seen:
      new = _cse_into_branches(eqn, env, seen, here, records)
      if new is not eqn:
        eqn = new
        b.changed = True
    key = _eqn_key(eqn, lambda a: _atom_key(a, env))
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
