"""The one rewrite driver: apply a per-level rewrite to a jaxpr and to every nested jaxpr.

Role: a *level function* ``fn(closed, path, records) -> closed`` rewrites the equations of one
jaxpr (keeping its interface) and appends :class:`Rewrite` records. :func:`rewrite_nested` runs it
bottom-up: first inside every sub-jaxpr of every equation (the params named by the primitive
registry: ``jit``, ``remat``/``checkpoint``, ``scan``, ``while``, ``cond``, custom_jvp/vjp primal
bodies, ``shard_map``, ...), rebuilding the equations, then on the level itself. Every pass of
``adaptive_jit`` (fold, cond, simplify, cse, routing) and the rule interpreter are level
functions, so none of them writes its own recursion, and all of them reach nested jaxprs.

Also here: the small rebuilding helpers the level functions share (substitution, inlining a
closed jaxpr's equations, tracing replacement equations with JAX itself, constants as literals).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import numpy as np

from lepton_jax.jaxpr import _compat as jc
from lepton_jax.jaxpr._registry import subjaxpr_params

__all__ = ["Rewrite", "LevelFn", "LevelBuilder", "rewrite_nested", "map_subjaxprs", "location", "substitute",
           "inline_closed", "inline_calls", "trace_eqns", "known_consts", "consts_to_literals",
           "count_eqns"]


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


#: ``fn(closed, path, records) -> closed``: rewrites one jaxpr level, interface unchanged.
LevelFn = Callable[[jc.ClosedJaxpr, str, list], jc.ClosedJaxpr]


def location(path: str, eqn=None) -> str:
  """A readable location: the equation path plus the user's source line."""
  if eqn is None:
    return path
  try:
    src = jc.source_info_util.summarize(eqn.source_info)
  except Exception:  # pragma: no cover - source info is best effort
    src = ""
  return f"{path} ({src})" if src and src != "unknown" else path


def known_consts(closed) -> dict:
  """Maps each constvar of ``closed`` whose value is concrete (not a tracer) to a numpy array."""
  known: dict = {}
  for v, c in zip(closed.jaxpr.constvars, closed.consts):
    if not isinstance(c, jc.Tracer):
      try:
        known[v] = np.asarray(c)
      except Exception:  # e.g. extended dtypes (PRNG keys) have no numpy view
        pass
  return known


def substitute(atom, env: dict):
  """Follows the substitution map ``env`` (Var -> Atom) to the final atom."""
  while isinstance(atom, jc.Var) and atom in env:
    atom = env[atom]
  return atom


class LevelBuilder:
  """Rebuilds one jaxpr level while a pass walks it: the substitution map, the new equations
  and new constants, and the final rebuild (the loop every substituting pass shares).

  >>> import jax
  >>> cj = jax.make_jaxpr(lambda x: x * 1.0)(2.0)
  >>> b = LevelBuilder(cj)
  >>> for eqn in cj.jaxpr.eqns:
  ...   eqn = b.read(eqn)
  ...   b.alias(eqn.outvars[0], eqn.invars[0])   # drop the multiply
  >>> len(b.build().jaxpr.eqns)
  0
  """

  def __init__(self, closed):
    self.closed = closed
    self.env: dict = {}
    self.eqns: list = []
    self.constvars: list = []
    self.consts: list = []
    self.changed = False

  def atom(self, a):
    """The current replacement of atom ``a``."""
    return substitute(a, self.env)

  def read(self, eqn):
    """``eqn`` with its inputs substituted."""
    invars = [substitute(a, self.env) for a in eqn.invars]
    if any(a is not b for a, b in zip(invars, eqn.invars)):
      self.changed = True
      return eqn.replace(invars=invars)
    return eqn

  def alias(self, var, atom) -> None:
    """Later reads of ``var`` see ``atom`` (the equation defining ``var`` is dropped)."""
    if not isinstance(var, jc.DropVar):
      self.env[var] = atom
    self.changed = True

  def emit(self, eqn, *, changed: bool = False) -> None:
    self.eqns.append(eqn)
    self.changed |= changed

  def add_const(self, value, aval):
    """A new constvar holding ``value`` (top-level jaxprs only)."""
    v = jc.Var(aval)
    self.constvars.append(v)
    self.consts.append(value)
    self.changed = True
    return v

  def build(self):
    """The rebuilt ``ClosedJaxpr`` (the original object when nothing changed)."""
    if not self.changed:
      return self.closed
    jaxpr = self.closed.jaxpr
    outvars = [substitute(a, self.env) for a in jaxpr.outvars]
    return jc.ClosedJaxpr(
        jaxpr.replace(constvars=list(jaxpr.constvars) + self.constvars, eqns=self.eqns,
                      outvars=outvars),
        list(self.closed.consts) + self.consts)


def count_eqns(jaxpr) -> int:
  """Equations in ``jaxpr`` and, recursively, in its sub-jaxprs."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  n = 0
  for e in jaxpr.eqns:
    n += 1
    for _, _, j in subjaxpr_params(e):
      n += count_eqns(j)
  return n


def _substitute_jaxpr(jaxpr, env: dict):
  def rd(a):
    return env.get(a, a) if isinstance(a, jc.Var) else a
  eqns = [e.replace(invars=[rd(a) for a in e.invars]) for e in jaxpr.eqns]
  return jaxpr.replace(constvars=[], eqns=eqns, outvars=[rd(a) for a in jaxpr.outvars])


def consts_to_literals(closed):
  """``closed`` with its scalar consts inlined as literals, or None if any is not a scalar."""
  env = {}
  for v, c in zip(closed.jaxpr.constvars, closed.consts):
    if isinstance(c, jc.Tracer):
      return None
    try:
      val = np.asarray(c)
    except Exception:  # pylint: disable=broad-except
      return None
    if val.ndim != 0 or len(getattr(v.aval, "shape", (None,))) != 0:
      return None
    env[v] = jc.Literal(val, v.aval)
  if len(env) != len(closed.jaxpr.constvars):
    return None
  return jc.ClosedJaxpr(_substitute_jaxpr(closed.jaxpr, env), ())


# Primitives whose open sub-jaxpr reads exactly the equation's inputs, so constants created by a
# rewrite inside it can be passed in as extra leading inputs ("hoisted") instead of being lost.
_HOISTABLE = frozenset({"remat", "remat2", "checkpoint"})


def map_subjaxprs(eqn, fn: Callable[[jc.ClosedJaxpr, str, bool], jc.ClosedJaxpr], hoisted=None):
  """Applies ``fn(closed_jaxpr, param_path, open)`` to every sub-jaxpr of ``eqn``.

  ``fn`` must keep the interface (in/out avals) unchanged. ``open`` is True when the param is an
  open ``Jaxpr``: constants a rewrite added to it become literals when scalar; inside
  ``remat``/``checkpoint`` others become extra inputs of the equation, appended to ``hoisted`` as
  ``(var, value)`` for the enclosing jaxpr to bind as its own consts; elsewhere that sub-jaxpr's
  rewrite is skipped (the original is kept, which is always correct).
  """
  subs = subjaxpr_params(eqn)
  if not subs:
    return eqn
  params = dict(eqn.params)
  new_invars = list(eqn.invars)
  changed = False
  for k, i, j in subs:
    is_open = jc.is_open_jaxpr(j, eqn.primitive.name)
    closed = jc.ClosedJaxpr(j, ()) if is_open else j
    name = k if i is None else f"{k}[{i}]"
    new = fn(closed, name, is_open)
    if new is closed:
      continue
    if is_open:
      if new.consts or new.jaxpr.constvars:
        lit = consts_to_literals(new)
        if lit is not None:
          new_val = lit.jaxpr
        elif (hoisted is not None and eqn.primitive.name in _HOISTABLE and len(subs) == 1):
          outer = [jc.Var(v.aval) for v in new.jaxpr.constvars]
          hoisted.extend(zip(outer, new.consts))
          new_invars = outer + new_invars
          new_val = new.jaxpr.replace(constvars=[], invars=list(new.jaxpr.constvars) + list(new.jaxpr.invars))
        else:
          continue
      else:
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
  if len(new_invars) != len(eqn.invars):
    return eqn.replace(params=params, invars=new_invars)
  return eqn.replace(params=params)


def rewrite_nested(closed, level_fn: LevelFn, records: list, path: str = "", _memo=None, *,
                   descend: Callable | None = None):
  """Applies ``level_fn`` inside every nested jaxpr (bottom-up), then to ``closed`` itself.

  Records get paths such as ``"4/jaxpr/2"`` (equation 2 of the sub-jaxpr ``jaxpr`` of equation
  4). The interface of ``closed`` is unchanged. A sub-jaxpr object met several times (``jit``
  caches them) is rewritten once and shared, so equal calls stay equal. ``descend(eqn)`` (default:
  always) says whether to enter an equation's sub-jaxprs at all.
  """
  memo = {} if _memo is None else _memo

  def sub(cj, name, _open, here):
    key = (id(cj.jaxpr), tuple(id(c) for c in cj.consts))
    if key not in memo:
      memo[key] = (cj, rewrite_nested(cj, level_fn, records, f"{here}/{name}/", memo,
                                      descend=descend))
    return memo[key][1]

  jaxpr = closed.jaxpr
  new_eqns, hoisted, changed = [], [], False
  for i, eqn in enumerate(jaxpr.eqns):
    here = f"{path}{i}"
    if descend is not None and not descend(eqn):
      new_eqns.append(eqn)
      continue
    new = map_subjaxprs(eqn, lambda cj, name, _open, here=here: sub(cj, name, _open, here), hoisted)
    changed |= new is not eqn
    new_eqns.append(new)
  if changed:
    constvars = list(jaxpr.constvars) + [v for v, _ in hoisted]
    consts = list(closed.consts) + [c for _, c in hoisted]
    closed = jc.ClosedJaxpr(jaxpr.replace(eqns=new_eqns, constvars=constvars), consts)
  return level_fn(closed, path, records)


def inline_closed(closed, in_atoms: list):
  """Copies ``closed``'s equations with fresh variables, reading ``in_atoms``.

  Returns ``(eqns, out_atoms)``, or ``None`` when the jaxpr has consts (callers keep
  the original equation then).
  """
  if closed.consts or closed.jaxpr.constvars:
    return None
  env: dict = dict(zip(closed.jaxpr.invars, in_atoms))

  def read(a):
    if isinstance(a, jc.Literal):
      return a
    return env[a]

  eqns = []
  for e in closed.jaxpr.eqns:
    outs = []
    for v in e.outvars:
      if isinstance(v, jc.DropVar):
        outs.append(jc.DropVar(v.aval))
      else:
        nv = jc.Var(v.aval)
        env[v] = nv
        outs.append(nv)
    eqns.append(e.replace(invars=[read(a) for a in e.invars], outvars=outs))
  return eqns, [read(a) for a in closed.jaxpr.outvars]


def inline_calls(closed):
  """Inlines nested ``jit`` calls at the top level so patterns can be seen whole.

  Returns ``(new_closed, changed)``; calls with effects or consts stay calls.
  """
  jaxpr = closed.jaxpr
  new_eqns, changed = [], False
  env: dict = {}
  for e in jaxpr.eqns:
    e = e.replace(invars=[env.get(a, a) if isinstance(a, jc.Var) else a for a in e.invars])
    if e.primitive.name in ("jit", "pjit") and not e.effects:
      inl = inline_closed(e.params["jaxpr"], list(e.invars))
      if inl is not None:
        sub, outs = inl
        sub_closed, _ = inline_calls(jc.ClosedJaxpr(
            jaxpr.replace(invars=[], outvars=outs, eqns=sub), closed.consts))
        new_eqns.extend(sub_closed.jaxpr.eqns)
        for v, o in zip(e.outvars, sub_closed.jaxpr.outvars):
          env[v] = o
        changed = True
        continue
    new_eqns.append(e)
  if not changed:
    return closed, False
  outvars = [env.get(a, a) if isinstance(a, jc.Var) else a for a in jaxpr.outvars]
  return jc.ClosedJaxpr(jaxpr.replace(eqns=new_eqns, outvars=outvars), closed.consts), True


def trace_eqns(fn: Callable, in_atoms: list):
  """Equations computing ``fn(*in_atoms)``, traced by JAX itself (so params match it).

  ``fn`` is traced with ``jax.make_jaxpr`` on the atoms' avals (weak types kept) and the
  resulting equations are copied with fresh variables reading ``in_atoms``. Scalar
  constants the trace captured become literals. Returns ``(eqns, out_atoms)``, or
  ``None`` when the trace fails or captures a non-scalar constant (callers skip then).
  """
  try:
    specs = [jax.ShapeDtypeStruct(a.aval.shape, a.aval.dtype,
                                  weak_type=getattr(a.aval, "weak_type", False))
             for a in in_atoms]
    closed = jax.make_jaxpr(fn)(*specs)
  except Exception:  # pylint: disable=broad-except
    return None
  if closed.consts or closed.jaxpr.constvars:
    closed = consts_to_literals(closed)
    if closed is None:
      return None
  return inline_closed(closed, list(in_atoms))
