"""The one place where the training loop meets lepton_jax.

``config.transforms`` chooses which transforms are on; each switch is either the lepton_jax
piece or, when switched off, the plain-JAX equivalent. The start-up summary shows which:

=================  ==============================================  ==============================
switch             on: lepton_jax piece                            off: plain JAX
=================  ==============================================  ==============================
auto_shard         ``lj.auto_shard(step, mesh, strategy=...)``     ``jax.jit`` + NamedSharding DP
adaptive_jit       ``lj.adaptive_jit(step)`` (inside auto_shard)   ``jax.jit``
remat_budget       ``lj.remat_plan(loss, budget=...)``             no remat
pallas_kernels     ``lj.pallas_kernels.softmax_cross_entropy``     ``optax`` cross-entropy
checkpoint.tiered  ``lj.checkpoint.TieredCheckpointManager``       ``orbax.checkpoint.CheckpointManager``
=================  ==============================================  ==============================

>>> import ml_collections
>>> t = ml_collections.ConfigDict(dict(auto_shard=False, adaptive_jit=True, remat_budget="",
...                                    pallas_kernels=False))
>>> resolve(t)["adaptive_jit"].backend
'lepton_jax'
>>> resolve(t)["auto_shard"].backend
'off'
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P

import lepton_jax as lj

__all__ = ["Choice", "resolve", "checkpoint_choice", "make_mesh", "cross_entropy", "wrap_loss",
           "compile_step", "compile_eval", "CheckpointManager"]

_log = logging.getLogger("experiments.imagenet")


@dataclasses.dataclass(frozen=True)
class Choice:
  """What one ``config.transforms`` switch resolved to.

  Attributes:
    backend: ``"lepton_jax"`` (the toolkit piece runs) or ``"off"`` (the plain-JAX equivalent).
    detail: a short human-readable description for the start-up summary.
    impl: the toolkit callable when ``backend == "lepton_jax"``.
  """
  backend: str
  detail: str
  impl: Any = None


def _parse_budget(value) -> float | int | str | None:
  if value in (None, "", 0, 0.0, "none", "None", "off"):
    return None
  if isinstance(value, (int, float)):
    return value
  try:
    return float(value)
  except ValueError:
    return str(value)  # "512MiB" etc.; lj.remat_plan validates it


def resolve(transforms) -> dict[str, Choice]:
  """Resolves ``config.transforms`` into a :class:`Choice` per switch."""
  out = {}
  if transforms.auto_shard:
    strategy = transforms.get("shard_strategy", "dp")
    out["auto_shard"] = Choice("lepton_jax", f"lj.auto_shard(strategy={strategy!r})", lj.auto_shard)
  else:
    out["auto_shard"] = Choice("off", "jax.jit, batch sharded over all devices (NamedSharding)")

  if transforms.adaptive_jit:
    kernels = transforms.get("kernels", "auto")
    out["adaptive_jit"] = Choice("lepton_jax", f"lj.adaptive_jit(kernels={kernels!r})", lj.adaptive_jit)
  else:
    out["adaptive_jit"] = Choice("off", "jax.jit")

  budget = _parse_budget(transforms.remat_budget)
  if budget is None:
    out["remat_plan"] = Choice("off", "no rematerialisation")
  else:
    out["remat_plan"] = Choice("lepton_jax", f"lj.remat_plan(budget={budget!r})", (lj.remat_plan, budget))

  if transforms.pallas_kernels:
    out["pallas_kernels"] = Choice("lepton_jax", "lj.pallas_kernels.softmax_cross_entropy (loss)",
                                   lj.pallas_kernels.softmax_cross_entropy)
  else:
    out["pallas_kernels"] = Choice("off", "optax softmax cross-entropy")
  return out


def checkpoint_choice(ckpt_config) -> Choice:
  """``lj.checkpoint.TieredCheckpointManager`` when ``config.checkpoint.tiered``, else plain Orbax.

  ``config.checkpoint.enabled=False`` gives backend ``"none"``: nothing is saved or restored.
  """
  if not ckpt_config.get("enabled", True):
    return Choice("none", "disabled (config.checkpoint.enabled=False): no checkpoints, no resume")
  if ckpt_config.tiered:
    return Choice("lepton_jax", "lj.checkpoint.TieredCheckpointManager (local + persistent)",
                  lj.checkpoint.TieredCheckpointManager)
  return Choice("off", "orbax.checkpoint.CheckpointManager (single tier)")


def make_mesh() -> jax.sharding.Mesh:
  """A 1-D ``("data",)`` mesh over all devices of all processes."""
  devices = np.array(jax.devices())
  return jax.sharding.Mesh(devices, ("data",))


def cross_entropy(logits: jax.Array, labels: jax.Array, *, label_smoothing: float,
                  kernel: Callable | None = None) -> jax.Array:
  """Per-example label-smoothed softmax cross-entropy.

  ``(1 - e) * CE(logits, labels) + e * mean_k(-log_softmax(logits)_k)``; the first term uses the
  lepton_jax kernel when ``kernel`` is given (integer labels), the second needs only a
  logsumexp and a mean, so no one-hot matrix is ever materialised.

  >>> cross_entropy(jnp.zeros((2, 4)), jnp.array([0, 3]), label_smoothing=0.1).round(4)
  Array([1.3863, 1.3863], dtype=float32)
  """
  logits = logits.astype(jnp.float32)
  if kernel is not None:
    ce = kernel(logits, labels)
  else:
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  if not label_smoothing:
    return ce
  uniform = jax.nn.logsumexp(logits, axis=-1) - jnp.mean(logits, axis=-1)
  return (1.0 - label_smoothing) * ce + label_smoothing * uniform


def wrap_loss(loss_fn: Callable, choices: dict[str, Choice]) -> Callable:
  """Applies ``lj.remat_plan`` to the function that will be differentiated, when on."""
  c = choices["remat_plan"]
  if c.backend == "lepton_jax":
    remat_plan, budget = c.impl
    return remat_plan(loss_fn, budget=budget)
  return loss_fn


def compile_step(step_fn: Callable, choices: dict[str, Choice], *, mesh, state_sharding,
                 batch_sharding, transforms) -> Callable:
  """Compiles ``step_fn(state, images, labels) -> (state, metrics)`` with the chosen transforms.

  With ``auto_shard`` on, ``lj.auto_shard`` places the state and batch over ``mesh`` with
  ``config.transforms.shard_strategy`` (``"dp"``: state replicated, batch split over ``"data"``);
  with it off, ``jax.jit`` does the same data-parallel placement with explicit shardings. The state
  argument is donated either way.
  """
  fn = step_fn
  ajit = choices["adaptive_jit"]
  shard = choices["auto_shard"]
  if ajit.backend == "lepton_jax":
    fn = ajit.impl(fn, kernels=transforms.get("kernels", "auto"), donate_argnums=(0,))
  if shard.backend == "lepton_jax":
    return shard.impl(fn, mesh, strategy=transforms.get("shard_strategy", "dp"), donate_argnums=(0,))
  if ajit.backend == "lepton_jax":
    return _placed(fn, batch_sharding)
  replicated = NamedSharding(mesh, P())
  return jax.jit(fn, in_shardings=(state_sharding, batch_sharding, batch_sharding),
                 out_shardings=(state_sharding, replicated), donate_argnums=(0,))


def _placed(fn, batch_sharding):
  """Calls a jit-like ``fn`` on batches placed for data parallelism (adaptive_jit without auto_shard)."""
  def call(state, images, labels):
    images = jax.device_put(images, batch_sharding)
    labels = jax.device_put(labels, batch_sharding)
    return fn(state, images, labels)
  call.lower = fn.lower
  return call


def compile_eval(eval_fn: Callable, choices: dict[str, Choice], *, mesh, state_sharding,
                 batch_sharding) -> Callable:
  """Compiles ``eval_fn(state, images, labels, mask) -> sums``.

  ``lj.adaptive_jit`` when on (it keeps the shardings of its placed inputs), else ``jax.jit`` with
  the data-parallel shardings.
  """
  ajit = choices["adaptive_jit"]
  if ajit.backend == "lepton_jax":
    return ajit.impl(eval_fn)
  replicated = NamedSharding(mesh, P())
  return jax.jit(eval_fn, in_shardings=(state_sharding, batch_sharding, batch_sharding, batch_sharding),
                 out_shardings=replicated)


@contextlib.contextmanager
def _warnings_to_log():
  """Turns warnings raised inside (checkpoint fallbacks, lock take-overs) into log lines."""
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    try:
      yield
    finally:
      for w in caught:
        _log.warning("%s: %s", w.category.__name__, w.message)


class CheckpointManager:
  """Tiered lepton_jax checkpoints, or one plain Orbax ``CheckpointManager`` (``tiered=False``).

  States are saved as pure pytrees (dicts of arrays). ``restore`` needs an abstract target.

  Args:
    workdir: the run's directory; checkpoints go under ``workdir/checkpoints``.
    ckpt_config: ``config.checkpoint`` (``enabled``, ``local_every_steps``,
      ``persistent_every_steps``, ``keep_local``, ``keep_persistent``, ``async_save``, ``tiered``).
    choice: the :class:`Choice` from :func:`checkpoint_choice`.
  """

  def __init__(self, workdir: str, ckpt_config, choice: Choice):
    self.choice = choice
    self.tiered = choice.backend == "lepton_jax"
    root = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.local_every = int(ckpt_config.local_every_steps)
    self.persistent_every = int(ckpt_config.persistent_every_steps)
    if self.local_every < 1 or self.persistent_every < 1:
      raise ValueError("experiments.imagenet: config.checkpoint.local_every_steps and "
                       "persistent_every_steps must be >= 1, got "
                       f"{self.local_every} and {self.persistent_every}")
    self.every = min(self.local_every, self.persistent_every)
    self.enabled = choice.backend != "none"
    if not self.enabled:
      self.directory = "(none)"
      self._mgr = None
    elif self.tiered:
      keep_p = int(ckpt_config.keep_persistent) or None
      with _warnings_to_log():  # e.g. the lock of a crashed earlier process being taken over
        self._mgr = choice.impl(os.path.join(root, "local"), os.path.join(root, "persistent"),
                                local_every=self.local_every, persistent_every=self.persistent_every,
                                keep_local=int(ckpt_config.keep_local), keep_persistent=keep_p,
                                async_save=bool(ckpt_config.async_save))
      self.directory = root
    else:
      self.directory = os.path.join(root, "persistent")
      opts = ocp.CheckpointManagerOptions(max_to_keep=max(1, int(ckpt_config.keep_local)),
                                          enable_async_checkpointing=bool(ckpt_config.async_save),
                                          create=True)
      self._mgr = ocp.CheckpointManager(self.directory, options=opts)

  def should_save(self, step: int) -> bool:
    if not self.enabled:
      return False
    return step % self.local_every == 0 or step % self.persistent_every == 0

  def save(self, step: int, state, *, force: bool = False) -> bool:
    if not self.enabled:
      return False
    if self.tiered:
      return bool(self._mgr.save(step, state, force=force))
    if not force and not self.should_save(step):
      return False
    return bool(self._mgr.save(step, args=ocp.args.StandardSave(state), force=True))

  def latest_step(self) -> int | None:
    if not self.enabled:
      return None
    if not self.tiered:
      self._mgr.reload()
    return self._mgr.latest_step()

  def restore_newest(self, target):
    """The newest checkpoint whose data verifies, restored onto ``target``; ``None`` if there is none.

    With tiered checkpoints a damaged newest step is skipped (logged) in favour of the next newest
    valid one, in either tier.
    """
    if not self.enabled:
      return None
    if not self.tiered:
      self._mgr.reload()
      latest = self._mgr.latest_step()
      return None if latest is None else self._mgr.restore(latest, args=ocp.args.StandardRestore(target))
    if not self._mgr.all_steps():
      return None
    with _warnings_to_log():
      try:
        return self._mgr.restore(None, target=target)
      except ValueError as e:
        if "no valid checkpoint" not in str(e):
          raise
        raise ValueError(
            f"experiments.imagenet: every checkpoint in {self.directory} failed verification, so the "
            "run cannot resume. Move that directory away to start this run over (details below)."
            f"\n{e}") from None

  def restore(self, step: int, target):
    if self.tiered:
      return self._mgr.restore(step, target=target)
    return self._mgr.restore(step, args=ocp.args.StandardRestore(target))

  def wait(self):
    if not self.enabled:
      return
    if self.tiered:
      self._mgr.wait()
    else:
      self._mgr.wait_until_finished()

  def close(self):
    if not self.enabled:
      return
    self._mgr.close()
