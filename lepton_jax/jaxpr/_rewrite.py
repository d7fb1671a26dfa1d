"""A rewriting interpreter: evaluate a jaxpr while substituting matched sub-graphs."""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.extend.core
import numpy as np
from lepton_jax.jaxpr import _compat as jax_core
from lepton_jax.jaxpr._compat import source_info_util

from lepton_jax.jaxpr._match import Match, Rule, find_matches
from lepton_jax.jaxpr._trace import trace
from lepton_jax.jaxpr._registry import as_closed, sub_jaxprs

__all__ = ["eval_jaxpr_with_rewrites", "rewrite", "select_matches"]

_API = "lepton_jax.jaxpr.eval_jaxpr_with_rewrites"


def _check_rules(rules, api) -> tuple:
  if isinstance(rules, Rule):
    rules = (rules,)
  try:
    rules = tuple(rules)
  except TypeError:
    raise TypeError(f"{api}: rules must be a Rule or a sequence of Rules, got {type(rules).__name__}") from None
  for r in rules:
    if not isinstance(r, Rule):
      raise TypeError(f"{api}: every rule must be a lepton_jax.jaxpr.Rule, got {type(r).__name__} {r!r}")
  return rules


def select_matches(jaxpr, rules: Sequence[Rule]) -> list[tuple[Rule, Match]]:
  """Non-overlapping matches that are safe to replace, in rule priority order.

  A match is skipped when a value computed inside it (other than the root's
  outputs) is used outside it, or when it overlaps an already selected match.
  """
  j = as_closed(jaxpr).jaxpr if not isinstance(jaxpr, jax_core.Jaxpr) else jaxpr
  users: dict = {}
  for e in j.eqns:
    for v in e.invars:
      if isinstance(v, jax_core.Var):
        users.setdefault(v, []).append(e)
  outs = set(v for v in j.outvars if isinstance(v, jax_core.Var))
  taken: set = set()
  chosen = []
  for rule in rules:
    for m in find_matches(j, rule.pattern):
      ids = {id(e) for e in m.eqns}
      if ids & taken:
        continue
      inner = m.intermediates()
      if any(v in outs for v in inner):
        continue
      if any(id(u) not in ids for v in inner for u in users.get(v, ())):
        continue
      taken |= ids
      chosen.append((rule, m))
  return chosen


def _has_rule_match(closed, rules) -> bool:
  j = as_closed(closed).jaxpr
  if any(find_matches(j, r.pattern) for r in rules):
    return True
  return any(_has_rule_match(s.closed_jaxpr, rules) for e in j.eqns for s in sub_jaxprs(e))


def _check_out(rule, root, vals):
  multiple = root.primitive.multiple_results
  if not multiple:
    vals = [vals]
  else:
    vals = list(vals)
  if len(vals) != len(root.outvars):
    raise ValueError(
        f"{_API}: rule {rule.name or rule.pattern!r} returned {len(vals)} values for the "
        f"{len(root.outvars)} outputs of '{root.primitive.name}'; return one value per output")
  out = []
  for v, var in zip(vals, root.outvars):
    want = var.aval
    got_shape = tuple(np.shape(v))
    got_dtype = jax.numpy.result_type(v)
    if got_shape != tuple(want.shape):
      raise ValueError(
          f"{_API}: rule {rule.name or rule.pattern!r} returned shape {got_shape} for the output of "
          f"'{root.primitive.name}', which has shape {tuple(want.shape)}; the replacement must keep shapes")
    if got_dtype != want.dtype:
      v = jax.lax.convert_element_type(v, want.dtype)
    out.append(v)
  return out


def _eval(jaxpr, consts, args, rules):
  env: dict = {}

  def read(v):
    return v.val if isinstance(v, jax_core.Literal) else env[v]

  def write(v, val):
    if not isinstance(v, jax_core.DropVar):
      env[v] = val

  for v, c in zip(jaxpr.constvars, consts):
    write(v, c)
  for v, a in zip(jaxpr.invars, args):
    write(v, a)
  chosen = select_matches(jaxpr, rules) if rules else []
  root_of = {id(m.root): (r, m) for r, m in chosen}
  skip = set()
  for r, m in chosen:
    cap_vars = {v for v in m.captures.values() if isinstance(v, jax_core.Var)}
    needed = set()  # matched eqns whose outputs a capture needs (and their matched ancestors)
    producers = {v: e for e in m.eqns for v in e.outvars}
    stack = [producers[v] for v in cap_vars if v in producers and producers[v] is not m.root]
    while stack:
      e = stack.pop()
      if id(e) in needed:
        continue
      needed.add(id(e))
      stack.extend(producers[v] for v in e.invars if isinstance(v, jax_core.Var) and v in producers)
    skip |= {id(e) for e in m.eqns if e is not m.root and id(e) not in needed}
  for eqn in jaxpr.eqns:
    if id(eqn) in skip:
      continue
    if id(eqn) in root_of:
      rule, m = root_of[id(eqn)]
      kwargs = {k: read(v) for k, v in m.captures.items()}
      outs = _check_out(rule, eqn, rule.replacement(**kwargs))
      for v, o in zip(eqn.outvars, outs):
        write(v, o)
      continue
    invals = [read(v) for v in eqn.invars]
    outs = _eval_eqn(eqn, invals, rules)
    if eqn.primitive.multiple_results:
      for v, o in zip(eqn.outvars, outs):
        write(v, o)
    else:
      write(eqn.outvars[0], outs)
  return [read(v) for v in jaxpr.outvars]


_RETRACE = {"scan": ("jaxpr",), "cond": ("branches",), "while": ("cond_jaxpr", "body_jaxpr")}


def _retrace(closed, rules):
  """A closed jaxpr with the same signature whose body is rewritten by ``rules``."""
  avals = [v.aval for v in closed.jaxpr.invars]
  new = jax.make_jaxpr(lambda *a: _eval(closed.jaxpr, closed.consts, a, rules))(*avals)
  if new.consts:  # keep the signature: hoisting consts is not possible here, so inline them as literals
    new = jax.make_jaxpr(lambda *a: jax.extend.core.jaxpr_as_fun(new)(*a))(*avals)
  return new


def _eval_eqn(eqn, invals, rules):
  name = eqn.primitive.name
  if rules and name in ("jit", "pjit", "closed_call", "core_call"):
    key = "jaxpr" if "jaxpr" in eqn.params else "call_jaxpr"
    inner = as_closed(eqn.params[key])
    if _has_rule_match(inner, rules):
      outs = _eval(inner.jaxpr, inner.consts, invals, rules)
      return outs
  if rules and name in ("remat2", "checkpoint"):
    inner = as_closed(eqn.params["jaxpr"])
    if _has_rule_match(inner, rules):
      p = eqn.params
      fn = lambda *a: _eval(inner.jaxpr, inner.consts, a, rules)
      prevent = p.get("prevent_cse", True)
      prevent = prevent if isinstance(prevent, bool) else bool(all(prevent))
      return jax.checkpoint(fn, policy=p.get("policy"), prevent_cse=prevent)(*invals)
  params = eqn.params
  if rules and name in _RETRACE:
    new = {}
    for key in _RETRACE[name]:
      val = params[key]
      vals = val if isinstance(val, tuple) else (val,)
      if any(_has_rule_match(v, rules) for v in vals):
        re = tuple(_retrace(as_closed(v), rules) for v in vals)
        new[key] = re if isinstance(val, tuple) else re[0]
    if new:
      params = dict(params, **new)
  bind_params = eqn.primitive.get_bind_params(params)
  name_stack = source_info_util.current_name_stack() + eqn.source_info.name_stack
  with source_info_util.user_context(eqn.source_info.traceback, name_stack=name_stack), eqn.ctx.manager:
    return eqn.primitive.bind(*invals, **bind_params)


def eval_jaxpr_with_rewrites(closed_jaxpr, rules: Rule | Sequence[Rule], *args) -> list:
  """Evaluates ``closed_jaxpr`` on ``args``, replacing sub-graphs matched by ``rules``.

  Rules apply in the top-level jaxpr and, recursively, inside ``jit`` calls
  (inlined) and ``remat`` blocks (re-wrapped in ``jax.checkpoint`` with the same
  policy), and in ``scan``/``cond``/``while`` bodies (re-traced with the same
  signature). ``custom_jvp``/``custom_vjp`` calls (whose derivative rules must
  stay consistent) and ``shard_map`` are re-bound unchanged. A match
  whose intermediate values are used outside it is skipped. Works on concrete
  arrays and on tracers (under ``jax.jit``/``jax.grad``/``jax.vmap``).

  Args:
    closed_jaxpr: a ``ClosedJaxpr`` (or :class:`Traced`).
    rules: a :class:`Rule` or a sequence of them (earlier rules win overlaps).
    *args: flat input values, one per ``invar``.

  Returns:
    The list of output values.

  >>> import jax, jax.numpy as jnp
  >>> from lepton_jax import jaxpr as ljx
  >>> j = jax.make_jaxpr(lambda x: jnp.exp(x) + 1)(1.0)
  >>> r = ljx.Rule(ljx.Pattern("exp", ljx.Capture("x")), lambda x: x * 0)
  >>> [float(v) for v in ljx.eval_jaxpr_with_rewrites(j, [r], 3.0)]
  [1.0]
  """
  rules = _check_rules(rules, _API)
  if hasattr(closed_jaxpr, "closed_jaxpr") and not isinstance(closed_jaxpr, (jax_core.Jaxpr, jax_core.ClosedJaxpr)):
    closed_jaxpr = closed_jaxpr.closed_jaxpr
  closed = as_closed(closed_jaxpr)
  if len(args) != len(closed.jaxpr.invars):
    raise TypeError(f"{_API}: the jaxpr takes {len(closed.jaxpr.invars)} inputs, got {len(args)} arguments")
  return _eval(closed.jaxpr, closed.consts, args, rules)


def rewrite(fun: Callable, rules: Rule | Sequence[Rule]) -> Callable:
  """Returns ``fun`` with every sub-graph matched by ``rules`` replaced.

  The new function traces ``fun`` on each call, rewrites, and evaluates; it
  returns the same pytree as ``fun`` and composes with ``jax.jit``,
  ``jax.grad`` and ``jax.vmap``.

  >>> import jax, jax.numpy as jnp
  >>> from lepton_jax import jaxpr as ljx
  >>> r = ljx.Rule(ljx.Pattern("sin", ljx.Capture("x")), lambda x: jnp.cos(x - jnp.pi / 2))
  >>> g = jax.jit(jax.grad(ljx.rewrite(lambda x: jnp.sin(x) * 2, [r])))
  >>> round(float(g(0.0)), 5)
  2.0
  """
  rules = _check_rules(rules, "lepton_jax.jaxpr.rewrite")
  if not callable(fun):
    raise TypeError(f"lepton_jax.jaxpr.rewrite: fun must be callable, got {type(fun).__name__}")

  @functools.wraps(fun)
  def wrapped(*args, **kwargs):
    t = trace(fun, *args, **kwargs)
    leaves = jax.tree_util.tree_leaves((args, kwargs))
    outs = _eval(t.closed_jaxpr.jaxpr, t.closed_jaxpr.consts, leaves, rules)
    return jax.tree_util.tree_unflatten(t.out_tree, outs)
  return wrapped
