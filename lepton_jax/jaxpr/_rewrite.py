"""User rewrite rules on the core: :class:`Rule` matches become a level function of the rewrite
driver, and the rewritten jaxpr is run by the one evaluator."""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax

import numpy as np
from lepton_jax.jaxpr import _compat as jax_core
from lepton_jax.jaxpr._defuse import OUTPUT, DefUse
from lepton_jax.jaxpr._driver import Rewrite, location, rewrite_nested
from lepton_jax.jaxpr._eval import eval_jaxpr, retrace

from lepton_jax.jaxpr._match import Match, Rule, find_matches
from lepton_jax.jaxpr._trace import trace
from lepton_jax.jaxpr._registry import as_closed

__all__ = ["eval_jaxpr_with_rewrites", "rewrite", "rewrite_jaxpr", "select_matches"]

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
  du = DefUse(j)
  users = {v: [j.eqns[i] for i in idx if i != OUTPUT] for v, idx in du.uses.items()}
  outs = {v for v, idx in du.uses.items() if OUTPUT in idx}
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


# Custom derivative rules must stay consistent with their primal, and shard_map bodies are
# per-device programs: rules are not applied inside them.
_NO_DESCEND = frozenset({"custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr", "shard_map"})


def _rule_level(rules):
  """The driver level function applying ``rules`` to one jaxpr level."""
  def level(closed, path, records):
    jaxpr = closed.jaxpr
    chosen = select_matches(jaxpr, rules) if rules else []
    if not chosen:
      return closed
    index = {id(e): i for i, e in enumerate(jaxpr.eqns)}
    replace, skip = {}, set()
    for rule, m in chosen:
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
      skip |= {index[id(e)] for e in m.eqns if e is not m.root and id(e) not in needed}
      root = index[id(m.root)]

      def fn(read, rule=rule, m=m):
        return _check_out(rule, m.root, rule.replacement(**{k: read(v) for k, v in m.captures.items()}))
      replace[root] = fn
      records.append(Rewrite("rule", rule.name or repr(rule.pattern), location(f"{path}{root}", m.root),
                             len(m.eqns)))
    return retrace(closed, replace=replace, skip=frozenset(skip))
  return level


def rewrite_jaxpr(closed_jaxpr, rules: Rule | Sequence[Rule]):
  """``(new_closed_jaxpr, rewrites)``: ``closed_jaxpr`` with every match of ``rules`` replaced.

  Uses the core's rewrite driver, so rules apply at the top level and inside ``jit`` calls,
  ``remat``/``checkpoint`` blocks and ``scan``/``cond``/``while`` bodies; not inside custom
  derivative rules or ``shard_map``. The interface is unchanged.
  """
  rules = _check_rules(rules, "lepton_jax.jaxpr.rewrite_jaxpr")
  closed = as_closed(getattr(closed_jaxpr, "closed_jaxpr", closed_jaxpr)
                     if not jax_core.is_jaxpr(closed_jaxpr) else closed_jaxpr)
  records: list = []
  new = rewrite_nested(closed, _rule_level(rules), records,
                       descend=lambda e: e.primitive.name not in _NO_DESCEND)
  return new, records


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
  new, _ = rewrite_jaxpr(closed, rules)
  return eval_jaxpr(new.jaxpr, new.consts, *args)


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
    new, _ = rewrite_jaxpr(t.closed_jaxpr, rules)
    outs = eval_jaxpr(new.jaxpr, new.consts, *leaves)
    return jax.tree_util.tree_unflatten(t.out_tree, outs)
  return wrapped
