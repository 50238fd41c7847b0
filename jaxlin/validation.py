"""Checks of config fields and layer / op arguments, with one error style.

Every check raises `ValueError` with the message

    {name}: got {value!r}; expected {what is allowed}

where `name` is the argument or config field as the caller spells it (a run config's
field with its group, e.g. "train.num_steps"). This module imports nothing of jaxlin, so
every layer of the package may use it.
"""

from __future__ import annotations

import numbers
from typing import Any, Collection, NoReturn


def fail(name: str, value: Any, expected: str) -> NoReturn:
  """Raises the one error of this module: `{name}: got {value!r}; expected {expected}`."""
  raise ValueError(f"{name}: got {value!r}; expected {expected}")


def require(ok: bool, name: str, value: Any, expected: str) -> None:
  """`fail(name, value, expected)` unless `ok`."""
  if not ok:
    fail(name, value, expected)


def is_int(value: Any) -> bool:
  """Whether value is an int (numpy integers included), not a bool."""
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def int_in_range(name: str, value: Any, minimum: int, maximum: int | None = None, *,
                 optional: bool = False) -> Any:
  """Returns value after checking it is an int in [minimum, maximum] (no upper bound when
  `maximum` is None; None passes when `optional`)."""
  if optional and value is None:
    return value
  bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
  require(is_int(value) and value >= minimum and (maximum is None or value <= maximum),
          name, value, ("None or " if optional else "") + f"an int {bound}")
  return value


def positive_int(name: str, value: Any, *, optional: bool = False) -> Any:
  """Returns value after checking it is an int >= 1 (or None when `optional`)."""
  return int_in_range(name, value, 1, optional=optional)


def non_negative_int(name: str, value: Any) -> Any:
  """Returns value after checking it is an int >= 0."""
  return int_in_range(name, value, 0)


def non_negative(name: str, value: Any) -> Any:
  """Returns value after checking it is a number >= 0 (NaN fails)."""
  require(isinstance(value, numbers.Real) and not isinstance(value, bool) and value >= 0,
          name, value, "a float >= 0")
  return value


def choice(name: str, value: Any, allowed: Collection[Any]) -> Any:
  """Returns value after checking it is one of `allowed` (listed in the error)."""
  require(value in allowed, name, value, f"one of {tuple(allowed)}")
  return value
