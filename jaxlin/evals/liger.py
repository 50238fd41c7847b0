"""Liger on a pretrained Llama-family checkpoint: convert, LoRA fine-tune, compare, decode.

    from jaxlin.evals import liger
    from jaxlin.training import cli
    setup = liger.Setup(checkpoint="/tmp/jaxlin/smollm2-135m", steps=60)
    config = liger.run_config(setup, cli.load_config_file("configs/liger.py"))
    dataset, held_out = liger.held_out_batches(config, setup.eval_batches)
    model_config, params = liger.load(setup, "liger_attention", lora=True)
    params, losses, _ = liger.finetune(model_config, params, config, dataset, setup.steps, print)
    liger.perplexity(model_config, params, held_out)

The pieces of `benchmarks/liger.py` (the CLI: every model, JSON + PNG) and `colab/liger.ipynb`.

Every model starts from the same checkpoint and, where it is fine-tuned, sees the same batches
with the same optimizer: configs/liger.py's recipe (LoRA rank 8, alpha 8 on q, k, v; AdamW at
lr 1e-3; only the adapters train):

    original          the imported softmax model, as is                              (a)
    original+lora     the original with the same LoRA steps: the fair reference      (d)
    liger_gla         every layer Liger-GLA (gate logsigmoid(k)/16, softmax feature
                      maps; no softmax branch): before (b) and after (c) the steps
    liger_attention   every layer Liger Attention (0.5 * sliding-window softmax over 64
                      tokens + 0.5 * Liger-GLA): before (b) and after (c)
    liger_gdn         Gated DeltaNet instead of GLA: jaxlin's extension, not in the
                      paper (not in DEFAULT_MODELS)

Perplexity is on held-out works of the embedded Shakespeare corpus (configs/liger.py's data:
data.validation_fraction of the works, never trained on), tokenized with the checkpoint's
tokenizer.json. Decoding (`decode_speed`): a `context`-token prompt is prefilled, then
`decode_tokens` greedy tokens are decoded one at a time (each a jitted step; tok/s from their wall time) by each model
as the run leaves it (fine-tuned ones with their adapters merged); the cache
bytes are those of the decode cache (`model.init_cache`): the original's KV cache grows with
the context, a Liger layer's state [H, D, D] and 64-token window ring buffer do not.

`plot` draws a run's result (perplexity per model; cache bytes vs context; decode tok/s), as
`benchmarks/liger.py` writes it to JSON. Targets (the issue's, not tests): after
fine-tuning Liger Attention within 15% of (d)'s perplexity, Liger-GLA within 35%; at 4K context
the converted model's cache under a quarter of the original's.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from jaxlin import data as data_lib
from jaxlin.config import ModelConfig
from jaxlin.interop import huggingface as hf_io
from jaxlin.training import optim, steps
from jaxlin.training import sample as sample_lib

# model name -> (conversion fields given to the import, fine-tuned?)
MODELS: dict[str, tuple[dict[str, Any], bool]] = {
    "original": (dict(), False),
    "original+lora": (dict(), True),
    "liger_gla": (dict(mixer="liger", pattern="L", liger_window=0), True),
    "liger_attention": (dict(mixer="liger", pattern="L", liger_window=64), True),
    "liger_gdn": (dict(mixer="liger", pattern="L", liger_window=64,
                       liger_recurrence="gated_deltanet"), True),
}
DEFAULT_MODELS = ("original", "original+lora", "liger_gla", "liger_attention")
DECODE_MODELS = ("original", "liger_gla", "liger_attention", "liger_gdn")


@dataclasses.dataclass(frozen=True)
class Setup:
  """What every model gets (the defaults are benchmarks/liger.py's)."""
  checkpoint: str = "/tmp/jaxlin/smollm2-135m"   # a Hugging Face Llama-family directory
  steps: int = 60               # LoRA steps of each fine-tuned model
  seq_len: int = 256            # tokens per training / eval row
  batch_size: int = 4
  eval_batches: int = 8         # held-out batches of the perplexity
  learning_rate: float = 1e-3
  lora_rank: int = 8
  lora_alpha: float = 8.0
  context: int = 4096           # decode benchmark: prompt length
  decode_tokens: int = 16       # decode benchmark: tokens timed
  seed: int = 0


def run_config(setup: Setup, base: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`base` (configs/liger.py's get_config(): its data and optimizer recipe) with the setup's
  checkpoint, sizes and steps."""
  config = copy.deepcopy(base)   # keeps its references (data.tokenizer follows init_from)
  config.init_from = setup.checkpoint
  config.seed = setup.seed
  config.data.update(seq_len=setup.seq_len, batch_size=setup.batch_size)
  config.train.num_steps = max(setup.steps, 2)
  config.optimizer.update(learning_rate=setup.learning_rate,
                          end_learning_rate=setup.learning_rate / 10,
                          warmup_steps=min(10, max(setup.steps, 2) // 10))
  return config


def load(setup: Setup, name: str, lora: bool) -> tuple[ModelConfig, Any]:
  """The checkpoint converted as `name` says (with LoRA adapters when it will be fine-tuned)."""
  fields = dict(MODELS[name][0])
  if lora:
    fields.update(lora_rank=setup.lora_rank, lora_alpha=setup.lora_alpha,
                  lora_targets="q_proj,k_proj,v_proj")
  return hf_io.load_pretrained(setup.checkpoint, seed=setup.seed, **fields)


def perplexity(model_config: ModelConfig, params: Any,
               batches: list[dict[str, np.ndarray]]) -> dict[str, float]:
  """Held-out loss, perplexity and accuracy (token-weighted over the batches)."""
  eval_step = jax.jit(steps.make_eval_step(steps.abstract_params(model_config)[0]))
  sums = [{k: float(v) for k, v in jax.device_get(eval_step(params, b)).items()} for b in batches]
  return steps.summarise_eval(sums)


def finetune(model_config: ModelConfig, params: Any, config: ml_collections.ConfigDict,
             dataset: data_lib.Data, num_steps: int, log: Callable[[str], None]
             ) -> tuple[Any, list[float], float]:
  """`num_steps` LoRA steps on the run's training stream: (params, losses, seconds per step)."""
  tx, schedule = optim.make_optimizer(config.optimizer, config.train.num_steps)
  graphdef = steps.abstract_params(model_config)[0]
  train_step = jax.jit(steps.make_train_step(
      graphdef, tx, schedule, trainable=optim.trainable_mask(config.optimizer)),
      donate_argnums=(0,))
  state = steps.TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
  batches = dataset.train_iterator()
  losses, started = [], None
  for step in range(num_steps):
    batch = {k: jnp.asarray(v) for k, v in next(batches).items()}
    state, metrics = train_step(state, batch)
    losses.append(float(metrics["loss"]))
    if step == 0:
      started = time.perf_counter()   # after the compilation
    if step % 10 == 0 or step == num_steps - 1:
      log(f"  step {step + 1}/{num_steps} loss {losses[-1]:.3f}")
  seconds = (time.perf_counter() - started) / max(num_steps - 1, 1) if started else float("nan")
  return state.params, losses, seconds


def cache_bytes(model_config: ModelConfig, context: int) -> int:
  """Bytes of the decode cache of one sequence of `context` tokens (shapes only)."""
  graphdef, params = steps.abstract_params(model_config)

  def make(params: Any) -> Any:
    return nnx.merge(graphdef, params).init_cache(1, context)

  shapes = jax.eval_shape(make, params)
  return int(sum(math.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves(shapes)))


def decode_speed(model_config: ModelConfig, params: Any, context: int, num_tokens: int,
                 seed: int) -> dict[str, float]:
  """Prefill `context` random tokens, then time `num_tokens` single-token greedy decode steps."""
  graphdef = steps.abstract_params(model_config)[0]

  @jax.jit
  def prefill(params: Any, prompt: jax.Array) -> tuple[jax.Array, Any]:
    model = nnx.merge(graphdef, params)
    cache = model.init_cache(prompt.shape[0], context + num_tokens + 1)
    logits, cache, _ = model(prompt, cache=cache)
    return jnp.argmax(logits[:, -1], -1).astype(jnp.int32), cache

  @functools.partial(jax.jit, donate_argnums=(2,))   # the cache updates in place
  def decode(params: Any, token: jax.Array, cache: Any) -> tuple[jax.Array, Any]:
    logits, cache, _ = nnx.merge(graphdef, params)(token[:, None], cache=cache)
    return jnp.argmax(logits[:, 0], -1).astype(jnp.int32), cache

  prompt = jax.random.randint(jax.random.key(seed), (1, context), 0, model_config.vocab_size)
  started = time.perf_counter()
  token, cache = jax.block_until_ready(prefill(params, prompt))
  prefill_s = time.perf_counter() - started
  token, cache = jax.block_until_ready(decode(params, token, cache))   # compiles
  started = time.perf_counter()
  for _ in range(num_tokens):
    token, cache = decode(params, token, cache)
  jax.block_until_ready(token)
  seconds = time.perf_counter() - started
  return {"prefill_seconds": prefill_s, "decode_tokens_per_second": num_tokens / seconds,
          "cache_bytes": int(sum(a.nbytes for a in jax.tree.leaves(cache)))}


def plot(result: dict[str, Any], path: str) -> None:
  """Perplexity per model; cache bytes vs context; decode tok/s at the benchmark's context."""
  models = result["models"]
  fig = Figure(figsize=(16, 4.6))
  FigureCanvasAgg(fig)
  axes = fig.subplots(1, 3)
  ax = axes[0]
  names, before, after = [], [], []
  for name, m in models.items():
    names.append(name)
    before.append(m["before"]["perplexity"])
    after.append(m["after"]["perplexity"] if m.get("after") else np.nan)
  x = np.arange(len(names))
  ax.bar(x - 0.2, before, 0.4, label="before fine-tuning")
  ax.bar(x + 0.2, after, 0.4, label=f"after {result['setup']['steps']} LoRA steps")
  for xi, (b, a) in enumerate(zip(before, after)):
    ax.text(xi - 0.2, b, f"{b:.1f}", ha="center", va="bottom", fontsize=7)
    if not np.isnan(a):
      ax.text(xi + 0.2, a, f"{a:.1f}", ha="center", va="bottom", fontsize=7)
  ax.set_xticks(x, names, rotation=15, fontsize=8)
  ax.set_yscale("log")
  ax.set_ylabel("held-out perplexity (log)")
  ax.set_title("perplexity: Shakespeare held-out works")
  ax.legend(fontsize=8)
  ax = axes[1]
  for name, curve in result["cache_bytes_vs_context"].items():
    ctx = sorted(int(c) for c in curve)
    ax.plot(ctx, [curve[str(c)] / 2**20 for c in ctx], marker="o", label=name)
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  ax.set_xlabel("context (tokens)")
  ax.set_ylabel("decode cache, MiB per sequence")
  ax.set_title("cache memory vs context")
  ax.legend(fontsize=8)
  ax = axes[2]
  decode = result["decode"]
  ax.bar(list(decode), [d["decode_tokens_per_second"] for d in decode.values()])
  ax.set_ylabel("tokens / s (batch 1)")
  ax.set_title(f"greedy decode after a {result['setup']['context']}-token prefill")
  ax.tick_params(axis="x", labelsize=8)
  fig.suptitle(f"Liger on {os.path.basename(result['setup']['checkpoint'].rstrip('/'))} "
               f"({result['machine']})", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def held_out_batches(config: ml_collections.ConfigDict, num_batches: int
                     ) -> tuple[data_lib.Data, list[dict[str, jax.Array]]]:
  """(the run's dataset, its first `num_batches` validation batches on the device)."""
  dataset = data_lib.build(config.data)
  return dataset, [{k: jnp.asarray(v) for k, v in b.items()}
                   for b in dataset.validation_batches(num_batches)]


def generate_text(model_config: ModelConfig, params: Any, tokenizer: Any, prompt: str, *,
                  max_new_tokens: int = 32, temperature: float = 0.0, seed: int = 0) -> str:
  """`prompt` continued by the model (greedy at temperature 0), decoded with `tokenizer`
  (jaxlin.data.load_tokenizer of the checkpoint's tokenizer.json); LoRA adapters are used
  as they are (not merged)."""
  model = nnx.merge(steps.abstract_params(model_config)[0], params)
  options = sample_lib.default_config()
  options.update(num_samples=1, max_new_tokens=max_new_tokens, temperature=temperature,
                 top_p=1.0)
  return sample_lib.sample_text(model, tokenizer, options, seed=seed, prompt=prompt)[0]
