"""The trained parameters of a run: a checkpoint of `config.workdir`, for sampling and export.

`trained(config, step)` rebuilds the model the config describes (from scratch, or init_from's
architecture converted by `config.model`), checks the checkpoint was written by that model, and
restores only its parameters (no optimizer state).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from jaxlin import data as data_lib
from jaxlin.config import ModelConfig
from jaxlin.training import pretrained, steps
from jaxlin.training.checkpoint import Checkpointer


@dataclasses.dataclass(frozen=True)
class Trained:
  """A restored run: its checkpoint step, model config, parameters and data tokenizer."""
  step: int
  model_config: ModelConfig
  graphdef: Any
  params: Any
  tokenizer: Any


def trained(config: ml_collections.ConfigDict, step: int | None = None) -> Trained:
  """The newest checkpoint of `config.workdir` (or `step`); errors name the saved steps."""
  checkpointer = Checkpointer(config.workdir, max_to_keep=config.checkpoint.max_to_keep)
  steps_saved = checkpointer.all_steps()
  if not steps_saved:
    raise FileNotFoundError(f"no checkpoint in {checkpointer.directory}: train first "
                            f"(python run.py --config ... --config.workdir={config.workdir})")
  step = steps_saved[-1] if step is None else step
  if step not in steps_saved:
    raise ValueError(f"--step={step}: no such checkpoint in {checkpointer.directory}; "
                     f"saved steps: {steps_saved}")
  if config.data.source == "mqar":
    raise ValueError("data.source='mqar': an MQAR run has no tokenizer; its eval accuracy is "
                     "in metrics.jsonl")
  tokenizer = data_lib.load_tokenizer(config.data.tokenizer)
  model_config = pretrained.run_model_config(config, tokenizer.vocab_size)
  graphdef, abstract_params = steps.abstract_params(model_config)
  checkpointer.check_compatible(step, abstract_params=abstract_params,
                                model_fields=dataclasses.asdict(model_config))
  params = checkpointer.restore(step, abstract_params=abstract_params)["params"]
  checkpointer.close()
  return Trained(step, model_config, graphdef, params, tokenizer)
