"""config.compression of the main job: validation, the mixed-precision decision, the bf16 train step,
prune-and-finetune and post-training quantization end to end (8 simulated CPU devices)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.configs import test as test_config
from experiments.imagenet import compression
from experiments.imagenet import models
from experiments.imagenet import toolkit
from experiments.imagenet import train


def _plain(config):
  config.transforms.auto_shard = False
  config.transforms.adaptive_jit = False
  config.transforms.pallas_kernels = False
  config.checkpoint.enabled = False
  config.plot = False
  return config


@pytest.mark.parametrize("field,value,match", [
    ("mixed_precision", "yes", r"config.compression.mixed_precision='yes' is not valid; use one of 'auto', 'on', 'off'"),
    ("prune", "3:4", r"config.compression.prune='3:4' is not valid; use one of '', '2:4', 'unstructured'"),
    ("sparsity", 1.0, r"config.compression.sparsity=1.0 is not valid; it must be a number in \(0, 1\)"),
    ("finetune_epochs", -1.0, r"config.compression.finetune_epochs=-1.0 is not valid"),
    ("quantize", "int2", r"config.compression.quantize='int2' is not valid; use one of '', 'int8', 'int4', 'fp8'"),
    ("group_size", 0, r"config.compression.group_size=0 is not valid; it must be an int >= 1"),
])
def test_bad_compression_config_is_refused_before_anything_is_written(tmp_path, field, value, match):
  config = test_config.get_config()
  config.compression[field] = value
  with pytest.raises(ValueError, match=match):
    train.train_and_evaluate(config, str(tmp_path / "wd"))
  assert not (tmp_path / "wd").exists()


def test_conflicting_compression_options_are_refused():
  config = test_config.get_config()
  config.compression.update(dict(prune="2:4", sparsity=0.7))
  with pytest.raises(ValueError, match=r"sparsity=0.7 does not fit prune='2:4'"):
    compression.validate(config)
  config = test_config.get_config()
  config.update(dict(dtype="bfloat16"))
  config.compression.mixed_precision = "on"
  with pytest.raises(ValueError, match=r"mixed_precision='on' .* config.dtype='bfloat16' already computes"):
    compression.validate(config)
  config = test_config.get_config()
  config.evaluate = False
  config.compression.quantize = "int8"
  with pytest.raises(ValueError, match=r"quantize='int8' reports held-out top-1 .* config.evaluate=False"):
    compression.validate(config)


def test_mixed_precision_auto_follows_the_device_and_says_why():
  config = test_config.get_config()
  plan = compression.resolve(config)  # this machine: CPU
  assert jax.default_backend() == "cpu"
  assert not plan.mixed_precision and "XLA:CPU converts bfloat16" in plan.mixed_precision_detail
  h200 = compression.resolve(config, platform="gpu", device_kind="NVIDIA H200", compute_capability="9.0")
  assert h200.mixed_precision and "tensor cores" in h200.mixed_precision_detail
  assert compression.resolve(config, platform="tpu", device_kind="TPU v5e").mixed_precision
  assert not compression.resolve(config, platform="gpu", device_kind="V100", compute_capability="7.0").mixed_precision
  config.compression.mixed_precision = "on"
  assert compression.resolve(config).mixed_precision  # forced, with the CPU note
  config.compression.mixed_precision = "auto"
  config.dtype = "bfloat16"
  assert not compression.resolve(config, platform="tpu", device_kind="TPU").mixed_precision


def test_mixed_precision_train_step_matches_float32_and_keeps_float32_state():
  config = test_config.get_config()
  model = models.create_model("ResNetTiny", num_classes=10, num_filters=8, stage_sizes=(1,), image_size=8)
  model.train()
  gd_train = nnx.graphdef(model)
  model.eval()
  gd_eval, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  params, stats = nnx.to_pure_dict(params), nnx.to_pure_dict(stats)
  tx, schedule = train.create_optimizer(config, 10, 5)
  choices = toolkit.resolve(_plain(config).transforms)
  state = {"step": jnp.zeros((), jnp.int32), "params": params, "batch_stats": stats, "opt_state": tx.init(params)}
  x = jax.random.normal(jax.random.key(0), (8, 8, 8, 3))
  y = jnp.arange(8) % 10
  out, steps = {}, {}
  for mp in (False, True):
    steps[mp] = jax.jit(train._make_steps(gd_train, gd_eval, tx, schedule, config, choices, mixed_precision=mp)[0])
    out[mp] = steps[mp](state, x, y)
  (s32, m32), (s16, m16) = out[False], out[True]
  np.testing.assert_allclose(m16["loss"], m32["loss"], rtol=2e-2)
  np.testing.assert_allclose(m16["grad_norm"], m32["grad_norm"], rtol=5e-2)
  assert all(a.dtype == b.dtype for a, b in zip(jax.tree.leaves(s16), jax.tree.leaves(s32)))
  for a, b in zip(jax.tree.leaves(s16["params"]), jax.tree.leaves(s32["params"])):
    np.testing.assert_allclose(a, b, rtol=5e-2, atol=5e-3)
  assert float(m16["grad_norm"]) != float(m32["grad_norm"])  # the rewrite changed the arithmetic
  assert "bf16" in steps[True].lower(state, x, y).as_text()  # convolutions/matmuls in bfloat16


def test_prune_finetune_and_quantize_end_to_end(tmp_path, caplog):
  """2:4 pruning after 2 epochs, a quarter epoch of masked finetuning, int8 post-training quantization."""
  config = _plain(test_config.get_config())
  config.compression.update(dict(prune="2:4", finetune_epochs=0.25, quantize="int8"))
  caplog.set_level("INFO")
  out = train.train_and_evaluate(config, str(tmp_path))
  c = out["compression"]
  assert out["step"] == 44 + 6 and c["finetune_steps"] == 6 and not c["mixed_precision"]
  # the mask survived 6 steps of SGD with momentum and weight decay: exactly 2 of every 4 kept
  assert c["sparsity"] == 0.5 and c["two_four_pattern_holds"] and c["pruned_weights"] > 4000
  recs = train.read_metrics(str(tmp_path))
  ev = {r["step"]: r for r in recs if r["split"] == "eval"}
  assert sorted(ev) == [22, 44, 50]
  assert c["top1_before_prune"] == ev[44]["top1"] > 0.3 and c["top1_after_finetune"] == ev[50]["top1"] == out["eval_top1"]
  ft = [r for r in recs if r["split"] == "train" and r["step"] > 44]
  assert ft and max(r["lr"] for r in ft) <= 0.4 * 0.1 + 1e-7  # finetune restarts at learning_rate x 0.1
  assert c["weight_bytes_before"] / c["weight_bytes_after"] == pytest.approx(c["weight_compression"])
  assert c["weight_compression"] > 3.7  # per-channel scales of 8-channel kernels cost ~3%
  assert c["top1_before_quantize"] == out["eval_top1"]
  assert abs(c["top1_after_quantize"] - c["top1_before_quantize"]) <= 0.02
  assert [r for r in recs if r["split"] == "compression"] == [{"step": 50, "split": "compression", **c}]
  assert "off: auto: XLA:CPU converts bfloat16" in caplog.text
  last = [m for m in caplog.messages if m.startswith("Done in")][-1]
  assert "2:4 pruning (sparsity 0.50): top-1" in last and "int8 weights (" in last
  assert json.load(open(os.path.join(tmp_path, "config.json")))["compression"]["prune"] == "2:4"
