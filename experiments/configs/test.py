"""A seconds-long config for tests: a very small ResNet on a slice of the digits stand-in.

>>> get_config().num_epochs
2
"""

from experiments.configs import default


def get_config():
  """Tiny, fast settings (the same code paths as the default run)."""
  config = default.get_config()
  config.image_size = 8
  config.num_filters = 8
  config.stage_sizes = (1, 1)
  config.batch_size = 64
  config.eval_batch_size = 512
  config.num_epochs = 2
  config.learning_rate = 0.4
  config.log_every_steps = 4
  config.progress_bar = False
  config.checkpoint.local_every_steps = 10
  config.checkpoint.persistent_every_steps = 20
  return config
