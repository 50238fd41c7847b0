"""MQAR: multi-query associative recall (Zoology, Arora et al. 2023) as a grain source.

An example of T tokens with n = num_kv_pairs key-value pairs, vocab V:

    position  0  1  2  3 .. 2n-2 2n-1 | 2n ........................... T-1
    inputs    k1 v1 k2 v2 .. kn  vn   | x  x  k3 x  k1 x  x  x  x  .. x
    targets   0  ........................... v3 .. v1 ...............  0
    weights   0  ........................... 1  .. 1  ...............  0

Keys are drawn from [1, V // 2), values from [V // 2, V), distinct within an
example. The query region after the 2n key-value tokens has (T - 2n) // 2
slots at even offsets; every key is queried exactly once, in a slot drawn
without replacement with Zoology's power law p(slot s) ~ (s + 1)^(power_a - 1)
(short gaps are likely; sampled as the n smallest Exp(1) / p, which is how
Zoology's np.random.choice(p=..., replace=False) is distributed). The target at
a query is the key's value, weight 1; everywhere else target 0, weight 0.
Other query-region tokens (x) are noise, uniform over the tokens that are
neither a key nor a value of this example (Zoology draws noise from all of V),
so each key occurs exactly twice.

Examples are a pure function of (seed, split, index): `MqarSource` is a
random-access grain source, and "train" and "validation" use different seeds.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from jaxlin import validation

SPLITS = {"train": 0, "validation": 1}


def _check_int(name: str, value: Any, minimum: int) -> int:
  return int(validation.int_in_range(name, value, minimum))


@dataclasses.dataclass(frozen=True)
class MqarTask:
  """The task: sizes, seed and query-gap power law; `example(split, index)` builds one."""
  vocab_size: int = 8192
  num_kv_pairs: int = 16
  seq_len: int = 256
  seed: int = 0
  power_a: float = 0.01

  def __post_init__(self) -> None:
    n = _check_int("data.mqar.num_kv_pairs", self.num_kv_pairs, 1)
    _check_int("data.mqar.seed", self.seed, 0)
    vocab = _check_int("data.mqar.vocab_size", self.vocab_size, 1)
    if vocab < 2 * n + 2:
      raise ValueError(
          f"data.mqar.vocab_size={vocab} is too small for data.mqar.num_kv_pairs={n}: keys come "
          f"from [1, vocab_size // 2) and values from [vocab_size // 2, vocab_size), so it must "
          f"be >= 2 * num_kv_pairs + 2 = {2 * n + 2}")
    seq_len = _check_int("data.seq_len", self.seq_len, 1)
    if seq_len < 4 * n:
      raise ValueError(
          f"data.seq_len={seq_len} is too short for data.mqar.num_kv_pairs={n}: it holds "
          f"2 * num_kv_pairs key-value tokens, then a query region with a query slot every 2 "
          f"tokens for each key, so it must be >= 4 * num_kv_pairs = {4 * n}")
    validation.require(float(self.power_a) > 0, "data.mqar.power_a", self.power_a,
                       "a number > 0 (1.0: uniform gaps)")

  @property
  def num_slots(self) -> int:
    """Query slots: (T - 2n) // 2, at even offsets of the query region."""
    return (self.seq_len - 2 * self.num_kv_pairs) // 2

  def example(self, split: str, index: int) -> dict[str, np.ndarray]:
    """Example `index` of `split`: inputs, targets, segment_ids [T] int32, weights [T] float32."""
    if split not in SPLITS:
      raise ValueError(f"split={split!r}; allowed: {tuple(SPLITS)}")
    n, vocab, length = self.num_kv_pairs, self.vocab_size, self.seq_len
    rng = np.random.default_rng([self.seed, SPLITS[split], int(index)])
    keys = 1 + rng.choice(vocab // 2 - 1, size=n, replace=False)
    values = vocab // 2 + rng.choice(vocab - vocab // 2, size=n, replace=False)
    # weighted sampling without replacement: the n smallest Exp(1) / p (Efraimidis-Spirakis)
    p = np.arange(1, self.num_slots + 1, dtype=np.float64) ** (float(self.power_a) - 1)
    slots = np.argsort(rng.exponential(size=self.num_slots) / p)[:n]
    # noise: uniform over the tokens that are neither keys nor values of this example
    used = np.sort(np.concatenate([keys, values]))
    draws = rng.integers(0, vocab - 2 * n, size=length)
    noise = draws + np.searchsorted(used - np.arange(2 * n), draws, side="right")
    inputs = noise.astype(np.int32)
    inputs[0:2 * n:2], inputs[1:2 * n:2] = keys, values
    queries = 2 * n + 2 * slots
    inputs[queries] = keys
    targets = np.zeros(length, np.int32)
    targets[queries] = values
    weights = np.zeros(length, np.float32)
    weights[queries] = 1.0
    return {"inputs": inputs, "targets": targets,
            "segment_ids": np.ones(length, np.int32), "weights": weights}


class MqarSource:
  """Random-access grain source of `num_examples` examples of one split."""

  def __init__(self, task: MqarTask, split: str, num_examples: int):
    if split not in SPLITS:
      raise ValueError(f"split={split!r}; allowed: {tuple(SPLITS)}")
    self.task, self.split, self.num_examples = task, split, int(num_examples)

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    index = int(index)
    if not 0 <= index < self.num_examples:
      raise IndexError(f"MQAR {self.split} example {index} of {self.num_examples}")
    return self.task.example(self.split, index)

  def __repr__(self) -> str:
    return f"MqarSource({self.task}, {self.split!r}, {self.num_examples})"


def answer_accuracy(logits_or_predictions: Any, targets: Any, weights: Any) -> float:
  """Accuracy over the positions with weight > 0 (the MQAR answers).

  logits_or_predictions: logits [..., T, V] (argmax taken) or predicted ids [..., T];
  targets, weights: [..., T].
  """
  predictions = np.asarray(logits_or_predictions)
  targets, weights = np.asarray(targets), np.asarray(weights, np.float64)
  if predictions.ndim == targets.ndim + 1:
    predictions = predictions.argmax(-1)
  if predictions.shape != targets.shape or weights.shape != targets.shape:
    raise ValueError(f"shapes differ: predictions {predictions.shape} (after argmax of logits), "
                     f"targets {targets.shape}, weights {weights.shape}")
  total = weights.sum()
  if total <= 0:
    raise ValueError("answer_accuracy: the weights are all zero (no answer positions)")
  return float((weights * (predictions == targets)).sum() / total)
