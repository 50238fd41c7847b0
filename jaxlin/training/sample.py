"""Text samples from a trained model: after training, and from a work directory's checkpoint.

    prompt --tokenizer--> ids --jaxlin.generate (prefill + cached decode)--> ids --> text

`from_checkpoint(config)` rebuilds the model the config describes, restores
only the parameters of the newest (or a given) checkpoint in `config.workdir`
and samples `config.sample.num_samples` continuations of `config.sample.prompt`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from jaxlin import data as data_lib
from jaxlin import generate, validation
from jaxlin.training import pretrained, steps
from jaxlin.training.checkpoint import Checkpointer


def default_config() -> ml_collections.ConfigDict:
  """The sampling fields of a run config (`config.sample`)."""
  c = ml_collections.ConfigDict()
  c.prompt = "\n"            # text the samples continue
  c.num_samples = 2          # samples at the end of training (0: none)
  c.max_new_tokens = 256     # tokens generated per sample
  c.temperature = 0.8        # 0: greedy
  c.top_k = 0                # keep the k most likely tokens (0: all)
  c.top_p = 0.95             # nucleus sampling mass (1.0: off)
  return c


def sample_text(model: nnx.Module, tokenizer: Any, config: ml_collections.ConfigDict, *,
                seed: int = 0, prompt: str | None = None) -> list[str]:
  """`config.num_samples` continuations (prompt included) of `prompt` (default config.prompt)."""
  prompt = config.prompt if prompt is None else prompt
  ids = tokenizer.encode(prompt)
  if not ids:
    raise ValueError(f"sample.prompt={prompt!r} encodes to no tokens; give a non-empty prompt")
  validation.require(config.temperature >= 0, "sample.temperature", config.temperature,
                     "a number >= 0 (0: greedy)")
  validation.require(0 < config.top_p <= 1, "sample.top_p", config.top_p, "a number in (0, 1]")
  num = max(int(config.num_samples), 1)
  prompt_BP = jnp.tile(jnp.asarray(ids, jnp.int32)[None], (num, 1))
  out = generate.generate(
      model, prompt_BP, max_new_tokens=config.max_new_tokens, temperature=config.temperature,
      top_k=config.top_k or None, top_p=None if config.top_p >= 1 else config.top_p,
      rng=jax.random.key(seed), eos_id=getattr(tokenizer, "eos_id", None))
  return [tokenizer.decode([int(t) for t in row]) for row in jax.device_get(out)]


def write_samples(workdir: str, step: int, samples: list[str]) -> str:
  """Appends the samples under a header to `<workdir>/samples.txt`; returns the path."""
  path = os.path.join(workdir, "samples.txt")
  with open(path, "a") as f:
    for i, text in enumerate(samples):
      f.write(f"===== step {step} sample {i} =====\n{text}\n")
  return path


def from_checkpoint(config: ml_collections.ConfigDict, *, prompt: str | None = None,
                    step: int | None = None, seed: int | None = None) -> tuple[int, list[str]]:
  """(step, samples) from the newest checkpoint (or `step`) of `config.workdir`; sampled
  with `seed` (None: config.seed)."""
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
    raise ValueError("data.source='mqar': MQAR runs have no text to sample; "
                     "their eval accuracy is in metrics.jsonl")
  tokenizer = data_lib.load_tokenizer(config.data.tokenizer)
  model_config = pretrained.run_model_config(config, tokenizer.vocab_size)
  graphdef, abstract_params = steps.abstract_params(model_config)
  checkpointer.check_compatible(step, abstract_params=abstract_params,
                                model_fields=dataclasses.asdict(model_config))
  params = checkpointer.restore(step, abstract_params=abstract_params)["params"]
  checkpointer.close()
  model = nnx.merge(graphdef, params)
  seed = config.seed if seed is None else seed
  return step, sample_text(model, tokenizer, config.sample, seed=seed, prompt=prompt)
