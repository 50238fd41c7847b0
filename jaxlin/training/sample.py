"""Text samples from a trained model: after training, and from a work directory's checkpoint.

    prompt --tokenizer--> ids --jaxlin.generate (prefill + cached decode)--> ids --> text

`from_checkpoint(config)` rebuilds the model the config describes, restores
only the parameters of the newest (or a given) checkpoint in `config.workdir`
and samples `config.sample.num_samples` continuations of `config.sample.prompt`.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from jaxlin import generate, validation
from jaxlin.training import restore


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
  run = restore.trained(config, step)
  model = nnx.merge(run.graphdef, run.params)
  seed = config.seed if seed is None else seed
  return run.step, sample_text(model, run.tokenizer, config.sample, seed=seed, prompt=prompt)
