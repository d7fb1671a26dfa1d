"""ResNet-50 on fake data: throughput measurements (images/s) without an input pipeline.

``python -m experiments.imagenet --config=experiments/configs/resnet50_fake.py``

>>> get_config().model
'ResNet50'
"""

from experiments.configs import default


def get_config():
  """Standard ResNet-50 at 224px, bf16 mixed precision, on one fixed random batch."""
  config = default.get_config()
  config.fake_data = True
  config.fake_steps_per_epoch = 100
  config.model = "ResNet50"
  config.num_filters = 0
  config.image_size = 224
  config.dtype = "bfloat16"
  config.batch_size = 256
  config.eval_batch_size = 256
  config.num_epochs = 1
  config.learning_rate = 0.1
  config.warmup_epochs = 0.1
  config.log_every_steps = 20
  config.plot = False
  config.evaluate = False  # fake data: nothing to evaluate
  config.checkpoint.enabled = False  # measures the step, not the checkpoint writer
  config.checkpoint.local_every_steps = 1000
  config.checkpoint.persistent_every_steps = 1000
  return config
