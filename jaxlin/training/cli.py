"""What `run.py` adds around the train loop: one-line user errors, the config's fields with
their comments, and the closest field to a misspelt one.

A user error (a bad config value, a missing data file, an unreadable or mismatched
checkpoint, a diverged run) is printed as ONE line `error: <message>` plus a hint line,
and the process exits with `USER_ERROR_EXIT` (2); `--debug` (or JAXLIN_DEBUG=1) shows the
traceback instead. Any other exception is an internal error and keeps its traceback.

Field comments are read from the sources that define the fields, in this order: the
config file, `ModelConfig`'s field lines and the `default_config()` of the data,
optimizer and sampling groups, then configs/default.py.
"""

from __future__ import annotations

import difflib
import importlib.util
import inspect
import os
import re
import sys
import traceback
from typing import Any, Callable, Iterable, NoReturn

import ml_collections

from jaxlin import data as data_lib
from jaxlin.config import ModelConfig
from jaxlin.training import checkpoint, optim, sample, train

USER_ERROR_EXIT = 2
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
    checkpoint.CheckpointCorruptError, train.NonFiniteError)
DEBUG_ENV = "JAXLIN_DEBUG"
HINT = f"(rerun with --debug or {DEBUG_ENV}=1 for the traceback)"

# group -> where its fields and comments are defined (besides the config files)
GROUP_SOURCES: dict[str, Callable[..., Any]] = {
    "data": data_lib.default_config, "optimizer": optim.default_config,
    "sample": sample.default_config, "model": ModelConfig}


def debug_requested(argv: Iterable[str]) -> bool:
  """--debug on the command line or JAXLIN_DEBUG=1 in the environment."""
  return "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # jaxlin/
REPO_DIR = os.path.dirname(PACKAGE_DIR)


def is_user_error(error: BaseException) -> bool:
  """A USER_ERRORS instance raised by this repository's own code (its checks of configs,
  data and checkpoints), not by a library deep inside a computation."""
  if not isinstance(error, USER_ERRORS):
    return False
  frames = traceback.extract_tb(error.__traceback__)
  if not frames:
    return False
  where = os.path.abspath(frames[-1].filename)
  return (where.startswith((PACKAGE_DIR + os.sep, os.path.join(REPO_DIR, "configs") + os.sep))
          or where == os.path.join(REPO_DIR, "run.py"))


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """get_config() of a configs/*.py file."""
  spec = importlib.util.spec_from_file_location("jaxlin_run_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def exit_user_error(message: str) -> NoReturn:
  """Prints `error: <first line>` (the rest of a multi-line message indented) and the hint
  to stderr, then exits with USER_ERROR_EXIT."""
  lines = str(message).strip().splitlines() or ["(no message)"]
  print("error: " + "\n  ".join(lines), file=sys.stderr)
  print(HINT, file=sys.stderr)
  sys.exit(USER_ERROR_EXIT)


def flatten(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
  """{"group.field": value} of every leaf field, in the config's order."""
  out: dict[str, Any] = {}
  for key, value in config.items():
    path = f"{prefix}{key}"
    if isinstance(value, ml_collections.ConfigDict):
      out.update(flatten(value, path + "."))
    else:
      out[path] = value
  return out


def closest_field(config: ml_collections.ConfigDict, path: str) -> str | None:
  """The existing field path nearest to `path` (None when nothing is close)."""
  fields = list(flatten(config))
  same_group = [f for f in fields if f.rsplit(".", 1)[0] == path.rsplit(".", 1)[0]]
  for pool in (same_group, fields):
    match = difflib.get_close_matches(path, pool, n=1, cutoff=0.6)
    if match:
      return match[0]
  return None


_ASSIGNMENT = re.compile(r"^\s*(?:config|c)\.([\w.]+)\s*=.*?#\s*(.+)$")
_FIELD_LINE = re.compile(r"^\s*(\w+)\s*:\s*[^=]+=.*?#\s*(.+)$")


def _comments_in(source: str, prefix: str, pattern: re.Pattern[str]) -> dict[str, str]:
  """{prefix + name: comment} of the commented assignments / field lines of `source`."""
  out: dict[str, str] = {}
  for line in source.splitlines():
    match = pattern.match(line)
    if match:
      out.setdefault(prefix + match.group(1), match.group(2).strip())
  return out


def field_comments(config_path: str) -> dict[str, str]:
  """{"group.field": comment}: the config file's own comments first, then the groups'
  definitions (`GROUP_SOURCES`), then configs/default.py."""
  def from_file(path: str) -> dict[str, str]:
    if not os.path.isfile(path):
      return {}
    with open(path) as f:
      return _comments_in(f.read(), "", _ASSIGNMENT)

  comments = from_file(config_path)
  for group, source in GROUP_SOURCES.items():
    pattern = _FIELD_LINE if inspect.isclass(source) else _ASSIGNMENT
    for key, text in _comments_in(inspect.getsource(source), group + ".", pattern).items():
      comments.setdefault(key, text)
  default = os.path.join(os.path.dirname(os.path.abspath(config_path)), "default.py")
  for key, text in from_file(default).items():
    comments.setdefault(key, text)
  return comments


def describe_fields(config: ml_collections.ConfigDict, config_path: str) -> str:
  """Every field as `group.field = value  # comment`, one per line."""
  comments = field_comments(config_path)
  rows = [(path, repr(value)) for path, value in flatten(config).items()]
  width = min(max(len(p) + len(v) + 3 for p, v in rows), 60)
  lines = []
  for path, value in rows:
    text = f"{path} = {value}"
    comment = comments.get(path)
    lines.append(f"{text.ljust(width)}  # {comment}" if comment else text)
  return "\n".join(lines)
