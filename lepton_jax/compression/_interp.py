"""One evaluator for the compression transforms: re-evaluates a closed jaxpr, letting a hook
replace matmuls (``dot_general``) and convolutions (``conv_general_dilated``).

Recursion: ``jit``/``pjit``/``closed_call`` bodies are inlined; ``remat`` bodies are re-wrapped in
``jax.checkpoint`` with the same policy (or inlined when the hook asks); ``scan``/``while``/``cond``
are rebuilt with ``lax.scan``/``lax.while_loop``/``lax.switch`` around the re-evaluated bodies
(signatures are unchanged because every replacement returns the original output dtype).
``custom_jvp``/``custom_vjp`` calls and ``shard_map`` are re-bound unchanged: rewriting only the
primal body of a custom derivative would make value and derivative disagree.
"""

from __future__ import annotations

from typing import Any

import jax

from lepton_jax.jaxpr._compat import DropVar, Literal
from lepton_jax.jaxpr._eval import bind_eqn
from lepton_jax.jaxpr._walk import as_closed, sub_jaxprs

__all__ = ["MATMULS", "evaluate", "contains_matmul", "bind_eqn"]

MATMULS = ("dot_general", "conv_general_dilated")
_CALLS = ("jit", "pjit", "closed_call", "core_call")
_REMAT = ("remat2", "checkpoint", "remat")
_OPAQUE = ("custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr", "custom_lin", "shard_map")


def contains_matmul(closed) -> bool:
  """True when ``closed`` (or a jaxpr nested in it) has a dot_general / conv."""
  j = as_closed(closed).jaxpr
  for e in j.eqns:
    if e.primitive.name in MATMULS:
      return True
    if any(contains_matmul(s.closed_jaxpr) for s in sub_jaxprs(e)):
      return True
  return False


class Hook:
  """What a transform customises. ``scope`` is the tuple of enclosing call names."""

  recurse_control_flow = True
  keep_remat = True

  def matmul(self, eqn, invals: list, scope: tuple) -> Any:
    """Returns the output value of a matmul/conv equation, or ``None`` to bind it unchanged."""
    return None

  def materialize(self, x):
    """Turns a hook-private lazy value into an array before an ordinary equation uses it."""
    return x

  def passthrough(self, eqn, invals: list):
    """Returns a value for an equation that merely forwards a lazy value, else ``None``."""
    return None

  def opaque(self, eqn, scope: tuple) -> None:
    """Called for custom_jvp/custom_vjp/shard_map equations (bound unchanged)."""


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
    invals = [read(v) for v in eqn.invars]
    outs = _eval_eqn(eqn, invals, hook, scope)
    if eqn.primitive.multiple_results:
      for v, o in zip(eqn.outvars, outs):
        write(v, o)
    else:
      write(eqn.outvars[0], outs)
  return [read(v) for v in jaxpr.outvars]


def _eval_eqn(eqn, invals, hook: Hook, scope: tuple):
  name = eqn.primitive.name
  stack = str(eqn.source_info.name_stack)
  here = scope + ((stack,) if stack else ())
  if name in MATMULS:
    out = hook.matmul(eqn, invals, here)
    if out is not None:
      return out
  elif name in _CALLS:
    key = "jaxpr" if "jaxpr" in eqn.params else "call_jaxpr"
    inner = as_closed(eqn.params[key])
    if contains_matmul(inner):
      return evaluate(inner.jaxpr, inner.consts, invals, hook, here + (_scope_name(eqn),))
  elif name in _REMAT:
    inner = as_closed(eqn.params["jaxpr"])
    if contains_matmul(inner):
      if not hook.keep_remat:
        return evaluate(inner.jaxpr, inner.consts, invals, hook, here)
      p = eqn.params
      prevent = p.get("prevent_cse", True)
      prevent = prevent if isinstance(prevent, bool) else bool(all(prevent))
      invals = [hook.materialize(x) for x in invals]
      fn = lambda *a: evaluate(inner.jaxpr, inner.consts, a, hook, here)
      return list(jax.checkpoint(fn, policy=p.get("policy"), prevent_cse=prevent)(*invals))
  elif name in ("scan", "while", "cond") and hook.recurse_control_flow:
    if any(contains_matmul(s.closed_jaxpr) for s in sub_jaxprs(eqn)):
      invals = [hook.materialize(x) for x in invals]
      return _control_flow(eqn, invals, hook, here)
  elif name in _OPAQUE:
    if any(contains_matmul(s.closed_jaxpr) for s in sub_jaxprs(eqn)):
      hook.opaque(eqn, here)
  else:
    out = hook.passthrough(eqn, invals)
    if out is not None:
      return out
  invals = [hook.materialize(x) for x in invals]
  outs = bind_eqn(eqn, invals)
  return outs if eqn.primitive.multiple_results else outs[0]


def _control_flow(eqn, invals, hook, scope):
  name, p = eqn.primitive.name, eqn.params
  if name == "scan":
    body = as_closed(p["jaxpr"])
    nc, nk = p["num_consts"], p["num_carry"]
    consts, init, xs = invals[:nc], invals[nc:nc + nk], invals[nc + nk:]

    def step(carry, x):
      outs = evaluate(body.jaxpr, body.consts, [*consts, *carry, *x], hook, scope + ("scan",))
      return list(outs[:nk]), list(outs[nk:])

    carry, ys = jax.lax.scan(step, list(init), list(xs), length=p["length"], reverse=p["reverse"],
                             unroll=p["unroll"])
    return [*carry, *ys]
  if name == "while":
    cj, bj = as_closed(p["cond_jaxpr"]), as_closed(p["body_jaxpr"])
    cn, bn = p["cond_nconsts"], p["body_nconsts"]
    cconsts, bconsts, init = invals[:cn], invals[cn:cn + bn], invals[cn + bn:]

    def cond_fun(carry):
      return evaluate(cj.jaxpr, cj.consts, [*cconsts, *carry], hook, scope + ("while",))[0]

    def body_fun(carry):
      return list(evaluate(bj.jaxpr, bj.consts, [*bconsts, *carry], hook, scope + ("while",)))

    return list(jax.lax.while_loop(cond_fun, body_fun, list(init)))
  # cond
  branches = [as_closed(b) for b in p["branches"]]
  index, ops = invals[0], invals[1:]
  fns = [(lambda *a, b=b: list(evaluate(b.jaxpr, b.consts, a, hook, scope + ("cond",)))) for b in branches]
  return list(jax.lax.switch(index, fns, *ops))
