"""Loop-invariant code motion: work in a ``scan``/``while`` body that does not depend on the loop
is computed once, before the loop, and passed in as a loop constant.

Why a pass of our own: XLA's while-loop invariant code motion hoists plain arithmetic and dots,
but measured on XLA:CPU (jax 0.10) it leaves in the loop body, recomputed every iteration,
random numbers drawn from a loop-invariant key (the threefry fusion) and tables built from
``iota`` (positional/RoPE ``sin``/``cos`` tables, masks) that fuse into a varying consumer. Here
the decision is made on the jaxpr: an equation of the body is *invariant* when every input is a
literal, a loop constant, or the output of an invariant equation; it is effect-free and
deterministic (``random_bits`` of a key is a pure function of the key; stateful RNG,
collectives, state and callbacks are never moved). Invariant equations that do work (FLOPs,
transcendentals, random bits, or nested calls that do) are hoisted together with the invariant
equations they read; cheap invariant layout work that only feeds the loop (a broadcast, an
``iota``) stays in the body so that no buffer grows for nothing. Loops that may run zero times
(``scan`` of length 0) are left alone.

Bottom-up through the driver: an inner loop's invariant work moves into the outer body first,
then out of the outer loop when it is invariant there too.
"""

from __future__ import annotations

from lepton_jax.jaxpr import _compat as core
from lepton_jax.jaxpr._driver import LevelBuilder, Rewrite, location, rewrite_nested
from lepton_jax.jaxpr._registry import local_flops, primitive_info, subjaxpr_params

__all__ = ["hoist"]

# Random primitives that are pure functions of their (key) inputs.
_PURE_RANDOM = frozenset("""random_bits random_wrap random_unwrap random_fold_in random_split
random_seed threefry2x32 iota_2x32_shape rng_bit_generator""".split())
_BAD_KINDS = frozenset({"effect", "collective", "state", "opaque", "other"})
# Invariant equations of these kinds are only hoisted when a hoisted equation needs them.
_CHEAP_KINDS = frozenset({"layout"})


def _movable(eqn) -> bool:
  """Effect-free and deterministic, here and in every nested jaxpr."""
  if eqn.effects:
    return False
  info = primitive_info(eqn)
  name = eqn.primitive.name
  if info.kind == "random":
    if name not in _PURE_RANDOM:
      return False
  elif info.kind in _BAD_KINDS:
    return False
  for _, _, sub in subjaxpr_params(eqn):
    j = getattr(sub, "jaxpr", sub)
    if j.effects or not all(_movable(e) for e in j.eqns):
      return False
  return True


def _does_work(eqn) -> bool:
  info = primitive_info(eqn)
  if info.kind == "random":
    return eqn.primitive.name in ("random_bits", "threefry2x32", "rng_bit_generator")
  if info.kind in _CHEAP_KINDS or info.view:
    return False
  flops, trans = local_flops(eqn)
  if flops + trans > 0:
    return True
  return any(_does_work(e) for _, _, sub in subjaxpr_params(eqn)
             for e in getattr(sub, "jaxpr", sub).eqns)


def _split_body(body: core.Jaxpr, nconsts: int):
  """``(hoisted_eqns, kept_eqns, boundary_vars)`` for a body whose first ``nconsts`` inputs are
  loop constants; ``boundary_vars`` are hoisted values the kept equations or outputs read."""
  invariant = set(body.invars[:nconsts])
  inv_eqns = []
  for idx, e in enumerate(body.eqns):
    if all(isinstance(a, core.Literal) or a in invariant for a in e.invars) and _movable(e):
      inv_eqns.append(idx)
      invariant.update(v for v in e.outvars if not isinstance(v, core.DropVar))
  if not inv_eqns:
    return None
  producer = {v: i for i in inv_eqns for v in body.eqns[i].outvars}
  take: set[int] = set()
  stack = [i for i in inv_eqns if _does_work(body.eqns[i])]
  while stack:
    i = stack.pop()
    if i in take:
      continue
    take.add(i)
    stack.extend(producer[a] for a in body.eqns[i].invars
                 if not isinstance(a, core.Literal) and a in producer)
  if not take:
    return None
  hoisted = [e for i, e in enumerate(body.eqns) if i in take]
  kept = [e for i, e in enumerate(body.eqns) if i not in take]
  defined = {v for e in hoisted for v in e.outvars}
  used = []
  seen = set()
  for a in [a for e in kept for a in e.invars] + list(body.outvars):
    if isinstance(a, core.Var) and a in defined and a not in seen:
      seen.add(a)
      used.append(a)
  return hoisted, kept, used


def _copy_out(hoisted, env: dict):
  """Copies ``hoisted`` equations with fresh variables, reading ``env`` (body var -> outer atom)."""
  out = []
  for e in hoisted:
    outs = []
    for v in e.outvars:
      if isinstance(v, core.DropVar):
        outs.append(core.DropVar(v.aval))
      else:
        env[v] = core.Var(v.aval)
        outs.append(env[v])
    out.append(e.replace(invars=[a if isinstance(a, core.Literal) else env[a] for a in e.invars],
                         outvars=outs))
  return out


def _hoist_scan(eqn):
  body: core.ClosedJaxpr = eqn.params["jaxpr"]
  if eqn.params["length"] == 0 or body.consts or body.jaxpr.constvars:
    return None
  nc = eqn.params["num_consts"]
  split = _split_body(body.jaxpr, nc)
  if split is None:
    return None
  hoisted, kept, used = split
  env = dict(zip(body.jaxpr.invars[:nc], eqn.invars[:nc]))
  outer = _copy_out(hoisted, env)
  new_body = body.jaxpr.replace(invars=list(used) + list(body.jaxpr.invars), eqns=kept)
  params = dict(eqn.params, jaxpr=core.ClosedJaxpr(new_body, ()), num_consts=nc + len(used))
  if "linear" in params:  # jax versions whose scan still carries per-operand linearity flags
    params["linear"] = (False,) * len(used) + tuple(params["linear"])
  new = eqn.replace(invars=[env[v] for v in used] + list(eqn.invars), params=params)
  return outer, new, len(hoisted)


def _hoist_while(eqn):
  body: core.ClosedJaxpr = eqn.params["body_jaxpr"]
  if body.consts or body.jaxpr.constvars:
    return None
  cn, bn = eqn.params["cond_nconsts"], eqn.params["body_nconsts"]
  split = _split_body(body.jaxpr, bn)
  if split is None:
    return None
  hoisted, kept, used = split
  env = dict(zip(body.jaxpr.invars[:bn], eqn.invars[cn:cn + bn]))
  outer = _copy_out(hoisted, env)
  new_body = body.jaxpr.replace(invars=list(used) + list(body.jaxpr.invars), eqns=kept)
  params = dict(eqn.params, body_jaxpr=core.ClosedJaxpr(new_body, ()), body_nconsts=bn + len(used))
  invars = list(eqn.invars[:cn]) + [env[v] for v in used] + list(eqn.invars[cn:])
  return outer, eqn.replace(invars=invars, params=params), len(hoisted)


def _hoist_level(closed: core.ClosedJaxpr, path: str, records: list[Rewrite]) -> core.ClosedJaxpr:
  b = LevelBuilder(closed)
  for i, eqn in enumerate(closed.jaxpr.eqns):
    eqn = b.read(eqn)
    name = eqn.primitive.name
    res = None
    if name == "scan" and not eqn.effects:
      res = _hoist_scan(eqn)
    elif name == "while" and not eqn.effects:
      res = _hoist_while(eqn)
    if res is None:
      b.emit(eqn)
      continue
    outer, new, n = res
    for e in outer:
      b.emit(e)
    b.emit(new, changed=True)
    kinds = sorted({e.primitive.name for e in outer if _does_work(e)})
    records.append(Rewrite("hoist", f"loop_invariant_{name}:{'+'.join(kinds)}",
                           location(f"{path}{i}", eqn), n))
  return b.build()


def hoist(closed: core.ClosedJaxpr, **_) -> tuple[core.ClosedJaxpr, list[Rewrite]]:
  """Moves loop-invariant work out of ``scan`` and ``while`` bodies (see module doc).

  Args:
    closed: the jaxpr to rewrite; its interface is kept.

  Returns:
    ``(new_closed_jaxpr, rewrites)``.

  >>> import jax, jax.numpy as jnp
  >>> def f(w, xs):
  ...   body = lambda c, x: (c + (x * jnp.sin(w)).sum(), None)
  ...   return jax.lax.scan(body, 0.0, xs)[0]
  >>> cj = jax.make_jaxpr(f)(jnp.ones(3), jnp.ones((5, 3)))
  >>> [r.pattern for r in hoist(cj)[1]]
  ['loop_invariant_scan:sin']
  """
  records: list[Rewrite] = []
  return rewrite_nested(closed, _hoist_level, records), records
