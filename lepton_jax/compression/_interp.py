"""The compression transforms' evaluation of a closed jaxpr, on the core's evaluator and driver.

A transform supplies a :class:`Hook` that may replace matrix products (primitives the registry
classes as ``"contraction"``: ``dot_general``, ``conv_general_dilated``, ...). :func:`evaluate` binds
every other equation with :func:`lepton_jax.jaxpr._eval.bind_eqn`. An equation holding sub-jaxprs
(the registry's ``subjaxpr_params``: ``jit``, ``checkpoint``/``remat``, ``scan``, ``while``, ``cond``,
...) that contains a matmul is rebuilt by :func:`lepton_jax.jaxpr._driver.map_subjaxprs`: each
sub-jaxpr is re-traced through :func:`evaluate` with the same interface and the equation is bound
with its own params (a ``checkpoint`` keeps its policy, a ``scan`` its length, a ``jit`` its
shardings). Lazy values of a hook (a quantized weight) enter a sub-jaxpr where the equation passes
an operand through to it unchanged: call and ``checkpoint`` operands, ``scan`` consts, ``scan`` xs
(one slice per iteration), ``while`` consts and ``cond`` operands; carries are plain values.

Left unchanged (reported through :meth:`Hook.opaque`): custom-derivative calls (``custom_jvp_call``,
``custom_vjp_call``, ...: rewriting only the primal body would make value and derivative disagree)
and calls the registry marks as not CSE-safe (``shard_map``, ``run_state``: manual axes / state).
"""

from __future__ import annotations

from typing import Any

import jax

from lepton_jax.jaxpr._compat import DropVar, Literal, scan_counts
from lepton_jax.jaxpr._driver import map_subjaxprs
from lepton_jax.jaxpr._eval import bind_eqn, in_specs
from lepton_jax.jaxpr._registry import as_closed, primitive_info, sub_jaxprs, subjaxpr_params

__all__ = ["Hook", "evaluate", "contains_matmul", "is_matmul", "bind_eqn"]


def is_matmul(eqn) -> bool:
  """A matrix product / convolution (the registry's ``"contraction"`` class)."""
  return primitive_info(eqn).kind == "contraction"


def _opaque(eqn) -> bool:
  info = primitive_info(eqn)
  if info.kind == "opaque" or eqn.primitive.name.startswith("custom_"):
    return True
  return info.kind == "call" and not info.cse_safe


def _inlinable(eqn) -> bool:
  """A call whose one body reads exactly the call's operands (``jit``, ``checkpoint``)."""
  subs = subjaxpr_params(eqn)
  return (primitive_info(eqn).kind == "call" and len(subs) == 1
          and len(as_closed(subs[0][2]).jaxpr.invars) == len(eqn.invars))


def contains_matmul(closed) -> bool:
  """True when ``closed`` (or a jaxpr nested in it) has a matmul / convolution."""
  for e in as_closed(closed).jaxpr.eqns:
    if is_matmul(e) or any(contains_matmul(s.closed_jaxpr) for s in sub_jaxprs(e)):
      return True
  return False


class Hook:
  """What a transform customises. ``scope`` is the tuple of enclosing call / name-scope names.

  Attributes:
    inline_calls: evaluate the bodies of calls (``jit``, ``checkpoint``) in place instead of
      rebuilding the call (the call boundary and the remat policy are dropped).
    depth: how many rebuilt sub-jaxprs (loop / branch bodies, kept calls) enclose the equation
      being evaluated (0 at the top level); maintained by :func:`evaluate`.
  """

  inline_calls = False
  depth = 0

  def matmul(self, eqn, invals: list, scope: tuple) -> Any:
    """The output value of a contraction equation, or ``None`` to bind it unchanged."""
    return None

  def materialize(self, x):
    """Turns a hook-private lazy value into an array before an ordinary equation uses it."""
    return x

  def passthrough(self, eqn, invals: list):
    """A value for an equation that merely forwards a lazy value, else ``None``."""
    return None

  def opaque(self, eqn, scope: tuple) -> None:
    """Called for custom-derivative / shard_map equations containing matmuls (bound unchanged)."""

  def carry_in(self, x):
    """A token for a lazy value that may enter a sub-jaxpr (``None``: enters as a plain array)."""
    return None

  def enter(self, token, value):
    """The lazy value standing for ``value`` (the sub-jaxpr's input) inside the sub-jaxpr."""
    return value


def _scope_name(eqn) -> str:
  return str(eqn.params.get("name", eqn.primitive.name))


def evaluate(jaxpr, consts, args, hook: Hook, scope: tuple = ()) -> list:
  """Evaluates an open ``jaxpr`` with ``consts`` and ``args`` under ``hook``."""
  env: dict = {}

  def read(v):
    return v.val if isinstance(v, Literal) else env[v]

  def write(v, val):
    if not isinstance(v, DropVar):
      env[v] = val

  for v, c in zip(jaxpr.constvars, consts):
    write(v, c)
  for v, a in zip(jaxpr.invars, args):
    write(v, a)
  for eqn in jaxpr.eqns:
    outs = _eval_eqn(eqn, [read(v) for v in eqn.invars], hook, scope)
    for v, o in zip(eqn.outvars, outs):
      write(v, o)
  return [read(v) for v in jaxpr.outvars]


def _eval_eqn(eqn, invals, hook: Hook, scope: tuple) -> list:
  stack = str(eqn.source_info.name_stack)
  here = scope + ((stack,) if stack else ())
  if is_matmul(eqn):
    out = hook.matmul(eqn, invals, here)
    if out is not None:
      return [out]
  elif subjaxpr_params(eqn):
    if any(contains_matmul(s.closed_jaxpr) for s in sub_jaxprs(eqn)):
      if _opaque(eqn):
        hook.opaque(eqn, here)
      elif hook.inline_calls and _inlinable(eqn):
        inner = as_closed(subjaxpr_params(eqn)[0][2])
        return evaluate(inner.jaxpr, inner.consts, invals, hook, here + (_scope_name(eqn),))
      else:
        return _rebuild(eqn, invals, hook, here + (_scope_name(eqn),))
  else:
    out = hook.passthrough(eqn, invals)
    if out is not None:
      return [out]
  return bind_eqn(eqn, [hook.materialize(x) for x in invals])


def _sources(eqn, key: str, n: int) -> list:
  """For each input of sub-jaxpr ``key``, the equation operand it receives unchanged (per use, or per
  iteration slice for ``scan`` xs), or ``None`` (loop carries)."""
  p, name = eqn.params, eqn.primitive.name
  if name == "scan":
    nc, nk = scan_counts(p)  # jax 0.10 num_consts/num_carry, jax 0.11 ft_in
    return [None if nc <= i < nc + nk else i for i in range(n)]
  if name == "while":
    cn, bn = p["cond_nconsts"], p["body_nconsts"]
    if key == "cond_jaxpr":
      return [i if i < cn else None for i in range(n)]
    return [cn + i if i < bn else None for i in range(n)]
  if name == "cond":
    return [i + 1 for i in range(n)]
  if n == len(eqn.invars):  # calls and checkpoint: operands are the body's inputs
    return list(range(n))
  return [None] * n


def _rebuild(eqn, invals, hook: Hook, scope: tuple) -> list:
  tokens = [hook.carry_in(x) for x in invals]

  def retrace(closed, name, _is_open):
    src = _sources(eqn, name.split("[")[0], len(closed.jaxpr.invars))

    def body(*a):
      a = list(a)
      for j, s in enumerate(src):
        if s is not None and tokens[s] is not None:
          a[j] = hook.enter(tokens[s], a[j])
      return [hook.materialize(o) for o in evaluate(closed.jaxpr, closed.consts, a, hook, scope)]

    hook.depth += 1
    try:
      return jax.make_jaxpr(body)(*in_specs(closed.jaxpr))
    finally:
      hook.depth -= 1

  hoisted: list = []
  new = map_subjaxprs(eqn, retrace, hoisted)
  vals = [c for _, c in hoisted] + [hook.materialize(x) for x in invals]
  return bind_eqn(new, vals)
