"""Constant folding: equations whose inputs are all known constants are evaluated once.

Results become literals (scalars) or new constants of the closed jaxpr (small arrays at
the top level only; nested jaxprs only receive scalar literals so their interface and
const layout stay unchanged). Effectful, random and control-flow equations are not
folded, nor results larger than ``max_elements``.
"""

from __future__ import annotations

import numpy as np

import jax
from lepton_jax.jaxpr import _compat as core

from lepton_jax.jaxpr._driver import known_consts, LevelBuilder, Rewrite, location, rewrite_nested
from lepton_jax.jaxpr._eval import bind_eqn
from lepton_jax.jaxpr._registry import primitive_info

__all__ = ["fold"]

_DEFAULT_MAX_ELEMENTS = 1 << 16
_EXPANDING = frozenset({"iota", "broadcast_in_dim"})


def _literal(val: np.ndarray, aval) -> core.Literal:
  return core.Literal(val, aval)


def _fold_jaxpr(closed: core.ClosedJaxpr, path: str, records: list[Rewrite],
                max_elements: int) -> core.ClosedJaxpr:
  top = path == ""   # nested jaxprs only get scalar literals (see below)
  jaxpr = closed.jaxpr
  known = known_consts(closed)
  b = LevelBuilder(closed)

  def value_of(a):
    a = b.atom(a)
    if isinstance(a, core.Literal):
      try:
        return np.asarray(a.val)
      except Exception:
        return None
    return known.get(a)

  for i, eqn in enumerate(jaxpr.eqns):
    here = f"{path}{i}"
    eqn = b.read(eqn)
    vals = [value_of(a) for a in eqn.invars]
    foldable = (
        all(v is not None for v in vals)
        # iota / broadcasts of known values: XLA materialises them for free inside fusions;
        # folding would only grow the executable's constants (and compile each shape eagerly).
        and not (eqn.primitive.name in _EXPANDING and top)
        and not eqn.effects
        and primitive_info(eqn).foldable
        and not any(isinstance(p, (core.ClosedJaxpr, core.Jaxpr)) for p in eqn.params.values())
        and all(hasattr(v.aval, "shape") and hasattr(v.aval, "dtype") for v in eqn.outvars)
        and all(np.issubdtype(np.dtype(v.aval.dtype), np.number) or v.aval.dtype == np.bool_
                for v in eqn.outvars if _is_numpy_dtype(v.aval.dtype))
        and all(_is_numpy_dtype(v.aval.dtype) for v in eqn.outvars)
        # Nested jaxprs only get scalar literals: an open sub-jaxpr (remat, custom_jvp,
        # ...) cannot take new consts, and closed ones keep their const layout.
        and all((int(np.prod(v.aval.shape)) <= max_elements) if top else (len(v.aval.shape) == 0)
                for v in eqn.outvars))
    if foldable:
      try:
        with jax.ensure_compile_time_eval():
          outs = bind_eqn(eqn, [jax.numpy.asarray(v) for v in vals])
        outs = [np.asarray(o) for o in outs]
      except Exception:  # an op we cannot evaluate eagerly: keep it
        outs = None
      if outs is not None and all(o.shape == v.aval.shape and o.dtype == v.aval.dtype
                                  for o, v in zip(outs, eqn.outvars)):
        for o, v in zip(outs, eqn.outvars):
          if isinstance(v, core.DropVar):
            continue
          if o.ndim == 0:
            b.alias(v, _literal(o, v.aval))
          else:
            cv = b.add_const(o, v.aval)
            known[cv] = o
            b.alias(v, cv)
        records.append(Rewrite("fold", f"constant_{eqn.primitive.name}", location(here, eqn), 1))
        continue
    b.emit(eqn)
  return b.build()


def _is_numpy_dtype(dt) -> bool:
  try:
    np.dtype(dt)
    return not jax.dtypes.issubdtype(dt, jax.dtypes.extended)
  except TypeError:
    return False


def fold(closed: core.ClosedJaxpr, *, max_elements: int = _DEFAULT_MAX_ELEMENTS, **_
         ) -> tuple[core.ClosedJaxpr, list[Rewrite]]:
  """Evaluates equations whose inputs are all constants (see module doc).

  Args:
    closed: the jaxpr to rewrite; its interface is kept.
    max_elements: largest folded result (elements) at the top level.

  Returns:
    ``(new_closed_jaxpr, rewrites)``.

  >>> import jax, jax.numpy as jnp
  >>> cj = jax.make_jaxpr(lambda x: x * (jnp.float32(2.0) + 3.0))(1.0)
  >>> [r.pattern for r in fold(cj)[1]]
  ['constant_add']
  """
  records: list[Rewrite] = []
  level = lambda cj, path, recs: _fold_jaxpr(cj, path, recs, max_elements)
  return rewrite_nested(closed, level, records), records
