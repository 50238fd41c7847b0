"""The device mesh of a run, from the config's `mesh` group (docs/design.md §7).

    mesh axes   data      pure data parallel: parameters replicated
                fsdp      data parallel with parameters and optimizer state sharded (FSDP)
                sequence  the sequence axis of the batch: LASP-2 in the linear layers
                          (`lasp2.py`), XLA's partitioning elsewhere
                expert    MoE experts sharded; also a data-parallel axis for everything else
                tensor    attention / linear-attention heads and MLP hidden units (Megatron TP)

One size may be -1: the devices the others leave. The product must equal the device count;
the global batch is split over data x fsdp x expert (`BATCH_AXES`). A single CPU device runs
the defaults (data=-1, the rest 1).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import ml_collections
from jax.sharding import Mesh

from jaxlin import validation

AXES = ("data", "fsdp", "sequence", "expert", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")   # the global batch is split over these
AUTO = -1


def default_config() -> ml_collections.ConfigDict:
  """The mesh fields of a run config (`config.mesh`)."""
  c = ml_collections.ConfigDict()
  c.data = AUTO            # data-parallel replicas (-1: the devices the other axes leave)
  c.fsdp = 1               # parameters + optimizer state sharded over this many devices
  c.sequence = 1           # sequence parallelism (LASP-2): each device holds a span of T
  c.sequence_collective = "all_gather"  # how the spans' states meet: one all-gather, or
  #                          "ppermute_scan" (log-depth, memory constant in the shard count)
  c.expert = 1             # MoE experts sharded over this many devices
  c.tensor = 1             # heads / MLP hidden units split over this many devices
  c.rules = ""             # overrides of the sharding rules, "logical=axis+axis,..." (see
  #                          jaxlin/parallel/sharding.py RULES; "logical=" replicates)
  return c


def axis_sizes(config: Any, device_count: int) -> dict[str, int]:
  """{axis: size} with the -1 resolved; errors name the field, the value and what would fit."""
  sizes = {}
  for axis in AXES:
    value = config.get(axis, 1)
    validation.require(validation.is_int(value) and (value >= 1 or value == AUTO),
                       f"mesh.{axis}", value, "an int >= 1, or -1 (the devices left)")
    sizes[axis] = int(value)
  auto = [a for a in AXES if sizes[a] == AUTO]
  validation.require(len(auto) <= 1, f"mesh.{auto[-1] if auto else ''}", AUTO,
                     f"at most one axis of -1; got -1 for {auto}")
  fixed = math.prod(s for s in sizes.values() if s != AUTO)
  if auto:
    validation.require(device_count % fixed == 0, f"mesh.{auto[0]}", AUTO,
                       f"the devices left by the other axes, but their product {fixed} does not "
                       f"divide the {device_count} devices")
    sizes[auto[0]] = device_count // fixed
  total = math.prod(sizes.values())
  if total != device_count:
    described = " x ".join(f"{a}={s}" for a, s in sizes.items() if s > 1) or "1"
    validation.fail("mesh", described, f"sizes whose product is the device count "
                    f"{device_count} (got {total}); set one axis to -1 to take the rest")
  return sizes


def check_batch(sizes: dict[str, int], batch_size: int, name: str = "data.batch_size") -> None:
  """The global batch must split evenly over the batch axes."""
  shards = math.prod(sizes[a] for a in BATCH_AXES)
  validation.require(batch_size % shards == 0, name, batch_size,
                     f"a multiple of data x fsdp x expert = {shards} (the batch shards)")


def make_mesh(config: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The Mesh of `config.mesh` over `devices` (default all), axes named as `AXES`."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = axis_sizes(config, len(devices))
  shape = tuple(sizes[a] for a in AXES)
  # Auto axes: jit's sharding propagation places the intermediates (make_mesh's default is
  # Explicit, which would ask every op for its output sharding)
  return jax.make_mesh(shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES),
                       devices=devices)
