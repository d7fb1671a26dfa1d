"""Algebraic simplification of a jaxpr (exact rewrites only, unless asked otherwise).

Rules (each reported under its pattern name):

- ``mul_by_one`` (x*1), ``div_by_one`` (x/1), ``add_zero`` (x+0, 0+x, x-0);
- ``mul_by_zero`` (x*0 -> 0) only with ``nan_unsafe=True``: it changes NaN/inf inputs;
- ``double_neg`` (-(-x)), ``double_transpose`` (merged or removed), ``identity_transpose``;
- ``double_broadcast`` (a broadcast of a broadcast is one broadcast);
- ``noop_convert`` (convert to the same dtype), ``roundtrip_convert`` (a float widened
  and narrowed back), ``noop_reshape``, ``noop_broadcast``, ``noop_squeeze``,
  ``noop_reduce`` (no axes), ``noop_copy``, ``select_same`` (select of one value);
- ``broadcast_then_reduce``: ``sum(broadcast(x))`` over exactly the broadcast axes is
  ``x * n``; ``max``/``min`` of it is ``x``.

Every rewrite keeps the replaced value's shape and dtype.
"""

from __future__ import annotations

import numpy as np

import jax
from lepton_jax.jaxpr import _compat as core

from lepton_jax.jaxpr._driver import (known_consts, LevelBuilder, Rewrite, location, rewrite_nested,
                                      trace_eqns)


def aval_equal(a, b) -> bool:
  """Same shape and dtype (weak types and shardings may differ)."""
  return (getattr(a, "shape", None) == getattr(b, "shape", None)
          and getattr(a, "dtype", None) == getattr(b, "dtype", None))

__all__ = ["simplify"]


def _const_value(a, known):
  if isinstance(a, core.Literal):
    try:
      return np.asarray(a.val)
    except Exception:
      return None
  return known.get(a)


def _all_equal(val, x) -> bool:
  if val is None:
    return False
  try:
    return val.size > 0 and bool(np.all(val == x))
  except Exception:
    return False


def _is_float(dt) -> bool:
  try:
    return jax.dtypes.issubdtype(dt, np.floating)
  except Exception:
    return False


def _exact_widening(orig, mid) -> bool:
  if not (_is_float(orig) and _is_float(mid)):
    return False
  fo, fm = jax.numpy.finfo(orig), jax.numpy.finfo(mid)
  return fm.nmant >= fo.nmant and fm.maxexp >= fo.maxexp and fm.minexp <= fo.minexp


def _simplify_jaxpr(closed: core.ClosedJaxpr, path: str, records: list[Rewrite], nan_unsafe: bool
                    ) -> core.ClosedJaxpr:
  top = path == ""
  jaxpr = closed.jaxpr
  known = known_consts(closed)
  lb = LevelBuilder(closed)
  producer: dict = {}

  for i, eqn in enumerate(jaxpr.eqns):
    here = f"{path}{i}"
    eqn = lb.read(eqn)
    name = eqn.primitive.name
    out = eqn.outvars[0] if len(eqn.outvars) == 1 else None
    alias = None     # an existing atom equal to the single output
    pattern = None
    replacement = None  # a replacement equation for the single output
    extra_eqns = []     # equations (traced by JAX) that compute ``alias``
    if out is not None and hasattr(out.aval, "shape") and not eqn.effects:
      ins = eqn.invars
      oa = out.aval
      if name == "mul" and len(ins) == 2:
        for a, b in ((ins[0], ins[1]), (ins[1], ins[0])):
          bv = _const_value(b, known)
          if _all_equal(bv, 1) and aval_equal(a.aval, oa):
            alias, pattern = a, "mul_by_one"
            break
          if nan_unsafe and _all_equal(bv, 0) and not np.iscomplexobj(bv):
            zeros = np.zeros(oa.shape, dtype=np.dtype(oa.dtype))
            if zeros.ndim == 0:
              alias, pattern = core.Literal(zeros, oa), "mul_by_zero"
              break
            if top and zeros.size <= (1 << 16):
              cv = lb.add_const(zeros, oa)
              known[cv] = zeros
              alias, pattern = cv, "mul_by_zero"
              break
      elif name == "div" and len(ins) == 2:
        if _all_equal(_const_value(ins[1], known), 1) and aval_equal(ins[0].aval, oa):
          alias, pattern = ins[0], "div_by_one"
      elif name in ("add", "add_any") and len(ins) == 2:
        for a, b in ((ins[0], ins[1]), (ins[1], ins[0])):
          if _all_equal(_const_value(b, known), 0) and aval_equal(a.aval, oa):
            alias, pattern = a, "add_zero"
            break
      elif name == "sub" and len(ins) == 2:
        if _all_equal(_const_value(ins[1], known), 0) and aval_equal(ins[0].aval, oa):
          alias, pattern = ins[0], "add_zero"
      elif name == "neg":
        p = _prod(producer, ins[0])
        if p is not None and p.primitive.name == "neg" and aval_equal(p.invars[0].aval, oa):
          alias, pattern = p.invars[0], "double_neg"
      elif name == "transpose":
        perm = tuple(eqn.params["permutation"])
        p = _prod(producer, ins[0])
        if perm == tuple(range(len(perm))) and aval_equal(ins[0].aval, oa):
          alias, pattern = ins[0], "identity_transpose"
        elif p is not None and p.primitive.name == "transpose":
          inner = tuple(p.params["permutation"])
          q = tuple(inner[j] for j in perm)
          x = p.invars[0]
          if q == tuple(range(len(q))) and aval_equal(x.aval, oa):
            alias, pattern = x, "double_transpose"
          else:
            replacement = eqn.replace(invars=[x], params=dict(eqn.params, permutation=q))
            pattern = "double_transpose"
      elif name == "convert_element_type":
        x = ins[0]
        if aval_equal(x.aval, oa):
          alias, pattern = x, "noop_convert"
        else:
          p = _prod(producer, x)
          if (p is not None and p.primitive.name == "convert_element_type"
              and aval_equal(p.invars[0].aval, oa)
              and _exact_widening(p.invars[0].aval.dtype, x.aval.dtype)):
            alias, pattern = p.invars[0], "roundtrip_convert"
      elif name == "reshape":
        if aval_equal(ins[0].aval, oa) and eqn.params.get("dimensions") in (None, ()):
          alias, pattern = ins[0], "noop_reshape"
      elif name == "broadcast_in_dim":
        bd = tuple(eqn.params["broadcast_dimensions"])
        p = _prod(producer, ins[0])
        if aval_equal(ins[0].aval, oa) and bd == tuple(range(len(oa.shape))):
          alias, pattern = ins[0], "noop_broadcast"
        elif (p is not None and p.primitive.name == "broadcast_in_dim" and len(p.invars) == 1
              and len(eqn.invars) == 1 and p.params.get("sharding") is None
              and eqn.params.get("sharding") is None):
          inner = tuple(p.params["broadcast_dimensions"])
          replacement = eqn.replace(invars=[p.invars[0]], params=dict(
              eqn.params, broadcast_dimensions=tuple(bd[d] for d in inner)))
          pattern = "double_broadcast"
      elif name == "squeeze":
        if not tuple(eqn.params["dimensions"]) and aval_equal(ins[0].aval, oa):
          alias, pattern = ins[0], "noop_squeeze"
      elif name == "copy" or name == "copy_p":
        if aval_equal(ins[0].aval, oa):
          alias, pattern = ins[0], "noop_copy"
      elif name == "select_n" and len(ins) >= 2:
        cases = ins[1:]
        if all(c is cases[0] for c in cases) and aval_equal(cases[0].aval, oa):
          alias, pattern = cases[0], "select_same"
      elif name in ("reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and",
                    "reduce_or"):
        axes = tuple(eqn.params["axes"])
        if not axes and aval_equal(ins[0].aval, oa):
          alias, pattern = ins[0], "noop_reduce"
        elif name in ("reduce_sum", "reduce_max", "reduce_min"):
          p = _prod(producer, ins[0])
          if p is not None and p.primitive.name == "broadcast_in_dim" and len(p.invars) == 1:
            x = p.invars[0]
            bd = tuple(p.params["broadcast_dimensions"])
            bshape = p.outvars[0].aval.shape
            new_dims = tuple(d for d in range(len(bshape)) if d not in bd)
            if (sorted(axes) == list(new_dims) and list(bd) == sorted(bd)
                and aval_equal(x.aval, oa)
                and all(x.aval.shape[j] == bshape[bd[j]] for j in range(len(bd)))):
              if name == "reduce_sum":
                n = int(np.prod([bshape[d] for d in new_dims]))
                dt = np.dtype(oa.dtype) if _numpy_ok(oa.dtype) else None
                if dt is not None and dt != np.bool_:
                  # Traced by JAX itself so the equation's params match the installed
                  # version's primitive (e.g. mul's ``out_dtype``).
                  traced = trace_eqns(lambda v, n=n: v * n, [x])
                  if traced is not None and aval_equal(traced[1][0].aval, oa) and (
                      getattr(traced[1][0].aval, "weak_type", False)
                      == getattr(oa, "weak_type", False)):
                    extra_eqns, (alias,) = traced
                    pattern = "broadcast_then_reduce"
              else:
                alias, pattern = x, "broadcast_then_reduce"
    if alias is not None:
      for e in extra_eqns:
        for v in e.outvars:
          producer[v] = e
      for e in extra_eqns:
        lb.emit(e)
      lb.alias(out, alias)
      records.append(Rewrite("simplify", pattern, location(here, eqn), 1))
      continue
    if replacement is not None:
      records.append(Rewrite("simplify", pattern, location(here, eqn), 1))
      eqn = replacement
    for v in eqn.outvars:
      producer[v] = eqn
    lb.emit(eqn, changed=replacement is not None)
  return lb.build()


def _prod(producer, a):
  return producer.get(a) if isinstance(a, core.Var) else None


def _numpy_ok(dt) -> bool:
  try:
    np.dtype(dt)
    return True
  except TypeError:
    return False


def simplify(closed: core.ClosedJaxpr, *, nan_unsafe: bool = False, **_
             ) -> tuple[core.ClosedJaxpr, list[Rewrite]]:
  """Applies the algebraic identities listed in the module doc.

  Args:
    closed: the jaxpr to rewrite; its interface is kept.
    nan_unsafe: also rewrite ``x * 0`` to ``0`` (wrong when ``x`` is NaN or inf).

  Returns:
    ``(new_closed_jaxpr, rewrites)``.

  >>> import jax, jax.numpy as jnp
  >>> cj = jax.make_jaxpr(lambda x: (x * 1.0).T.T)(jnp.ones((2, 3)))
  >>> sorted(r.pattern for r in simplify(cj)[1])
  ['double_transpose', 'mul_by_one']
  """
  records: list[Rewrite] = []
  level = lambda cj, path, recs: _simplify_jaxpr(cj, path, recs, nan_unsafe)
  return rewrite_nested(closed, level, records), records
