"""Multi-process runs: `jax.distributed.initialize` when the config or the environment asks.

    --config.distributed.coordinator_address=host:port --config.distributed.num_processes=N \\
        --config.distributed.process_id=i        # explicit (CPU hosts: gloo collectives)
    --config.distributed.auto=True               # TPU pods, SLURM, ...: jax detects the cluster
    JAX_COORDINATOR_ADDRESS=host:port ...        # the environment asks (jax reads it)

Called by run.py before anything touches a device. Then each process reads its own share of
the data (`data.build(process_index, process_count)`), the global batch is assembled with
`jax.make_array_from_process_local_data`, every process writes and restores the orbax
checkpoints, and only process 0 writes metrics, plots and samples.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections

from jaxlin import validation

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"


def default_config() -> ml_collections.ConfigDict:
  """The multi-process fields of a run config (`config.distributed`)."""
  c = ml_collections.ConfigDict()
  c.coordinator_address = ""   # "host:port" of process 0 ("": one process, or auto / the env)
  c.num_processes = 0          # processes in the run (with coordinator_address)
  c.process_id = -1            # this process, 0 .. num_processes - 1 (with coordinator_address)
  c.auto = False               # jax.distributed.initialize() detects the cluster (TPU pod, SLURM)
  return c


def initialize(config: Any) -> bool:
  """Starts jax's distributed runtime if asked; returns whether it did."""
  c = config.get("distributed") if config is not None else None
  address = (c.get("coordinator_address", "") if c else "") or ""
  if address:
    n, pid = c.num_processes, c.process_id
    validation.require(validation.is_int(n) and n >= 1, "distributed.num_processes", n,
                       "an int >= 1 with distributed.coordinator_address")
    validation.require(validation.is_int(pid) and 0 <= pid < n, "distributed.process_id", pid,
                       f"an int in [0, distributed.num_processes={n})")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")   # CPU hosts
    jax.distributed.initialize(address, num_processes=n, process_id=pid)
    return True
  if (c and c.get("auto", False)) or os.environ.get(ENV_COORDINATOR):
    jax.distributed.initialize()
    return True
  return False
