"""Checks of user settings whose errors name the setting at fault: the package's bottom layer,
imported by every other (it imports nothing of the package).

Every layer validates its own settings with these helpers (the model config, the scan and SLWS
modules, the input pipeline, the optimizer, the training loop), so that a bad value fails before
anything compiles with one message of the form `setting=value: requirement`.
"""

from __future__ import annotations

import math
from collections.abc import Collection

import numpy as np


class SettingError(ValueError):
  """A setting with a value it cannot take; `setting` names it (a model field or `config.*`)."""

  def __init__(self, setting: str, value, requirement: str):
    super().__init__(f"{setting}={value!r}: {requirement}")
    self.setting, self.value, self.requirement = setting, value, requirement


def integer(setting: str, value, minimum: int = 1) -> int:
  """`value` if it is an integer (not a bool) >= `minimum`, else a SettingError."""
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise SettingError(setting, value, f"must be an integer >= {minimum}")
  return int(value)


def number(setting: str, value, low: float = 0.0, high: float = math.inf, *, high_open=False) -> float:
  """`value` if it is a real number in [low, high] (or [low, high) with `high_open`)."""
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
    raise SettingError(setting, value, "must be a number")
  if math.isnan(value) or value < low or value > high or (high_open and value == high):
    raise SettingError(setting, value, f"must be in [{low}, {high}{')' if high_open else ']'}")
  return float(value)


def size_pair(setting: str, value) -> tuple[int, int]:
  """`value` as (height, width) if it is two integers >= 1."""
  if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
    raise SettingError(setting, value, "must be two sizes, (height, width)")
  return tuple(integer(setting, side) for side in value)


def one_of(setting: str, value, choices: Collection):
  """`value` if it is one of `choices`."""
  if value not in choices:
    raise SettingError(setting, value, f"must be one of {tuple(choices)}")
  return value
