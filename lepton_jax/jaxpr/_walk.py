"""Walking closed jaxprs, including nested sub-jaxprs, with stable equation ids.

Role: the read-only traversal of the core (``walk``) and byte sizes of avals; which params hold
sub-jaxprs and how often they run comes from the primitive registry (``_registry``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import jax
import numpy as np
from lepton_jax.jaxpr import _compat as jax_core
from lepton_jax.jaxpr._registry import SubJaxpr, as_closed, sub_jaxprs, while_trip_count

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
