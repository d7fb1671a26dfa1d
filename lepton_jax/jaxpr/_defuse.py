"""The def-use index of one jaxpr level.

Role: for every variable of a jaxpr, the equation that defines it and the equations (and
outputs) that use it. Matchers (routing's attention/norm/cross-entropy recognisers, the public
:class:`Pattern` matcher, rule selection) and passes read this index instead of rebuilding their
own producer and user maps.
"""

from __future__ import annotations

from lepton_jax.jaxpr import _compat as jc

__all__ = ["DefUse", "OUTPUT"]

#: The "user" index that stands for the jaxpr's outputs.
OUTPUT = -1


class DefUse:
  """Producers and users of each variable of ``jaxpr`` (one level; sub-jaxprs are separate).

  >>> import jax, jax.numpy as jnp
  >>> j = jax.make_jaxpr(lambda x: (lambda s: s * s)(jnp.sin(x)))(1.0).jaxpr
  >>> du = DefUse(j)
  >>> du.producer(j.outvars[0]), du.users(j.eqns[0].outvars[0])
  (1, [1, 1])
  """

  __slots__ = ("jaxpr", "_producer", "_users")

  def __init__(self, jaxpr):
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    self.jaxpr = jaxpr
    self._producer: dict = {}
    self._users: dict = {}
    for i, e in enumerate(jaxpr.eqns):
      for v in e.outvars:
        if jc.is_var(v):
          self._producer[v] = i
      for a in e.invars:
        if isinstance(a, jc.Var):
          self._users.setdefault(a, []).append(i)
    for a in jaxpr.outvars:
      if isinstance(a, jc.Var):
        self._users.setdefault(a, []).append(OUTPUT)

  def producer(self, v) -> int | None:
    """Index of the equation defining ``v`` (None for inputs, consts and literals)."""
    return self._producer.get(v) if isinstance(v, jc.Var) else None

  def producer_eqn(self, v):
    i = self.producer(v)
    return None if i is None else self.jaxpr.eqns[i]

  def users(self, v) -> list[int]:
    """Indices of the equations reading ``v`` (with repeats), ``OUTPUT`` for a jaxpr output."""
    return self._users.get(v, []) if isinstance(v, jc.Var) else []

  def single_use(self, v, idx: int) -> bool:
    """``v`` is read exactly once, by equation ``idx``."""
    return self.users(v) == [idx]

  @property
  def producers(self) -> dict:
    """Var -> defining equation index (read-only view for matchers that need the map)."""
    return self._producer

  @property
  def uses(self) -> dict:
    """Var -> list of user indices (read-only view)."""
    return self._users
