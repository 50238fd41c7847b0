"""Names of pytree paths, shared by the optimizer's decay mask and the checkpoint checks."""

from __future__ import annotations

from typing import Any


def path_names(path: tuple[Any, ...]) -> list[str]:
  """The key names of a pytree path (dict keys, attribute names, sequence indices)."""
  names = []
  for entry in path:
    for attr in ("key", "name", "idx"):
      if hasattr(entry, attr):
        names.append(str(getattr(entry, attr)))
        break
  return names
