"""Input pipelines: the embedded digits stand-in, ImageFolder JPEGs (real ImageNet) and fake data.

Every training batch is a pure function of ``(seed, step)``: the epoch's permutation comes from
``(seed, epoch)`` and every random augmentation from ``(seed, step, position)``. A run resumed
from a checkpoint at step ``N`` therefore sees exactly the batches an uninterrupted run sees.

Batches are NumPy arrays ``images: float32[B, H, W, 3]`` (normalised) and ``labels: int32[B]``.
Evaluation batches carry ``mask: float32[B]`` (0 for padding in the last batch).

>>> ds = load_dataset(data_dir="", fake_data=True, image_size=8, batch_size=4, num_classes=10)
>>> images, labels = ds.train_batch(0)
>>> images.shape, labels.shape
((4, 8, 8, 3), (4,))
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import math
import os
import threading
from typing import Callable, Iterator

import numpy as np

__all__ = ["Dataset", "load_dataset", "Prefetcher", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32) * 255.0
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32) * 255.0
_log = logging.getLogger("experiments.imagenet")
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".JPEG", ".JPG", ".PNG")


@dataclasses.dataclass
class Dataset:
  """A data set with deterministic, step-addressable training batches.

  Attributes:
    name: short name (``"digits"``, ``"imagefolder"``, ``"fake"``).
    description: one line for the start-up summary.
    num_classes: number of classes.
    image_size: side of the square input images.
    train_size: number of training examples.
    eval_size: number of held-out examples.
    batch_size: global training batch size.
    steps_per_epoch: training steps per epoch.
    train_batch: ``step -> (images, labels)``, deterministic in ``(seed, step)``.
    eval_batches: ``() -> iterator of (images, labels, mask)``.
    close: releases worker threads.
    skipped: ``() -> list of image files that could not be decoded`` (skipped with a warning).
  """
  name: str
  description: str
  num_classes: int
  image_size: int
  train_size: int
  eval_size: int
  batch_size: int
  steps_per_epoch: int
  train_batch: Callable[[int], tuple[np.ndarray, np.ndarray]]
  eval_batches: Callable[[], Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]]
  close: Callable[[], None] = lambda: None
  skipped: Callable[[], list] = lambda: []


def _epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch, 0x5EED]).permutation(n)


def _batch_indices(seed: int, step: int, n: int, batch_size: int, steps_per_epoch: int) -> np.ndarray:
  epoch, i = divmod(step, steps_per_epoch)
  return _epoch_order(seed, epoch, n)[i * batch_size:(i + 1) * batch_size]


def _eval_chunks(n: int, batch_size: int):
  for start in range(0, n, batch_size):
    yield start, min(start + batch_size, n)


def _pad(x: np.ndarray, size: int) -> np.ndarray:
  if x.shape[0] == size:
    return x
  pad = np.zeros((size - x.shape[0],) + x.shape[1:], x.dtype)
  return np.concatenate([x, pad])


# ---------------------------------------------------------------------------------------------
# Embedded default: scikit-learn's bundled 8x8 digits, upscaled. A stand-in for ImageNet.
# ---------------------------------------------------------------------------------------------

def _load_digits(*, image_size: int, batch_size: int, eval_batch_size: int, seed: int,
                 holdout_fraction: float = 0.2) -> Dataset:
  from PIL import Image
  from sklearn.datasets import load_digits

  digits = load_digits()
  raw = (digits.images / 16.0 * 255.0).astype(np.uint8)  # [1797, 8, 8], offline, bundled
  labels_all = digits.target.astype(np.int32)
  up = np.stack([np.asarray(Image.fromarray(im).resize((image_size, image_size), Image.BILINEAR))
                 for im in raw]).astype(np.float32)
  up = np.repeat(up[..., None], 3, axis=-1)
  # Fixed, stratified train / held-out split (independent of the training seed).
  split_rng = np.random.default_rng(1234)
  eval_idx = []
  for c in range(10):
    idx = np.flatnonzero(labels_all == c)
    eval_idx.extend(split_rng.permutation(idx)[:int(round(len(idx) * holdout_fraction))])
  eval_mask = np.zeros(len(raw), bool)
  eval_mask[np.array(eval_idx)] = True
  train_x, train_y = up[~eval_mask], labels_all[~eval_mask]
  eval_x, eval_y = up[eval_mask], labels_all[eval_mask]
  mean, std = train_x.mean(), train_x.std()
  train_x = (train_x - mean) / std
  eval_x = (eval_x - mean) / std
  n = len(train_x)
  if batch_size > n:
    raise ValueError(f"experiments.imagenet: config.batch_size={batch_size} exceeds the {n} "
                     "training images of the embedded digits set; use a smaller batch_size")
  steps_per_epoch = n // batch_size

  def train_batch(step):
    idx = _batch_indices(seed, step, n, batch_size, steps_per_epoch)
    return train_x[idx], train_y[idx]

  def eval_batches():
    for a, b in _eval_chunks(len(eval_x), eval_batch_size):
      mask = np.zeros(eval_batch_size, np.float32)
      mask[:b - a] = 1
      yield _pad(eval_x[a:b], eval_batch_size), _pad(eval_y[a:b], eval_batch_size), mask

  return Dataset(
      name="digits",
      description=(f"EMBEDDED STAND-IN, not ImageNet: scikit-learn digits (1797 8x8 images, 10 "
                   f"classes) upscaled to {image_size}x{image_size}x3; {n} train / "
                   f"{len(eval_x)} held-out (fixed split). Set --config.data_dir for real ImageNet."),
      num_classes=10, image_size=image_size, train_size=n, eval_size=len(eval_x),
      batch_size=batch_size, steps_per_epoch=steps_per_epoch, train_batch=train_batch,
      eval_batches=eval_batches)


# ---------------------------------------------------------------------------------------------
# Fake data for throughput measurements.
# ---------------------------------------------------------------------------------------------

def _fake(*, image_size: int, batch_size: int, eval_batch_size: int, num_classes: int, seed: int,
          steps_per_epoch: int) -> Dataset:
  rng = np.random.default_rng(seed)
  images = rng.standard_normal((batch_size, image_size, image_size, 3), dtype=np.float32)
  labels = rng.integers(0, num_classes, batch_size).astype(np.int32)
  eval_images = rng.standard_normal((eval_batch_size, image_size, image_size, 3), dtype=np.float32)
  eval_labels = rng.integers(0, num_classes, eval_batch_size).astype(np.int32)

  def train_batch(step):  # the same batch every step: measures the step, not the loader
    return images, labels

  def eval_batches():
    yield eval_images, eval_labels, np.ones(eval_batch_size, np.float32)

  return Dataset(
      name="fake", description=(f"FAKE DATA for throughput: one fixed random batch of "
                                f"{batch_size}x{image_size}x{image_size}x3, {num_classes} classes"),
      num_classes=num_classes, image_size=image_size, train_size=batch_size * steps_per_epoch,
      eval_size=eval_batch_size, batch_size=batch_size, steps_per_epoch=steps_per_epoch,
      train_batch=train_batch, eval_batches=eval_batches)


# ---------------------------------------------------------------------------------------------
# ImageFolder JPEGs: root/train/<class>/*.JPEG and root/val/<class>/*.JPEG.
# ---------------------------------------------------------------------------------------------

def _list_image_folder(split_dir: str, classes: list[str] | None = None):
  if not os.path.isdir(split_dir):
    raise FileNotFoundError(f"experiments.imagenet: expected an ImageFolder directory {split_dir!r} "
                            "with one sub-folder of JPEGs per class (data_dir/train/<class>/*.JPEG)")
  found = sorted(d for d in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, d)))
  classes = found if classes is None else classes
  index = {c: i for i, c in enumerate(classes)}
  files, labels = [], []
  for c in found:
    if c not in index:
      raise ValueError(f"experiments.imagenet: class folder {c!r} in {split_dir!r} is not a "
                       f"training class; the val/ classes must be a subset of train/ classes")
    for f in sorted(os.listdir(os.path.join(split_dir, c))):
      if f.endswith(_IMAGE_EXTENSIONS):
        files.append(os.path.join(split_dir, c, f))
        labels.append(index[c])
  if not files:
    raise ValueError(f"experiments.imagenet: no images ({', '.join(_IMAGE_EXTENSIONS[:5])}) under {split_dir!r}")
  return classes, files, np.array(labels, np.int32)


def random_resized_crop_box(rng: np.random.Generator, width: int, height: int,
                            scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
  """Inception-style crop box ``(left, top, right, bottom)`` (as torchvision/Flax examples)."""
  area = width * height
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      left = int(rng.integers(0, width - w + 1))
      top = int(rng.integers(0, height - h + 1))
      return left, top, left + w, top + h
  # Fallback: central crop with the aspect ratio clamped to `ratio`.
  in_ratio = width / height
  if in_ratio < ratio[0]:
    w, h = width, int(round(width / ratio[0]))
  elif in_ratio > ratio[1]:
    h, w = height, int(round(height * ratio[1]))
  else:
    w, h = width, height
  left, top = (width - w) // 2, (height - h) // 2
  return left, top, left + w, top + h


def decode_train(path: str, image_size: int, rng: np.random.Generator) -> np.ndarray:
  """Decode + random-resized-crop + horizontal flip + normalise one training image."""
  from PIL import Image
  with Image.open(path) as im:
    im = im.convert("RGB")
    box = random_resized_crop_box(rng, im.width, im.height)
    im = im.resize((image_size, image_size), Image.BILINEAR, box=box)
    x = np.asarray(im, np.float32)
  if rng.random() < 0.5:
    x = x[:, ::-1]
  return (x - IMAGENET_MEAN) / IMAGENET_STD


def decode_eval(path: str, image_size: int, crop_fraction: float = 0.875) -> np.ndarray:
  """Decode + resize shorter side to ``image_size / 0.875`` + central crop + normalise."""
  from PIL import Image
  with Image.open(path) as im:
    im = im.convert("RGB")
    resize = int(round(image_size / crop_fraction))
    s = resize / min(im.width, im.height)
    w, h = max(resize, int(round(im.width * s))), max(resize, int(round(im.height * s)))
    im = im.resize((w, h), Image.BILINEAR)
    left, top = (w - image_size) // 2, (h - image_size) // 2
    im = im.crop((left, top, left + image_size, top + image_size))
    x = np.asarray(im, np.float32)
  return (x - IMAGENET_MEAN) / IMAGENET_STD


def _image_folder(data_dir: str, *, image_size: int, batch_size: int, eval_batch_size: int,
                  seed: int, num_workers: int, process_index: int, process_count: int) -> Dataset:
  classes, train_files, train_labels = _list_image_folder(os.path.join(data_dir, "train"))
  _, val_files, val_labels = _list_image_folder(os.path.join(data_dir, "val"), classes)
  n = len(train_files)
  if batch_size > n:
    raise ValueError(f"experiments.imagenet: config.batch_size={batch_size} exceeds the {n} "
                     f"training images in {data_dir!r}; use a smaller batch_size")
  steps_per_epoch = n // batch_size
  pool = concurrent.futures.ThreadPoolExecutor(max(1, num_workers), thread_name_prefix="decode")
  local = batch_size // process_count
  bad: dict[str, str] = {}  # unreadable file -> reason (this data set's own record)
  bad_lock = threading.Lock()

  def attempt(decode, path):
    """``decode(path)``, or ``None`` (with one warning per file) if the file cannot be decoded."""
    try:
      return decode(path)
    except (OSError, ValueError, SyntaxError) as e:  # truncated / corrupt / not an image
      with bad_lock:
        new = path not in bad
        bad[path] = f"{type(e).__name__}: {e}"
      if new:
        _log.warning("experiments.imagenet: skipping unreadable image %s (%s: %s)", path,
                     type(e).__name__, e)
      return None

  def train_example(i, step):
    # A file that cannot be decoded is replaced by the next file in the listing (deterministic).
    for k in range(n):
      j = (int(i) + k) % n
      rng = np.random.default_rng([seed, step, j] + ([k] if k else []))
      x = attempt(lambda p: decode_train(p, image_size, rng), train_files[j])
      if x is not None:
        return x, train_labels[j]
    raise ValueError(f"experiments.imagenet: none of the {n} training images in {data_dir!r} can be "
                     "decoded")

  def train_batch(step):
    idx = _batch_indices(seed, step, n, batch_size, steps_per_epoch)
    idx = idx[process_index * local:(process_index + 1) * local]
    out = list(pool.map(lambda i: train_example(i, step), idx))
    return np.stack([x for x, _ in out]), np.array([y for _, y in out], np.int32)

  def eval_batches():
    for a, b in _eval_chunks(len(val_files), eval_batch_size):
      images = list(pool.map(lambda p: attempt(lambda q: decode_eval(q, image_size), p), val_files[a:b]))
      mask = np.zeros(eval_batch_size, np.float32)
      mask[:b - a] = [x is not None for x in images]  # unreadable held-out images are not counted
      zero = np.zeros((image_size, image_size, 3), np.float32)
      images = [zero if x is None else x for x in images]
      yield _pad(np.stack(images), eval_batch_size), _pad(val_labels[a:b], eval_batch_size), mask

  def skipped():
    with bad_lock:
      return sorted(bad)

  return Dataset(
      name="imagefolder",
      description=(f"ImageFolder {data_dir!r}: {n} train / {len(val_files)} val JPEGs, "
                   f"{len(classes)} classes, {image_size}px, {num_workers} decode threads"),
      num_classes=len(classes), image_size=image_size, train_size=n, eval_size=len(val_files),
      batch_size=batch_size, steps_per_epoch=steps_per_epoch, train_batch=train_batch,
      eval_batches=eval_batches, close=lambda: pool.shutdown(wait=False, cancel_futures=True),
      skipped=skipped)


def load_dataset(*, data_dir: str, fake_data: bool, image_size: int, batch_size: int,
                 eval_batch_size: int | None = None, num_classes: int = -1, seed: int = 0,
                 num_workers: int = 8, fake_steps_per_epoch: int = 100, process_index: int = 0,
                 process_count: int = 1) -> Dataset:
  """Chooses the data set from the config fields.

  Args:
    data_dir: ImageFolder root with ``train/`` and ``val/``; empty for the embedded default.
    fake_data: a fixed random batch (throughput measurements); wins over ``data_dir``.
    image_size: square input side.
    batch_size: global training batch size.
    eval_batch_size: evaluation batch size (defaults to ``batch_size``).
    num_classes: classes for fake data (``-1``: 1000); other sets infer it.
    seed: data order / augmentation seed.
    num_workers: JPEG decoding threads.
    fake_steps_per_epoch: epoch length for fake data.
    process_index, process_count: multi-process runs load their slice of each global batch.
  """
  eval_batch_size = eval_batch_size or batch_size
  if batch_size < 1 or batch_size % process_count:
    raise ValueError(f"experiments.imagenet: config.batch_size={batch_size} must be >= 1 and "
                     f"divisible by the process count {process_count}")
  if fake_data:
    return _fake(image_size=image_size, batch_size=batch_size, eval_batch_size=eval_batch_size,
                 num_classes=1000 if num_classes < 1 else num_classes, seed=seed,
                 steps_per_epoch=fake_steps_per_epoch)
  if data_dir:
    return _image_folder(data_dir, image_size=image_size, batch_size=batch_size,
                         eval_batch_size=eval_batch_size, seed=seed, num_workers=num_workers,
                         process_index=process_index, process_count=process_count)
  if process_count != 1:
    raise ValueError("experiments.imagenet: the embedded digits set is for single-process runs")
  return _load_digits(image_size=image_size, batch_size=batch_size,
                      eval_batch_size=eval_batch_size, seed=seed)


class Prefetcher:
  """Runs ``batch_fn(step)`` for the next ``depth`` steps on a background thread.

  >>> p = Prefetcher(lambda s: s * 2, start=3, depth=2)
  >>> p.get(3), p.get(4)
  (6, 8)
  >>> p.close()
  """

  def __init__(self, batch_fn: Callable[[int], object], *, start: int, depth: int = 2):
    self._fn = batch_fn
    self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="prefetch")
    self._futures: dict[int, concurrent.futures.Future] = {}
    self._depth = max(1, depth)
    self._next = start
    self._fill(start)

  def _fill(self, step):
    while self._next < step + self._depth:
      self._futures[self._next] = self._pool.submit(self._fn, self._next)
      self._next += 1

  def get(self, step: int):
    """Returns ``batch_fn(step)``; steps must be requested in increasing order."""
    fut = self._futures.pop(step, None)
    if fut is None:
      for s in [s for s in self._futures if s < step]:
        self._futures.pop(s).cancel()
      self._next = max(self._next, step)
      fut = self._pool.submit(self._fn, step)
      self._next = max(self._next, step + 1)
    self._fill(step + 1)
    return fut.result()

  def close(self):
    for f in self._futures.values():
      f.cancel()
    self._pool.shutdown(wait=False, cancel_futures=True)
