"""Packing: token documents -> fixed-length rows with segment ids -> training examples.

`PackIterDataset` concatenates documents (1-D int arrays, an EOS already
appended where the tokenizer has one) and cuts them into rows of L = T + 1:

    documents  [a a a a] [b b] [c c c c c c c c c]           L = 8
    tokens     a a a a b b c c | c c c c c c c 0
    segments   1 1 1 1 2 2 3 3 | 1 1 1 1 1 1 1 0

Segment ids count the document pieces of a row from 1; a document cut at a row
end goes on in the next row. 0 is padding, only in the last row of a finite
stream. The iterator state is JSON-serialisable and restores the stream
exactly: the parent's state before the document being cut, and the offset in it.

`make_example` turns rows [..., L] into the example the model trains on:

    inputs = tokens[:-1]   targets = tokens[1:]   segment_ids = segments[:-1]
    weights = 1 where segments[:-1] == segments[1:] != 0, else 0

so no target belongs to another document than its input, and padding is never trained.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping

import grain
import numpy as np

from jaxlin import validation

MAX_EMPTY_DOCUMENTS = 100_000  # in a row: more means the documents tokenize to nothing


class _PackIterator(grain.DatasetIterator):
  """Fills rows of `row_length` tokens from the parent's documents."""

  def __init__(self, parent: grain.DatasetIterator, row_length: int):
    super().__init__(parent)
    self._row_length = row_length
    self._document: np.ndarray | None = None  # being cut: 0 < offset < len
    self._offset = 0
    self._document_state: dict[str, Any] = {}  # parent state before `_document`

  def _load_document(self) -> bool:
    """Reads the next non-empty document from the parent; False when it has no more."""
    for _ in range(MAX_EMPTY_DOCUMENTS):
      state = copy.deepcopy(self._parent.get_state())
      try:
        document = np.asarray(next(self._parent), np.int32).reshape(-1)
      except StopIteration:
        return False
      if document.size:
        self._document, self._offset, self._document_state = document, 0, state
        return True
    raise ValueError(f"{MAX_EMPTY_DOCUMENTS} documents in a row have no tokens: "
                     "check the data and data.tokenizer")

  def __next__(self) -> dict[str, np.ndarray]:
    tokens = np.zeros(self._row_length, np.int32)
    segments = np.zeros(self._row_length, np.int32)
    filled, segment = 0, 0
    while filled < self._row_length:
      if self._document is None and not self._load_document():
        break
      assert self._document is not None
      take = min(self._row_length - filled, self._document.size - self._offset)
      segment += 1
      tokens[filled:filled + take] = self._document[self._offset:self._offset + take]
      segments[filled:filled + take] = segment
      filled += take
      self._offset += take
      if self._offset == self._document.size:
        self._document = None
    if not filled:
      raise StopIteration
    return {"tokens": tokens, "segment_ids": segments}

  def get_state(self) -> dict[str, Any]:
    """{"parent": parent state before the partly used document (or now), "offset": in it}."""
    if self._document is None:
      return {"parent": copy.deepcopy(self._parent.get_state()), "offset": 0}
    return {"parent": copy.deepcopy(self._document_state), "offset": self._offset}

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Restores a state of `get_state` (also after a JSON round trip)."""
    self._parent.set_state(state["parent"])
    self._document = None
    offset = int(state["offset"])
    if offset:
      if not self._load_document():
        raise ValueError(f"cannot restore packing state {state}: the parent has no document")
      self._offset = offset


class PackIterDataset(grain.IterDataset):
  """Packs the parent's 1-D token documents into rows {"tokens", "segment_ids"} [row_length]."""

  def __init__(self, parent: grain.IterDataset, row_length: int):
    super().__init__(parent)
    validation.int_in_range("row_length (seq_len + 1)", row_length, 2)
    self._row_length = row_length

  def __iter__(self) -> grain.DatasetIterator:
    return _PackIterator(self._parent.__iter__(), self._row_length)

  def __str__(self) -> str:
    return f"PackIterDataset(row_length={self._row_length})"


def make_example(rows: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Rows {"tokens", "segment_ids"} [..., T + 1] -> the example [..., T] (see the legend)."""
  tokens = np.asarray(rows["tokens"], np.int32)
  segments = np.asarray(rows["segment_ids"], np.int32)
  same = (segments[..., :-1] == segments[..., 1:]) & (segments[..., :-1] != 0)
  return {
      "inputs": tokens[..., :-1],
      "targets": tokens[..., 1:],
      "segment_ids": segments[..., :-1],
      "weights": same.astype(np.float32),
  }
