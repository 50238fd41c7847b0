"""Tokenizers: text <-> token ids for the language-model data.

`load_tokenizer(spec)` reads the `data.tokenizer` field:

    "byte"                  ByteTokenizer: UTF-8 bytes, vocab 256, no EOS (the default)
    path/tokenizer.json     HuggingFaceTokenizer (needs the `tokenizers` package)
    path/name.model         SentencePieceTokenizer (needs the `sentencepiece` package)

Every tokenizer has `encode(text) -> list[int]`, `decode(ids) -> str`,
`vocab_size` and `eos_id` (the id appended after each document when packing,
None if the tokenizer has none). Tokenizers pickle (grain workers get a copy):
file-backed ones reload from their path.
"""

from __future__ import annotations

import abc
import importlib
import os
from typing import Any, Sequence

FIELD = "data.tokenizer"
ALLOWED = "'byte', a HuggingFace tokenizer.json file or a sentencepiece .model file"
# special tokens taken as the end-of-document token of a tokenizer.json, first found wins
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|eot_id|>")


class Tokenizer(abc.ABC):
  """Base class: text <-> ids, with `vocab_size` and `eos_id` (or None)."""

  vocab_size: int
  eos_id: int | None

  @abc.abstractmethod
  def encode(self, text: str) -> list[int]:
    """The token ids of `text` (no special tokens added)."""

  @abc.abstractmethod
  def decode(self, ids: Sequence[int]) -> str:
    """The text of `ids`."""


class ByteTokenizer(Tokenizer):
  """UTF-8 bytes as ids 0..255; decoding replaces invalid byte sequences."""

  vocab_size = 256
  eos_id = None

  def encode(self, text: str) -> list[int]:
    """The UTF-8 bytes of `text`."""
    return list(text.encode("utf-8"))

  def decode(self, ids: Sequence[int]) -> str:
    """The text of the bytes `ids` (invalid UTF-8 becomes U+FFFD)."""
    values = [int(i) for i in ids]
    bad = [i for i in values if not 0 <= i < 256]
    if bad:
      raise ValueError(f"ByteTokenizer.decode: ids must be in [0, 256), got {bad[:5]}")
    return bytes(values).decode("utf-8", errors="replace")

  def __repr__(self) -> str:
    return "ByteTokenizer()"


def _import(package: str, spec: str) -> Any:
  """Imports an optional package, or says which field needs it."""
  try:
    return importlib.import_module(package)
  except ImportError as e:
    raise ImportError(
        f"{FIELD}={spec!r} needs the optional package {package!r}: pip install {package}"
    ) from e


class _FileTokenizer(Tokenizer):
  """A tokenizer loaded from a local file; pickles as its path (grain workers reload it)."""

  def __init__(self, path: str):
    self.path = os.fspath(path)
    self._load()

  def _load(self) -> None:
    raise NotImplementedError

  def __getstate__(self) -> dict[str, Any]:
    return {"path": self.path}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.path = state["path"]
    self._load()

  def __repr__(self) -> str:
    return f"{type(self).__name__}({self.path!r})"


class HuggingFaceTokenizer(_FileTokenizer):
  """A HuggingFace `tokenizers` tokenizer.json file."""

  def _load(self) -> None:
    module = _import("tokenizers", self.path)
    self._tok = module.Tokenizer.from_file(self.path)
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    ids = [self._tok.token_to_id(t) for t in EOS_CANDIDATES]
    self.eos_id = next((i for i in ids if i is not None), None)

  def encode(self, text: str) -> list[int]:
    """The ids of `text` without the tokenizer's post-processing specials."""
    return list(self._tok.encode(text, add_special_tokens=False).ids)

  def decode(self, ids: Sequence[int]) -> str:
    """The text of `ids`, special tokens included."""
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)



class SentencePieceTokenizer(_FileTokenizer):
  """A sentencepiece .model file; `eos_id` is the model's EOS piece if it has one."""

  def _load(self) -> None:
    module = _import("sentencepiece", self.path)
    self._sp = module.SentencePieceProcessor(model_file=self.path)
    self.vocab_size = int(self._sp.get_piece_size())
    eos = int(self._sp.eos_id())
    self.eos_id = eos if eos >= 0 else None

  def encode(self, text: str) -> list[int]:
    """The piece ids of `text` (no BOS / EOS added)."""
    return list(self._sp.encode(text, out_type=int))

  def decode(self, ids: Sequence[int]) -> str:
    """The text of the piece ids `ids`."""
    return self._sp.decode([int(i) for i in ids])



def load_tokenizer(spec: str) -> Tokenizer:
  """The tokenizer named by `data.tokenizer`: "byte" or a local file path."""
  if not isinstance(spec, str) or not spec:
    raise ValueError(f"{FIELD}={spec!r} is not allowed; expected {ALLOWED}")
  if spec == "byte":
    return ByteTokenizer()
  path = os.path.expanduser(spec)
  if path.endswith(".json"):
    cls = HuggingFaceTokenizer
  elif path.endswith(".model"):
    cls = SentencePieceTokenizer
  else:
    raise ValueError(f"{FIELD}={spec!r}: unknown tokenizer file type; expected {ALLOWED}")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{FIELD}={spec!r}: no such file; expected {ALLOWED}")
  try:
    return cls(path)
  except ImportError:
    raise
  except Exception as e:  # the libraries raise their own exception types on bad files
    raise ValueError(f"{FIELD}={spec!r}: cannot read {cls.__name__} file: {e}") from e
