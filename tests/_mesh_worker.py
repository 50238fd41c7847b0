"""The multi-device checks of tests/test_parallel.py, in a fresh interpreter with 8 fake CPU
devices (XLA_FLAGS is set here, before jax starts). Prints one JSON object of measurements;
the test asserts on them.

    python tests/_mesh_worker.py OUT_DIR
"""
from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()

import json  # noqa: E402

import grain  # noqa: E402
import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from jaxlin import parallel  # noqa: E402
from jaxlin.config import ModelConfig  # noqa: E402
from jaxlin.training import optim, placement, steps  # noqa: E402
from jaxlin.training.checkpoint import Checkpointer  # noqa: E402

MODELS = {
    "hybrid_moe": ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=2,
                              pattern="LN", moe_every=2, num_experts=4, moe_top_k=2,
                              expert_hidden=32, mlp_hidden=64, num_shared_experts=1,
                              init_std=0.1),
    "mom": ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=2, pattern="LN",
                       mixer="mom", mom_core="gated_deltanet", mom_num_memories=4, mom_top_k=2,
                       mlp_hidden=64, tie_embeddings=False, init_std=0.1),
    # the paper configs' layout: GLA + MoE in every block, a remat scan over the blocks
    "scan_moe": ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=2, pattern="L",
                            moe_every=1, num_experts=4, moe_top_k=2, expert_hidden=32,
                            init_std=0.1, remat=True, scan_layers=True),
}
MESHES = {"fsdp8": dict(fsdp=8, data=1), "data2_fsdp2_tensor2": dict(data=2, fsdp=2, tensor=2),
          "data2_expert4": dict(data=2, expert=4),
          "fsdp2_sequence2_expert2": dict(data=1, fsdp=2, sequence=2, expert=2)}
B, T = 8, 16


def mesh_config(**sizes: int) -> ml_collections.ConfigDict:
  config = parallel.mesh.default_config()
  config.update(sizes)
  return config


def batch() -> dict[str, np.ndarray]:
  tokens = np.random.RandomState(0).randint(0, 64, size=(B, T + 1))
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "segment_ids": np.ones((B, T), np.int32), "weights": np.ones((B, T), np.float32)}


def optimizer() -> tuple:
  opt = optim.default_config()
  # eps 1e-3: Adam's first step is g / (|g| + eps), so a gradient of float32 noise size
  # moves a parameter by noise, not by +-lr (the updated parameters are compared)
  opt.update(warmup_steps=0, learning_rate=1e-2, eps=1e-3)
  return optim.make_optimizer(opt, 10)


def one_step(model_config: ModelConfig, sizes: dict[str, int], devices: list) -> tuple:
  """(loss, params after one step, placement) of one train step on the mesh `sizes`."""
  tx, schedule = optimizer()
  place = placement.make_placement(mesh_config(**sizes), model_config, tx, batch_size=B,
                                   devices=devices)
  state = placement.init_state(place, model_config, tx, seed=0)
  graphdef = steps.abstract_params(model_config)[0]
  step = placement.jit_train_step(place, graphdef, tx, schedule)
  data = {k: jax.device_put(v, place.batch) for k, v in batch().items()}
  compiled_text = step.lower(state, data).compile().as_text()
  state, metrics = step(state, data)
  return float(metrics["loss"]), state, place, compiled_text, metrics


def max_diff(a, b) -> float:
  return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def main(out_dir: str) -> None:
  devices = jax.devices()
  assert len(devices) == 8, devices
  result: dict = {"steps": {}, "placement": {}, "errors": {}}
  for name, model_config in MODELS.items():
    loss1, state1, _, _, metrics1 = one_step(model_config, dict(data=1), devices[:1])
    for mesh_name, sizes in MESHES.items():
      loss, state, place, hlo, metrics = one_step(model_config, sizes, devices)
      aux = {k: (float(metrics1[k]), float(metrics[k])) for k in metrics1 if "/" in k}
      result["steps"][f"{name}/{mesh_name}"] = {
          "loss_one_device": loss1, "loss": loss, "params_max_diff": max_diff(state1.params,
                                                                              state.params),
          "aux": aux, "collectives": sorted({op for op in ("all-gather", "reduce-scatter",
                                                           "all-reduce", "all-to-all")
                                             if op in hlo})}
      if mesh_name == "fsdp8" and name == "hybrid_moe":
        saved = (state, model_config)   # restored onto another mesh below
      if mesh_name == "fsdp8":   # every leaf sharded as the rules say
        leaves = jax.tree_util.tree_leaves_with_path(state.params)
        report = []
        for path, leaf in leaves:
          want = parallel.sharding.partition_spec(parallel.sharding.path_name(path), leaf.shape,
                                                  place.mesh, place.rules)
          report.append({"name": parallel.sharding.path_name(path), "shape": list(leaf.shape),
                         "spec": str(leaf.sharding.spec), "want": str(want),
                         "shard_shape": list(leaf.addressable_shards[0].data.shape)})
        opt_leaves = [x for x in jax.tree.leaves(state.opt_state) if x.ndim >= 2]
        result["placement"][name] = {
            "params": report,
            "opt_state_fully_replicated_matrices": sum(
                x.sharding.is_fully_replicated for x in opt_leaves)}

  # expert parallel, worst case: every token routed to experts 0 and 1 (both on device 0 of
  # the expert axis); nothing may drop, the output equals one device's
  from flax import nnx
  from jaxlin.layers.moe import MoE
  moe = MoE(32, num_experts=8, top_k=2, expert_hidden_dim=16, rngs=nnx.Rngs(0))
  moe.router[...] = moe.router[...].at[:, :2].add(10.0)
  x = jax.random.normal(jax.random.key(1), (8, 16, 32))
  one_device = moe(x)[0]
  mesh = parallel.make_mesh(mesh_config(data=2, expert=4), devices)
  graphdef, weights = nnx.split(moe)

  @jax.jit
  def on_mesh(weights, x):
    with parallel.activations_on(mesh):
      return nnx.merge(graphdef, weights)(x)[0]

  x_sharded = jax.device_put(x, parallel.batch_sharding(mesh))
  compiled = on_mesh.lower(weights, x_sharded).compile().as_text()
  result["skewed_experts"] = {"max_diff": max_diff(one_device, on_mesh(weights, x_sharded)),
                              "all_to_all": "all-to-all" in compiled}

  # a checkpoint saved on fsdp 8 restores onto data 2 x fsdp 2 (4 devices) with equal values
  state8, model_config = saved
  iterator = iter(grain.MapDataset.range(4).to_iter_dataset())
  with Checkpointer(out_dir, max_to_keep=1) as checkpointer:
    checkpointer.save(1, params=state8.params, opt_state=state8.opt_state,
                      data_iterator=iterator, meta={"model": {}})
  tx, _ = optimizer()
  place4 = placement.make_placement(mesh_config(data=2, fsdp=2), model_config, tx, batch_size=B,
                                    devices=devices[:4])
  abstract = placement.abstract_state(place4, model_config, tx).params
  with Checkpointer(out_dir, max_to_keep=1) as checkpointer:
    restored = checkpointer.restore(1, abstract_params=abstract)["params"]
  result["restore"] = {
      "max_diff": max_diff(state8.params, restored),
      "devices": sorted({d.id for x in jax.tree.leaves(restored) for d in x.sharding.device_set}),
      "mesh": {k: int(v) for k, v in place4.mesh.shape.items()}}

  # meshes that cannot divide the model name the field
  for label, sizes, config in (
      ("tensor_heads", dict(data=1, tensor=8), model_config),
      ("fsdp_dim", dict(data=1, fsdp=8), model_config.replace(d_model=36, num_heads=2)),
      ("batch", dict(data=8), model_config),
      ("product", dict(data=3), model_config)):
    try:
      placement.make_placement(mesh_config(**sizes), config, tx,
                               batch_size=12 if label == "batch" else B, devices=devices)
      result["errors"][label] = None
    except ValueError as error:
      result["errors"][label] = str(error)
  print("RESULT " + json.dumps(result))


if __name__ == "__main__":
  main(sys.argv[1])
