"""``config.compression``: mixed precision, prune-and-finetune and post-training quantization.

=========================  =================================================================
field                      meaning
=========================  =================================================================
``mixed_precision``        ``"auto"`` (on where the device runs bfloat16 matmuls natively: TPU,
                           NVIDIA GPU with compute capability >= 8.0; off on CPU, where XLA
                           converts bfloat16 matmul operands back to float32), ``"on"``, ``"off"``.
                           On: ``lj.mixed_precision(loss)`` (bf16 matmuls/convs, float32
                           accumulation, parameters/gradients/norms/loss float32).
``prune``                  ``""`` (off), ``"2:4"`` or ``"unstructured"``: ``lj.prune`` of the conv /
                           dense kernels after the main training, then ``finetune_epochs`` of
                           training with the masks kept (``lj.prune.apply_masks``).
``sparsity``               unstructured sparsity in (0, 1) (2:4 is 0.5 by construction).
``finetune_epochs``        epochs of masked finetuning after pruning (may be fractional, >= 0).
``finetune_lr_scale``      finetune peak learning rate = ``learning_rate * finetune_lr_scale``
                           (cosine decay to 0 over the finetune steps, momentum reset).
``quantize``               ``""`` (off), ``"int8"``, ``"int4"`` or ``"fp8"``: ``lj.quantize`` of the
                           final weights (post-training, weight-only), evaluated on the held-out set.
``group_size``             int4 group length along the input axis.
=========================  =================================================================

Top-1 before/after each step is written to ``metrics.jsonl`` (a ``"split": "compression"``
record) and to the final log line.

>>> import ml_collections
>>> c = ml_collections.ConfigDict(dict(dtype="float32", evaluate=True,
...     compression=defaults()))
>>> resolve(c, platform="cpu", device_kind="cpu").mixed_precision
False
"""

from __future__ import annotations

import dataclasses
import math
import types
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import lepton_jax as lj

__all__ = ["defaults", "validate", "resolve", "Plan", "prunable_tree", "prune_params", "pruned_stats",
           "masked", "weight_bytes"]

MIXED_PRECISION = ("auto", "on", "off")
PRUNE = ("", "2:4", "unstructured")
QUANTIZE = ("", "int8", "int4", "fp8")

_P = "experiments.imagenet: config.compression"

#: Why mixed precision is off on CPU (measured: benchmarks/results/compression_cpu.json).
CPU_REASON = ("XLA:CPU converts bfloat16 matmul/conv operands back to float32, so bf16 compute is not "
              "faster or smaller there (measured train-step temp bytes 1.13x in "
              "benchmarks/results/compression_cpu.json)")


def defaults() -> ml_collections.ConfigDict:
  """The ``config.compression`` block of ``configs/default.py`` (the one place defaults live)."""
  from experiments.configs import default
  return default.get_config().compression


def _num(value) -> bool:
  return not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))


def validate(config) -> None:
  """Checks ``config.compression`` before anything runs; a ``ValueError`` naming the field otherwise."""
  c = _merged(config)
  if c.mixed_precision not in MIXED_PRECISION:
    raise ValueError(f"{_P}.mixed_precision={c.mixed_precision!r} is not valid; use one of "
                     f"{', '.join(map(repr, MIXED_PRECISION))}")
  if c.mixed_precision == "on" and config.dtype != "float32":
    raise ValueError(f"{_P}.mixed_precision='on' rewrites float32 matmuls to bfloat16, but config.dtype="
                     f"{config.dtype!r} already computes in {config.dtype}; set config.dtype='float32' (parameters "
                     "stay float32 either way) or config.compression.mixed_precision='off'")
  if c.prune not in PRUNE:
    raise ValueError(f"{_P}.prune={c.prune!r} is not valid; use one of {', '.join(map(repr, PRUNE))}")
  if not _num(c.sparsity) or not 0.0 < float(c.sparsity) < 1.0:
    raise ValueError(f"{_P}.sparsity={c.sparsity!r} is not valid; it must be a number in (0, 1)")
  if c.prune == "2:4" and float(c.sparsity) != 0.5:
    raise ValueError(f"{_P}.sparsity={c.sparsity!r} does not fit prune='2:4' (2 of every 4 weights kept: "
                     "sparsity 0.5); set sparsity=0.5 or prune='unstructured'")
  if not _num(c.finetune_epochs) or float(c.finetune_epochs) < 0 or math.isnan(float(c.finetune_epochs)):
    raise ValueError(f"{_P}.finetune_epochs={c.finetune_epochs!r} is not valid; it must be a number >= 0")
  if not _num(c.finetune_lr_scale) or not float(c.finetune_lr_scale) > 0:
    raise ValueError(f"{_P}.finetune_lr_scale={c.finetune_lr_scale!r} is not valid; it must be a number > 0")
  if c.quantize not in QUANTIZE:
    raise ValueError(f"{_P}.quantize={c.quantize!r} is not valid; use one of {', '.join(map(repr, QUANTIZE))}")
  if isinstance(c.group_size, bool) or not isinstance(c.group_size, (int, np.integer)) or c.group_size < 1:
    raise ValueError(f"{_P}.group_size={c.group_size!r} is not valid; it must be an int >= 1")
  if (c.prune or c.quantize) and not config.get("evaluate", True):
    which = "prune" if c.prune else "quantize"
    raise ValueError(f"{_P}.{which}={getattr(c, which)!r} reports held-out top-1 before/after, but config.evaluate=False; "
                     f"set config.evaluate=True or config.compression.{which}=''")


def _merged(config) -> types.SimpleNamespace:
  """``config.compression`` over the defaults, as plain attributes (unknown fields refused)."""
  given = config.get("compression", None)
  given = {} if given is None else (given.to_dict() if hasattr(given, "to_dict") else dict(given))
  full = defaults().to_dict()
  unknown = sorted(set(given) - set(full))
  if unknown:
    raise ValueError(f"{_P} has unknown field(s) {', '.join(unknown)}; valid: {', '.join(sorted(full))}")
  full.update(given)
  return types.SimpleNamespace(**full)


@dataclasses.dataclass(frozen=True)
class Plan:
  """What ``config.compression`` resolved to on this device.

  Attributes:
    mixed_precision: whether ``lj.mixed_precision`` wraps the loss and the eval forward.
    mixed_precision_detail: the reason, for the start-up summary and the log.
    prune, sparsity, finetune_epochs, finetune_lr_scale: prune-and-finetune (``prune == ""``: off).
    quantize, group_size: post-training quantization (``quantize == ""``: off).
  """
  mixed_precision: bool
  mixed_precision_detail: str
  prune: str
  sparsity: float
  finetune_epochs: float
  finetune_lr_scale: float
  quantize: str
  group_size: int

  def summary(self) -> list[tuple[str, str]]:
    rows = [("mixed precision", ("on: " if self.mixed_precision else "off: ") + self.mixed_precision_detail)]
    rows.append(("pruning", "off" if not self.prune else
                 f"lj.prune(structure={self.prune!r}, sparsity={self.sparsity}) after training, then "
                 f"{self.finetune_epochs} finetune epoch(s) at lr x{self.finetune_lr_scale}"))
    rows.append(("quantization", "off" if not self.quantize else
                 f"lj.quantize(weights={self.quantize!r}) of the final weights (post-training)"))
    return rows


def device_supports_bf16(platform: str, device_kind: str, compute_capability: str | None = None) -> tuple[bool, str]:
  """Whether bf16 matmuls pay off on this device, and why."""
  if platform == "tpu":
    return True, f"{device_kind}: bfloat16 matrix units"
  if platform in ("gpu", "cuda"):
    try:
      major = int(str(compute_capability).split(".")[0])
    except (TypeError, ValueError):
      major = None
    if major is not None and major >= 8:
      return True, f"{device_kind} (compute capability {compute_capability}): bfloat16 tensor cores"
    return False, f"{device_kind} (compute capability {compute_capability}) has no bfloat16 tensor cores"
  if platform in ("rocm",):
    return True, f"{device_kind}: bfloat16 matrix cores"
  if platform == "cpu":
    return False, CPU_REASON
  return False, f"platform {platform!r}: bfloat16 support unknown, kept float32"


def resolve(config, *, platform: str | None = None, device_kind: str | None = None,
            compute_capability: str | None = None) -> Plan:
  """The :class:`Plan` for ``config`` on the default device (or the one described)."""
  validate(config)
  c = _merged(config)
  if platform is None:
    dev = jax.devices()[0]
    platform, device_kind = dev.platform, dev.device_kind
    compute_capability = getattr(dev, "compute_capability", None)
  ok, why = device_supports_bf16(platform, device_kind or platform, compute_capability)
  if c.mixed_precision == "off":
    mp, detail = False, "config.compression.mixed_precision='off'"
  elif c.mixed_precision == "on":
    mp = True
    detail = ("lj.mixed_precision(bfloat16 matmuls/convs, float32 accumulation), forced by "
              "config.compression.mixed_precision='on'" + ("" if ok else f"; note: {why}"))
  elif config.dtype != "float32":
    mp, detail = False, f"config.dtype={config.dtype!r} already computes in {config.dtype}"
  elif ok:
    mp, detail = True, f"lj.mixed_precision(bfloat16 matmuls/convs, float32 accumulation): {why}"
  else:
    mp, detail = False, f"auto: {why}"
  return Plan(mp, detail, c.prune, float(c.sparsity) if c.prune else 0.0, float(c.finetune_epochs),
              float(c.finetune_lr_scale), c.quantize, int(c.group_size))


# ------------------------------------------------------------------------------- pruning


def prunable_tree(params, structure: str):
  """A bool per leaf: the conv/dense kernels ``lj.prune`` takes (2:4 needs axis -2 divisible by 4)."""
  def ok(x):
    if np.ndim(x) < 2 or not jnp.issubdtype(jnp.result_type(x), jnp.floating):
      return False
    return structure != "2:4" or x.shape[-2] % 4 == 0
  return jax.tree.map(ok, params)


def prune_params(params, plan: Plan):
  """``lj.prune`` of the prunable kernels of ``params`` (others untouched); ``(params, pruned paths)``."""
  which = prunable_tree(params, plan.prune)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  flags = jax.tree.leaves(which)
  sub = {jax.tree_util.keystr(k): x for (k, x), f in zip(leaves, flags) if f}
  if not sub:
    raise ValueError(f"{_P}.prune={plan.prune!r}: no kernel of this model can be pruned that way "
                     "(2:4 needs an input axis divisible by 4); use prune='unstructured'")
  pruned, _ = lj.prune(sub, sparsity=plan.sparsity, structure=plan.prune)
  out = [pruned[jax.tree_util.keystr(k)] if f else x for (k, x), f in zip(leaves, flags)]
  skipped = [jax.tree_util.keystr(k) for (k, x), f in zip(leaves, flags) if not f and np.ndim(x) >= 2]
  return jax.tree_util.tree_unflatten(treedef, out), sorted(sub), skipped


def masked(params, which):
  """Keeps pruned weights at zero: on the prunable leaves, entries that are 0 stay 0.

  After ``lj.prune`` the pruned entries are exactly zero and every finetune step re-applies this
  mask (``lj.prune.apply_masks``), so the mask is a function of the parameters themselves and
  survives checkpoint / resume without being stored.
  """
  return jax.tree.map(lambda p, f: p != 0 if f else jnp.ones(p.shape, bool), params, which)


def pruned_stats(params, which, structure: str) -> dict[str, Any]:
  """Measured sparsity of the pruned leaves and whether every 4-group along axis -2 keeps <= 2."""
  zeros = total = 0
  two_four = True
  for p, f in zip(jax.tree.leaves(params), jax.tree.leaves(which)):
    if not f:
      continue
    a = np.asarray(jax.device_get(p))
    zeros += int((a == 0).sum())
    total += a.size
    if structure == "2:4":
      moved = np.moveaxis(a, -2, -1)
      groups = moved.reshape(*moved.shape[:-1], moved.shape[-1] // 4, 4)
      two_four &= bool(((groups != 0).sum(-1) <= 2).all())
  out = {"sparsity": zeros / total if total else 0.0, "pruned_weights": total}
  if structure == "2:4":
    out["two_four_pattern_holds"] = two_four
  return out


# ------------------------------------------------------------------------------- quantization


def weight_bytes(params) -> tuple[int, int]:
  """(float bytes, packed bytes incl. scales) of the leaves ``lj.quantize.freeze`` packed."""
  qa = lj.quantize.QuantizedArray
  before = after = 0
  for leaf in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, qa)):
    if isinstance(leaf, qa):
      before += math.prod(leaf.shape) * leaf.dtype.itemsize
      after += leaf.nbytes
  return before, after


def quantized_eval(forward: Callable, plan: Plan):
  """``(freeze, eval_fn)``: packs the params and evaluates with ``lj.quantize(forward)``."""
  q = lj.quantize(forward, weights=plan.quantize, group_size=plan.group_size)
  return q.freeze, q
