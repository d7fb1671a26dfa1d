"""Tiered, crash-safe, verified checkpoints on Orbax.

>>> from lepton_jax.checkpoint import TieredCheckpointManager
"""

from lepton_jax.checkpoint._manager import CheckpointCorruptionWarning as CheckpointCorruptionWarning
from lepton_jax.checkpoint._manager import CheckpointLockError as CheckpointLockError
from lepton_jax.checkpoint._manager import TieredCheckpointManager as TieredCheckpointManager
