"""ResNet training and evaluation loop (Flax NNX + optax + lepton_jax).

``train_and_evaluate(config, workdir)`` is the whole job: it builds the data set and model,
compiles the step with the transforms chosen in ``config.transforms`` (and ``lj.mixed_precision``
when ``config.compression`` turns it on), resumes from the newest complete checkpoint in
``workdir`` (if any), trains with a progress bar, evaluates top-1/top-5 every epoch, optionally
prunes and finetunes and quantizes the result (``config.compression``, see ``compression.py``),
and writes ``workdir/metrics.jsonl``, TensorBoard events (``workdir/tensorboard``) and
``workdir/curves.png``.

>>> from experiments.configs import test as test_config
>>> final = train_and_evaluate(test_config.get_config(), "/tmp/doctest_workdir")  # doctest: +SKIP
>>> final["eval_top1"] > 0.5  # doctest: +SKIP
True
"""

from __future__ import annotations

import json
import logging as logging_std
import math
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import lepton_jax as lj

from experiments.imagenet import compression
from experiments.imagenet import input_pipeline
from experiments.imagenet import models
from experiments.imagenet import toolkit

__all__ = ["train_and_evaluate", "create_optimizer", "read_metrics", "plot_metrics"]

# Keys of metrics.jsonl records that depend on wall-clock time (everything else is a
# deterministic function of the config and seed, also across resumption).
TIMING_KEYS = ("steps_per_sec", "images_per_sec", "time")


def create_optimizer(config: ml_collections.ConfigDict, total_steps: int, steps_per_epoch: int, *,
                     schedule: optax.Schedule | None = None
                     ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """SGD + momentum or AdamW, linear warm-up then cosine decay, weight decay on kernels only.

  >>> import ml_collections
  >>> c = ml_collections.ConfigDict(dict(optimizer="sgd", learning_rate=0.1, momentum=0.9,
  ...     nesterov=True, weight_decay=1e-4, warmup_epochs=1.0))
  >>> tx, schedule = create_optimizer(c, total_steps=100, steps_per_epoch=10)
  >>> round(float(schedule(10)), 6)
  0.1
  """
  if schedule is None:
    warmup = int(round(config.warmup_epochs * steps_per_epoch))
    warmup = min(warmup, max(total_steps - 1, 0))
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.learning_rate, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=0.0)
  mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)  # noqa: E731
  if config.optimizer == "sgd":
    tx = optax.chain(optax.add_decayed_weights(config.weight_decay, mask),
                     optax.sgd(schedule, momentum=config.momentum, nesterov=config.nesterov))
  elif config.optimizer == "adamw":
    tx = optax.adamw(schedule, weight_decay=config.weight_decay, mask=mask)
  else:
    raise ValueError(f"experiments.imagenet: config.optimizer={config.optimizer!r} is not valid; "
                     "use 'sgd' or 'adamw'")
  return tx, schedule


def _topk_correct(logits, labels, k):
  k = min(k, logits.shape[-1])
  topk = jax.lax.top_k(logits, k)[1]
  return jnp.any(topk == labels[:, None], axis=-1).astype(jnp.float32)


def _make_steps(graphdef_train, graphdef_eval, tx, schedule, config, choices, *, mixed_precision=False,
                keep_zeros=None):
  """``(train_step, eval_step, forward)``.

  ``mixed_precision``: the loss and the eval forward run under ``lj.mixed_precision`` (bf16
  matmuls/convs, float32 accumulation). ``keep_zeros``: a bool tree of pruned leaves whose zero
  entries stay zero (masked finetuning after ``lj.prune``).
  """
  kernel = choices["pallas_kernels"].impl if choices["pallas_kernels"].backend == "lepton_jax" else None
  smoothing = float(config.label_smoothing)

  def loss_fn(params, batch_stats, images, labels):
    model = nnx.merge(graphdef_train, params, batch_stats)
    logits = model(images)
    loss = jnp.mean(toolkit.cross_entropy(logits, labels, label_smoothing=smoothing, kernel=kernel))
    new_stats = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
    return loss, (logits, new_stats)

  def forward(params, batch_stats, images):
    return nnx.merge(graphdef_eval, params, batch_stats)(images)

  if mixed_precision:
    loss_fn = lj.mixed_precision(loss_fn)
    run_forward = lj.mixed_precision(forward)
  else:
    run_forward = forward
  grad_fn = jax.value_and_grad(toolkit.wrap_loss(loss_fn, choices), has_aux=True)

  def train_step(state, images, labels):
    (loss, (logits, new_stats)), grads = grad_fn(state["params"], state["batch_stats"], images, labels)
    if keep_zeros is not None:
      masks = compression.masked(state["params"], keep_zeros)
      grads = lj.prune.apply_masks(grads, masks)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    if keep_zeros is not None:  # momentum / weight decay must not revive pruned weights
      params = lj.prune.apply_masks(params, masks)
    metrics = {
        "loss": loss,
        "top1": jnp.mean(_topk_correct(logits, labels, 1)),
        "top5": jnp.mean(_topk_correct(logits, labels, 5)),
        "grad_norm": optax.global_norm(grads),
        "lr": schedule(state["step"]),
    }
    new_state = {"step": state["step"] + 1, "params": params, "batch_stats": new_stats,
                 "opt_state": opt_state}
    return new_state, metrics

  def eval_step(state, images, labels, mask, forward=run_forward):
    logits = forward(state["params"], state["batch_stats"], images)
    loss = toolkit.cross_entropy(logits, labels, label_smoothing=0.0, kernel=kernel)
    return {"loss": jnp.sum(loss * mask),
            "top1": jnp.sum(_topk_correct(logits, labels, 1) * mask),
            "top5": jnp.sum(_topk_correct(logits, labels, 5) * mask),
            "count": jnp.sum(mask)}

  return train_step, eval_step, forward


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """The records of ``workdir/metrics.jsonl`` (a torn last line from a crash is skipped)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  out = []
  with open(path) as f:
    for line in f:
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return out


def _truncate_metrics(workdir: str, step: int) -> None:
  """Keeps only records at or before ``step`` (what the restored checkpoint had seen)."""
  # "compression" records summarise the end of a run and are always recomputed.
  kept = [r for r in read_metrics(workdir) if r["step"] <= step and r["split"] != "compression"]
  path = os.path.join(workdir, "metrics.jsonl")
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    for r in kept:
      f.write(json.dumps(r) + "\n")
  os.replace(tmp, path)


#: Config fields that do not change what a run computes: they may differ when a run is resumed.
RESUMABLE_FIELDS = ("debug_kill_at_step", "progress_bar", "plot", "num_workers", "prefetch", "max_steps",
                    "checkpoint.async_save")


def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
  return out


def claim_workdir(config: ml_collections.ConfigDict, workdir: str) -> bool:
  """Makes ``workdir`` this run's: writes ``config.json`` or checks it; returns whether it existed.

  A workdir belongs to one run. If it holds a ``config.json`` whose content differs from
  ``config`` in any field but :data:`RESUMABLE_FIELDS`, the run is refused (the message names
  the fields); nothing in the workdir is touched. A workdir with metrics or checkpoints but no
  ``config.json`` is refused too.

  Raises:
    ValueError: the workdir belongs to another run.
  """
  path = os.path.join(workdir, "config.json")
  mine = json.loads(config.to_json_best_effort())
  if os.path.exists(path):
    with open(path) as f:
      theirs = json.load(f)
    a, b = _flat(theirs), _flat(mine)
    diff = [k for k in sorted(set(a) | set(b)) if a.get(k, "<absent>") != b.get(k, "<absent>")
            and k not in RESUMABLE_FIELDS]
    if diff:
      shown = "; ".join(f"{k}: {a.get(k, '<absent>')!r} in the workdir, {b.get(k, '<absent>')!r} now"
                        for k in diff[:8]) + (f"; and {len(diff) - 8} more" if len(diff) > 8 else "")
      raise ValueError(
          f"experiments.imagenet: --workdir={workdir} belongs to another run (its config.json "
          f"differs: {shown}). A workdir holds one run; rerunning with the same config resumes it. "
          "Use a new --workdir for this config (nothing in the existing one was changed).")
    return True
  leftovers = [n for n in ("metrics.jsonl", "checkpoints") if os.path.exists(os.path.join(workdir, n))]
  if leftovers:
    raise ValueError(f"experiments.imagenet: --workdir={workdir} holds {', '.join(leftovers)} but no "
                     "config.json, so it cannot be told whether they belong to this config; use a new "
                     "--workdir (nothing in the existing one was changed)")
  if jax.process_index() == 0:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      f.write(config.to_json_best_effort(indent=2))
    os.replace(tmp, path)
  return False


def plot_metrics(records: list[dict[str, Any]], path: str, title: str = "") -> None:
  """Writes a PNG with the loss and accuracy curves (matplotlib, Agg back end)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  train = [r for r in records if r["split"] == "train"]
  ev = [r for r in records if r["split"] == "eval"]
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
  ax1.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss (smoothed labels)")
  ax1.plot([r["step"] for r in ev], [r["loss"] for r in ev], "o-", label="held-out loss")
  ax1.set_xlabel("step")
  ax1.set_ylabel("cross-entropy")
  ax1.set_yscale("log")
  ax1.legend()
  ax1.grid(alpha=0.3)
  ax2.plot([r["step"] for r in train], [r["top1"] for r in train], label="train top-1")
  ax2.plot([r["step"] for r in ev], [r["top1"] for r in ev], "o-", label="held-out top-1")
  ax2.plot([r["step"] for r in ev], [r["top5"] for r in ev], "s--", label="held-out top-5")
  ax2.set_xlabel("step")
  ax2.set_ylabel("accuracy")
  ax2.set_ylim(0, 1.01)
  ax2.legend(loc="lower right")
  ax2.grid(alpha=0.3)
  if ev:
    ax2.set_title(f"final held-out top-1 {ev[-1]['top1']:.2%}")
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


class _MetricsWriter:
  """metrics.jsonl + TensorBoard, written by process 0 only."""

  def __init__(self, workdir: str, purge_step: int | None):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.tb = None
    if self.enabled:
      try:
        from tensorboardX import SummaryWriter
        self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=purge_step)
      except ImportError:  # pragma: no cover - tensorboardX is a dependency
        logging.warning("tensorboardX is not installed; no TensorBoard event files")

  def write(self, record: dict[str, Any]) -> None:
    if not self.enabled:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
      f.flush()
      os.fsync(f.fileno())
    if self.tb is not None:
      for k, v in record.items():
        if k not in ("step", "split", "epoch") and isinstance(v, (int, float)):
          self.tb.add_scalar(f"{record['split']}/{k}", v, record["step"])
      self.tb.flush()

  def close(self):
    if self.tb is not None:
      self.tb.close()


class _QuietOrbax(logging_std.Filter):
  """Drops Orbax's per-save INFO chatter (warnings and errors still pass)."""

  def filter(self, record):
    return record.levelno > logging_std.INFO or "/orbax/" not in record.pathname


def _quiet_third_party_logs():
  for name in ("absl", ""):
    logger = logging_std.getLogger(name)
    if not any(isinstance(f, _QuietOrbax) for f in logger.filters):
      logger.addFilter(_QuietOrbax())


def _summary_table(rows: list[tuple[str, str]]) -> str:
  width = max(len(k) for k, _ in rows)
  lines = ["=" * 78, "experiments.imagenet: start-up summary"] + [
      f"  {k:<{width}}  {v}" for k, v in rows] + ["=" * 78]
  return "\n".join(lines)


def _evaluate(eval_fn, state, dataset, place):
  totals = None
  for images, labels, mask in dataset.eval_batches():
    sums = eval_fn(state, place(images), place(labels), place(mask))
    sums = jax.device_get(sums)
    totals = sums if totals is None else {k: totals[k] + sums[k] for k in totals}
  n = float(totals["count"])
  return {"loss": float(totals["loss"]) / n, "top1": float(totals["top1"]) / n,
          "top5": float(totals["top5"]) / n, "examples": int(n)}


def _checkpoint_on_interrupt(ckpt, state, workdir: str) -> None:
  """Ctrl-C: saves the state of the last finished step (both tiers) so the rerun resumes there."""
  if not ckpt.enabled:
    logging.warning("Interrupted; checkpoints are off (config.checkpoint.enabled=False), nothing saved.")
    return
  try:
    step = int(jax.device_get(state["step"]))
    ckpt.save(step, state, force=True)
    ckpt.wait()
    logging.warning("Interrupted: saved a checkpoint at step %d in %s. Rerun the same command "
                    "(same --workdir=%s and config) to resume from it.", step, ckpt.directory, workdir)
  except Exception as e:  # noqa: BLE001 - e.g. interrupted while the step held the donated state
    logging.warning("Interrupted; could not save the current step (%s: %s). Rerunning the same command "
                    "resumes from the newest checkpoint in %s.", type(e).__name__, e, ckpt.directory)


def _prune_state(state, plan, tx_ft, replicated, train_steps, ft_steps):
  """``lj.prune`` of the trained kernels; the finetune optimizer starts fresh (momentum reset)."""
  params, pruned, skipped = compression.prune_params(state["params"], plan)
  logging.info("Step %d: lj.prune(structure=%r, sparsity=%s) of %d kernels%s; finetuning %d steps with the "
               "masks kept.", train_steps, plan.prune, plan.sparsity, len(pruned),
               f" ({len(skipped)} left dense: {', '.join(skipped)})" if skipped else "", ft_steps)
  state = dict(state, params=params)
  if tx_ft is not None:
    state["opt_state"] = tx_ft.init(params)
  return jax.device_put(state, replicated)


def _eval_record_at(workdir: str, step: int) -> dict[str, Any] | None:
  for r in read_metrics(workdir):
    if r["split"] == "eval" and r["step"] == step:
      return r
  return None


def _compression_results(plan, state, last_eval, prunable, train_steps, ft_steps, workdir, forward,
                         eval_step, dataset, place) -> dict[str, Any] | None:
  """Top-1 before/after pruning + finetuning and post-training quantization (``None``: both off)."""
  if not (plan.prune or plan.quantize) or last_eval is None:
    return None
  out: dict[str, Any] = {"mixed_precision": plan.mixed_precision}
  if plan.prune:
    before = _eval_record_at(workdir, train_steps)
    out.update(prune=plan.prune, finetune_steps=ft_steps,
               top1_before_prune=None if before is None else before["top1"],
               top1_after_finetune=last_eval["top1"],
               **compression.pruned_stats(state["params"], prunable, plan.prune))
  if plan.quantize:
    freeze, q_forward = compression.quantized_eval(forward, plan)
    frozen = freeze(state["params"])
    before_b, after_b = compression.weight_bytes(frozen)
    q_eval = jax.jit(lambda st, x, y, m: eval_step(st, x, y, m, forward=q_forward))
    ev = _evaluate(q_eval, {"params": frozen, "batch_stats": state["batch_stats"]}, dataset, place)
    out.update(quantize=plan.quantize, weight_bytes_before=before_b, weight_bytes_after=after_b,
               weight_compression=before_b / after_b if after_b else None,
               top1_before_quantize=last_eval["top1"], top1_after_quantize=ev["top1"],
               loss_before_quantize=last_eval["loss"], loss_after_quantize=ev["loss"])
  return out


def _compression_line(plan, comp) -> str:
  parts = [f"mixed precision {'bf16' if plan.mixed_precision else 'off'}"]
  if comp and plan.prune:
    b = comp["top1_before_prune"]
    parts.append(f"{plan.prune} pruning (sparsity {comp['sparsity']:.2f}): top-1 "
                 f"{'?' if b is None else f'{100 * b:.2f}%'} -> {100 * comp['top1_after_finetune']:.2f}% "
                 f"after {comp['finetune_steps']} finetune steps")
  if comp and plan.quantize:
    parts.append(f"{plan.quantize} weights ({comp['weight_compression']:.2f}x fewer weight bytes): top-1 "
                 f"{100 * comp['top1_before_quantize']:.2f}% -> {100 * comp['top1_after_quantize']:.2f}%")
  return "; compression: " + "; ".join(parts)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains and evaluates; resumes automatically from the newest complete checkpoint.

  Args:
    config: see ``experiments/configs/default.py``.
    workdir: directory for checkpoints, ``metrics.jsonl``, TensorBoard events and the plot.

  Returns:
    The final held-out metrics ``{"step", "eval_loss", "eval_top1", "eval_top5", "resumed_from"}``.
  """
  t_start = time.time()
  _quiet_third_party_logs()
  plan = compression.resolve(config)  # config.compression checked before anything is written
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  claim_workdir(config, workdir)  # before anything is written: another run's workdir is refused
  mesh = toolkit.make_mesh()
  n_dev = mesh.devices.size
  if config.batch_size % n_dev or config.eval_batch_size % n_dev:
    raise ValueError(f"experiments.imagenet: config.batch_size={config.batch_size} and "
                     f"config.eval_batch_size={config.eval_batch_size} must be divisible by the "
                     f"{n_dev} devices (data parallel); pick multiples of {n_dev}")

  dataset = input_pipeline.load_dataset(
      data_dir=config.data_dir, fake_data=config.fake_data, image_size=config.image_size,
      batch_size=config.batch_size, eval_batch_size=config.eval_batch_size,
      num_classes=config.num_classes, seed=config.seed, num_workers=config.num_workers,
      fake_steps_per_epoch=config.fake_steps_per_epoch, process_index=jax.process_index(),
      process_count=jax.process_count())
  steps_per_epoch = dataset.steps_per_epoch
  schedule_steps = max(int(config.num_epochs * steps_per_epoch), 1)
  total_steps = schedule_steps  # max_steps stops early without changing the schedule
  if config.max_steps > 0:
    total_steps = min(total_steps, int(config.max_steps))
  # Prune-and-finetune: the main training ends at train_steps, lj.prune runs there, and the
  # masked finetuning continues the step count up to total_steps.
  train_steps = total_steps
  ft_steps = int(round(plan.finetune_epochs * steps_per_epoch)) if plan.prune else 0
  total_steps = train_steps + ft_steps

  model = models.create_model(config.model, num_classes=dataset.num_classes,
                              num_filters=config.num_filters, stage_sizes=config.stage_sizes,
                              stem=config.stem, image_size=config.image_size, dtype=config.dtype,
                              seed=config.seed)
  n_params, param_bytes = models.count_params(model)
  model.train()
  graphdef_train = nnx.graphdef(model)
  model.eval()
  graphdef_eval, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  params, batch_stats = nnx.to_pure_dict(params), nnx.to_pure_dict(batch_stats)
  del model

  tx, schedule = create_optimizer(config, schedule_steps, steps_per_epoch)
  choices = toolkit.resolve(config.transforms)
  ckpt_choice = toolkit.checkpoint_choice(config.checkpoint)

  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P("data"))
  state = {"step": jnp.zeros((), jnp.int32), "params": params, "batch_stats": batch_stats,
           "opt_state": tx.init(params)}
  state = jax.device_put(state, replicated)
  state_sharding = jax.tree.map(lambda _: replicated, state)

  train_step, eval_step, forward = _make_steps(graphdef_train, graphdef_eval, tx, schedule, config, choices,
                                               mixed_precision=plan.mixed_precision)
  p_train = toolkit.compile_step(train_step, choices, mesh=mesh, state_sharding=state_sharding,
                                 batch_sharding=batch_sharding, transforms=config.transforms)
  p_finetune = tx_ft = None
  prunable = compression.prunable_tree(params, plan.prune) if plan.prune else None
  if plan.prune and ft_steps:
    # The same optimizer (so the checkpointed state keeps its structure), restarted at
    # learning_rate * finetune_lr_scale with a cosine decay to 0 over the finetune steps.
    tx_ft, ft_schedule = create_optimizer(
        config, ft_steps, steps_per_epoch,
        schedule=optax.cosine_decay_schedule(config.learning_rate * plan.finetune_lr_scale, ft_steps))
    ft_step, _, _ = _make_steps(graphdef_train, graphdef_eval, tx_ft,
                                lambda s: ft_schedule(s - train_steps), config, choices,
                                mixed_precision=plan.mixed_precision, keep_zeros=prunable)
    p_finetune = toolkit.compile_step(ft_step, choices, mesh=mesh, state_sharding=state_sharding,
                                      batch_sharding=batch_sharding, transforms=config.transforms)
  p_eval = toolkit.compile_eval(eval_step, choices, mesh=mesh, state_sharding=state_sharding,
                                batch_sharding=batch_sharding)

  def place(x):
    return jax.make_array_from_process_local_data(batch_sharding, np.asarray(x))

  # ---- Resume -----------------------------------------------------------------------------
  ckpt = toolkit.CheckpointManager(workdir, config.checkpoint, ckpt_choice)
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  restored = ckpt.restore_newest(target)  # the newest checkpoint that verifies, or None
  resumed_from = None
  if restored is not None:
    state = restored
    resumed_from = int(jax.device_get(state["step"]))
    _truncate_metrics(workdir, resumed_from)  # records after it are recomputed identically
  elif jax.process_index() == 0 and os.path.exists(os.path.join(workdir, "metrics.jsonl")):
    _truncate_metrics(workdir, -1)  # this run (same config) crashed before its first checkpoint
  start_step = int(jax.device_get(state["step"]))

  devices = jax.devices()
  rows = [
      ("workdir", workdir),
      ("devices", f"{len(devices)} x {devices[0].device_kind} ({jax.default_backend()}), "
                  f"{jax.process_count()} process(es); mesh {dict(mesh.shape)}"),
      ("data", dataset.description),
      ("model", f"{config.model} (width {config.num_filters or 64}, stages "
                f"{tuple(config.stage_sizes) or models.MODEL_SPECS[config.model][0]}), {n_params:,} "
                f"params ({param_bytes / 2**20:.1f} MiB), compute dtype {config.dtype}"),
      ("optimizer", f"{config.optimizer} lr {config.learning_rate} warmup {config.warmup_epochs} ep "
                    f"+ cosine, wd {config.weight_decay}, label smoothing {config.label_smoothing}"),
      ("schedule", f"batch {config.batch_size} ({config.batch_size // n_dev}/device), "
                   f"{steps_per_epoch} steps/epoch, {train_steps} steps ({config.num_epochs} epochs)"
                   + (f" + {ft_steps} finetune steps after pruning" if plan.prune else "")),
  ] + [(f"transform {k}", f"[{c.backend}] {c.detail}") for k, c in choices.items()] + [
      (f"compression {k}", v) for k, v in plan.summary()] + [
      ("checkpoints", f"[{ckpt_choice.backend}] {ckpt_choice.detail}" + (
          f"; every {ckpt.local_every}/{ckpt.persistent_every} steps -> {ckpt.directory}"
          if ckpt.enabled else "")),
      ("evaluation", "held-out top-1/top-5 every epoch" if config.get("evaluate", True)
                     else "off (config.evaluate=False)"),
      ("resume", f"Resuming from step {resumed_from}" if resumed_from is not None
                 else "no checkpoint found: starting from step 0"),
  ]
  logging.info("\n%s", _summary_table(rows))
  if resumed_from is not None:
    logging.info("Resuming from step %d (newest complete checkpoint in %s)", resumed_from, ckpt.directory)

  writer = _MetricsWriter(workdir, purge_step=start_step + 1 if resumed_from is not None else None)
  prefetch = input_pipeline.Prefetcher(dataset.train_batch, start=start_step, depth=config.prefetch)
  from tqdm import tqdm
  bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
             disable=not config.progress_bar or jax.process_index() != 0, desc="train")
  last_eval = None
  do_eval = bool(config.get("evaluate", True))
  final_step = start_step
  window: list[dict] = []
  window_start = time.perf_counter()
  window_steps = 0
  images_per_step = config.batch_size
  try:
    if start_step >= total_steps:
      logging.info("Training already complete (step %d of %d)%s.", start_step, total_steps,
                   "; evaluating the restored state" if do_eval else "")
    for step in range(start_step, total_steps):
      if step == train_steps and plan.prune:  # the main training is done: prune, then finetune
        state = _prune_state(state, plan, tx_ft, replicated, train_steps, ft_steps)
      images, labels = prefetch.get(step)
      step_fn = p_train if step < train_steps else p_finetune
      state, metrics = step_fn(state, place(images), place(labels))
      window.append(metrics)
      window_steps += 1
      s = step + 1
      epoch_end = s % steps_per_epoch == 0 or s == total_steps or s == train_steps
      save_now = ckpt.enabled and (ckpt.should_save(s) or s in (train_steps, total_steps))
      if s % config.log_every_steps == 0 or epoch_end or save_now:
        host = jax.device_get(window)
        elapsed = time.perf_counter() - window_start
        rec = {"step": s, "split": "train", "epoch": s / steps_per_epoch}
        for k in host[0]:
          rec[k] = float(np.mean([h[k] for h in host]))
        rec.update(steps_per_sec=window_steps / elapsed, images_per_sec=window_steps * images_per_step / elapsed,
                   time=time.time() - t_start)
        writer.write(rec)
        bar.set_postfix(loss=f"{rec['loss']:.3f}", img_s=f"{rec['images_per_sec']:.0f}",
                        refresh=False)
        window, window_steps, window_start = [], 0, time.perf_counter()
      if epoch_end and do_eval:
        ev = _evaluate(p_eval, state, dataset, place)
        last_eval = {"step": s, "split": "eval", "epoch": s / steps_per_epoch, **ev,
                     "time": time.time() - t_start}
        writer.write(last_eval)
        bar.write(f"epoch {s / steps_per_epoch:5.2f}  step {s:6d}  held-out top-1 {ev['top1']:.2%}  "
                  f"top-5 {ev['top5']:.2%}  loss {ev['loss']:.4f}")
        window_start = time.perf_counter()
      if save_now:
        ckpt.save(s, state, force=s in (train_steps, total_steps))  # intervals honoured; phase ends durable
        if s == config.debug_kill_at_step:  # testing: a hard crash, possibly mid-save
          os.kill(os.getpid(), signal.SIGKILL)
      final_step = s
      bar.update(1)
    if plan.prune and not ft_steps:  # pruning without finetuning: prune the final weights
      state = _prune_state(state, plan, None, replicated, train_steps, 0)
      last_eval = None
    if last_eval is None and do_eval:  # nothing left to train (or just pruned): evaluate
      ev = _evaluate(p_eval, state, dataset, place)
      last_eval = {"step": final_step, "split": "eval", **ev}
    comp = _compression_results(plan, state, last_eval, prunable, train_steps, ft_steps, workdir,
                                forward, eval_step, dataset, place)
    if comp is not None:
      writer.write({"step": last_eval["step"], "split": "compression", **comp})
  except KeyboardInterrupt:
    _checkpoint_on_interrupt(ckpt, state, workdir)
    raise
  finally:
    bar.close()
    prefetch.close()
    dataset.close()
    ckpt.wait()
    ckpt.close()
    writer.close()

  records = read_metrics(workdir)
  if config.plot and jax.process_index() == 0 and records:
    path = os.path.join(workdir, "curves.png")
    name = "digits (embedded stand-in, not ImageNet)" if dataset.name == "digits" else dataset.name
    plot_metrics(records, path, title=f"{config.model} on {name}")
    logging.info("Wrote loss / accuracy curves to %s", path)
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  # Throughput of this session: logged windows after the first (which includes compilation).
  windows = [r["images_per_sec"] for r in records if r["split"] == "train" and r["step"] > start_step]
  img_s = float(np.median(windows[1:] if len(windows) > 1 else windows)) if windows else None
  speed = (f"; {img_s:,.1f} images/s (median of {max(len(windows) - 1, len(windows))} logged windows"
           f"{', first excluded' if len(windows) > 1 else ', includes compilation'})"
           if img_s is not None else "")
  skipped = dataset.skipped() if hasattr(dataset, "skipped") else []
  if skipped:
    logging.warning("Skipped %d unreadable image file(s), e.g. %s", len(skipped), ", ".join(skipped[:3]))
  if last_eval is None:  # config.evaluate=False
    logging.info("Done in %.1f s at step %d (config.evaluate=False: no held-out evaluation)%s. "
                 "Metrics: %s", time.time() - t_start, final_step, speed, metrics_path)
    return {"step": final_step, "eval_loss": None, "eval_top1": None, "eval_top5": None,
            "resumed_from": resumed_from, "seconds": time.time() - t_start, "images_per_sec": img_s,
            "skipped_images": len(skipped), "compression": None}
  logging.info("Done in %.1f s: held-out top-1 %.2f%%, top-5 %.2f%% at step %d (%d examples)%s%s. "
               "Metrics: %s", time.time() - t_start, 100 * last_eval["top1"],
               100 * last_eval["top5"], last_eval["step"], last_eval["examples"], speed,
               _compression_line(plan, comp), metrics_path)
  return {"step": last_eval["step"], "eval_loss": last_eval["loss"], "eval_top1": last_eval["top1"],
          "eval_top5": last_eval["top5"], "resumed_from": resumed_from,
          "seconds": time.time() - t_start, "images_per_sec": img_s, "skipped_images": len(skipped),
          "compression": comp}
