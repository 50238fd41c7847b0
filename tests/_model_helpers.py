"""Shared helpers of the model and generation tests: cheap model construction and jitting."""
from __future__ import annotations

from typing import Any, Callable

import jax
from flax import nnx

from jaxlin.config import ModelConfig
from jaxlin.model import LanguageModel

OPTS = {"xla_backend_optimization_level": 0}  # halves CPU compile time, same math


def build(config: ModelConfig, seed: int = 0) -> LanguageModel:
  """LanguageModel(config) with its initialisation jitted (cheaper than eager on CPU)."""
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: LanguageModel(config, rngs=nnx.Rngs(seed))))
  init = jax.jit(lambda: nnx.state(LanguageModel(config, rngs=nnx.Rngs(seed))),
                 compiler_options=OPTS)
  return nnx.merge(graphdef, init())


def jitted(model: nnx.Module, fn: Callable[..., Any]) -> Callable[..., Any]:
  """jit of fn(model, *args) with the model split outside and merged inside."""
  graphdef, state = nnx.split(model)
  compiled = jax.jit(lambda s, *a: fn(nnx.merge(graphdef, s), *a), compiler_options=OPTS)
  return lambda *a: compiled(state, *a)
