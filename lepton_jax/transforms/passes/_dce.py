"""Dead-code elimination, including unused outputs and carries of sub-jaxprs.

Builds on JAX's own DCE rules (``jit``, ``cond``, ``scan``, ``custom_jvp``/``custom_vjp``,
``remat``, ``shard_map``) which prune unused outputs of those sub-jaxprs, and adds a
rule for ``while`` loops (unused loop carries that neither the predicate nor any used
carry depends on are removed) and recursion into every nested jaxpr.
"""

from __future__ import annotations

from lepton_jax.jaxpr import _compat as core
from lepton_jax.jaxpr._compat import pe
from lepton_jax.jaxpr._driver import Rewrite, count_eqns, location, map_subjaxprs
from lepton_jax.jaxpr._registry import subjaxpr_params

__all__ = ["dce"]


def _while_rule(used_outs: list[bool], eqn: core.JaxprEqn):
  """Drops loop carries that nothing used depends on."""
  body: core.ClosedJaxpr = eqn.params["body_jaxpr"]
  cond: core.ClosedJaxpr = eqn.params["cond_jaxpr"]
  cn, bn = eqn.params["cond_nconsts"], eqn.params["body_nconsts"]
  if pe.has_effects(eqn) or body.jaxpr.effects or cond.jaxpr.effects:
    return [True] * len(eqn.invars), eqn
  ncarry = len(eqn.outvars)
  _, cond_used = pe.dce_jaxpr(cond.jaxpr, [True])
  cond_used_carry = cond_used[cn:]
  used = [u or c for u, c in zip(used_outs, cond_used_carry)]
  while True:
    _, body_used = pe.dce_jaxpr(body.jaxpr, used)
    new_used = [u or b for u, b in zip(used, body_used[bn:])]
    if new_used == used:
      break
    used = new_used
  if all(used):
    return [True] * len(eqn.invars), eqn
  new_body, body_used = pe.dce_jaxpr(body.jaxpr, used, instantiate=[False] * bn + used)
  new_cond, cond_used = pe.dce_jaxpr(cond.jaxpr, [True], instantiate=[False] * cn + used)
  cused, bused = cond_used[:cn], body_used[:bn]
  invars = eqn.invars
  new_invars = ([v for v, u in zip(invars[:cn], cused) if u]
                + [v for v, u in zip(invars[cn:cn + bn], bused) if u]
                + [v for v, u in zip(invars[cn + bn:], used) if u])
  new_outvars = [v for v, u in zip(eqn.outvars, used) if u]
  params = dict(eqn.params,
                cond_jaxpr=core.ClosedJaxpr(new_cond, cond.consts),
                body_jaxpr=core.ClosedJaxpr(new_body, body.consts),
                cond_nconsts=sum(cused), body_nconsts=sum(bused))
  new_eqn = core.new_jaxpr_eqn(new_invars, new_outvars, eqn.primitive, params,
                               eqn.effects, eqn.source_info, eqn.ctx)
  used_ins = list(cused) + list(bused) + list(used)
  assert len(used_ins) == len(invars) and ncarry == len(used)
  return used_ins, new_eqn


def _dce_jaxpr(jaxpr: core.Jaxpr, used_outputs: list[bool], instantiate: list[bool],
               path: str, records: list[Rewrite]) -> tuple[core.Jaxpr, list[bool]]:
  env: dict = {}

  def write(x, b):
    if isinstance(x, core.Var) and not isinstance(x, core.DropVar):
      env[x] = env.get(x, False) or b

  for v, b in zip(jaxpr.outvars, used_outputs):
    write(v, b)
  new_eqns = []
  n = len(jaxpr.eqns)
  for i in range(n - 1, -1, -1):
    eqn = jaxpr.eqns[i]
    used_outs = [env.get(v, False) if not isinstance(v, core.DropVar) else False
                 for v in eqn.outvars]
    if eqn.primitive is core.while_p:
      rule = _while_rule
    else:
      rule = pe.dce_rules.get(eqn.primitive, pe._default_dce_rule)  # pylint: disable=protected-access
    used_ins, new_eqn = rule(used_outs, eqn)
    here = f"{path}{i}"
    if new_eqn is None:
      records.append(Rewrite("dce", f"dead_{eqn.primitive.name}", location(here, eqn),
                             1 + _sub_count(eqn)))
    else:
      if len(new_eqn.outvars) < len(eqn.outvars):
        records.append(Rewrite("dce", f"unused_outputs_of_{eqn.primitive.name}",
                               location(here, eqn), len(eqn.outvars) - len(new_eqn.outvars)))
      new_eqn = map_subjaxprs(
          new_eqn, lambda cj, name, _open, here=here: _dce_closed_all(cj, f"{here}/{name}/", records))
      new_eqns.append(new_eqn)
    for v, b in zip(eqn.invars, used_ins):
      write(v, b)
  used_inputs = [env.get(v, False) or inst for v, inst in zip(jaxpr.invars, instantiate)]
  invars = [v for v, b in zip(jaxpr.invars, used_inputs) if b]
  outvars = [v for v, b in zip(jaxpr.outvars, used_outputs) if b]
  new_jaxpr = jaxpr.replace(invars=invars, outvars=outvars, eqns=new_eqns[::-1])
  return new_jaxpr, used_inputs


def _sub_count(eqn) -> int:
  return sum(count_eqns(j) for _, _, j in subjaxpr_params(eqn))


def _dce_closed_all(closed: core.ClosedJaxpr, path: str, records: list[Rewrite]) -> core.ClosedJaxpr:
  """DCE of a nested jaxpr keeping its whole interface (all inputs and outputs)."""
  jaxpr = closed.jaxpr
  new, _ = _dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars), [True] * len(jaxpr.invars), path, records)
  if len(new.eqns) == len(jaxpr.eqns) and all(a is b for a, b in zip(new.eqns, jaxpr.eqns)):
    return closed
  return core.ClosedJaxpr(new, closed.consts)


def dce(closed: core.ClosedJaxpr, **_) -> tuple[core.ClosedJaxpr, list[Rewrite]]:
  """Removes equations whose results are never used (recursively, see module doc).

  Args:
    closed: the jaxpr to clean; its interface is kept.

  Returns:
    ``(new_closed_jaxpr, rewrites)``.

  >>> import jax, jax.numpy as jnp
  >>> cj = jax.make_jaxpr(lambda x: (jnp.sin(x), x * 2)[1])(1.0)
  >>> len(dce(cj)[0].jaxpr.eqns)
  1
  """
  records: list[Rewrite] = []
  new = _dce_closed_all(closed, "", records)
  # Records were appended walking backwards; report them in program order.
  records.reverse()
  return new, records
