"""Every mixer learns associative recall: on a small MQAR, each one goes clearly above the
plateau that needs no recall.

MQAR (`jaxlin.data.mqar`) with n = 4 key-value pairs, T = 32, vocabulary 32 (keys [1, 16),
values [16, 32)). Answering with any value seen in the context, without binding it to
its key, scores about 1/n = 0.25; chance over the values is 1/16. Each mixer (every
linear variant, MoM over GLA and Gated DeltaNet, a Gated DeltaNet + softmax hybrid and
all-softmax: `jaxlin.evals.recall.MIXERS`) trains a 2-layer d_model 64 model for
STEPS AdamW steps at learning rate 1e-2, with the short causal conv on in every linear
and MoM layer (as Zoology gives every model; without it bla, lightning and gla stay on
the plateau for 600 steps, see docs/benchmarks.md), and must reach accuracy > BOUND = 0.4 (1.6 / n) on
256 held-out examples with at least one of two seeds (the jump off the plateau comes at a
seed-dependent step: one Gated DeltaNet seed was at 0.32 after 500 steps, the other at 1.0).
The benchmark's own harness (`jaxlin.evals.recall.run_mixer`), both seeds in one vmapped run.

Mamba2 gets STEPS_FOR["mamba2"] = 1500 steps: it leaves the plateau later than the others,
at a seed-dependent step (in the benchmark's 600 steps both seeds stay near chance, 0.06 and
0.11; after 1500 the two seeds here are at 0.99 and 0.73). Its layer equals transformers' Mamba2Mixer (`tests/test_peer_mamba2.py`);
the same model in PyTorch leaves the plateau sooner, mostly because of PyTorch's larger dense
init (ModelConfig.dense_init "fan_in"; docs/benchmarks.md: Recall, Mamba2).
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest

from jaxlin.evals import recall

PAIRS, STEPS, SEEDS = 4, 500, 2
BOUND = 0.4                      # 1.6 x the plateau; 1024 held-out answers
STEPS_FOR = {"mamba2": 1500}     # mixers that leave the plateau later (module docstring)
SETUP = recall.Setup(levels=(PAIRS,), seeds=SEEDS, steps=STEPS, short_conv=1, eval_every=STEPS,
                     train_examples=4096, eval_examples=256)


@functools.lru_cache(maxsize=None)
def _data() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """(train, held_out) with a leading replica axis (one per seed)."""
  return recall.datasets(SETUP)


@pytest.mark.slow   # ~25-90 s per mixer on 2 CPU cores (mamba2's 1500 steps: ~90 s)
@pytest.mark.parametrize("mixer", list(recall.MIXERS))
def test_mixer_recalls_above_the_no_binding_plateau(mixer: str) -> None:
  train, held_out = _data()          # the data do not depend on the number of steps
  steps = STEPS_FOR.get(mixer, STEPS)
  setup = dataclasses.replace(SETUP, steps=steps, eval_every=steps)
  result = recall.run_mixer(setup, mixer, train, held_out, log=lambda line: None)
  accuracy = [r["accuracy"] for r in result["replicas"]]
  assert max(accuracy) > BOUND, (f"{mixer}: answer accuracy {accuracy} (seeds) after {steps} "
                                 f"steps; the no-binding plateau is {1 / PAIRS:.2f}")
