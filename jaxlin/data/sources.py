"""Document sources: the user's local files as random-access sequences of texts.

`data.paths` is a comma-separated list of files and glob patterns; what a
document is depends on `data.source`:

    "text"         UTF-8 text files: pieces of each file (`split_pieces`), or the whole file
    "jsonl"        JSON lines: one document per line, from field `data.text_field`
    "parquet"      column `data.text_field` (string): one document per row (needs pyarrow)
    "arrayrecord"  ArrayRecord: one document per record, UTF-8 text or a JSON
                   object with field `data.text_field`

Bad input raises FileNotFoundError / ValueError naming the config field, the
value and what is allowed; nothing is silently dropped except empty texts.
`validation_mask` picks the held-out documents (or works) deterministically.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
from typing import Any, Sequence

import grain
import numpy as np

USER_SOURCES = ("text", "jsonl", "parquet", "arrayrecord")
_BLANK_LINES = re.compile(r"\n[ \t\r]*\n\s*")  # a passage ends after a run of blank lines


def expand_paths(paths: str, field: str = "data.paths") -> list[str]:
  """The files named by comma-separated paths / glob patterns, in order, without repeats."""
  entries = [p.strip() for p in str(paths).split(",") if p.strip()]
  if not entries:
    raise ValueError(f"{field}={paths!r}: give comma-separated local files or glob patterns")
  files: list[str] = []
  seen: set[str] = set()
  for entry in entries:
    pattern = os.path.expanduser(entry)
    if glob.has_magic(pattern):
      matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
      if not matches:
        raise FileNotFoundError(f"{field}={paths!r}: the pattern {entry!r} matches no files")
    elif os.path.isdir(pattern):
      raise ValueError(f"{field}={paths!r}: {entry!r} is a directory; give files or a glob such as "
                       f"'{os.path.join(entry, '*.jsonl')}'")
    elif not os.path.isfile(pattern):
      raise FileNotFoundError(f"{field}={paths!r}: no such file {entry!r}")
    else:
      matches = [pattern]
    for match in matches:
      if os.path.abspath(match) not in seen:
        seen.add(os.path.abspath(match))
        files.append(match)
  return files


def split_pieces(text: str, piece_chars: int) -> list[str]:
  """Cuts `text` at blank lines into consecutive pieces of about `piece_chars` characters.

  A piece closes at the first passage end once it holds >= piece_chars
  characters; the pieces concatenate back to `text` exactly. piece_chars=0:
  the whole text is one piece.
  """
  if piece_chars <= 0 or len(text) <= piece_chars:
    return [text] if text else []
  pieces, start = [], 0
  for match in _BLANK_LINES.finditer(text):
    if match.end() - start >= piece_chars:
      pieces.append(text[start:match.end()])
      start = match.end()
  if start < len(text):
    pieces.append(text[start:])
  return pieces


def validation_mask(num_units: int, fraction: float) -> np.ndarray:
  """[num_units] bool: ceil(fraction * num_units) units, evenly spread, are held out."""
  mask = np.zeros(num_units, bool)
  count = math.ceil(fraction * num_units) if fraction > 0 else 0
  if count:
    mask[[int((i + 0.5) * num_units / count) for i in range(count)]] = True
  return mask


def _read_text(path: str, field: str, piece_chars: int) -> list[str]:
  with open(path, "rb") as f:
    raw = f.read()
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(f"{field}: {path} is not UTF-8 text ({e})") from e
  if not text.strip():
    raise ValueError(f"{field}: {path} is empty; data.source='text' needs UTF-8 text files")
  return split_pieces(text, piece_chars)


def _field_text(value: Any, text_field: str, where: str) -> str:
  """The text field of a parsed JSON value, or a ValueError naming `where`."""
  if not isinstance(value, dict):
    raise ValueError(f"data.text_field={text_field!r}: {where} is a JSON "
                     f"{type(value).__name__}, expected an object with field {text_field!r}")
  if text_field not in value:
    raise ValueError(f"data.text_field={text_field!r}: {where} has no field {text_field!r} "
                     f"(its fields: {sorted(value)[:10]})")
  text = value[text_field]
  if not isinstance(text, str):
    raise ValueError(f"data.text_field={text_field!r}: {where} has {type(text).__name__} value "
                     f"{repr(text)[:40]} in field {text_field!r}, expected a string")
  return text


def _read_jsonl(path: str, field: str, text_field: str) -> list[str]:
  texts = []
  with open(path, "rb") as f:
    for number, raw in enumerate(f, 1):
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise ValueError(f"{field}: {path} line {number} is not UTF-8 ({e})") from e
      if not line.strip():
        continue
      try:
        value = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{field}: {path} line {number} is not valid JSON ({e.msg})") from e
      text = _field_text(value, text_field, f"{path} line {number}")
      if text:
        texts.append(text)
  return texts


def _read_parquet(path: str, field: str, text_field: str) -> list[str]:
  try:
    import pyarrow  # pylint: disable=g-import-not-at-top
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("data.source='parquet' needs the optional package 'pyarrow': "
                      "pip install pyarrow") from e
  try:
    schema = pq.read_schema(path)
  except pyarrow.ArrowException as e:
    raise ValueError(f"{field}: {path} is not a parquet file ({e})") from e
  if text_field not in schema.names:
    raise ValueError(f"data.text_field={text_field!r}: {path} has no column {text_field!r} "
                     f"(its columns: {schema.names[:10]})")
  kind = schema.field(text_field).type
  if not (pyarrow.types.is_string(kind) or pyarrow.types.is_large_string(kind)):
    raise ValueError(f"data.text_field={text_field!r}: column {text_field!r} of {path} has "
                     f"type {kind}, expected string")
  values = pq.read_table(path, columns=[text_field]).column(text_field).to_pylist()
  for row, value in enumerate(values):
    if value is None:
      raise ValueError(f"data.text_field={text_field!r}: {path} row {row} is null, "
                       "expected a string")
  return [v for v in values if v]


def _record_text(record: bytes, text_field: str, where: str, field: str) -> str:
  """An ArrayRecord record as text: UTF-8, or a JSON object holding the text field."""
  try:
    text = record.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(f"{field}: {where} is not UTF-8 ({e})") from e
  if text.lstrip().startswith("{"):
    try:
      value = json.loads(text)
    except json.JSONDecodeError:
      return text  # plain text that happens to start with "{"
    return _field_text(value, text_field, where)
  return text


class ArrayRecordTexts(Sequence[str]):
  """The records of ArrayRecord files as texts, read lazily by index."""

  def __init__(self, files: Sequence[str], text_field: str, field: str = "data.paths"):
    self._files = list(files)
    self._text_field, self._field = text_field, field
    self._sources = []
    for path in self._files:
      try:
        source = grain.sources.ArrayRecordDataSource([path])
        size = len(source)
      except Exception as e:  # array_record raises RuntimeError / its own status errors
        raise ValueError(f"{field}: {path} is not an ArrayRecord file ({e})") from e
      if size == 0:
        raise ValueError(f"{field}: {path} has no records")
      self._sources.append(source)
      _record_text(source[0], text_field, f"{path} record 0", field)  # fail early on the format
    self._ends = np.cumsum([len(s) for s in self._sources])

  def __len__(self) -> int:
    return int(self._ends[-1])

  def __getitem__(self, index: int) -> str:  # type: ignore[override]
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"record {index} of {len(self)}")
    k = int(np.searchsorted(self._ends, index, side="right"))
    local = index - (int(self._ends[k - 1]) if k else 0)
    return _record_text(self._sources[k][local], self._text_field,
                        f"{self._files[k]} record {local}", self._field)


def read_documents(source: str, paths: str, *, text_field: str = "text", piece_chars: int = 0,
                   field: str = "data.paths") -> Sequence[str]:
  """The documents of the files `paths` (a `data.paths`-style string) read as `source`."""
  if source not in USER_SOURCES:
    raise ValueError(f"data.source={source!r} is not a file source; allowed: {USER_SOURCES}")
  files = expand_paths(paths, field)
  if source == "arrayrecord":
    return ArrayRecordTexts(files, text_field, field)
  documents: list[str] = []
  for path in files:
    if source == "text":
      texts = _read_text(path, field, piece_chars)
    elif source == "jsonl":
      texts = _read_jsonl(path, field, text_field)
    else:
      texts = _read_parquet(path, field, text_field)
    if not texts:
      raise ValueError(f"{field}: {path} has no documents (data.source={source!r}, "
                       f"data.text_field={text_field!r})")
    documents.extend(texts)
  return documents
