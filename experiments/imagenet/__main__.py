"""``python -m experiments.imagenet [--config=experiments/configs/X.py] [--config.FIELD=v] [--workdir=DIR]``.

A thin entry point in the layout of Flax's examples: flags in, ``train_and_evaluate`` out.
"""

import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
_DEFAULT_WORKDIR = os.path.join("workdir", "imagenet")

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", _DEFAULT_WORKDIR,
                    "Directory for checkpoints, metrics.jsonl, TensorBoard events and the plot. "
                    "Rerunning with the same workdir resumes from its newest checkpoint.")
config_flags.DEFINE_config_file(
    "config", os.path.join(_CONFIGS, "default.py"),
    "Training configuration file (experiments/configs/*.py); override fields with "
    "--config.FIELD=value.", lock_config=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
  from experiments.imagenet import train  # imports JAX after flags are parsed
  logging.info("workdir: %s", os.path.abspath(FLAGS.workdir))
  train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
