"""jaxlin.data MQAR: the task layout, determinism, splits, the pipeline and the accuracy metric."""

from __future__ import annotations

import json
from typing import Any

import ml_collections
import numpy as np
import pytest

from jaxlin import data
from jaxlin.data import mqar

TASK = mqar.MqarTask(vocab_size=64, num_kv_pairs=6, seq_len=40, seed=1)


def _config(seq_len: int = 40, batch_size: int = 4, **fields: Any) -> Any:
  config = ml_collections.ConfigDict(data.default_config().to_dict(), type_safe=False)
  config.source, config.seq_len, config.batch_size = "mqar", seq_len, batch_size
  config.mqar.update(vocab_size=64, num_kv_pairs=6, num_train_examples=40,
                     num_validation_examples=12, seed=1)
  config.mqar.update(fields)
  return config


def test_example_layout() -> None:
  n, vocab = 6, 64
  for index in range(50):
    e = TASK.example("train", index)
    inputs, targets, weights = e["inputs"], e["targets"], e["weights"]
    assert {k: (v.shape, v.dtype.name) for k, v in e.items()} == {
        "inputs": ((40,), "int32"), "targets": ((40,), "int32"),
        "segment_ids": ((40,), "int32"), "weights": ((40,), "float32")}
    assert (e["segment_ids"] == 1).all()
    keys, values = inputs[0:12:2], inputs[1:12:2]
    assert ((1 <= keys) & (keys < 32)).all() and ((32 <= values) & (values < vocab)).all()
    assert len(set(keys)) == n and len(set(values)) == n
    answers = np.flatnonzero(weights)
    assert len(answers) == n and set(weights) <= {0.0, 1.0}
    assert (answers >= 2 * n).all() and ((answers - 2 * n) % 2 == 0).all()
    assert sorted(inputs[answers]) == sorted(keys)  # every key queried exactly once
    for t in answers:
      value = targets[t]
      earlier = np.flatnonzero(inputs[:t] == value)
      assert len(earlier) == 1  # the answer appears once before the query ...
      assert inputs[earlier[0] - 1] == inputs[t]  # ... right after its key
    assert (targets[weights == 0] == 0).all()
    noise = np.delete(inputs[2 * n:], answers - 2 * n)
    assert not set(noise) & set(keys) and not set(noise) & set(values)
    assert ((0 <= noise) & (noise < vocab)).all()


def test_queries_favour_short_gaps() -> None:
  task = mqar.MqarTask(vocab_size=512, num_kv_pairs=4, seq_len=208, seed=0)  # 100 slots
  slots = np.concatenate([(np.flatnonzero(task.example("train", i)["weights"]) - 8) // 2
                          for i in range(300)])
  assert np.mean(slots < 50) > 0.6  # power law a = 0.01: ~p(s) ~ 1 / s
  uniform = mqar.MqarTask(vocab_size=512, num_kv_pairs=4, seq_len=208, power_a=1.0)
  slots = np.concatenate([(np.flatnonzero(uniform.example("train", i)["weights"]) - 8) // 2
                          for i in range(300)])
  assert 0.4 < np.mean(slots < 50) < 0.6


def test_examples_are_deterministic_and_seeded() -> None:
  again = mqar.MqarTask(vocab_size=64, num_kv_pairs=6, seq_len=40, seed=1)
  for index in (0, 7, 99_999):
    a, b = TASK.example("train", index), again.example("train", index)
    assert all(np.array_equal(a[k], b[k]) for k in a)
  other_seed = mqar.MqarTask(vocab_size=64, num_kv_pairs=6, seq_len=40, seed=2)
  first = TASK.example("train", 0)["inputs"]
  assert not np.array_equal(first, other_seed.example("train", 0)["inputs"])
  assert not np.array_equal(TASK.example("train", 0)["inputs"], TASK.example("train", 1)["inputs"])
  source = mqar.MqarSource(TASK, "validation", 10)
  assert len(source) == 10
  np.testing.assert_array_equal(source[3]["inputs"], TASK.example("validation", 3)["inputs"])
  with pytest.raises(IndexError):
    source[10]


def test_train_and_validation_share_no_example() -> None:
  task = mqar.MqarTask(vocab_size=8192, num_kv_pairs=4, seq_len=32)
  train = {task.example("train", i)["inputs"].tobytes() for i in range(2000)}
  validation = {task.example("validation", i)["inputs"].tobytes() for i in range(500)}
  assert len(train) == 2000 and len(validation) == 500 and not train & validation
  assert not train & {TASK.example("validation", i)["inputs"].tobytes() for i in range(10)}


def test_pipeline_batches_restore_and_shard() -> None:
  built = data.build(_config())
  assert built.vocab_size == 64 and built.tokenizer is None
  iterator = built.train_iterator()
  batches = [next(iterator) for _ in range(5)]
  assert batches[0]["inputs"].shape == (4, 40) and batches[0]["weights"].dtype == np.float32
  state = json.loads(json.dumps(iterator.get_state()))
  expected = [next(iterator) for _ in range(5)]
  fresh = built.train_iterator()
  fresh.set_state(state)
  for a, b in zip([next(fresh) for _ in range(5)], expected):
    assert all(np.array_equal(a[k], b[k]) for k in a)
  everything = {TASK.example("train", i)["inputs"].tobytes() for i in range(40)}
  seen = []
  for index in (0, 1):
    shard = data.build(_config(), process_index=index, process_count=2).train_iterator()
    rows = np.concatenate([next(shard)["inputs"] for _ in range(10)])  # 2 per batch: 1 epoch
    seen.append({r.tobytes() for r in rows})
    assert len(seen[-1]) == 20
  assert not seen[0] & seen[1] and seen[0] | seen[1] == everything


def test_validation_batches_are_the_validation_examples_in_order() -> None:
  built = data.build(_config())
  batches = built.validation_batches(10)
  assert len(batches) == 3  # 12 examples, 4 per batch
  expected = np.stack([TASK.example("validation", i)["inputs"] for i in range(12)])
  np.testing.assert_array_equal(np.concatenate([b["inputs"] for b in batches]), expected)
  second = data.build(_config(), process_index=1, process_count=2).validation_batches(1)[0]
  np.testing.assert_array_equal(second["inputs"], expected[2:4])
  with pytest.raises(ValueError, match=r"the validation split has 3 examples; one batch needs "
                     r"data.batch_size = 4: raise data.mqar.num_validation_examples"):
    data.build(_config(num_validation_examples=3)).validation_batches(1)
  with pytest.raises(ValueError, match=r"no validation split: data.mqar.num_validation_examples=0"):
    data.build(_config(num_validation_examples=0)).validation_batches(1)


@pytest.mark.parametrize("seq_len, fields, message", [
    (20, {}, r"data.seq_len=20 is too short for data.mqar.num_kv_pairs=6: .* must be >= "
     r"4 \* num_kv_pairs = 24"),
    (40, {"vocab_size": 13}, r"data.mqar.vocab_size=13 is too small for data.mqar.num_kv_pairs=6: "
     r".* >= 2 \* num_kv_pairs \+ 2 = 14"),
    (40, {"num_kv_pairs": 0}, r"data.mqar.num_kv_pairs: got 0; expected an int >= 1"),
    (40, {"num_train_examples": 0}, r"data.mqar.num_train_examples: got 0; expected an int >= 1"),
    (40, {"num_validation_examples": -1}, r"data.mqar.num_validation_examples: got -1; expected an "
     r"int >= 0"),
    (40, {"seed": -3}, r"data.mqar.seed: got -3; expected an int >= 0"),
    (40, {"power_a": 0.0}, r"data.mqar.power_a: got 0.0; expected a number > 0"),
])
def test_config_errors(seq_len: int, fields: dict[str, Any], message: str) -> None:
  with pytest.raises(ValueError, match=message):
    data.build(_config(seq_len=seq_len, **fields))


def test_mqar_reads_no_files() -> None:
  config = _config()
  config.paths = "data.jsonl"
  with pytest.raises(ValueError, match=r"data.paths='data.jsonl' is set but data.source='mqar'"):
    data.build(config)


def test_answer_accuracy() -> None:
  targets = np.array([[0, 5, 0, 7], [0, 0, 9, 0]])
  weights = np.array([[0, 1, 0, 1], [0, 0, 1, 0]], np.float32)
  predictions = np.array([[3, 5, 3, 6], [1, 1, 9, 1]])  # 2 of the 3 answers right
  assert mqar.answer_accuracy(predictions, targets, weights) == pytest.approx(2 / 3)
  logits = np.zeros((2, 4, 10), np.float32)
  np.put_along_axis(logits, predictions[..., None], 1.0, axis=-1)
  assert data.answer_accuracy(logits, targets, weights) == pytest.approx(2 / 3)
  assert mqar.answer_accuracy(targets, targets, weights) == 1.0
  with pytest.raises(ValueError, match=r"the weights are all zero"):
    mqar.answer_accuracy(predictions, targets, np.zeros_like(weights))
  with pytest.raises(ValueError, match=r"shapes differ: predictions \(2, 3\)"):
    mqar.answer_accuracy(predictions[:, :3], targets, weights)
