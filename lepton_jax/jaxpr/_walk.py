"""Walking closed jaxprs, including nested sub-jaxprs, with stable equation ids."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterator

import jax
import numpy as np
from jax._src import core as jax_core

__all__ = ["aval_bytes", "SubJaxpr", "sub_jaxprs", "EqnRef", "walk", "as_closed", "while_trip_count"]


def _aval_of(x):
  if isinstance(x, (jax_core.Var, jax_core.Literal)):
    return x.aval
  if isinstance(x, jax_core.AbstractValue):
    return x
  if hasattr(x, "aval") and isinstance(getattr(x, "aval"), jax_core.AbstractValue):
    return x.aval
  if isinstance(x, jax.ShapeDtypeStruct) or (hasattr(x, "shape") and hasattr(x, "dtype")):
    return jax_core.ShapedArray(tuple(x.shape), x.dtype)
  if isinstance(x, (bool, int, float, complex, np.number, np.bool_)):
    return jax_core.get_aval(x)
  raise TypeError(
      f"lepton_jax.jaxpr.aval_bytes: expected an abstract value, jaxpr Var/Literal, array or "
      f"ShapeDtypeStruct, got {type(x).__name__}")


def aval_bytes(x) -> int:
  """Bytes of an abstract value, jaxpr variable, literal or array.

  Non-array avals (tokens, refs to nothing) count as 0. Extended dtypes such as
  PRNG keys count their physical representation.

  >>> import jax.numpy as jnp
  >>> from lepton_jax import jaxpr as ljx
  >>> ljx.aval_bytes(jnp.ones((4, 8), jnp.float32))
  128
  """
  aval = _aval_of(x)
  shape = getattr(aval, "shape", None)
  dtype = getattr(aval, "dtype", None)
  if shape is None or dtype is None:
    inner = getattr(aval, "inner_aval", None)  # refs
    return aval_bytes(inner) if inner is not None else 0
  if jax.dtypes.issubdtype(dtype, jax.dtypes.extended):
    try:
      phys = jax_core.physical_aval(aval)
      return aval_bytes(phys)
    except Exception:  # pragma: no cover - exotic extended dtypes
      return 0
  try:
    itemsize = np.dtype(dtype).itemsize
  except TypeError:  # pragma: no cover
    itemsize = getattr(dtype, "itemsize", 0)
  n = 1
  for d in shape:
    n *= int(d) if isinstance(d, (int, np.integer)) else 1
  return int(n * itemsize)


def as_closed(j) -> jax_core.ClosedJaxpr:
  """Wraps an open ``Jaxpr`` as a ``ClosedJaxpr`` (no consts); passes closed ones through."""
  if isinstance(j, jax_core.ClosedJaxpr):
    return j
  if isinstance(j, jax_core.Jaxpr):
    return jax_core.ClosedJaxpr(j, ())
  raise TypeError(f"lepton_jax.jaxpr: expected a Jaxpr or ClosedJaxpr, got {type(j).__name__}")


@dataclasses.dataclass(frozen=True)
class SubJaxpr:
  """A jaxpr nested in an equation's params.

  Attributes:
    name: stable name within the equation (``"jaxpr"``, ``"call_jaxpr"``,
      ``"body_jaxpr"``, ``"cond_jaxpr"``, ``"branch0"``...).
    closed_jaxpr: the nested jaxpr as a ``ClosedJaxpr``.
    trip_count: how many times the body runs per execution of the equation:
      the scan length, a detected ``fori_loop`` trip count, the number of
      shards for ``shard_map``, 1 for calls, and ``None`` when unknown
      (a data-dependent ``while``).
    exclusive: ``True`` for ``cond`` branches (only one of them runs).
  """
  name: str
  closed_jaxpr: Any
  trip_count: int | None
  exclusive: bool = False


def _literal_int(atom):
  if isinstance(atom, jax_core.Literal):
    try:
      v = np.asarray(atom.val)
      if v.shape == () and np.issubdtype(v.dtype, np.integer):
        return int(v)
    except Exception:  # pragma: no cover
      return None
  return None


def while_trip_count(eqn) -> int | None:
  """Trip count of a ``while`` equation written as a counted loop, else ``None``.

  Detects ``fori_loop``-style loops: the condition is ``i < upper`` on a carry
  ``i`` that the body increments by a literal 1, with ``i``'s initial value and
  ``upper`` known literals (``upper`` either a literal in the condition or a
  carry the body passes through unchanged).
  """
  if eqn.primitive.name != "while":
    return None
  p = eqn.params
  cj, bj = p["cond_jaxpr"].jaxpr, p["body_jaxpr"].jaxpr
  cn, bn = p["cond_nconsts"], p["body_nconsts"]
  init = eqn.invars[cn + bn:]
  if len(cj.eqns) != 1 or cj.eqns[0].primitive.name not in ("lt", "ne"):
    return None
  ceqn = cj.eqns[0]
  if cj.outvars[0] is not ceqn.outvars[0]:
    return None
  cond_carry = cj.invars[cn:]
  lhs, rhs = ceqn.invars
  if lhs not in cond_carry:
    return None
  i = cond_carry.index(lhs)
  lower = _literal_int(init[i])
  if lower is None:
    return None
  if isinstance(rhs, jax_core.Literal):
    upper = _literal_int(rhs)
  elif rhs in cond_carry:
    j = cond_carry.index(rhs)
    body_carry_in = bj.invars[bn:]
    if bj.outvars[j] is not body_carry_in[j]:
      return None
    upper = _literal_int(init[j])
  else:
    return None
  if upper is None:
    return None
  body_in = bj.invars[bn:][i]
  out = bj.outvars[i]
  step_ok = False
  for e in bj.eqns:
    if e.outvars and e.outvars[0] is out and e.primitive.name == "add":
      a, b = e.invars
      if (a is body_in and _literal_int(b) == 1) or (b is body_in and _literal_int(a) == 1):
        step_ok = True
  if not step_ok:
    return None
  return max(0, upper - lower)


_CALL_KEYS = {
    "jit": ("jaxpr",), "pjit": ("jaxpr",), "closed_call": ("call_jaxpr",), "core_call": ("call_jaxpr",),
    "remat2": ("jaxpr",), "checkpoint": ("jaxpr",), "custom_jvp_call": ("call_jaxpr",),
    "custom_vjp_call": ("call_jaxpr",), "custom_vjp_call_jaxpr": ("fun_jaxpr",),
    "custom_lin": (), "shard_map": ("jaxpr",), "xla_call": ("call_jaxpr",),
    "custom_transpose_call": (), "run_state": ("jaxpr",),
}
_OPAQUE = {"pallas_call", "custom_lin", "custom_transpose_call"}


def _shard_count(eqn) -> int:
  mesh = eqn.params.get("mesh")
  axes = eqn.params.get("newly_manual_axes") or eqn.params.get("manual_axes")
  try:
    shape = dict(mesh.shape)
  except Exception:  # pragma: no cover
    return 1
  if axes is None:
    axes = shape.keys()
  return int(math.prod(shape[a] for a in axes if a in shape))


def sub_jaxprs(eqn) -> list[SubJaxpr]:
  """Jaxprs nested in ``eqn``'s params, with how many times each runs.

  Handles ``jit``/``pjit``, ``remat``/``checkpoint``, ``custom_jvp_call``,
  ``custom_vjp_call``, ``scan``, ``while``, ``cond``, ``shard_map``,
  ``closed_call`` and (generically) any other primitive whose params hold jaxprs.
  Only the primal computation of custom derivative rules is returned.

  >>> import jax, jax.numpy as jnp
  >>> from lepton_jax import jaxpr as ljx
  >>> j = jax.make_jaxpr(lambda x: jax.lax.scan(lambda c, x: (c + x, None), 0., x)[0])(jnp.ones(5))
  >>> [(s.name, s.trip_count) for s in ljx.sub_jaxprs(j.eqns[0])]
  [('jaxpr', 5)]
  """
  name = eqn.primitive.name
  p = eqn.params
  if name in _OPAQUE:
    return []
  if name == "scan":
    return [SubJaxpr("jaxpr", as_closed(p["jaxpr"]), int(p["length"]))]
  if name == "while":
    trip = while_trip_count(eqn)
    return [SubJaxpr("cond_jaxpr", as_closed(p["cond_jaxpr"]), None if trip is None else trip + 1),
            SubJaxpr("body_jaxpr", as_closed(p["body_jaxpr"]), trip)]
  if name == "cond":
    return [SubJaxpr(f"branch{i}", as_closed(b), 1, exclusive=True) for i, b in enumerate(p["branches"])]
  if name == "shard_map":
    return [SubJaxpr("jaxpr", as_closed(p["jaxpr"]), _shard_count(eqn))]
  if name in _CALL_KEYS:
    return [SubJaxpr(k, as_closed(p[k]), 1) for k in _CALL_KEYS[name]
            if isinstance(p.get(k), (jax_core.Jaxpr, jax_core.ClosedJaxpr))]
  out = []
  for k, v in p.items():
    vals = v if isinstance(v, tuple) else (v,)
    many = isinstance(v, tuple) and len(v) > 1
    for i, x in enumerate(vals):
      if isinstance(x, (jax_core.Jaxpr, jax_core.ClosedJaxpr)):
        out.append(SubJaxpr(f"{k}{i}" if many else k, as_closed(x), 1))
  return out


@dataclasses.dataclass(frozen=True)
class EqnRef:
  """One equation met by :func:`walk`.

  Attributes:
    id: stable id: the index in the top-level jaxpr (``"4"``), or a path into
      nested jaxprs (``"4/jaxpr/2"``, ``"7/branch1/0"``).
    eqn: the ``JaxprEqn``.
    jaxpr: the (open) ``Jaxpr`` that contains ``eqn``.
    depth: nesting depth (0 at top level).
    multiplier: product of the trip counts of the enclosing sub-jaxprs
      (scan lengths, detected loop counts, shard counts; unknown counts as 1).
  """
  id: str
  eqn: Any
  jaxpr: Any
  depth: int
  multiplier: int


def walk(closed_jaxpr, *, into_subjaxprs: bool = True) -> Iterator[EqnRef]:
  """Pre-order iterator over every equation, descending into nested jaxprs.

  Args:
    closed_jaxpr: a ``ClosedJaxpr`` or ``Jaxpr`` (or a :class:`Traced`).
    into_subjaxprs: ``False`` yields only the top-level equations.

  >>> import jax, jax.numpy as jnp
  >>> from lepton_jax import jaxpr as ljx
  >>> j = jax.make_jaxpr(lambda x: jax.jit(jnp.sin)(x) * 2)(jnp.ones(3))
  >>> [(r.id, r.eqn.primitive.name) for r in ljx.walk(j)]
  [('0', 'jit'), ('0/jaxpr/0', 'sin'), ('1', 'mul')]
  """
  if hasattr(closed_jaxpr, "closed_jaxpr") and not isinstance(closed_jaxpr, (jax_core.Jaxpr, jax_core.ClosedJaxpr)):
    closed_jaxpr = closed_jaxpr.closed_jaxpr
  jaxpr = as_closed(closed_jaxpr).jaxpr
  yield from _walk(jaxpr, "", 0, 1, into_subjaxprs)


def _walk(jaxpr, prefix, depth, mult, deep):
  for i, eqn in enumerate(jaxpr.eqns):
    eid = f"{prefix}{i}"
    yield EqnRef(eid, eqn, jaxpr, depth, mult)
    if deep:
      for sub in sub_jaxprs(eqn):
        trip = 1 if sub.trip_count is None else sub.trip_count
        yield from _walk(sub.closed_jaxpr.jaxpr, f"{eid}/{sub.name}/", depth + 1, mult * trip, deep)
