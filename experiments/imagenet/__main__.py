"""``python -m experiments.imagenet [--config=experiments/configs/X.py] [--config.FIELD=v] [--workdir=DIR]``.

A thin entry point in the layout of Flax's examples: flags in, ``train_and_evaluate`` out.
A misspelled ``--config.FIELD``, a workdir of another run or Ctrl-C end with a few lines,
not a traceback.
"""

import difflib
import importlib.util
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
_DEFAULT_CONFIG = os.path.join(_CONFIGS, "default.py")
_DEFAULT_WORKDIR = os.path.join("workdir", "imagenet")


def _config_error(err: BaseException, argv: list[str]) -> str:
  """A short message for an override that names no field of the chosen config file."""
  path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), _DEFAULT_CONFIG)
  fields: list[str] = []
  try:
    spec = importlib.util.spec_from_file_location("_lepton_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def walk(d, prefix=""):
      for k, v in d.items():
        if hasattr(v, "items"):
          walk(v, f"{prefix}{k}.")
        else:
          fields.append(f"{prefix}{k}")
    walk(module.get_config())
  except Exception:  # noqa: BLE001 - the message falls back to the library's text
    pass
  bad = [a.split("=", 1)[0][len("--config."):] for a in argv
         if a.startswith("--config.") and a.split("=", 1)[0][len("--config."):] not in fields]
  lines = ["experiments.imagenet: unknown config field" if bad and fields else
           f"experiments.imagenet: config error: {type(err).__name__}: {err}"]
  for b in bad if fields else []:
    close = difflib.get_close_matches(b, fields, n=3)
    lines.append(f"  --config.{b}: {os.path.basename(path)} has no field {b!r}"
                 + (f"; did you mean {', '.join('--config.' + c for c in close)}?" if close else ""))
  if fields:
    lines.append(f"  fields: {', '.join(fields)}")
  return "\n".join(lines)


FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", _DEFAULT_WORKDIR,
                    "Directory for checkpoints, metrics.jsonl, TensorBoard events and the plot. "
                    "Rerunning with the same workdir resumes from its newest checkpoint.")
try:  # ml_collections parses the --config.FIELD overrides while the flag is defined
  config_flags.DEFINE_config_file(
      "config", _DEFAULT_CONFIG,
      "Training configuration file (experiments/configs/*.py); override fields with "
      "--config.FIELD=value.", lock_config=True)
except (AttributeError, KeyError, TypeError, ValueError) as _err:
  if __name__ != "__main__":
    raise
  sys.stderr.write(_config_error(_err, sys.argv[1:]) + "\n")
  sys.exit(2)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
  from experiments.imagenet import train  # imports JAX after flags are parsed
  from lepton_jax.checkpoint import CheckpointLockError
  logging.info("workdir: %s", os.path.abspath(FLAGS.workdir))
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except KeyboardInterrupt:
    sys.stderr.write(f"\nexperiments.imagenet: interrupted. Resume with the same command (same "
                     f"--workdir={FLAGS.workdir} and config); it continues from the newest checkpoint.\n")
    sys.exit(130)
  except (ValueError, CheckpointLockError) as e:
    if not str(e).startswith(("experiments.imagenet", "TieredCheckpointManager")):
      raise
    sys.stderr.write(f"{e}\n")
    sys.exit(1)


def _parse_flags(argv):
  try:
    return FLAGS(argv)
  except flags.Error:
    raise  # absl prints those in one line
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    sys.stderr.write(_config_error(e, argv[1:]) + "\n")
    sys.exit(2)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
