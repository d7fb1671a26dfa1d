"""ResNet v1.5 in Flax NNX (ResNet-18/34/50/101/152 and a configurable tiny variant).

The layout follows Flax's ImageNet example (``examples/imagenet/models.py``) ported to NNX:
``nnx.Conv`` + ``nnx.BatchNorm``, basic blocks for ResNet-18/34 and bottleneck blocks for
ResNet-50 and deeper. ``dtype`` is the computation dtype (``jnp.bfloat16`` for mixed precision);
parameters and BatchNorm statistics are always kept in float32 and logits are returned in float32.

>>> from flax import nnx
>>> model = ResNet(stage_sizes=(1, 1), block="basic", num_classes=10, num_filters=8,
...                stem="cifar", rngs=nnx.Rngs(0))
>>> model(jnp.zeros((2, 16, 16, 3))).shape
(2, 10)
"""

from __future__ import annotations

from typing import Literal, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["ResNet", "MODEL_SPECS", "create_model", "count_params"]

# name -> (stage sizes, block type)
MODEL_SPECS: dict[str, tuple[tuple[int, ...], str]] = {
    "ResNet18": ((2, 2, 2, 2), "basic"),
    "ResNet34": ((3, 4, 6, 3), "basic"),
    "ResNet50": ((3, 4, 6, 3), "bottleneck"),
    "ResNet101": ((3, 4, 23, 3), "bottleneck"),
    "ResNet152": ((3, 8, 36, 3), "bottleneck"),
    # A small network for the embedded default data set (CPU, minutes).
    "ResNetTiny": ((1, 1, 1), "basic"),
}


def _conv(cin, cout, kernel, strides, dtype, rngs, *, padding="SAME"):
  return nnx.Conv(cin, cout, kernel_size=kernel, strides=strides, padding=padding,
                  use_bias=False, dtype=dtype, param_dtype=jnp.float32,
                  kernel_init=nnx.initializers.variance_scaling(2.0, "fan_out", "normal"),
                  rngs=rngs)


def _norm(features, dtype, rngs, *, zero_init=False):
  return nnx.BatchNorm(features, momentum=0.9, epsilon=1e-5, dtype=dtype,
                       param_dtype=jnp.float32,
                       scale_init=nnx.initializers.zeros if zero_init else nnx.initializers.ones,
                       rngs=rngs)


class BasicBlock(nnx.Module):
  """Two 3x3 convolutions with a residual connection (ResNet-18/34)."""
  expansion = 1

  def __init__(self, cin: int, filters: int, strides: int, *, dtype, rngs: nnx.Rngs):
    self.conv1 = _conv(cin, filters, (3, 3), (strides, strides), dtype, rngs)
    self.bn1 = _norm(filters, dtype, rngs)
    self.conv2 = _conv(filters, filters, (3, 3), (1, 1), dtype, rngs)
    self.bn2 = _norm(filters, dtype, rngs, zero_init=True)
    if strides != 1 or cin != filters:
      self.proj = _conv(cin, filters, (1, 1), (strides, strides), dtype, rngs)
      self.proj_bn = _norm(filters, dtype, rngs)
    else:
      self.proj = None
      self.proj_bn = None

  def __call__(self, x):
    y = nnx.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    residual = x if self.proj is None else self.proj_bn(self.proj(x))
    return nnx.relu(residual + y)


class BottleneckBlock(nnx.Module):
  """1x1 -> 3x3 (strided, v1.5) -> 1x1 bottleneck with a residual connection (ResNet-50+)."""
  expansion = 4

  def __init__(self, cin: int, filters: int, strides: int, *, dtype, rngs: nnx.Rngs):
    out = filters * 4
    self.conv1 = _conv(cin, filters, (1, 1), (1, 1), dtype, rngs)
    self.bn1 = _norm(filters, dtype, rngs)
    self.conv2 = _conv(filters, filters, (3, 3), (strides, strides), dtype, rngs)
    self.bn2 = _norm(filters, dtype, rngs)
    self.conv3 = _conv(filters, out, (1, 1), (1, 1), dtype, rngs)
    self.bn3 = _norm(out, dtype, rngs, zero_init=True)
    if strides != 1 or cin != out:
      self.proj = _conv(cin, out, (1, 1), (strides, strides), dtype, rngs)
      self.proj_bn = _norm(out, dtype, rngs)
    else:
      self.proj = None
      self.proj_bn = None

  def __call__(self, x):
    y = nnx.relu(self.bn1(self.conv1(x)))
    y = nnx.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    residual = x if self.proj is None else self.proj_bn(self.proj(x))
    return nnx.relu(residual + y)


class ResNet(nnx.Module):
  """ResNet v1.5.

  Args:
    stage_sizes: number of blocks per stage; stage ``i`` has ``num_filters * 2**i`` filters and
      every stage after the first halves the resolution.
    block: ``"basic"`` (ResNet-18/34) or ``"bottleneck"`` (ResNet-50 and deeper).
    num_classes: size of the classifier.
    num_filters: width of the first stage (64 for the standard networks).
    stem: ``"imagenet"`` (7x7/2 conv + 3x3/2 max-pool, for 224px inputs) or ``"cifar"``
      (one 3x3/1 conv, for small inputs such as 32px).
    dtype: computation dtype; ``jnp.bfloat16`` gives mixed precision (float32 parameters).
    rngs: ``nnx.Rngs`` for parameter initialisation.
  """

  def __init__(self, *, stage_sizes: Sequence[int], block: Literal["basic", "bottleneck"],
               num_classes: int, num_filters: int = 64, stem: Literal["imagenet", "cifar"] = "imagenet",
               in_channels: int = 3, dtype=jnp.float32, rngs: nnx.Rngs):
    if block not in ("basic", "bottleneck"):
      raise ValueError(f"ResNet: block must be 'basic' or 'bottleneck', got {block!r}")
    if stem not in ("imagenet", "cifar"):
      raise ValueError(f"ResNet: stem must be 'imagenet' or 'cifar', got {stem!r}")
    if not stage_sizes or any(int(s) < 1 for s in stage_sizes):
      raise ValueError(f"ResNet: stage_sizes must be a non-empty sequence of ints >= 1, got {stage_sizes!r}")
    self.dtype = dtype
    self.stem = stem
    if stem == "imagenet":
      self.conv_init = _conv(in_channels, num_filters, (7, 7), (2, 2), dtype, rngs,
                             padding=[(3, 3), (3, 3)])
    else:
      self.conv_init = _conv(in_channels, num_filters, (3, 3), (1, 1), dtype, rngs)
    self.bn_init = _norm(num_filters, dtype, rngs)
    block_cls = BasicBlock if block == "basic" else BottleneckBlock
    blocks = []
    cin = num_filters
    for i, size in enumerate(stage_sizes):
      for j in range(int(size)):
        strides = 2 if i > 0 and j == 0 else 1
        blocks.append(block_cls(cin, num_filters * 2**i, strides, dtype=dtype, rngs=rngs))
        cin = num_filters * 2**i * block_cls.expansion
    self.blocks = nnx.List(blocks)
    self.head = nnx.Linear(cin, num_classes, dtype=dtype, param_dtype=jnp.float32,
                           kernel_init=nnx.initializers.zeros_init(), rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(self.dtype)
    x = nnx.relu(self.bn_init(self.conv_init(x)))
    if self.stem == "imagenet":
      x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
    for blk in self.blocks:
      x = blk(x)
    x = jnp.mean(x, axis=(1, 2))
    return self.head(x).astype(jnp.float32)


def create_model(name: str, *, num_classes: int, num_filters: int = 0, stage_sizes=(),
                 stem: str = "auto", image_size: int = 224, dtype: str = "float32",
                 seed: int = 0) -> ResNet:
  """Builds a ResNet from config-style options.

  Args:
    name: one of ``MODEL_SPECS`` (``"ResNet18"``, ``"ResNet50"``, ``"ResNetTiny"``, ...).
    num_classes: classifier size.
    num_filters: first-stage width; ``0`` means the standard 64 (16 for ``ResNetTiny``).
    stage_sizes: blocks per stage; empty means the named network's depth.
    stem: ``"imagenet"``, ``"cifar"`` or ``"auto"`` (``"cifar"`` when ``image_size <= 64``).
    image_size: input resolution (only used by ``stem="auto"``).
    dtype: ``"float32"`` or ``"bfloat16"`` (mixed precision).
    seed: parameter initialisation seed.

  >>> create_model("ResNetTiny", num_classes=10, image_size=32).head.out_features
  10
  """
  if name not in MODEL_SPECS:
    raise ValueError(f"experiments.imagenet: config.model={name!r} is not known; "
                     f"valid: {sorted(MODEL_SPECS)}")
  default_sizes, block = MODEL_SPECS[name]
  sizes = tuple(int(s) for s in stage_sizes) if stage_sizes else default_sizes
  if not num_filters:
    num_filters = 16 if name == "ResNetTiny" else 64
  if stem == "auto":
    stem = "cifar" if image_size <= 64 else "imagenet"
  dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
  if dtype not in dtypes:
    raise ValueError(f"experiments.imagenet: config.dtype={dtype!r} is not valid; use one of {sorted(dtypes)}")

  def build() -> ResNet:
    return ResNet(stage_sizes=sizes, block=block, num_classes=num_classes, num_filters=num_filters,
                  stem=stem, dtype=dtypes[dtype],
                  # RBG keys: same statistics, and XLA compiles their initialisers faster.
                  rngs=nnx.Rngs(jax.random.key(seed, impl="rbg")))

  # Initialise inside one jit: a deep network then compiles one program instead of one small
  # program per distinct weight shape run eagerly (ResNet-50: ~3x less time to a usable model).
  graphdef, abstract = nnx.split(nnx.eval_shape(build))
  values = jax.jit(lambda: nnx.to_pure_dict(nnx.state(build())))()
  nnx.replace_by_pure_dict(abstract, values)
  return nnx.merge(graphdef, abstract)


def count_params(model: nnx.Module) -> tuple[int, int]:
  """Returns ``(number of parameters, bytes of parameters)`` of ``model``."""
  leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
  return sum(int(x.size) for x in leaves), sum(int(x.size) * x.dtype.itemsize for x in leaves)
