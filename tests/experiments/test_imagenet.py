"""Tests for ``python -m experiments.imagenet`` (8 simulated CPU devices, see tests/conftest.py)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from experiments.configs import default as default_config
from experiments.configs import test as test_config
from experiments.imagenet import input_pipeline
from experiments.imagenet import models
from experiments.imagenet import toolkit
from experiments.imagenet import train

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _plain(config):
  """All toolkit switches off: the plain-JAX reference path."""
  config.transforms.auto_shard = False
  config.transforms.adaptive_jit = False
  config.transforms.pallas_kernels = False
  config.transforms.remat_budget = ""
  config.checkpoint.tiered = False
  return config


def _deterministic(records):
  return [{k: v for k, v in r.items() if k not in train.TIMING_KEYS} for r in records]


def _write_jpeg_folder(root, classes=3, per_class=(6, 2), seed=0):
  from PIL import Image
  rng = np.random.default_rng(seed)
  for split, n in zip(("train", "val"), per_class):
    for c in range(classes):
      d = os.path.join(root, split, f"n{c:08d}")
      os.makedirs(d)
      for i in range(n):
        h, w = rng.integers(20, 48, size=2)
        arr = (rng.random((h, w, 3)) * 80 + c * 60).astype(np.uint8)
        Image.fromarray(arr).save(os.path.join(d, f"img_{i}.JPEG"), quality=90)
  return root


# ---------------------------------------------------------------------------------------------
# Pieces
# ---------------------------------------------------------------------------------------------

def test_default_config_is_the_embedded_stand_in():
  c = default_config.get_config()
  assert c.data_dir == "" and not c.fake_data and c.model == "ResNetTiny"
  ds = input_pipeline.load_dataset(data_dir="", fake_data=False, image_size=c.image_size,
                                   batch_size=c.batch_size, eval_batch_size=c.eval_batch_size)
  assert "STAND-IN" in ds.description
  assert (ds.train_size, ds.eval_size, ds.num_classes) == (1438, 359, 10)
  images, labels = ds.train_batch(0)
  assert images.shape == (c.batch_size, c.image_size, c.image_size, 3) and images.dtype == np.float32
  assert labels.dtype == np.int32 and labels.max() < 10
  n_eval = sum(int(m.sum()) for _, _, m in ds.eval_batches())
  assert n_eval == 359


def test_batches_are_a_function_of_seed_and_step():
  kw = dict(data_dir="", fake_data=False, image_size=8, batch_size=64, eval_batch_size=64)
  a = input_pipeline.load_dataset(seed=3, **kw)
  b = input_pipeline.load_dataset(seed=3, **kw)
  c = input_pipeline.load_dataset(seed=4, **kw)
  for step in (0, 5, a.steps_per_epoch + 1):
    np.testing.assert_array_equal(a.train_batch(step)[0], b.train_batch(step)[0])
  assert not np.array_equal(a.train_batch(0)[1], c.train_batch(0)[1])
  # epochs reshuffle: one epoch covers distinct examples
  epoch = np.concatenate([a.train_batch(s)[1] for s in range(a.steps_per_epoch)])
  assert len(epoch) == a.steps_per_epoch * 64
  assert not np.array_equal(a.train_batch(0)[1], a.train_batch(a.steps_per_epoch)[1])


def test_prefetcher_matches_direct_calls_and_handles_jumps():
  p = input_pipeline.Prefetcher(lambda s: s * s, start=2, depth=3)
  assert [p.get(s) for s in (2, 3, 4, 9, 10)] == [4, 9, 16, 81, 100]
  p.close()


def test_random_resized_crop_box_is_inside_the_image():
  rng = np.random.default_rng(0)
  for _ in range(200):
    w, h = rng.integers(1, 300, size=2)
    l, t, r, b = input_pipeline.random_resized_crop_box(rng, int(w), int(h))
    assert 0 <= l < r <= w and 0 <= t < b <= h


def test_image_folder_pipeline(tmp_path):
  root = _write_jpeg_folder(str(tmp_path / "imgs"))
  ds = input_pipeline.load_dataset(data_dir=root, fake_data=False, image_size=16, batch_size=8,
                                   eval_batch_size=8, seed=1, num_workers=3)
  try:
    assert (ds.num_classes, ds.train_size, ds.eval_size, ds.steps_per_epoch) == (3, 18, 6, 2)
    x1, y1 = ds.train_batch(1)
    x2, y2 = ds.train_batch(1)
    np.testing.assert_array_equal(x1, x2)  # augmentation is deterministic in (seed, step)
    assert x1.shape == (8, 16, 16, 3) and np.isfinite(x1).all()
    assert abs(float(x1.mean())) < 3 and set(y1.tolist()) <= {0, 1, 2}
    batches = list(ds.eval_batches())
    assert sum(int(m.sum()) for _, _, m in batches) == 6
    # class folders are sorted: class c images are brighter for larger c
    ex, ey, em = batches[0]
    means = [ex[(ey == c) & (em > 0)].mean() for c in range(3)]
    assert means[0] < means[1] < means[2]
  finally:
    ds.close()


def test_image_folder_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="train"):
    input_pipeline.load_dataset(data_dir=str(tmp_path), fake_data=False, image_size=8, batch_size=2)


@pytest.mark.parametrize("name,expected", [("ResNet18", 11_689_512), ("ResNet50", 25_557_032)])
def test_standard_resnet_sizes(name, expected):
  # parameter counts of the torchvision / Flax-example networks (ImageNet stem, 1000 classes)
  model = nnx.eval_shape(lambda: models.create_model(name, num_classes=1000, image_size=224))
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert n == expected


def test_resnet_forward_in_mixed_precision():
  dtype = "bfloat16"
  model = models.create_model("ResNet18", num_classes=7, num_filters=8, stage_sizes=(1, 1),
                              image_size=16, dtype=dtype)
  x = jnp.ones((2, 16, 16, 3))
  model.train()
  y = nnx.jit(lambda m, x: m(x))(model, x)
  assert y.shape == (2, 7) and y.dtype == jnp.float32
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_unknown_model_is_a_clear_error():
  with pytest.raises(ValueError, match="config.model='ResNet9'.*valid"):
    models.create_model("ResNet9", num_classes=10)


def test_cross_entropy_matches_optax_with_label_smoothing():
  logits = jax.random.normal(jax.random.key(0), (6, 11))
  labels = jnp.arange(6) % 11
  ref_fn = lambda l: optax.softmax_cross_entropy(l, optax.smooth_labels(jax.nn.one_hot(labels, 11), 0.1))  # noqa: E731
  kernel = toolkit.resolve(test_config.get_config().transforms)["pallas_kernels"].impl
  for k in (None, kernel):
    got_fn = lambda l, k=k: toolkit.cross_entropy(l, labels, label_smoothing=0.1, kernel=k)  # noqa: E731
    np.testing.assert_allclose(jax.jit(got_fn)(logits), ref_fn(logits), rtol=1e-5, atol=1e-6)
    g_ref = jax.jit(jax.grad(lambda l: ref_fn(l).sum()))(logits)
    g = jax.jit(jax.grad(lambda l: got_fn(l).sum()))(logits)
    np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-6)


def test_optimizer_schedule_and_weight_decay_mask():
  c = default_config.get_config()
  tx, schedule = train.create_optimizer(c, total_steps=100, steps_per_epoch=10)
  assert float(schedule(0)) == 0.0 and abs(float(schedule(10)) - c.learning_rate) < 1e-7
  assert float(schedule(100)) < 1e-6
  c.optimizer = "lion"
  with pytest.raises(ValueError, match="config.optimizer='lion'"):
    train.create_optimizer(c, total_steps=10, steps_per_epoch=1)


# ---------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
  """One uninterrupted run of the test config with its default (lepton_jax) transforms."""
  workdir = tmp_path_factory.mktemp("reference")
  out = train.train_and_evaluate(test_config.get_config(), str(workdir))
  return workdir, out


def test_train_resume_and_outputs(reference_run):
  config = test_config.get_config()
  tmp_path, out = reference_run
  assert out["resumed_from"] is None and out["step"] == 44
  assert out["eval_top1"] > 0.3  # well above chance (0.1) after 44 tiny steps
  recs = train.read_metrics(str(tmp_path))
  evals = [r for r in recs if r["split"] == "eval"]
  assert [r["step"] for r in evals] == [22, 44]
  assert all({"loss", "top1", "top5", "lr", "images_per_sec"} <= set(r) for r in recs if r["split"] == "train")
  assert os.path.getsize(tmp_path / "curves.png") > 10_000
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tensorboard"))
  # Rerun in the same workdir: resumes at the end, does not start over or duplicate records.
  again = train.train_and_evaluate(config, str(tmp_path))
  assert again["resumed_from"] == 44 and again["eval_top1"] == out["eval_top1"]
  assert train.read_metrics(str(tmp_path)) == recs


def test_kill_9_mid_run_resumes_exactly(tmp_path, caplog, reference_run):
  """SIGKILL right after an async save starts; the rerun matches an uninterrupted run.

  The child is killed at step 20, right after the save at 20 (local and persistent tier) has
  started and before the first evaluation (step 22), so it only compiles the train step.
  """
  config = test_config.get_config()
  crash_dir = tmp_path / "crash"
  ref = _deterministic(train.read_metrics(str(reference_run[0])))

  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.imagenet", "--config=experiments/configs/test.py",
       f"--workdir={crash_dir}", "--config.debug_kill_at_step=20"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == -9, proc.stderr[-3000:]
  assert "start-up summary" in proc.stderr and "STAND-IN" in proc.stderr
  assert "starting from step 0" in proc.stderr
  killed = train.read_metrics(str(crash_dir))
  assert max(r["step"] for r in killed) == 20  # it really stopped mid-run
  # The persistent interval (20) is honoured: step 10 went to the local tier only.
  persistent = crash_dir / "checkpoints" / "persistent"
  assert "10" not in os.listdir(persistent) and "10" in os.listdir(crash_dir / "checkpoints" / "local")
  assert all(r["split"] == "train" for r in killed)

  caplog.set_level("INFO")
  out = train.train_and_evaluate(config, str(crash_dir))
  assert out["resumed_from"] in (10, 20)  # the save at 20 may or may not have completed
  assert f"Resuming from step {out['resumed_from']}" in caplog.text
  assert _deterministic(train.read_metrics(str(crash_dir))) == ref


def test_plain_jax_path_with_remat_matches_the_toolkit_path(reference_run, tmp_path):
  """auto_shard, adaptive_jit and the CE kernel off (jax.jit, optax CE, one Orbax tier) and
  lj.remat_plan on: trains to the same numbers as the reference run (all toolkit pieces on)."""
  config = _plain(test_config.get_config())
  config.transforms.remat_budget = "0.5"
  config.update(dict(max_steps=8, evaluate=False))
  choices = toolkit.resolve(config.transforms)
  assert {k: c.backend for k, c in choices.items()} == {
      "auto_shard": "off", "adaptive_jit": "off", "remat_plan": "lepton_jax", "pallas_kernels": "off"}
  out = train.train_and_evaluate(config, str(tmp_path))
  assert out["step"] == 8 and out["resumed_from"] is None and out["eval_top1"] is None
  assert os.listdir(tmp_path / "checkpoints" / "persistent")  # plain Orbax wrote the final step
  plain = {r["step"]: r for r in train.read_metrics(str(tmp_path)) if r["split"] == "train"}
  ref = {r["step"]: r for r in train.read_metrics(str(reference_run[0])) if r["split"] == "train"}
  assert sorted(plain) == [4, 8]
  for step in (4, 8):
    for k in ("loss", "top1", "lr", "grad_norm"):
      np.testing.assert_allclose(plain[step][k], ref[step][k], rtol=2e-4, atol=1e-5, err_msg=f"{k}@{step}")


def test_toolkit_choices_are_reported():
  c = test_config.get_config()
  choices = toolkit.resolve(c.transforms)
  assert {k: v.backend for k, v in choices.items()} == {
      "auto_shard": "lepton_jax", "adaptive_jit": "lepton_jax", "remat_plan": "off",
      "pallas_kernels": "lepton_jax"}
  c.transforms.remat_budget = "0.5"
  assert toolkit.resolve(c.transforms)["remat_plan"].backend == "lepton_jax"
  assert toolkit.checkpoint_choice(c.checkpoint).backend == "lepton_jax"
  assert set(toolkit.resolve(_plain(c).transforms)[k].backend for k in choices) == {"off"}


def test_resnet50_two_steps_on_fake_data(tmp_path, caplog):
  """ResNet-50's architecture (bottleneck blocks, stages [3, 4, 6, 3], 7x7 stem + max-pool) on
  tiny fake images: the resnet50_fake throughput config at 32px, train only.

  Width 16 instead of 64 (same depth, same 53 convolutions and compile) keeps the two steps cheap
  on CPU; test_standard_resnet_sizes checks the full-width parameter count.
  """
  from experiments.configs import resnet50_fake
  config = _plain(resnet50_fake.get_config())
  config.update(dict(image_size=32, num_filters=16, stem="imagenet", dtype="float32", batch_size=8,
                     num_classes=10,
                     max_steps=2, fake_steps_per_epoch=2, log_every_steps=1, progress_bar=False))
  caplog.set_level("INFO")
  out = train.train_and_evaluate(config, str(tmp_path))
  assert out["step"] == 2 and out["eval_top1"] is None
  assert "ResNet50 (width 16, stages (3, 4, 6, 3))" in caplog.text
  model = nnx.eval_shape(lambda: models.create_model("ResNet50", num_classes=10, num_filters=16,
                                                     stem="imagenet"))
  assert len(model.blocks) == 16 and all(isinstance(b, models.BottleneckBlock) for b in model.blocks)
  assert model.blocks[-1].conv3.out_features == 16 * 8 * 4 and model.stem == "imagenet"
  recs = train.read_metrics(str(tmp_path))
  assert [r["step"] for r in recs] == [1, 2] and all(r["split"] == "train" for r in recs)
  assert all(np.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in recs)
  assert recs[0]["loss"] != recs[1]["loss"]  # the first step changed the parameters


def test_two_steps_on_a_generated_jpeg_folder(tmp_path):
  root = _write_jpeg_folder(str(tmp_path / "imagenet"))
  config = default_config.get_config()
  config.update(dict(data_dir=root, image_size=16, batch_size=8, eval_batch_size=8, num_filters=8,
                     stage_sizes=(1,),
                     num_epochs=1, num_workers=2, progress_bar=False, plot=False))
  out = train.train_and_evaluate(config, str(tmp_path / "wd"))
  assert out["step"] == 2 and 0.0 <= out["eval_top1"] <= 1.0
  ev = [r for r in train.read_metrics(str(tmp_path / "wd")) if r["split"] == "eval"]
  assert ev[-1]["examples"] == 6


@pytest.mark.parametrize("name", ["default", "test", "resnet50_fake", "resnet50_fake_cpu", "imagenet_resnet50"])
def test_every_config_file_loads_and_names_a_known_model(name):
  import importlib
  c = importlib.import_module(f"experiments.configs.{name}").get_config()
  assert c.model in models.MODEL_SPECS and c.batch_size > 0 and c.num_epochs > 0
  assert set(c.transforms.keys()) >= {"auto_shard", "adaptive_jit", "remat_budget", "pallas_kernels"}


# ---------------------------------------------------------------------------------------------
# Issue 18: a workdir belongs to one run; resume from the newest valid checkpoint; bad images
# ---------------------------------------------------------------------------------------------

def test_workdir_of_another_run_is_refused_untouched(reference_run):
  workdir, _ = reference_run
  before = {n: (workdir / n).read_bytes() for n in ("config.json", "metrics.jsonl")}
  config = test_config.get_config()
  config.num_epochs = 3
  with pytest.raises(ValueError, match=r"belongs to another run .*num_epochs: 2 in the workdir, 3 now"):
    train.train_and_evaluate(config, str(workdir))
  assert {n: (workdir / n).read_bytes() for n in before} == before


def test_workdir_without_config_json_is_refused(tmp_path):
  (tmp_path / "metrics.jsonl").write_text('{"step": 1, "split": "train"}\n')
  with pytest.raises(ValueError, match="holds metrics.jsonl but no config.json"):
    train.train_and_evaluate(test_config.get_config(), str(tmp_path))
  assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "split": "train"}\n'


def test_resumes_from_the_newest_valid_checkpoint_when_the_newest_is_corrupt(reference_run, tmp_path, caplog):
  import shutil
  ref_dir, ref_out = reference_run
  workdir = tmp_path / "wd"
  shutil.copytree(ref_dir, workdir)
  for tier in ("local", "persistent"):  # the final step 44 is damaged in both tiers
    step_dir = workdir / "checkpoints" / tier / "44"
    for f in (p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"):
      f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # half-written data files
  caplog.set_level("INFO")
  out = train.train_and_evaluate(test_config.get_config(), str(workdir))
  assert out["resumed_from"] == 40 and "CheckpointCorruptionWarning" in caplog.text
  assert out["eval_top1"] == ref_out["eval_top1"]
  assert _deterministic(train.read_metrics(str(workdir))) == _deterministic(train.read_metrics(str(ref_dir)))


def test_unreadable_jpeg_is_skipped_with_a_warning(tmp_path, caplog):
  root = _write_jpeg_folder(str(tmp_path / "imgs"))
  bad = os.path.join(root, "train", "n00000001", "img_2.JPEG")
  with open(bad, "rb") as f:
    data = f.read()
  with open(bad, "wb") as f:
    f.write(data[: len(data) // 2])  # truncated
  bad_val = os.path.join(root, "val", "n00000000", "img_0.JPEG")
  with open(bad_val, "wb") as f:
    f.write(b"not a jpeg")
  caplog.set_level("WARNING")
  ds = input_pipeline.load_dataset(data_dir=root, fake_data=False, image_size=16, batch_size=8,
                                   eval_batch_size=8, seed=1, num_workers=2)
  try:
    for step in range(ds.steps_per_epoch * 2):
      x, y = ds.train_batch(step)
      assert x.shape == (8, 16, 16, 3) and np.isfinite(x).all() and y.shape == (8,)
    assert sum(int(m.sum()) for _, _, m in ds.eval_batches()) == 5  # 6 held-out, 1 unreadable
    assert ds.skipped() == sorted([bad, bad_val])
    assert bad in caplog.text and bad_val in caplog.text
  finally:
    ds.close()


def test_command_line_errors_are_short():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "experiments.imagenet", "--config.num_epoch=1",
                         "--workdir=/nonexistent/never"], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) <= 4 and "Traceback" not in proc.stderr, proc.stderr
  assert "did you mean --config.num_epochs" in proc.stderr
