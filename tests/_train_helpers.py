"""Shared helpers of the training tests: a tiny run config and readers of a work directory."""
from __future__ import annotations

import os
from typing import Any

import ml_collections
import numpy as np

from configs import default  # the repository root is on sys.path (conftest.py)


def tiny_config(workdir: str, **overrides: Any) -> ml_collections.ConfigDict:
  """configs/default.py shrunk to seconds on CPU: a 2-block L N model with one MoE block."""
  config = default.get_config()
  config.workdir = str(workdir)
  config.data.seq_len = 32
  config.data.batch_size = 4
  config.model.update(d_model=32, num_layers=2, num_heads=2, pattern="LN", moe_every=2,
                      num_experts=4, moe_top_k=2, expert_hidden=32, mlp_hidden=64)
  config.optimizer.warmup_steps = 2
  config.train.num_steps = 8
  config.checkpoint.every_steps = 4
  config.eval.every_steps = 4
  config.eval.num_batches = 2
  config.logging.every_steps = 1
  config.logging.progress = False
  config.logging.tensorboard = False
  config.sample.num_samples = 1
  config.sample.max_new_tokens = 16
  for key, value in overrides.items():
    group, field = key.split(".")
    config[group][field] = value
  return config


def train_losses(workdir: str) -> dict[int, float]:
  """{step: train loss} from a work directory's metrics.jsonl (last record per step)."""
  from jaxlin.training.metrics import read_metrics
  return {r["step"]: r["loss"] for r in read_metrics(str(workdir)) if r["split"] == "train"}


def checkpoint_params(workdir: str, step: int) -> list[np.ndarray]:
  """The parameter arrays of checkpoint `step` (flattened, in tree order)."""
  import jax
  import orbax.checkpoint as ocp
  path = os.path.join(str(workdir), "checkpoints", str(step), "params")
  restored = ocp.PyTreeCheckpointer().restore(path)
  return [np.asarray(x) for x in jax.tree.leaves(restored)]
