"""Optax optimizer state kept in host memory between steps."""

from __future__ import annotations

from typing import NamedTuple

import optax

from lepton_jax.offload._memory import to_device, to_host

__all__ = ["offload_optimizer"]


def offload_optimizer(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """Wraps ``tx`` so that its state lives in host memory (``pinned_host``) between steps.

  ``init`` returns the state in host memory; ``update`` streams the state to device,
  runs ``tx.update`` there and sends the new state back to host memory. Updates
  (and therefore parameters) are identical to ``tx``'s; only where the state lives
  changes, so device memory no longer holds the optimizer state between steps
  (for Adam: two copies of the parameters).

  Args:
    tx: any ``optax.GradientTransformation`` (``GradientTransformationExtraArgs`` too).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with the same updates.

  >>> import jax, jax.numpy as jnp, optax, lepton_jax as lj
  >>> tx = lj.offload.offload_optimizer(optax.adam(1e-3))
  >>> params = {"w": jnp.ones(3)}
  >>> state = tx.init(params)
  >>> updates, state = jax.jit(tx.update)(params, state, params)
  >>> state[0].mu["w"].sharding.memory_kind
  'pinned_host'
  """
  if not (hasattr(tx, "init") and hasattr(tx, "update")):
    raise TypeError(
        "lj.offload.offload_optimizer: tx must be an optax.GradientTransformation "
        f"(with .init and .update), got {type(tx).__name__}")

  def init_fn(params):
    return to_host(tx.init(params))

  def update_fn(updates, state, params=None, **extra_args):
    state = to_device(state)
    if extra_args:
      new_updates, new_state = tx.update(updates, state, params, **extra_args)
    else:
      new_updates, new_state = tx.update(updates, state, params)
    return new_updates, to_host(new_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
