"""The one place where the training loop meets lepton_jax (or its plain-JAX equivalents).

``config.transforms`` chooses what is on. Each switch uses the lepton_jax piece when the
installed package provides it, otherwise the plain-JAX equivalent, and says which in the
start-up summary, so the job runs with any subset of the toolkit:

=================  ==============================================  ==============================
switch             lepton_jax piece                                plain-JAX fallback
=================  ==============================================  ==============================
auto_shard         ``lj.auto_shard(step, mesh, strategy=...)``     ``jax.jit`` + NamedSharding DP
adaptive_jit       ``lj.adaptive_jit(step)`` (inside auto_shard)   ``jax.jit``
remat_budget       ``lj.remat_plan(loss, budget=...)``             no remat
pallas_kernels     ``lj.pallas_kernels.softmax_cross_entropy``     ``optax`` cross-entropy
checkpoint tiers   ``lj.checkpoint.TieredCheckpointManager``       ``orbax.checkpoint.CheckpointManager``
=================  ==============================================  ==============================

>>> import ml_collections
>>> t = ml_collections.ConfigDict(dict(auto_shard=False, adaptive_jit=False, remat_budget="",
...                                    pallas_kernels=False))
>>> resolve(t)["adaptive_jit"].backend
'off'
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

__all__ = ["Choice", "resolve", "make_mesh", "cross_entropy", "wrap_loss", "compile_step",
           "compile_eval", "CheckpointManager"]

_log = logging.getLogger("experiments.imagenet")


@dataclasses.dataclass(frozen=True)
class Choice:
  """What one ``config.transforms`` switch resolved to.

  Attributes:
    backend: ``"lepton_jax"``, ``"plain"`` (requested but the toolkit piece is missing, so the
      plain-JAX equivalent runs) or ``"off"``.
    detail: a short human-readable description for the start-up summary.
    impl: the toolkit callable / module when ``backend == "lepton_jax"``.
  """
  backend: str
  detail: str
  impl: Any = None


def _lj_attr(name: str):
  """``lepton_jax.<name>`` or ``None`` when that piece is not installed (yet)."""
  try:
    import lepton_jax as lj
  except ImportError:  # pragma: no cover - the package is installed with the experiments
    return None
  obj = getattr(lj, name, None)
  if obj is not None:
    return obj
  for mod in ("transforms", "sharding", "checkpoint", "pallas_kernels"):
    try:
      pkg = __import__(f"lepton_jax.{mod}", fromlist=[name])
    except ImportError:
      continue
    if name == mod:
      return pkg if getattr(pkg, "__all__", None) or dir(pkg) else None
    obj = getattr(pkg, name, None)
    if obj is not None:
      return obj
  return None


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
  shard = _lj_attr("auto_shard")
  if not transforms.auto_shard:
    out["auto_shard"] = Choice("off", "jax.jit, batch sharded over all devices (NamedSharding)")
  elif shard is not None:
    out["auto_shard"] = Choice("lepton_jax", f"lj.auto_shard(strategy={transforms.get('shard_strategy', 'dp')!r})", shard)
  else:
    out["auto_shard"] = Choice("plain", "lepton_jax.auto_shard not available: jax.jit + NamedSharding data parallel")

  ajit = _lj_attr("adaptive_jit")
  if not transforms.adaptive_jit:
    out["adaptive_jit"] = Choice("off", "jax.jit")
  elif ajit is not None:
    out["adaptive_jit"] = Choice("lepton_jax", f"lj.adaptive_jit(kernels={transforms.get('kernels', 'auto')!r})", ajit)
  else:
    out["adaptive_jit"] = Choice("plain", "lepton_jax.adaptive_jit not available: jax.jit")

  budget = _parse_budget(transforms.remat_budget)
  remat = _lj_attr("remat_plan")
  if budget is None:
    out["remat_plan"] = Choice("off", "no rematerialisation")
  elif remat is not None:
    out["remat_plan"] = Choice("lepton_jax", f"lj.remat_plan(budget={budget!r})", (remat, budget))
  else:
    out["remat_plan"] = Choice("plain", f"lepton_jax.remat_plan not available: budget={budget!r} ignored, no remat")

  kernels = _lj_attr("pallas_kernels")
  sce = getattr(kernels, "softmax_cross_entropy", None) if kernels is not None else None
  if not transforms.pallas_kernels:
    out["pallas_kernels"] = Choice("off", "optax softmax cross-entropy")
  elif sce is not None:
    out["pallas_kernels"] = Choice("lepton_jax", "lj.pallas_kernels.softmax_cross_entropy (loss)", sce)
  else:
    out["pallas_kernels"] = Choice("plain", "lepton_jax.pallas_kernels not available: optax cross-entropy")
  return out


def checkpoint_choice(ckpt_config) -> Choice:
  tiered = _lj_attr("TieredCheckpointManager")
  if not ckpt_config.tiered:
    return Choice("off", "orbax.checkpoint.CheckpointManager (single tier)")
  if tiered is not None:
    return Choice("lepton_jax", "lj.checkpoint.TieredCheckpointManager (local + persistent)", tiered)
  return Choice("plain", "lepton_jax.checkpoint not available: orbax.checkpoint.CheckpointManager (single tier)")


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

  The state is replicated and the batch split over the ``"data"`` axis (data parallel) unless
  ``lj.auto_shard`` chooses otherwise; the state argument is donated.
  """
  fn = step_fn
  ajit = choices["adaptive_jit"]
  shard = choices["auto_shard"]
  if ajit.backend == "lepton_jax":
    fn = ajit.impl(fn, kernels=transforms.get("kernels", "auto"), donate_argnums=(0,))
    if shard.backend != "lepton_jax":
      return _placed(fn, state_sharding, batch_sharding)
  if shard.backend == "lepton_jax":
    strategy = transforms.get("shard_strategy", "dp")
    if strategy == "dp" and mesh.devices.size == 1:
      # On one device data parallel *is* replication; lj.auto_shard(strategy="dp") rejects a
      # mesh whose only data axis has size 1, so ask for the equivalent placement.
      strategy = "replicate"
    return shard.impl(fn, mesh, strategy=strategy, donate_argnums=(0,))
  replicated = NamedSharding(mesh, P())
  return jax.jit(fn, in_shardings=(state_sharding, batch_sharding, batch_sharding),
                 out_shardings=(state_sharding, replicated), donate_argnums=(0,))


def _placed(fn, state_sharding, batch_sharding):
  """Calls a jit-like ``fn`` on inputs placed for data parallelism (adaptive_jit without auto_shard)."""
  def call(state, images, labels):
    images = jax.device_put(images, batch_sharding)
    labels = jax.device_put(labels, batch_sharding)
    return fn(state, images, labels)
  call.lower = fn.lower if hasattr(fn, "lower") else None
  return call


def compile_eval(eval_fn: Callable, choices: dict[str, Choice], *, mesh, state_sharding,
                 batch_sharding) -> Callable:
  """Compiles ``eval_fn(state, images, labels, mask) -> sums``; jit-like toolkit pieces apply."""
  ajit = choices["adaptive_jit"]
  if ajit.backend == "lepton_jax":
    return ajit.impl(eval_fn)
  replicated = NamedSharding(mesh, P())
  return jax.jit(eval_fn, in_shardings=(state_sharding, batch_sharding, batch_sharding, batch_sharding),
                 out_shardings=replicated)


class CheckpointManager:
  """Tiered checkpoints when ``lj.checkpoint`` is there, else one Orbax ``CheckpointManager``.

  States are saved as pure pytrees (dicts of arrays). ``restore`` needs an abstract target.

  Args:
    workdir: the run's directory; checkpoints go under ``workdir/checkpoints``.
    ckpt_config: ``config.checkpoint`` (``local_every_steps``, ``persistent_every_steps``,
      ``keep_local``, ``keep_persistent``, ``async_save``, ``tiered``).
    choice: the :class:`Choice` from :func:`checkpoint_choice`.
  """

  def __init__(self, workdir: str, ckpt_config, choice: Choice):
    self.choice = choice
    root = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.local_every = int(ckpt_config.local_every_steps)
    self.persistent_every = int(ckpt_config.persistent_every_steps)
    if self.local_every < 1 or self.persistent_every < 1:
      raise ValueError("experiments.imagenet: config.checkpoint.local_every_steps and "
                       "persistent_every_steps must be >= 1, got "
                       f"{self.local_every} and {self.persistent_every}")
    if choice.backend == "lepton_jax":
      keep_p = int(ckpt_config.keep_persistent) or None
      self._mgr = choice.impl(os.path.join(root, "local"), os.path.join(root, "persistent"),
                              local_every=self.local_every, persistent_every=self.persistent_every,
                              keep_local=int(ckpt_config.keep_local), keep_persistent=keep_p,
                              async_save=bool(ckpt_config.async_save))
      self.directory = root
      self.every = min(self.local_every, self.persistent_every)
    else:
      import orbax.checkpoint as ocp
      self.every = min(self.local_every, self.persistent_every)
      self.directory = os.path.join(root, "persistent")
      opts = ocp.CheckpointManagerOptions(max_to_keep=max(1, int(ckpt_config.keep_local)),
                                          enable_async_checkpointing=bool(ckpt_config.async_save),
                                          create=True)
      self._mgr = ocp.CheckpointManager(self.directory, options=opts)

  def should_save(self, step: int) -> bool:
    return step % self.local_every == 0 or step % self.persistent_every == 0

  def save(self, step: int, state, *, force: bool = False) -> bool:
    if self.choice.backend == "lepton_jax":
      return bool(self._mgr.save(step, state, force=force))
    import orbax.checkpoint as ocp
    if not force and not self.should_save(step):
      return False
    return bool(self._mgr.save(step, args=ocp.args.StandardSave(state), force=True))

  def latest_step(self) -> int | None:
    if self.choice.backend != "lepton_jax":
      self._mgr.reload()
    return self._mgr.latest_step()

  def restore(self, step: int, target):
    if self.choice.backend == "lepton_jax":
      return self._mgr.restore(step, target=target)
    import orbax.checkpoint as ocp
    return self._mgr.restore(step, args=ocp.args.StandardRestore(target))

  def wait(self):
    if self.choice.backend == "lepton_jax":
      self._mgr.wait()
    else:
      self._mgr.wait_until_finished()

  def close(self):
    self._mgr.close()
