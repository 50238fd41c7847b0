"""Memory plan for the paper sizes: the train step compiled on a fake mesh, nothing allocated.

    python benchmarks/scale.py                                   # both configs, 8 and 64 devices
    python benchmarks/scale.py --configs linear_moe_a0_3b_2b --devices 8
    python benchmarks/scale.py --fsdp-sweep                      # bytes vs fsdp 1..8 (small model)

For each config and device count the train step of `run.py` (the config's own mesh, batch,
accumulation and optimizer; `jaxlin.training.placement`) is lowered with abstract inputs
(ShapeDtypeStructs carrying their shardings) and compiled for fake CPU devices
(`--xla_force_host_platform_device_count`). Per device it reports the bytes of the parameters
and of the optimizer state (their shard shapes), XLA's `memory_analysis()` of the compiled step
(arguments, temporaries, outputs not aliased to the donated state), and the bytes each kind of
collective moves, summed over the collectives in the compiled HLO (an op inside a loop runs its
trip count times per step: the gradient accumulation loop, and inside it the scan over the
layers; both the static sum and the per-step sum are given).

Assumptions (say them with the numbers): activations in bfloat16 (`model.dtype` as on a TPU /
GPU; parameters and Adam moments float32), XLA:CPU's buffer assignment standing in for the
accelerator's (the temporaries are an estimate: TPU and GPU fuse differently), remat as the
config sets it, and the MoE layers compiled with the capacity dispatch (factor 1.25, per batch
shard): XLA:CPU lowers `ragged_dot` (the dropless path) to a matmul masked per expert that
materialises [E, tokens, d] (32 GiB per layer here), which the TPU / GPU grouped matmuls do not,
while the capacity path's [E, C, d] buffers are what a grouped matmul needs, with 1.25x slack. A config fits when arguments + temporaries + non-aliased outputs per device are
under the budget: TPU v5p 95 GiB, H100 80 GB.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import re
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ("linear_moe_a0_3b_2b", "linear_moe_a1b_7b")
BUDGETS = {"tpu_v5p": 95 * 2**30, "h100": 80e9}
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1,
               "f64": 8, "s64": 8, "u64": 8}


def parse_args() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--configs", nargs="+", default=list(CONFIGS))
  parser.add_argument("--devices", nargs="+", type=int, default=[8, 64])
  parser.add_argument("--fsdp-sweep", action="store_true",
                      help="also: a small model at fsdp 1, 2, 4, 8 (bytes should fall as 1/fsdp)")
  parser.add_argument("--accumulation-steps", type=int, default=None,
                      help="override the configs' train.accumulation_steps")
  parser.add_argument("--mesh", default="",
                      help="override the configs' mesh sizes, e.g. 'expert=8,fsdp=-1'")
  parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "scale.json"))
  return parser.parse_args()


ARGS = parse_args() if __name__ == "__main__" else None
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count="
                           f"{max(ARGS.devices + [8]) if ARGS else 8}").strip()
sys.path.insert(0, REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402

from jaxlin.config import ModelConfig, model_config_for  # noqa: E402
from jaxlin.training import optim, placement, steps  # noqa: E402


def shard_bytes(tree: object) -> int:
  """Bytes of one device's shards of `tree` (ShapeDtypeStructs carrying their shardings)."""
  return sum(math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
             for leaf in jax.tree.leaves(tree))


def _header(line: str) -> str | None:
  """The computation a line of HLO text opens ("%name (...) -> ... {" / "ENTRY %name ..."), or
  None for any other line (instructions are indented; the HloModule line is not one)."""
  if not line or line.startswith((" ", "HloModule", "}")) or not line.rstrip().endswith("{"):
    return None
  return (line.split()[1] if line.startswith("ENTRY") else line.split()[0]).lstrip("%")


def _computation_trips(hlo: str) -> dict[str, int]:
  """{computation name: how many times it runs per step}: a while loop's body runs its
  `known_trip_count` times per run of the computation holding the loop (nested loops
  multiply: the gradient-accumulation loop around the scan over layers); other called
  computations (fusions, calls, conditional branches, async wrappers) run as often as their
  caller. A loop without a known trip count stops with an error (it would be miscounted)."""
  calls: dict[str, list[tuple[str, int]]] = {}
  entry, current = None, None
  for line in hlo.splitlines():
    name = _header(line)
    if name is not None:
      current, calls[name] = name, []
      entry = name if line.startswith("ENTRY") else entry
      continue
    if current is None:
      continue
    trips = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', line)
    if " while(" in line and not trips:
      raise ValueError(f"a while loop without known_trip_count in {current}: {line[:200]}")
    for attr, names in re.findall(r"\b(body|condition|calls|to_apply|branch_computations|"
                                  r"called_computations)=(\{[^}]*\}|%?[\w.\-]+)", line):
      for callee in re.findall(r"[\w.\-]+", names.replace("%", " ")):
        calls[current].append((callee, int(trips.group(1)) if attr == "body" else 1))
  counts: dict[str, int] = {}

  def visit(name: str, times: int) -> None:
    counts[name] = counts.get(name, 0) + times
    for callee, trips in calls.get(name, ()):
      visit(callee, times * trips)

  if entry is not None:
    visit(entry, 1)
  return counts


def collective_bytes(hlo: str) -> dict[str, dict[str, int]]:
  """{kind: {"static": bytes, "per_step": bytes}} from the result shapes of the collectives
  in the compiled HLO: "static" counts each op once, "per_step" as often as it runs per step
  (`_computation_trips`: inside the accumulation loop and the scan over layers)."""
  out = {k: {"static": 0, "per_step": 0} for k in COLLECTIVES}
  trips = _computation_trips(hlo)
  current = None
  for line in hlo.splitlines():
    current = _header(line) or current
    for kind in COLLECTIVES:
      if f" {kind}(" in line or f" {kind}-start(" in line:
        lhs = line.split("=", 1)[1] if "=" in line else line
        nbytes = sum(math.prod(int(d) for d in filter(None, dims.split(",")))
                     * DTYPE_BYTES.get(dtype, 4)
                     for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]",
                                                   lhs.split(kind)[0]))
        out[kind]["static"] += nbytes
        out[kind]["per_step"] += nbytes * trips.get(current, 1)
  return out


def plan(config: ml_collections.ConfigDict, model_config: ModelConfig, devices: list) -> dict:
  """Compile the config's train step on `devices`; per-device bytes and collective bytes."""
  tx, schedule = optim.make_optimizer(config.optimizer, config.train.num_steps)
  accumulation = config.train.accumulation_steps
  place = placement.make_placement(config.mesh, model_config, tx,
                                   batch_size=config.data.batch_size,
                                   accumulation_steps=accumulation,
                                   seq_len=config.data.seq_len, devices=devices)
  graphdef = steps.abstract_params(model_config)[0]
  state = placement.abstract_state(place, model_config, tx)
  B, T = config.data.batch_size, config.data.seq_len
  batch = {k: jax.ShapeDtypeStruct((B, T), dtype, sharding=place.batch) for k, dtype in (
      ("inputs", jnp.int32), ("targets", jnp.int32), ("segment_ids", jnp.int32),
      ("weights", jnp.float32))}
  step = placement.jit_train_step(place, graphdef, tx, schedule, accumulation,
                                  optim.trainable_mask(config.optimizer))
  compiled = step.lower(state, batch).compile()
  memory = compiled.memory_analysis()
  arguments, temporaries = int(memory.argument_size_in_bytes), int(memory.temp_size_in_bytes)
  outputs = int(memory.output_size_in_bytes) - int(memory.alias_size_in_bytes)
  total = arguments + temporaries + max(outputs, 0)
  return {
      "mesh": {k: int(v) for k, v in place.mesh.shape.items()},
      "batch": [B, T], "accumulation_steps": accumulation,
      "params_bytes": shard_bytes(state.params),
      "opt_state_bytes": shard_bytes(state.opt_state),
      "arguments_bytes": arguments, "temporaries_bytes": temporaries,
      "outputs_not_aliased_bytes": outputs, "total_bytes": total,
      "fits": {name: total < budget for name, budget in BUDGETS.items()},
      "collectives": collective_bytes(compiled.as_text())}


def load(name: str) -> tuple[ml_collections.ConfigDict, ModelConfig]:
  config = importlib.import_module(f"configs.{name}").get_config()
  config.model.dtype = "bfloat16"    # as "auto" resolves on TPU / GPU
  config.model.moe_dispatch = "capacity"   # see the module docstring: XLA:CPU's ragged_dot
  if ARGS is not None and ARGS.accumulation_steps is not None:
    config.train.accumulation_steps = ARGS.accumulation_steps
  for item in filter(None, (ARGS.mesh if ARGS is not None else "").split(",")):
    axis, size = item.split("=")
    config.mesh[axis] = int(size)
  return config, model_config_for(config, config.model.vocab_size)


def gib(n: int) -> str:
  return f"{n / 2**30:7.2f} GiB"


def main() -> None:
  results = {"assumptions": __doc__.split("Assumptions (say them with the numbers): ")[1]
             .split("\n\n")[0].replace("\n", " "), "budgets_bytes": BUDGETS, "plans": []}
  all_devices = jax.devices()
  runs = [(name, n) for name in ARGS.configs for n in ARGS.devices]
  for name, n in runs:
    config, model_config = load(name)
    print(f"{name} on {n} devices ...", flush=True)
    result = plan(config, model_config, all_devices[:n])
    result.update(config=name, devices=n)
    results["plans"].append(result)
    print(f"  mesh {result['mesh']}: params {gib(result['params_bytes'])}, optimizer "
          f"{gib(result['opt_state_bytes'])}, temporaries {gib(result['temporaries_bytes'])}, "
          f"total {gib(result['total_bytes'])} per device; fits {result['fits']}", flush=True)
  if ARGS.fsdp_sweep:
    sweep = []
    config, _ = load(CONFIGS[0])
    config.model.update(num_layers=2, num_experts=8, moe_top_k=2)
    config.data.update(batch_size=16, seq_len=256)
    config.train.accumulation_steps = 1
    model_config = model_config_for(config, config.model.vocab_size)
    for fsdp in (1, 2, 4, 8):
      config.mesh.update(data=-1, fsdp=fsdp)
      result = plan(config, model_config, all_devices[:8])
      sweep.append({"fsdp": fsdp, **{k: result[k] for k in (
          "params_bytes", "opt_state_bytes", "total_bytes", "mesh")}})
      print(f"  fsdp {fsdp}: params + optimizer "
            f"{gib(result['params_bytes'] + result['opt_state_bytes'])} per device", flush=True)
    results["fsdp_sweep"] = sweep
  os.makedirs(os.path.dirname(ARGS.out), exist_ok=True)
  with open(ARGS.out, "w") as f:
    json.dump(results, f, indent=1)
  print(f"wrote {ARGS.out}")


if __name__ == "__main__":
  main()
