"""Tracing a Python function to a closed jaxpr, with argument validation."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import numpy as np
from lepton_jax.jaxpr import _compat as jax_core

__all__ = ["Traced", "trace", "validate_args"]


@dataclasses.dataclass(frozen=True)
class Traced:
  """A function traced once to a closed jaxpr.

  Attributes:
    closed_jaxpr: the ``jax.extend.core.ClosedJaxpr`` over the flattened
      ``(args, kwargs)`` leaves.
    in_tree: treedef of ``(args, kwargs)``.
    out_tree: treedef of the output.
    in_avals: tuple of the input abstract values (one per leaf).
    out_avals: tuple of the output abstract values (one per leaf).
  """
  closed_jaxpr: Any
  in_tree: Any
  out_tree: Any
  in_avals: tuple
  out_avals: tuple

  @property
  def jaxpr(self):
    """The (open) ``Jaxpr`` of :attr:`closed_jaxpr`."""
    return self.closed_jaxpr.jaxpr

  def flatten_args(self, *args, **kwargs) -> list:
    """Flattens call arguments the way they were flattened when tracing."""
    leaves, tree = jax.tree_util.tree_flatten((args, kwargs))
    if tree != self.in_tree:
      raise TypeError(
          f"lepton_jax.jaxpr: arguments have structure {tree}, but the function was "
          f"traced with {self.in_tree}; trace again for the new structure")
    return leaves


def _path_str(path) -> str:
  """``(args, kwargs)`` key path -> ``args[0]['w']`` / ``kwargs['x']``."""
  if not path:
    return "args"
  head, rest = path[0], path[1:]
  idx = getattr(head, "idx", None)
  root = "args" if idx == 0 else "kwargs"
  return root + jax.tree_util.keystr(tuple(rest))


def _describe(x) -> str:
  r = repr(x)
  if len(r) > 60:
    r = r[:57] + "..."
  return f"{type(x).__name__} {r}"


def _is_leaked(tracer) -> bool:
  """A tracer whose trace is finished: invalidated, or met outside any transformation."""
  trace = getattr(tracer, "_trace", None)
  valid = getattr(trace, "is_valid", None)
  if valid is not None and not valid():
    return True
  current = getattr(jax_core.trace_ctx, "trace", None)
  chain = []
  t = current
  while t is not None and len(chain) < 10000:
    chain.append(t)
    t = getattr(t, "parent_trace", None)
  if any(t is trace for t in chain):
    return False
  # Outside of every transformation no tracer can be alive.
  return isinstance(current, jax_core.EvalTrace) or current is None


_SCALARS = (bool, int, float, complex, np.number, np.bool_)


def validate_args(args: tuple, kwargs: dict, *, api: str = "lepton_jax.jaxpr.trace") -> tuple[list, Any]:
  """Flattens ``(args, kwargs)`` and checks every leaf is an array-like.

  Valid leaves are ``jax.Array`` (and tracers of the *current* trace),
  ``numpy`` arrays and scalars, Python ``bool/int/float/complex`` and
  ``jax.ShapeDtypeStruct`` (traced abstractly).

  Returns:
    ``(leaves, in_tree)``.

  Raises:
    TypeError: a leaf is not an array (a string, ``object()``, a function, ...);
      the message names its path, e.g. ``args[1]['w']``.
    ValueError: a leaf is a tracer that leaked out of a finished transformation.
  """
  with_path, in_tree = jax.tree_util.tree_flatten_with_path((args, kwargs))
  leaves = []
  for path, x in with_path:
    where = _path_str(path)
    if isinstance(x, jax_core.Tracer):
      if _is_leaked(x):
        raise ValueError(
            f"{api}: argument {where} is a leaked tracer ({x.aval.str_short()}) from a "
            "jax transformation that has already finished (e.g. a value stored from inside "
            "jax.jit/jax.grad into a global or object attribute). Pass concrete arrays, or "
            "call this from inside the same transformation.")
      leaves.append(x)
      continue
    if isinstance(x, (jax.Array, np.ndarray, jax.ShapeDtypeStruct)) or isinstance(x, _SCALARS):
      leaves.append(x)
      continue
    if hasattr(x, "__jax_array__"):
      leaves.append(x)
      continue
    raise TypeError(
        f"{api}: argument {where} is a {_describe(x)}, which is not an array. Every leaf of the "
        "arguments must be a jax.Array, numpy array, Python/numpy scalar or jax.ShapeDtypeStruct. "
        "Bind non-array values with functools.partial (or a closure) before tracing, or make "
        "them pytree nodes / static fields.")
  return leaves, in_tree


def trace(fun: Callable, *args, **kwargs) -> Traced:
  """Traces ``fun(*args, **kwargs)`` to a closed jaxpr over the flattened leaves.

  Args:
    fun: a function of pytrees of arrays.
    *args: positional arguments (pytrees of arrays or ``jax.ShapeDtypeStruct``).
    **kwargs: keyword arguments (pytrees of arrays).

  Returns:
    A :class:`Traced`.

  Raises:
    TypeError: ``fun`` is not callable, or an argument leaf is not an array
      (the message names the argument path, such as ``args[0]['w']``), or the
      output contains non-array leaves.
    ValueError: an argument is a leaked tracer.

  >>> import jax.numpy as jnp
  >>> from lepton_jax import jaxpr as ljx
  >>> t = ljx.trace(lambda x: jnp.sin(x) * 2, jnp.ones(3))
  >>> [e.primitive.name for e in t.closed_jaxpr.jaxpr.eqns]
  ['sin', 'mul']
  """
  if not callable(fun):
    raise TypeError(f"lepton_jax.jaxpr.trace: fun must be callable, got {_describe(fun)}")
  leaves, in_tree = validate_args(args, kwargs)
  out_store = []

  def flat_fun(*flat):
    a, k = jax.tree_util.tree_unflatten(in_tree, flat)
    out = fun(*a, **k)
    out_with_path, out_tree = jax.tree_util.tree_flatten_with_path(out)
    for path, leaf in out_with_path:
      if not (isinstance(leaf, (jax.Array, np.ndarray, jax_core.Tracer)) or isinstance(leaf, _SCALARS)):
        raise TypeError(
            f"lepton_jax.jaxpr.trace: output{jax.tree_util.keystr(path)} of {getattr(fun, '__name__', fun)!r} "
            f"is a {_describe(leaf)}, not an array; return only pytrees of arrays")
    out_store.append(out_tree)
    return [leaf for _, leaf in out_with_path]

  closed = jax.make_jaxpr(flat_fun)(*leaves)
  return Traced(
      closed_jaxpr=closed,
      in_tree=in_tree,
      out_tree=out_store[-1],
      in_avals=tuple(v.aval for v in closed.jaxpr.invars),
      out_avals=tuple(closed.out_avals),
  )
