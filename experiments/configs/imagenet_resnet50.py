"""ResNet-50 on real ImageNet (ImageFolder layout: data_dir/train/<class>/*.JPEG, data_dir/val/...).

``python -m experiments.imagenet --config=experiments/configs/imagenet_resnet50.py
--config.data_dir=/path/to/imagenet --workdir=/path/to/workdir``

>>> get_config().num_epochs
90
"""

from experiments.configs import default


def get_config():
  """Goyal et al. recipe: SGD + nesterov, lr 0.1 per 256 images, 5 warm-up epochs, 90 epochs."""
  config = default.get_config()
  config.data_dir = ""  # set --config.data_dir
  config.model = "ResNet50"
  config.num_filters = 0
  config.image_size = 224
  config.dtype = "bfloat16"
  config.batch_size = 1024
  config.eval_batch_size = 1024
  config.learning_rate = 0.4  # 0.1 * batch_size / 256
  config.weight_decay = 1e-4
  config.warmup_epochs = 5.0
  config.num_epochs = 90
  config.num_workers = 32
  config.log_every_steps = 100
  config.checkpoint.local_every_steps = 500
  config.checkpoint.persistent_every_steps = 5000
  return config
