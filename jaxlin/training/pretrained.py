"""Runs that start from a pretrained checkpoint: `config.init_from`.

`init_from` is a Hugging Face Llama-family directory (`jaxlin.interop.huggingface`: llama,
mistral, qwen2; or a jaxlin export of a converted model). The architecture is the
checkpoint's; `config.model` may then hold only the conversion fields
(`huggingface.CONVERSION_FIELDS`: mixer="liger", pattern, liger_*, lora_*, dtypes), e.g.

    config.init_from = "/path/to/SmolLM2-135M"
    config.model = {"mixer": "liger", "pattern": "L", "lora_rank": 8, ...}

Without `init_from` a run builds `config.model` from scratch (`jaxlin.config.model_config_for`).
"""

from __future__ import annotations

from typing import Any

from jaxlin.config import ModelConfig, model_config_for
from jaxlin.interop import huggingface


def init_from(config: Any) -> str:
  """The run's init_from directory ("" when the run starts from scratch)."""
  return config.get("init_from", "") or ""


def run_model_config(config: Any, vocab_size: int) -> ModelConfig:
  """The run's ModelConfig: the checkpoint's architecture converted by `config.model`, or
  `config.model` itself without init_from."""
  directory = init_from(config)
  if not directory:
    return model_config_for(config, vocab_size)
  model = huggingface.model_config_from_hf(huggingface.read_config(directory),
                                           **config.model.to_dict())
  if model.vocab_size < vocab_size:
    raise ValueError(f"data.tokenizer={config.data.tokenizer!r}: {vocab_size} tokens, more "
                     f"than the vocab_size {model.vocab_size} of init_from={directory!r}; use "
                     "the checkpoint's tokenizer.json")
  return model


def initial_params(model_config: ModelConfig, config: Any) -> Any | None:
  """The parameters of init_from converted to `model_config` (None without init_from)."""
  directory = init_from(config)
  if not directory:
    return None
  return huggingface.params_from_tensors(model_config, huggingface.read_tensors(directory),
                                         seed=config.seed)
