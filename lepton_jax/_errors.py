"""Exceptions raised by lepton_jax.

All are ``ValueError`` subclasses so that code catching ``ValueError`` for bad
arguments keeps working.
"""

from __future__ import annotations

__all__ = ["LeptonError", "BudgetError", "ShardingError", "KernelError"]


class LeptonError(ValueError):
  """Base class of lepton_jax's argument / feasibility errors."""


class BudgetError(LeptonError):
  """A memory budget no plan can reach.

  The message names the smallest feasible budget; ``smallest_feasible_bytes``
  holds it as a number when it is known.
  """

  def __init__(self, message: str, *, smallest_feasible_bytes: int | None = None):
    super().__init__(message)
    self.smallest_feasible_bytes = smallest_feasible_bytes


class ShardingError(LeptonError):
  """A mesh, array or leaf that cannot be placed as asked."""


class KernelError(LeptonError):
  """Shapes or dtypes a kernel does not support (message gives the valid range)."""
