"""Training throughput: the default hybrid model against a same-size all-softmax model.

    python benchmarks/train.py                       # T = 2048 and 8192, JSON to benchmarks/results/
    python benchmarks/train.py --seq-lens 512 --steps 3 --batch-tokens 4096   # a quick look

Both models come from one run config (default: configs/default.py): "hybrid" is
the config's model (LLLN: three GLA layers per softmax layer), "softmax" the
same model with pattern "N" (every token mixer softmax attention; same widths,
MoE and parameter count up to the mixers' own projections). Each step is the
full jitted train step (forward, backward, AdamW) on random tokens with
batch = batch_tokens / T rows, so every sequence length processes the same
tokens per step. The steps of the two models are interleaved and the median
step time is reported, so the ratio hybrid / softmax is measured under the
same machine load. Expect the hybrid to win at long T: its linear layers cost
O(T) per token against attention's O(T^2) (only one layer in four is softmax).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from jaxlin.training import optim, steps  # noqa: E402
from jaxlin.config import model_config_for  # noqa: E402


def load_config(path: str) -> Any:
  """get_config() of a configs/*.py file."""
  spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def make_step(model_config: Any, config: Any) -> tuple[Any, Any, int]:
  """(jitted train step, initial state, parameter count) of one model."""
  tx, schedule = optim.make_optimizer(config.optimizer, config.train.num_steps)
  graphdef, params = steps.init_params(model_config, 0)
  state = steps.TrainState(jnp.int32(0), params, tx.init(params))
  step = jax.jit(steps.make_train_step(graphdef, tx, schedule), donate_argnums=(0,))
  return step, state, sum(x.size for x in jax.tree.leaves(params))


def random_batch(batch: int, seq_len: int, vocab: int, seed: int = 0) -> dict[str, jax.Array]:
  """Random tokens, one document per row, every position weighted."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, (batch, seq_len + 1)).astype(np.int32)
  return {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:]),
          "segment_ids": jnp.ones((batch, seq_len), jnp.int32),
          "weights": jnp.ones((batch, seq_len), jnp.float32)}


def measure(config: Any, seq_len: int, batch_tokens: int, num_steps: int) -> dict[str, Any]:
  """Median step time and tokens/s of the hybrid and the all-softmax model at one T."""
  batch = max(batch_tokens // seq_len, 1)
  hybrid = model_config_for(config, 256)
  models = {"hybrid": hybrid, "softmax": hybrid.replace(pattern="N")}
  data = random_batch(batch, seq_len, hybrid.vocab_size)
  runners, times, params = {}, {name: [] for name in models}, {}
  for name, model_config in models.items():
    step, state, params[name] = make_step(model_config, config)
    start = time.perf_counter()
    state, metrics = step(state, data)  # compile + one step
    jax.block_until_ready(metrics)
    print(f"  T={seq_len} {name}: compiled in {time.perf_counter() - start:.1f}s", flush=True)
    runners[name] = [step, state]
  for _ in range(num_steps):  # interleaved: both models see the same load
    for name, runner in runners.items():
      start = time.perf_counter()
      runner[1], metrics = runner[0](runner[1], data)
      jax.block_until_ready(metrics)
      times[name].append(time.perf_counter() - start)
  result: dict[str, Any] = {"seq_len": seq_len, "batch": batch, "tokens_per_step": batch * seq_len}
  for name in models:
    median = statistics.median(times[name])
    result[name] = {"step_s": median, "tokens_per_s": batch * seq_len / median,
                    "parameters": params[name], "step_times_s": times[name]}
  result["hybrid_speedup"] = result["softmax"]["step_s"] / result["hybrid"]["step_s"]
  return result


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default=os.path.join(REPO, "configs", "default.py"))
  parser.add_argument("--seq-lens", type=int, nargs="+", default=[2048, 8192])
  parser.add_argument("--batch-tokens", type=int, default=16384,
                      help="tokens per step at every T (batch = batch_tokens / T)")
  parser.add_argument("--steps", type=int, default=5, help="timed steps per model and T")
  parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "train.json"))
  args = parser.parse_args()
  config = load_config(args.config)
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; config {args.config}")
  results = []
  for seq_len in args.seq_lens:
    row = measure(config, seq_len, args.batch_tokens, args.steps)
    results.append(row)
    print(f"T={seq_len:6d} batch {row['batch']:3d}: hybrid {row['hybrid']['tokens_per_s']:9.0f} "
          f"tok/s, softmax {row['softmax']['tokens_per_s']:9.0f} tok/s, "
          f"hybrid/softmax speed {row['hybrid_speedup']:.2f}x", flush=True)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"jax": jax.__version__, "device": jax.devices()[0].device_kind,
               "platform": platform.platform(), "config": args.config,
               "batch_tokens": args.batch_tokens, "results": results}, f, indent=2)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
