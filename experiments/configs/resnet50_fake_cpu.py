"""ResNet-50's architecture on fake data at a size a CPU finishes in minutes: images/s at the end.

``python -m experiments.imagenet --config=experiments/configs/resnet50_fake_cpu.py --workdir=/tmp/r50cpu``

Same depth and block structure as ``resnet50_fake.py`` (bottleneck blocks, stages [3, 4, 6, 3],
7x7 stem + max-pool), width 16 instead of 64, 32x32 inputs, batch 16, float32, 12 steps. The
final line reports the median images/s of the logged windows after the first (compilation).

>>> get_config().model
'ResNet50'
"""

from experiments.configs import resnet50_fake


def get_config():
  """ResNet-50 structure, CPU-sized."""
  config = resnet50_fake.get_config()
  config.num_filters = 16
  config.image_size = 32
  config.stem = "imagenet"
  config.dtype = "float32"
  config.batch_size = 16
  config.eval_batch_size = 16
  config.num_classes = 10
  config.fake_steps_per_epoch = 12
  config.log_every_steps = 3
  config.warmup_epochs = 0.25
  return config
