"""The mesh and the sharding rules (jaxlin.parallel, jaxlin.training.placement).

In-process tests check the tables with an abstract mesh (no devices needed); the slow test
runs tests/_mesh_worker.py in a fresh interpreter with 8 fake CPU devices: one train step on
the meshes fsdp 8, data 2 x fsdp 2 x tensor 2 and data 2 x expert 4 against one device, every
leaf's placement, a restore onto another mesh and the errors of meshes that do not divide.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import jax
import pytest
from jax.sharding import AbstractMesh, PartitionSpec

from jaxlin import parallel
from jaxlin.config import ModelConfig
from jaxlin.layers.linear_attention import VARIANTS
from jaxlin.training import placement, steps

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
D = 48


def _mesh(**sizes: int) -> AbstractMesh:
  shape = tuple(sizes.get(a, 1) for a in parallel.AXES)
  return AbstractMesh(shape, parallel.AXES)


def _models() -> list[ModelConfig]:
  base = dict(vocab_size=96, d_model=D, num_layers=2, num_heads=4, pattern="LN", head_dim=16,
              linear_head_dim=16)   # heads x head dim 64: only the embed side is D
  models = [ModelConfig(**base, linear_variant=v, moe_every=2, num_experts=4,
                        num_shared_experts=1, moe_shared_gate=True) for v in VARIANTS]
  models += [ModelConfig(**base, mixer="mom", mom_core=c, tie_embeddings=False)
             for c in ("gla", "gated_deltanet", "rwkv6", "mamba2")]
  models.append(ModelConfig(**dict(base, pattern="L"), mixer="liger", lora_rank=4,
                            qkv_bias=True, num_kv_heads=2))
  return models


def test_every_matrix_of_every_model_has_logical_axes() -> None:
  """Every parameter with two dims of at least 8 (all but conv taps and per-head vectors)
  has a named logical axis, so some rule shards it; fsdp 8 shards it."""
  mesh = _mesh(fsdp=8)
  for config in _models():
    abstract = steps.abstract_params(config)[1]
    for path, leaf in jax.tree_util.tree_leaves_with_path(abstract):
      name = parallel.sharding.path_name(path)
      axes = parallel.logical_axes(name, leaf.ndim)
      big = leaf.ndim >= 2 and sorted(leaf.shape)[-2] >= 8
      assert not big or any(axes), (config.mixer, config.linear_variant, name, leaf.shape)
      if D in leaf.shape and big:
        spec = parallel.sharding.partition_spec(name, leaf.shape, mesh, parallel.RULES)
        assert "fsdp" in jax.tree.leaves(tuple(spec)), (name, spec)


def test_specs_follow_the_rules_and_overrides() -> None:
  mesh = _mesh(fsdp=2, tensor=2)
  spec = lambda name, shape, rules=parallel.RULES: parallel.sharding.partition_spec(
      name, shape, mesh, rules)
  assert spec("blocks/0/mixer/q_proj/kernel", (D, 64)) == PartitionSpec("fsdp", "tensor")
  assert spec("blocks/0/mixer/o_proj/kernel", (64, D)) == PartitionSpec("tensor", "fsdp")
  assert spec("blocks/1/mlp/w_up", (4, D, 32)) == PartitionSpec(None, "fsdp", "tensor")
  assert spec("embedding", (96, D)) == PartitionSpec("tensor", "fsdp")
  assert spec("blocks/0/mixer_norm/weight", (D,)) == PartitionSpec(None)
  rules = parallel.parse_rules("embed=fsdp+tensor,vocab=")
  assert spec("embedding", (96, D), rules) == PartitionSpec(None, ("fsdp", "tensor"))
  expert = _mesh(data=2, expert=4)
  assert parallel.sharding.partition_spec("blocks/1/mlp/w_down", (4, 32, D), expert,
                                          parallel.RULES) == PartitionSpec("expert", None, None)
  one_device = parallel.make_mesh(parallel.mesh.default_config(), jax.devices()[:1])
  assert dict(one_device.shape) == dict(data=1, fsdp=1, sequence=1, expert=1, tensor=1)
  assert parallel.batch_sharding(one_device).spec == PartitionSpec(
      ("data", "fsdp", "expert"), ("sequence",))


@pytest.mark.parametrize("sizes, devices, match", [
    (dict(data=3), 8, r"mesh: got 'data=3'; expected sizes whose product is the device count 8"),
    (dict(data=-1, fsdp=3), 8, r"mesh.data: got -1; expected the devices left .* product 3"),
    (dict(data=-1, fsdp=-1), 8, r"at most one axis of -1"),
    (dict(fsdp=0), 8, r"mesh.fsdp: got 0; expected an int >= 1, or -1"),
])
def test_bad_mesh_sizes_name_the_field(sizes: dict, devices: int, match: str) -> None:
  config = parallel.mesh.default_config()
  config.update(sizes)
  with pytest.raises(ValueError, match=match):
    parallel.axis_sizes(config, devices)


def test_a_sequence_axis_must_divide_the_length() -> None:
  config = ModelConfig(vocab_size=64, d_model=32, num_layers=1, num_heads=2)
  placement.check_mesh(_mesh(sequence=4), config, batch_size=8, seq_len=32)
  with pytest.raises(ValueError, match=r"data.seq_len: got 30; expected a multiple of "
                                       r"mesh.sequence=4"):
    placement.check_mesh(_mesh(sequence=4), config, batch_size=8, seq_len=30)


def test_auto_axis_takes_the_devices_left() -> None:
  config = parallel.mesh.default_config()
  config.update(fsdp=2, tensor=2)
  assert parallel.axis_sizes(config, 8) == dict(data=2, fsdp=2, sequence=1, expert=1, tensor=2)
  with pytest.raises(ValueError, match=r"data.batch_size: got 6; expected a multiple of "
                                       r"data x fsdp x expert = 4"):
    parallel.check_batch(dict(data=2, fsdp=2, sequence=1, expert=1, tensor=2), 6)


def test_a_dimension_that_does_not_divide_names_the_parameter() -> None:
  with pytest.raises(ValueError, match=re.escape(
      "mesh.fsdp=8: got 8; expected a divisor of the embed dimension 36 of parameter "
      "blocks/0/mlp/w_up (36, 64): one of [1, 2, 3, 4, 6, 9, 12, 18, 36]")):
    parallel.sharding.partition_spec("blocks/0/mlp/w_up", (36, 64), _mesh(fsdp=8),
                                     parallel.RULES)
  with pytest.raises(ValueError, match="mesh.rules"):
    parallel.parse_rules("embedding=fsdp")
  with pytest.raises(ValueError, match="mesh.rules"):
    parallel.parse_rules("embed=pipeline")


@pytest.mark.slow  # ~4 min: 23 train-step compilations on 8 fake devices in a subprocess
def test_meshes_equal_one_device_and_restore_across_meshes(tmp_path) -> None:
  run = subprocess.run([sys.executable, os.path.join(REPO, "tests", "_mesh_worker.py"),
                        str(tmp_path)], capture_output=True, text=True, timeout=900, cwd=REPO)
  lines = [l for l in run.stdout.splitlines() if l.startswith("RESULT ")]
  assert run.returncode == 0 and lines, run.stderr[-3000:]
  result = json.loads(lines[-1][len("RESULT "):])
  assert len(result["steps"]) == 12
  for name, step in result["steps"].items():
    assert abs(step["loss"] - step["loss_one_device"]) < 1e-5, (name, step)
    assert step["params_max_diff"] < 1e-5, (name, step)
    for metric, (one, sharded) in step["aux"].items():   # aux losses over the global batch
      assert abs(one - sharded) < 1e-6, (name, metric, one, sharded)
    assert "all-gather" in step["collectives"] or "all-reduce" in step["collectives"], name
  # expert parallel: the MoE tokens travel to their experts' devices by all_to_all, and with
  # every token on one device's experts (the worst case) nothing drops
  for model in ("hybrid_moe", "scan_moe"):
    assert "all-to-all" in result["steps"][f"{model}/data2_expert4"]["collectives"]
  assert result["skewed_experts"]["all_to_all"]
  assert result["skewed_experts"]["max_diff"] < 1e-5
  for model, report in result["placement"].items():
    for leaf in report["params"]:
      assert leaf["spec"] == leaf["want"], (model, leaf)
    sharded = [l for l in report["params"] if "fsdp" in l["spec"]]
    assert all(l["shard_shape"] != l["shape"] for l in sharded)
  assert result["restore"]["max_diff"] == 0.0
  assert result["restore"]["devices"] == [0, 1, 2, 3]
  errors = result["errors"]
  assert errors["tensor_heads"] == "mesh.tensor: got 8; expected a divisor of model.num_heads=2"
  assert "mesh.fsdp=8: got 8; expected a divisor of the embed dimension 36" in errors["fsdp_dim"]
  assert errors["batch"].startswith("data.batch_size: got 12; expected a multiple of")
  assert errors["product"].startswith("mesh: got 'data=3'")


@pytest.mark.parametrize("trainable", ["all", "lora"])
def test_optimizer_state_follows_its_parameters(trainable: str) -> None:
  """Adam's mu and nu of each parameter are placed as the parameter, through the LoRA
  optimizer's masked state too; the step count is replicated."""
  from jaxlin.training import optim
  config = ModelConfig(vocab_size=96, d_model=D, num_layers=1, num_heads=4, head_dim=16,
                       pattern="L", mixer="liger", lora_rank=4, qkv_bias=True)
  opt = optim.default_config()
  opt.update(trainable=trainable, warmup_steps=0)
  tx, _ = optim.make_optimizer(opt, 10)
  mesh = _mesh(fsdp=2, tensor=2)
  abstract = steps.abstract_params(config)[1]
  shardings = parallel.param_shardings(abstract, mesh)
  state = parallel.opt_state_shardings(tx, abstract, shardings, mesh)
  specs = {parallel.sharding.path_name(p): s.spec
           for p, s in jax.tree_util.tree_leaves_with_path(shardings)}
  placed = 0
  for path, sharding in jax.tree_util.tree_leaves_with_path(state):
    name = next((n for n in specs if parallel.sharding.path_name(path).endswith("/" + n)), None)
    if name is not None:
      assert sharding.spec == specs[name], (name, sharding.spec)
      placed += 1
    else:
      assert sharding.spec == PartitionSpec(), (path, sharding.spec)
  trained = len(specs) if trainable == "all" else sum("lora_" in n for n in specs)
  assert placed == 2 * trained       # mu and nu
