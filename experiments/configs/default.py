"""Default config: a tiny ResNet on the embedded digits stand-in (CPU, about two minutes).

Override any field on the command line, e.g.
``python -m experiments.imagenet --config.num_epochs=3 --config.transforms.remat_budget=0.5``.
For real ImageNet see ``imagenet_resnet50.py`` (or set ``--config.data_dir``).

>>> get_config().model
'ResNetTiny'
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """The default hyper-parameters (embedded digits stand-in, ResNetTiny)."""
  config = ml_collections.ConfigDict()

  # Data. data_dir="" -> embedded digits stand-in; an ImageFolder root (train/ + val/) -> real
  # pipeline; fake_data=True -> one fixed random batch for throughput.
  config.data_dir = ""
  config.fake_data = False
  config.fake_steps_per_epoch = 100
  config.image_size = 16  # the 8x8 digits are upscaled 2x
  config.num_classes = -1  # inferred from the data (fake data: 1000)
  config.num_workers = 8  # JPEG decoding threads
  config.prefetch = 2  # batches prepared ahead of the step

  # Model.
  config.model = "ResNetTiny"  # ResNet18 | ResNet34 | ResNet50 | ResNet101 | ResNet152 | ResNetTiny
  config.num_filters = 16  # 0 -> the network's standard width (64)
  config.stage_sizes = ()  # () -> the network's standard depth, e.g. (1, 1, 1)
  config.stem = "auto"  # imagenet | cifar | auto (cifar for image_size <= 64)
  config.dtype = "float32"  # float32 | bfloat16 (mixed precision, float32 parameters)

  # Optimisation.
  config.optimizer = "sgd"  # sgd (momentum, nesterov) | adamw
  config.learning_rate = 0.1  # peak (not rescaled with batch_size)
  config.momentum = 0.9
  config.nesterov = True
  config.weight_decay = 5e-4  # on conv / dense kernels only
  config.label_smoothing = 0.1
  config.warmup_epochs = 1.0
  config.batch_size = 32  # global, split over all devices
  config.eval_batch_size = 256
  config.num_epochs = 10
  config.max_steps = -1  # stop after this many steps (-1: num_epochs)
  config.seed = 0

  # Held-out top-1/top-5 after every epoch and at the last step (False: train only, e.g. for
  # throughput runs on fake data).
  config.evaluate = True

  # Logging.
  config.log_every_steps = 10
  config.progress_bar = True
  config.plot = True

  # Which lepton_jax transforms are on (each one off runs its plain-JAX equivalent).
  config.transforms = ml_collections.ConfigDict()
  config.transforms.auto_shard = True  # data parallel over all devices
  config.transforms.shard_strategy = "dp"  # auto | dp | fsdp | tp | replicate
  config.transforms.adaptive_jit = True
  config.transforms.kernels = "auto"  # adaptive_jit kernel routing: auto | xla | none
  config.transforms.remat_budget = ""  # "" off; "0.5" (fraction) or "512MiB"
  config.transforms.pallas_kernels = True  # cross-entropy kernel for the loss

  # Compression (lj.mixed_precision, lj.prune, lj.quantize); see experiments/imagenet/compression.py.
  config.compression = ml_collections.ConfigDict()
  # auto: on where the device has bf16 matrix units (TPU, GPU with compute capability >= 8.0),
  # off on CPU (XLA:CPU converts bf16 matmuls back to float32: no gain); on | off force it.
  config.compression.mixed_precision = "auto"
  config.compression.prune = ""  # "" off | "2:4" | "unstructured": after training, then finetune
  config.compression.sparsity = 0.5  # unstructured only (2:4 is 0.5 by construction)
  config.compression.finetune_epochs = 1.0  # masked finetuning after pruning
  config.compression.finetune_lr_scale = 0.1  # finetune peak lr = learning_rate * this, cosine to 0
  config.compression.quantize = ""  # "" off | int8 | int4 | fp8: post-training, weight-only, at the end
  config.compression.group_size = 128  # int4 group length along the input axis

  # Checkpoints (tiered: fast local + durable persistent). Resume is automatic.
  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.enabled = True  # False: no checkpoints and no resume (throughput runs)
  config.checkpoint.tiered = True  # False: one plain orbax.checkpoint.CheckpointManager
  config.checkpoint.local_every_steps = 44  # one epoch of digits
  config.checkpoint.persistent_every_steps = 220
  config.checkpoint.keep_local = 2
  config.checkpoint.keep_persistent = 2
  config.checkpoint.async_save = True

  # Testing only: SIGKILL this process right after the save at this step (-1: never).
  config.debug_kill_at_step = -1
  return config
