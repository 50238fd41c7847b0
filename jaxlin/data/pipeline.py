"""The data pipeline: `default_config()` -> `build(config)` -> `Data`.

Language-model data (the embedded Shakespeare corpus or the user's files):

    documents --shard by process--> shuffle(seed) --> repeat --> tokenize (+EOS)
      --> pack into rows of T + 1 (packing.py) --> batch(b) --> make_example

MQAR (mqar.py): examples of a random-access source --shard--> shuffle --> repeat --> batch(b).

Every batch is a dict of numpy arrays: inputs, targets, segment_ids [b, T]
int32 and weights [b, T] float32, with b = batch_size / process_count. The
train iterator is a grain DatasetIterator: `get_state()` / `set_state()`
(what grain.checkpoint saves) resume the stream exactly. Validation batches
are fixed: the held-out documents in order, packed, cut into global batches
of which each process takes its own b rows.

Legend: T = data.seq_len, B = data.batch_size (global), b = B / process_count.
"""

from __future__ import annotations

import itertools
from typing import Any, Sequence

from absl import flags
import grain
import ml_collections
import numpy as np

from jaxlin import validation
from jaxlin.data import mqar as mqar_lib
from jaxlin.data import packing, shakespeare, sources
from jaxlin.data import tokenizers as tokenizers_lib

SOURCES = ("shakespeare",) + sources.USER_SOURCES + ("mqar",)
READ_OPTIONS = grain.ReadOptions(num_threads=4, prefetch_buffer_size=128)


def default_config() -> ml_collections.ConfigDict:
  """Every data field with its default."""
  config = ml_collections.ConfigDict()
  config.source = "shakespeare"    # one of SOURCES: "shakespeare" (embedded), user files, "mqar"
  config.paths = ""                # comma-separated local files / glob patterns (user sources)
  config.validation_paths = ""     # separate validation files; "": hold out validation_fraction
  config.text_field = "text"       # the text of a JSONL line / parquet row / JSON ArrayRecord
  config.tokenizer = "byte"        # "byte" or a local tokenizer.json / sentencepiece .model
  config.seq_len = 256             # T: tokens per example
  config.batch_size = 16           # B: examples per step, global across processes
  config.validation_fraction = 0.05  # held out: of the works (shakespeare) or documents (files)
  config.piece_chars = 2048        # works / text files cut at blank lines into ~this; 0: whole
  config.shuffle_seed = 0          # document order, reshuffled every epoch
  config.worker_count = 0          # grain worker processes (0: in the main process)
  config.mqar = ml_collections.ConfigDict()
  config.mqar.vocab_size = 8192    # keys from [1, V/2), values from [V/2, V)
  config.mqar.num_kv_pairs = 16    # key-value pairs (and queries) per example
  config.mqar.num_train_examples = 100_000
  config.mqar.num_validation_examples = 1_000
  config.mqar.seed = 0             # examples are a function of (seed, split, index)
  config.mqar.power_a = 0.01       # query gap power law (Zoology); 1.0: uniform
  return config


class Data:
  """Built data: `train_iterator()`, `validation_batches(n)`, `tokenizer`, `vocab_size`."""

  def __init__(self, *, tokenizer: tokenizers_lib.Tokenizer | None, vocab_size: int,
               seq_len: int, batch_size: int, process_index: int, process_count: int,
               worker_count: int, train: grain.IterDataset,
               validation: grain.IterDataset | None, no_validation: str,
               num_train_documents: int, num_validation_documents: int):
    self.tokenizer = tokenizer  # None for MQAR
    self.vocab_size = vocab_size
    self.seq_len = seq_len
    self.batch_size = batch_size  # global
    self.per_process_batch_size = batch_size // process_count
    self.process_index, self.process_count = process_index, process_count
    self.worker_count = worker_count
    self.num_train_documents = num_train_documents  # all processes (MQAR: examples)
    self.num_validation_documents = num_validation_documents
    self._train, self._validation, self._no_validation = train, validation, no_validation

  def train_iterator(self) -> grain.DatasetIterator:
    """A fresh iterator over this process's endless stream of [b, T] batches, checkpointable.

    With data.worker_count > 0 call `.close()` on it when done (stops the workers).
    """
    if self.worker_count and not flags.FLAGS.is_parsed():  # grain's workers read absl flags
      flags.FLAGS.mark_as_parsed()
    return iter(self._train)

  def validation_batches(self, num_batches: int) -> list[dict[str, np.ndarray]]:
    """The first min(num_batches, available) fixed validation batches of this process."""
    validation.positive_int("num_batches", num_batches)
    if self._validation is None:
      raise ValueError(f"there is no validation split: {self._no_validation}")
    rows = list(itertools.islice(iter(self._validation), num_batches * self.batch_size))
    if len(rows) < self.batch_size:
      raise ValueError(self._shortfall(rows))
    b, first = self.per_process_batch_size, self.process_index * self.per_process_batch_size
    batches = []
    for start in range(0, len(rows) - self.batch_size + 1, self.batch_size):
      mine = rows[start + first:start + first + b]
      batch = {k: np.stack([r[k] for r in mine]) for k in mine[0]}
      batches.append(packing.make_example(batch) if "tokens" in batch else batch)
    return batches

  def _shortfall(self, rows: Sequence[dict[str, np.ndarray]]) -> str:
    if rows and "tokens" in rows[0]:
      tokens = sum(int(np.count_nonzero(r["segment_ids"])) for r in rows)
      return (f"the validation split has {tokens} tokens, {len(rows)} rows of data.seq_len + 1 = "
              f"{self.seq_len + 1}; one batch needs data.batch_size = {self.batch_size} rows "
              f"(about {self.batch_size * (self.seq_len + 1)} tokens): use more validation data, "
              "a larger data.validation_fraction or a smaller data.batch_size / data.seq_len")
    return (f"the validation split has {len(rows)} examples; one batch needs data.batch_size = "
            f"{self.batch_size}: raise data.mqar.num_validation_examples")

  def __repr__(self) -> str:
    return (f"Data(vocab_size={self.vocab_size}, seq_len={self.seq_len}, batch_size="
            f"{self.batch_size}, process {self.process_index}/{self.process_count}, "
            f"train_documents={self.num_train_documents})")


class _Encode:
  """Picklable map: document index -> int32 token ids of the text, EOS appended if any."""

  def __init__(self, texts: Sequence[str], tokenizer: tokenizers_lib.Tokenizer):
    self.texts, self.tokenizer = texts, tokenizer

  def __call__(self, index: Any) -> np.ndarray:
    ids = list(self.tokenizer.encode(self.texts[int(index)]))
    if self.tokenizer.eos_id is not None:
      ids.append(self.tokenizer.eos_id)
    return np.asarray(ids, np.int32)


def _int(config: ml_collections.ConfigDict, name: str, minimum: int,
         maximum: int | None = None) -> int:
  """config.<name> as an int in [minimum, maximum], or a ValueError naming data.<name>."""
  value = config
  for part in name.split("."):
    value = value[part]
  return int(validation.int_in_range(f"data.{name}", value, minimum, maximum))


def _check(config: ml_collections.ConfigDict, process_index: int, process_count: int) -> None:
  """Validates the fields that do not need the data; errors name data.<field>."""
  defaults = default_config()
  given = set(config.keys()) | {f"mqar.{k}" for k in config.get("mqar", {}).keys()}
  wanted = set(defaults.keys()) | {f"mqar.{k}" for k in defaults.mqar.keys()}
  for problem, names in (("unknown", given - wanted), ("missing", wanted - given)):
    if names:
      raise ValueError(f"{problem} data fields {sorted('data.' + k for k in names)}; start from "
                       "jaxlin.data.default_config()")
  validation.choice("data.source", config.source, SOURCES)
  validation.positive_int("process_count", process_count)
  validation.require(validation.is_int(process_index) and 0 <= process_index < process_count,
                     "process_index", process_index, f"an int in [0, process_count={process_count})")
  _int(config, "seq_len", 1)
  batch_size = _int(config, "batch_size", 1)
  validation.require(batch_size % process_count == 0, "data.batch_size", batch_size,
                     f"a multiple of the process count {process_count}")
  _int(config, "shuffle_seed", 0, 2**32 - 1)
  _int(config, "worker_count", 0)
  _int(config, "piece_chars", 0)
  fraction = config.validation_fraction
  validation.require(validation.non_negative("data.validation_fraction", fraction) < 1,
                     "data.validation_fraction", fraction, "a number in [0, 1)")
  validation.require(isinstance(config.text_field, str) and bool(config.text_field),
                     "data.text_field", config.text_field, "a non-empty string")
  if config.source in ("shakespeare", "mqar"):
    for name in ("paths", "validation_paths"):
      if config[name]:
        raise ValueError(f"data.{name}={config[name]!r} is set but data.source={config.source!r} "
                         f"reads no files; use a file source: {sources.USER_SOURCES}")


def _copy_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Plain arrays out of a worker's shared memory (freed at once, not at exit)."""
  return {k: np.array(v) for k, v in batch.items()}


def _finish(config: ml_collections.ConfigDict, train: grain.IterDataset) -> grain.IterDataset:
  """The train dataset, produced by `data.worker_count` grain worker processes if > 0."""
  if config.worker_count:
    options = grain.MultiprocessingOptions(num_workers=config.worker_count)
    return train.mp_prefetch(options).map(_copy_batch)
  return train


def _build_mqar(config: ml_collections.ConfigDict, process_index: int,
                process_count: int) -> Data:
  c = config.mqar
  task = mqar_lib.MqarTask(vocab_size=c.vocab_size, num_kv_pairs=c.num_kv_pairs,
                           seq_len=config.seq_len, seed=c.seed, power_a=c.power_a)
  num_train = _int(config, "mqar.num_train_examples", process_count)
  num_validation = _int(config, "mqar.num_validation_examples", 0)
  b = config.batch_size // process_count
  train = (grain.MapDataset.source(mqar_lib.MqarSource(task, "train", num_train))
           [process_index::process_count].shuffle(config.shuffle_seed).repeat(None)
           .to_iter_dataset(READ_OPTIONS).batch(b, drop_remainder=True))
  validation = None
  if num_validation:
    validation = grain.MapDataset.source(
        mqar_lib.MqarSource(task, "validation", num_validation)).to_iter_dataset()
  return Data(tokenizer=None, vocab_size=task.vocab_size, seq_len=config.seq_len,
              batch_size=config.batch_size, process_index=process_index,
              process_count=process_count, worker_count=config.worker_count,
              train=_finish(config, train), validation=validation,
              no_validation="data.mqar.num_validation_examples=0",
              num_train_documents=num_train, num_validation_documents=num_validation)


def _documents(config: ml_collections.ConfigDict) -> tuple[Sequence[str], np.ndarray,
                                                           Sequence[str], np.ndarray]:
  """(train texts, train ids, validation texts, validation ids) of an LM source."""
  if config.source == "shakespeare":
    works = shakespeare.load_works()
    held_out = sources.validation_mask(len(works), config.validation_fraction)
    texts, is_validation = [], []
    for work, hold in zip(works, held_out):
      pieces = sources.split_pieces(work.text, config.piece_chars)
      texts += pieces
      is_validation += [hold] * len(pieces)
    mask = np.array(is_validation, bool)
    return texts, np.flatnonzero(~mask), texts, np.flatnonzero(mask)
  texts = sources.read_documents(config.source, config.paths, text_field=config.text_field,
                                 piece_chars=config.piece_chars, field="data.paths")
  if config.validation_paths:
    validation = sources.read_documents(
        config.source, config.validation_paths, text_field=config.text_field,
        piece_chars=config.piece_chars, field="data.validation_paths")
    return texts, np.arange(len(texts)), validation, np.arange(len(validation))
  mask = sources.validation_mask(len(texts), config.validation_fraction)
  return texts, np.flatnonzero(~mask), texts, np.flatnonzero(mask)


def _build_lm(config: ml_collections.ConfigDict, process_index: int, process_count: int) -> Data:
  tokenizer = tokenizers_lib.load_tokenizer(config.tokenizer)
  train_texts, train_ids, validation_texts, validation_ids = _documents(config)
  if len(train_ids) < process_count:
    raise ValueError(
        f"{len(train_ids)} training documents for {process_count} processes (data.source="
        f"{config.source!r}, {len(validation_ids)} validation documents): use more data or a "
        "smaller data.validation_fraction")
  row_length = config.seq_len + 1
  documents = (grain.MapDataset.source(train_ids)[process_index::process_count]
               .shuffle(config.shuffle_seed).repeat(None)
               .map(_Encode(train_texts, tokenizer)).to_iter_dataset(READ_OPTIONS))
  train = (packing.PackIterDataset(documents, row_length)
           .batch(config.batch_size // process_count, drop_remainder=True)
           .map(packing.make_example))
  validation = None
  if len(validation_ids):
    validation = packing.PackIterDataset(
        grain.MapDataset.source(validation_ids).map(_Encode(validation_texts, tokenizer))
        .to_iter_dataset(READ_OPTIONS), row_length)
  return Data(tokenizer=tokenizer, vocab_size=tokenizer.vocab_size, seq_len=config.seq_len,
              batch_size=config.batch_size, process_index=process_index,
              process_count=process_count, worker_count=config.worker_count,
              train=_finish(config, train), validation=validation,
              no_validation=(f"data.validation_paths='' and data.validation_fraction="
                             f"{config.validation_fraction} holds out no documents"),
              num_train_documents=len(train_ids), num_validation_documents=len(validation_ids))


def build(config: ml_collections.ConfigDict, *, process_index: int = 0,
          process_count: int = 1) -> Data:
  """The data of `config` (fields of `default_config()`) for one of `process_count` processes."""
  _check(config, process_index, process_count)
  if config.source == "mqar":
    return _build_mqar(config, process_index, process_count)
  return _build_lm(config, process_index, process_count)
