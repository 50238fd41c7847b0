"""LASP-2 (`jaxlin.ops.lasp2`): a recurrence with its sequence split over the `sequence`
mesh axis equals the one-device op, for every family and gate kind.

The slow test runs tests/_lasp2_worker.py in a fresh interpreter with 8 fake CPU devices (see
its docstring for the cases): outputs, final state and the gradient of every input against the
one-device op on sequence 2, 4, 8 and data 2 x sequence 4, batch 2 with packed documents
(one ending exactly at a shard boundary, one spanning several shards, one per shard, a padding
shard) and an initial state; extreme decays (a gate of -30 per token: no memory; -1e-6: none
forgotten) over 8 shards; and the compiled forward's all-gathers: one of the T-independent
(M, N) summaries (two with packed documents: the spans' first and last segment ids), the same
bytes at T = 1024 and T = 8192; the GPU Pallas kernels (interpreter) as each span's op; the "ppermute_scan" collective likewise; every layer (12 linear
variants, HGRN2 with its conv, MoM over GLA and Gated DeltaNet, softmax with GQA and with a
window) against one device on sequence 2, 4, 8; a causality probe across a shard boundary; the
collectives of one linear layer's forward. And run.py on data 2 x sequence 4.
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from typing import Any

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# float32 agreement: the fold and the per-shard op reorder sums of products (measured <= 4.1e-7
# relative to the largest value of each array); a lost span or a wrong reset is off by O(1)
TOLERANCE = 1e-5
# a layer's gradients pass its norms and Based/ReBased's division, which amplify the op's
# float32 reassociation (measured up to 6.8e-6: rebased dx, jax 0.12.1; 1.2e-6 on jax 0.10.2)
LAYER_TOLERANCE = 5e-5
# gates of -30 per token: gradients of g are sums of terms that cancel to exp(-30)-scale values
# (measured 1.0e-5); a dropped or doubled state is off by O(1)
EXTREME_TOLERANCE = 1e-4


@functools.lru_cache(maxsize=None)
def _results() -> dict[str, Any]:
  proc = subprocess.run([sys.executable, os.path.join(REPO, "tests", "_lasp2_worker.py")],
                        capture_output=True, text=True, timeout=900, cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _worst(entry: dict[str, Any]) -> float:
  return max([entry["o"], entry["final"], *entry["grads"].values()])


@pytest.mark.slow   # ~3 min on 2 CPU cores (one interpreter, every case)
def test_sequence_parallel_op_equals_one_device() -> None:
  results = _results()
  for section, bound in (("compare", TOLERANCE), ("unpacked", TOLERANCE),
                         ("ppermute_scan", TOLERANCE), ("pallas", TOLERANCE),
                         ("extreme", EXTREME_TOLERANCE)):
    assert results[section], section
    for name, entry in results[section].items():
      assert entry["finite"], (section, name)
      assert _worst(entry) < bound, (section, name, entry)
  grads = {n for entry in results["compare"].values() for n in entry["grads"]}
  assert {"q", "k", "v", "inputs", "initial_state", "head_inputs"} <= grads


@pytest.mark.slow
def test_every_layer_equals_one_device_with_the_sequence_split() -> None:
  """Every linear variant, MoM over GLA and Gated DeltaNet, softmax attention (GQA, sliding
  window) and Liger Attention: y and the gradients of x and of every parameter, sequence 2, 4
  and 8."""
  layers = _results()["layers"]
  assert len(layers) == 18, sorted(layers)
  for name, meshes in layers.items():
    assert sorted(meshes) == ["sequence2", "sequence4", "sequence8"], name
    for mesh, errors in meshes.items():
      assert max(errors.values()) < LAYER_TOLERANCE, (name, mesh, errors)


@pytest.mark.slow
def test_no_output_sees_a_later_token_across_shards() -> None:
  """Exactly 0 for the layers; MoM within float32 rounding (outputs are O(1)): a later token's
  routing moves where earlier tokens' copies sit in the sorted stream, so their chunk
  boundaries and sum order change (measured 1.2e-7), as on one device."""
  for name, moved in _results()["causality"].items():
    assert moved <= (1e-6 if name.startswith("mom") else 0.0), (name, moved)


@pytest.mark.slow
def test_a_linear_layer_forward_moves_one_all_gather_and_one_halo() -> None:
  collectives = _results()["layer_collectives"]
  for name in ("gated_deltanet", "gla"):   # gla has no short conv: no halo
    want = {"all-gather": 1, "collective-permute": int(name == "gated_deltanet")}
    assert {k: collectives[name][k] for k in want} == want, (name, collectives[name])
    assert collectives[name]["all-reduce"] == collectives[name]["all-to-all"] == 0, name
  assert collectives["softmax"]["all-gather"] == 1    # LASP-2H: K and V packed


@pytest.mark.slow
def test_one_all_gather_of_t_independent_bytes() -> None:
  gathers = _results()["all_gathers"]
  for case in ("gated_per_key", "delta_gated"):
    for packed, count in (("unpacked", 1), ("packed", 2)):
      short, long = (gathers[f"{case}/T{t}/{packed}"] for t in (1024, 8192))
      assert short["count"] == long["count"] == count, (case, packed, short, long)
      assert short["bytes"] == long["bytes"], (case, packed, short, long)


def _train(workdir: str, *args: str) -> tuple[dict[int, float], str]:
  """run.py on the default config (tests/test_run.py's TINY sizes) with 8 fake CPU devices;
  the train losses by step."""
  from test_run import TINY
  env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "")
                                    + " --xla_force_host_platform_device_count=8").strip())
  command = [sys.executable, os.path.join(REPO, "run.py"), "--config",
             os.path.join(REPO, "configs", "default.py"), f"--config.workdir={workdir}", *TINY,
             "--config.train.num_steps=3", "--config.checkpoint.every_steps=3",
             "--config.eval.every_steps=3", "--config.sample.num_samples=0",
             "--config.logging.progress=False", *args]
  proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  return {r["step"]: r["loss"] for r in records if r["split"] == "train"}, proc.stderr


@pytest.mark.slow   # ~2 min: two run.py processes
def test_run_py_trains_with_the_sequence_split_four_ways(tmp_path) -> None:
  """The default hybrid MoE config through run.py on data 2 x sequence 4 (LASP-2 in every
  linear layer, the softmax and MoE layers partitioned by XLA) takes the losses of data 8."""
  split, log = _train(str(tmp_path / "sequence"), "--config.mesh.sequence=4")
  assert "data 2 x sequence 4" in log, log[-2000:]
  plain, _ = _train(str(tmp_path / "data"))
  assert sorted(split) == sorted(plain) == [1, 2, 3]
  for step in plain:
    assert abs(split[step] - plain[step]) < 1e-4 * abs(plain[step]), (step, split, plain)
