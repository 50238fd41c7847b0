"""jaxlin.evals: the experiment functions the benchmarks and notebooks call (their long runs are
the slow tests test_recall.py and test_notebooks.py; these check the pieces cheaply)."""
from __future__ import annotations

import matplotlib.figure
import numpy as np
import pytest
from flax import nnx

from jaxlin.evals import recall, timing
from jaxlin.model import LanguageModel


def test_attention_memory_grows_quadratically_the_ops_linearly() -> None:
  # compiled forward memory from T = 256 to 1024 (x4): the linear ops' state is constant, so
  # their buffers grow as T (x4); attention's scores grow as T^2 (x16)
  growth = {}
  for case in timing.CASES:
    small, large = (timing.measure(case, "xla", t, runs=1, heads=2, dim=16)["memory_bytes"]
                    for t in (256, 1024))
    growth[case] = large / small
  assert growth["softmax"] > 10, growth
  for case in ("gla", "gated_deltanet"):
    assert 3 < growth[case] < 5, growth


def test_timing_rows_and_plot(tmp_path) -> None:
  rows = timing.sweep([32, 64], cases=("gla", "softmax"), runs=1, log=lambda line: None,
                      heads=1, dim=16)
  assert [(r["case"], r["T"]) for r in rows] == [("gla", 32), ("gla", 64), ("softmax", 32),
                                                 ("softmax", 64)]
  assert all(r["seconds"] is not None and r["skipped"] is None for r in rows)
  figure = timing.plot(rows, str(tmp_path / "t.png"))
  assert isinstance(figure, matplotlib.figure.Figure) and (tmp_path / "t.png").stat().st_size
  with pytest.raises(ValueError, match=r"case: got 'mamba'; expected one of \('gla'"):
    timing.inputs("mamba", 32)


def test_a_case_too_big_for_the_device_is_compiled_not_run(monkeypatch) -> None:
  monkeypatch.setattr(timing, "device_memory_budget_bytes", lambda: 1000)
  row = timing.measure("softmax", "xla", 32, runs=1, heads=1, dim=16)
  assert row["seconds"] is None and row["memory_bytes"] > 500
  assert row["skipped"].startswith("needs ") and "over 50% of the device's" in row["skipped"]


def test_recall_datasets_and_names() -> None:
  setup = recall.Setup(levels=(2, 4), seeds=2, seq_len=16, train_examples=8, eval_examples=4)
  train, held_out = recall.datasets(setup)
  assert train["inputs"].shape == (4, 8, 16) and held_out["inputs"].shape == (4, 4, 16)
  # each (level, seed) its own examples; the held-out set is one per level
  assert not np.array_equal(train["inputs"][0], train["inputs"][1])
  np.testing.assert_array_equal(held_out["inputs"][0], held_out["inputs"][1])
  with pytest.raises(ValueError, match="mixer: got 'gla2'; expected one of"):
    recall.run(setup, ["gla", "gla2"], log=lambda line: None)   # before any training


@pytest.mark.parametrize("mixer", ["gated_deltanet", "mom-gated_deltanet"])
def test_recall_decay_dt_max_reaches_the_gates(mixer: str) -> None:
  """Setup.decay_dt_max sets dt_max (and dt_min <= it) of every "mamba2" decay gate, in the
  linear layer and in each memory of MoM; 0 leaves the papers' dt range [1e-3, 0.1]."""
  def dts(dt_max: float) -> np.ndarray:
    config = recall.model_config(recall.Setup(decay_dt_max=dt_max), mixer)
    mixer_0 = LanguageModel(config, rngs=nnx.Rngs(0)).blocks[0].mixer
    gates = list(mixer_0.gates) if hasattr(mixer_0, "gates") else [mixer_0.gate]
    return np.logaddexp(0.0, np.concatenate([np.asarray(g.dt_bias[...]) for g in gates]))
  np.testing.assert_allclose(dts(5e-4), 5e-4, rtol=1e-4)
  default = dts(0.0)
  assert default.min() >= 1e-3 * (1 - 1e-4) and default.max() <= 0.1 * (1 + 1e-4)
  assert default.max() > 2e-3     # drawn over the range, not at its lower end


@pytest.mark.parametrize("mixer, output_gate", [("gated_deltanet", 0), ("mom-gated_deltanet", 0),
                                                ("deltanet", 1)])
def test_recall_output_gate_reaches_the_layers(mixer: str, output_gate: int) -> None:
  """Setup.output_gate 0 / 1 removes / adds the swish output gate of every linear and MoM
  layer; -1 keeps each row's own (Gated DeltaNet has one, DeltaNet none)."""
  def gate_projection(flag: int) -> object:
    config = recall.model_config(recall.Setup(output_gate=flag), mixer)
    block = LanguageModel(config, rngs=nnx.Rngs(0)).blocks[0].mixer
    return getattr(block, "out_gate_proj", getattr(block, "g_proj", None))
  assert (gate_projection(output_gate) is not None) == bool(output_gate)
  assert (gate_projection(-1) is not None) == (mixer != "deltanet")
