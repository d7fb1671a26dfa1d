"""A small pattern matcher over jaxpr equations (dataflow sub-graphs with captures).

A pattern is a tree that follows dataflow backwards from a *root* equation:

>>> import jax, jax.numpy as jnp
>>> from lepton_jax import jaxpr as ljx
>>> P, C = ljx.Pattern, ljx.Capture
>>> softmax_num = P("exp", P("sub", C("x"), P("broadcast_in_dim", P("reduce_max", C("x")))))
>>> j = jax.make_jaxpr(lambda x: jnp.exp(x - x.max(-1, keepdims=True)))(jnp.ones((2, 3)))
>>> [sorted(m.captures) for m in ljx.find_matches(j, softmax_num)]
[['x']]
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

from lepton_jax.jaxpr import _compat as jax_core
from lepton_jax.jaxpr._defuse import DefUse

from lepton_jax.jaxpr._walk import as_closed

__all__ = ["Capture", "Pattern", "Match", "Rule", "find_matches"]


def _check_where(where, api):
  if where is not None and not callable(where):
    raise TypeError(f"{api}: where must be a callable predicate or None, got {where!r}")


class Capture:
  """Matches any operand (a variable or a literal) and binds it to ``name``.

  Using the same name twice requires both places to hold the *same* value.

  Args:
    name: capture name (a Python identifier: it becomes a keyword argument of
      a :class:`Rule`'s replacement).
    where: optional predicate on the operand's abstract value
      (``lambda aval: aval.ndim == 2``).
    literal: ``True`` to only match literal constants, ``False`` to only match
      variables, ``None`` for either.
  """

  def __init__(self, name: str, *, where: Callable[[Any], bool] | None = None, literal: bool | None = None):
    if not isinstance(name, str) or not name.isidentifier():
      raise ValueError(f"lepton_jax.jaxpr.Capture: name must be a Python identifier, got {name!r}")
    _check_where(where, "lepton_jax.jaxpr.Capture")
    self.name, self.where, self.literal = name, where, literal

  def __repr__(self):
    return f"Capture({self.name!r})"


class Pattern:
  """Matches an equation by primitive name, operands, shapes, params and a predicate.

  Args:
    primitive: a primitive name (``"exp"``), a tuple of alternatives
      (``("max", "reduce_max")``), or ``None`` for any primitive.
    *operands: one pattern per input of the equation: a :class:`Pattern`
      (the input must be produced by an equation matching it), a
      :class:`Capture`, or ``None`` (anything). With no operands, inputs are
      not constrained.
    shape: required output shape (a tuple; ``None`` entries match any size).
    dtype: required output dtype.
    params: ``{name: value_or_predicate}`` the equation's params must satisfy.
    where: predicate ``eqn -> bool`` for anything else.
    name: capture this equation's (first) output under ``name``.
    commutative: also try the two operands swapped (for ``add``, ``mul``...).
  """

  def __init__(self, primitive: str | tuple | None, *operands, shape=None, dtype=None,
               params: Mapping[str, Any] | None = None, where: Callable[[Any], bool] | None = None,
               name: str | None = None, commutative: bool = False):
    api = "lepton_jax.jaxpr.Pattern"
    if primitive is not None and not isinstance(primitive, (str, tuple)):
      raise TypeError(f"{api}: primitive must be a name, a tuple of names or None, got {primitive!r}")
    for o in operands:
      if o is not None and not isinstance(o, (Pattern, Capture)):
        raise TypeError(f"{api}: operands must be Pattern, Capture or None, got {type(o).__name__} {o!r}")
    if params is not None and not isinstance(params, Mapping):
      raise TypeError(f"{api}: params must be a mapping, got {params!r}")
    _check_where(where, api)
    if name is not None and (not isinstance(name, str) or not name.isidentifier()):
      raise ValueError(f"{api}: name must be a Python identifier, got {name!r}")
    if commutative and len(operands) != 2:
      raise ValueError(f"{api}: commutative=True needs exactly two operands, got {len(operands)}")
    self.primitive = (primitive,) if isinstance(primitive, str) else primitive
    self.operands, self.shape, self.dtype = operands, shape, dtype
    self.params, self.where, self.name, self.commutative = dict(params or {}), where, name, commutative

  def __repr__(self):
    prim = "*" if self.primitive is None else "|".join(self.primitive)
    return f"Pattern({prim}{''.join(', ' + repr(o) for o in self.operands)})"


@dataclasses.dataclass(frozen=True)
class Match:
  """One match of a pattern.

  Attributes:
    root: the equation matched by the outermost pattern.
    eqns: every matched equation (root last), in program order.
    captures: ``{name: Var or Literal}``.
    jaxpr: the jaxpr the match lives in.
    root_index: index of ``root`` in ``jaxpr.eqns``.
  """
  root: Any
  eqns: tuple
  captures: dict
  jaxpr: Any
  root_index: int

  @property
  def outputs(self) -> list:
    return list(self.root.outvars)

  def intermediates(self) -> set:
    """Variables defined inside the match other than the root's outputs."""
    return {v for e in self.eqns if e is not self.root for v in e.outvars}


def _same_atom(a, b) -> bool:
  if a is b:
    return True
  if isinstance(a, jax_core.Literal) and isinstance(b, jax_core.Literal):
    try:
      return a.aval == b.aval and bool((a.val == b.val).all() if hasattr(a.val, "all") else a.val == b.val)
    except Exception:  # pragma: no cover
      return False
  return False


def _shape_ok(want, got) -> bool:
  if want is None:
    return True
  want = tuple(want)
  return len(want) == len(got) and all(w is None or w == g for w, g in zip(want, got))


def _match_operand(pat, atom, producers, caps, eqns):
  if pat is None:
    return [(caps, eqns)]
  if isinstance(pat, Capture):
    is_lit = isinstance(atom, jax_core.Literal)
    if pat.literal is not None and pat.literal != is_lit:
      return []
    if pat.where is not None and not pat.where(atom.aval):
      return []
    if pat.name in caps:
      return [(caps, eqns)] if _same_atom(caps[pat.name], atom) else []
    c = dict(caps)
    c[pat.name] = atom
    return [(c, eqns)]
  if isinstance(atom, jax_core.Literal) or atom not in producers:
    return []
  return _match_eqn(pat, producers[atom], producers, caps, eqns)


def _match_eqn(pat, eqn, producers, caps, eqns):
  if pat.primitive is not None and eqn.primitive.name not in pat.primitive:
    return []
  out = eqn.outvars[0].aval if eqn.outvars else None
  if pat.shape is not None and (out is None or not _shape_ok(pat.shape, out.shape)):
    return []
  if pat.dtype is not None and (out is None or out.dtype != pat.dtype):
    return []
  for k, want in pat.params.items():
    if k not in eqn.params:
      return []
    got = eqn.params[k]
    ok = want(got) if callable(want) else got == want
    if not ok:
      return []
  if pat.where is not None and not pat.where(eqn):
    return []
  if pat.name is not None:
    if pat.name in caps and caps[pat.name] is not eqn.outvars[0]:
      return []
    caps = dict(caps)
    caps[pat.name] = eqn.outvars[0]
  eqns = eqns + (eqn,)
  if not pat.operands:
    return [(caps, eqns)]
  if len(pat.operands) != len(eqn.invars):
    return []
  orders = [pat.operands]
  if pat.commutative:
    orders.append(pat.operands[::-1])
  results = []
  for ops in orders:
    states = [(caps, eqns)]
    for op, atom in zip(ops, eqn.invars):
      states = [s for c, e in states for s in _match_operand(op, atom, producers, c, e)]
      if not states:
        break
    results.extend(states)
  return results


def find_matches(jaxpr, pattern: Pattern) -> list[Match]:
  """All matches of ``pattern`` rooted at equations of ``jaxpr`` (top level only).

  Sub-jaxprs are not searched; call this on ``SubJaxpr.closed_jaxpr`` to look
  inside. A root equation yields at most one match (the first found).

  Args:
    jaxpr: a ``ClosedJaxpr``, ``Jaxpr`` or :class:`Traced`.
    pattern: a :class:`Pattern`.

  Returns:
    Matches in program order of their roots.
  """
  if not isinstance(pattern, Pattern):
    raise TypeError(f"lepton_jax.jaxpr.find_matches: pattern must be a Pattern, got {type(pattern).__name__}")
  if hasattr(jaxpr, "closed_jaxpr") and not isinstance(jaxpr, (jax_core.Jaxpr, jax_core.ClosedJaxpr)):
    jaxpr = jaxpr.closed_jaxpr
  j = as_closed(jaxpr).jaxpr
  du = DefUse(j)
  producers = {v: j.eqns[i] for v, i in du.producers.items()}
  order = {id(e): i for i, e in enumerate(j.eqns)}
  out = []
  for i, eqn in enumerate(j.eqns):
    found = _match_eqn(pattern, eqn, producers, {}, ())
    if found:
      caps, eqns = found[0]
      uniq = {id(e): e for e in eqns}
      eqns = tuple(sorted(uniq.values(), key=lambda e: order[id(e)]))
      out.append(Match(eqn, eqns, caps, j, i))
  return out


@dataclasses.dataclass(frozen=True)
class Rule:
  """Replace the sub-graph matched by ``pattern`` with ``replacement(**captures)``.

  ``replacement`` receives the captured values (arrays, or tracers under a
  transformation) as keyword arguments and returns the values of the root
  equation's outputs (one array, or a sequence for multi-output primitives),
  with the same shapes and dtypes.

  >>> import jax, jax.numpy as jnp
  >>> from lepton_jax import jaxpr as ljx
  >>> rule = ljx.Rule(ljx.Pattern("tanh", ljx.Capture("x")), lambda x: 2 * jax.nn.sigmoid(2 * x) - 1)
  >>> f = ljx.rewrite(jnp.tanh, [rule])
  >>> bool(jnp.allclose(f(jnp.arange(3.)), jnp.tanh(jnp.arange(3.)), atol=1e-6))
  True
  """
  pattern: Pattern
  replacement: Callable[..., Any]
  name: str = ""

  def __post_init__(self):
    if not isinstance(self.pattern, Pattern):
      raise TypeError(f"lepton_jax.jaxpr.Rule: pattern must be a Pattern, got {type(self.pattern).__name__}")
    if not callable(self.replacement):
      raise TypeError(f"lepton_jax.jaxpr.Rule: replacement must be callable, got {self.replacement!r}")
