"""Package-level checks: public names, error hierarchy, README/CI agreement."""

import pathlib
import re

import pytest

import lepton_jax as lj
from lepton_jax._utils import format_bytes, parse_bytes

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_errors_are_value_errors():
  for cls in (lj.BudgetError, lj.ShardingError, lj.KernelError):
    assert issubclass(cls, ValueError)
    with pytest.raises(ValueError):
      raise cls("x")


def test_budget_error_carries_smallest_feasible():
  e = lj.BudgetError("too small", smallest_feasible_bytes=123)
  assert e.smallest_feasible_bytes == 123


@pytest.mark.parametrize("text,expected", [
    ("512MiB", 512 * 2**20), ("2GB", 2 * 10**9), ("1.5 GiB", int(1.5 * 2**30)),
    (17, 17), ("100", 100), ("3kib", 3072)])
def test_parse_bytes(text, expected):
  assert parse_bytes(text) == expected


@pytest.mark.parametrize("bad", ["12 parsecs", "", "MiB", -1, 1.5, None, True])
def test_parse_bytes_rejects(bad):
  with pytest.raises((TypeError, ValueError), match="budget"):
    parse_bytes(bad, name="budget")


def test_format_bytes():
  assert format_bytes(3 * 2**20) == "3.0 MiB"
  assert format_bytes(10) == "10 B"


def test_readme_has_exactly_the_two_ci_commands():
  text = (ROOT / "README.md").read_text()
  assert "<!-- ci:main -->" in text and "<!-- ci:test -->" in text
  ci = (ROOT / ".ci" / "run").read_text()
  assert "ci:test" in ci


def test_version_single_sourced():
  assert re.fullmatch(r"\d+\.\d+\.\d+", lj.__version__)
