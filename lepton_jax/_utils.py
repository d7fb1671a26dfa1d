"""Small shared helpers (no JAX tracing logic lives here)."""

from __future__ import annotations

import re

__all__ = ["parse_bytes", "format_bytes"]

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
}


def parse_bytes(value: str | int, *, name: str = "value", api: str = "lepton_jax") -> int:
  """Parses ``"512MiB"``, ``"2GB"``, ``"1.5 GiB"`` or an int into a byte count."""
  if isinstance(value, bool):
    raise TypeError(f"{api}: {name} must be an int or a size string like '512MiB', got {value!r}")
  if isinstance(value, int):
    if value < 0:
      raise ValueError(f"{api}: {name} must be >= 0 bytes, got {value}")
    return value
  if not isinstance(value, str):
    raise TypeError(f"{api}: {name} must be an int or a size string like '512MiB', got {type(value).__name__} {value!r}")
  m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", value)
  if not m or m.group(2).lower() not in _UNITS:
    raise ValueError(
        f"{api}: could not parse {name}={value!r}; use bytes as an int or a string such as "
        "'512MiB', '2GB', '1.5GiB' (units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)")
  return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_bytes(n: float) -> str:
  """Human-readable bytes with binary units: ``format_bytes(3*2**20) == '3.0 MiB'``."""
  n = float(n)
  for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
    if abs(n) < 1024 or unit == "TiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024
  return f"{n:.1f} TiB"
