"""Liger on a real pretrained model: SmolLM2-135M linearized, LoRA fine-tuned, against the original.

    python benchmarks/smollm2_checkpoint.py --out=/tmp/jaxlin/smollm2-135m    # once
    python benchmarks/liger.py --checkpoint=/tmp/jaxlin/smollm2-135m           # see docs/liger.md
    python benchmarks/liger.py --steps 10 --eval-batches 2 --context 512       # a quick look

The models, the measurements and the targets are `jaxlin.evals.liger`'s (its docstring);
this script runs them on configs/liger.py's recipe and writes PREFIX.json (every number,
every loss curve, the command and machine) and PREFIX.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402

from configs import liger as liger_config  # noqa: E402 (configs/ is not an installed package)
from jaxlin.config import ModelConfig  # noqa: E402
from jaxlin.evals.liger import (DECODE_MODELS, DEFAULT_MODELS, MODELS, Setup,  # noqa: E402
                                cache_bytes, decode_speed, finetune, held_out_batches, load,
                                perplexity, plot, run_config)
from jaxlin.interop import huggingface as hf_io  # noqa: E402


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--checkpoint", default="/tmp/jaxlin/smollm2-135m",
                      help="a Hugging Face Llama-family directory (smollm2_checkpoint.py)")
  parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), choices=list(MODELS))
  parser.add_argument("--steps", type=int, default=60, help="LoRA steps per fine-tuned model")
  parser.add_argument("--seq-len", type=int, default=256)
  parser.add_argument("--batch-size", type=int, default=4)
  parser.add_argument("--eval-batches", type=int, default=8)
  parser.add_argument("--learning-rate", type=float, default=1e-3)
  parser.add_argument("--lora-rank", type=int, default=8)
  parser.add_argument("--lora-alpha", type=float, default=8.0)
  parser.add_argument("--context", type=int, default=4096, help="decode benchmark prompt length")
  parser.add_argument("--decode-tokens", type=int, default=16)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "liger"),
                      help="JSON and PNG path prefix")
  args = parser.parse_args()
  if not os.path.isfile(os.path.join(args.checkpoint, "config.json")):
    raise SystemExit(f"error: --checkpoint={args.checkpoint!r} has no config.json; write it "
                     "with python benchmarks/smollm2_checkpoint.py --out=" + args.checkpoint)
  setup = Setup(args.checkpoint, args.steps, args.seq_len, args.batch_size, args.eval_batches,
                args.learning_rate, args.lora_rank, args.lora_alpha, args.context,
                args.decode_tokens, args.seed)
  start = time.perf_counter()

  def log(message: str) -> None:
    print(f"[{time.perf_counter() - start:7.1f}s] {message}", flush=True)

  config = run_config(setup, liger_config.get_config())
  dataset, held_out = held_out_batches(config, setup.eval_batches)
  log(f"{len(held_out)} held-out batches of {setup.batch_size} x {setup.seq_len} tokens")

  models: dict[str, dict[str, Any]] = {}
  decoders: dict[str, tuple[ModelConfig, Any]] = {}
  for name in args.models:
    tuned = MODELS[name][1]
    model_config, params = load(setup, name, lora=tuned)
    entry: dict[str, Any] = {"fields": MODELS[name][0], "before": perplexity(
        model_config, params, held_out)}
    log(f"{name}: perplexity {entry['before']['perplexity']:.2f} before fine-tuning")
    if tuned and setup.steps > 0:
      params, losses, per_step = finetune(model_config, params, config, dataset, setup.steps, log)
      entry.update(after=perplexity(model_config, params, held_out), train_losses=losses,
                   seconds_per_step=per_step)
      log(f"{name}: perplexity {entry['after']['perplexity']:.2f} after {setup.steps} steps "
          f"({per_step:.1f} s/step)")
    models[name] = entry
    if name in DECODE_MODELS:   # decoded below as it ends here, adapters merged (no reload)
      decoders[name] = (model_config.replace(lora_rank=0),
                        hf_io.merged_params(model_config, params))

  decode, cache_curves = {}, {}
  contexts = sorted({256, 1024, 4096, 16384, 65536, setup.context})
  for name, (model_config, params) in decoders.items():
    cache_curves[name] = {str(c): cache_bytes(model_config, c) for c in contexts}
    if setup.decode_tokens > 0:
      decode[name] = decode_speed(model_config, params, setup.context, setup.decode_tokens,
                                  setup.seed)
      log(f"{name}: decode {decode[name]['decode_tokens_per_second']:.1f} tok/s, cache "
          f"{decode[name]['cache_bytes'] / 2**20:.1f} MiB at context {setup.context}")

  reference = models.get("original+lora", {}).get("after")
  summary = {}
  for name in ("liger_gla", "liger_attention", "liger_gdn"):
    if name in models and models[name].get("after") and reference:
      summary[f"{name}_perplexity_vs_reference"] = (
          models[name]["after"]["perplexity"] / reference["perplexity"])
    if name in decode and "original" in decode:
      summary[f"{name}_cache_vs_original"] = (
          decode[name]["cache_bytes"] / decode["original"]["cache_bytes"])
  result = {"machine": f"{platform.machine()} {jax.devices()[0].device_kind} x"
                       f"{jax.device_count()}, jax {jax.__version__}",
            "platform": platform.platform(), "command": " ".join(sys.argv),
            "setup": dataclasses.asdict(setup), "models": models, "decode": decode,
            "cache_bytes_vs_context": cache_curves, "summary": summary,
            "seconds": time.perf_counter() - start}
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out + ".json", "w") as f:
    json.dump(result, f, indent=1)
  plot(result, args.out + ".png")
  for key, value in summary.items():
    print(f"{key}: {value:.3f}")
  log(f"wrote {args.out}.json and {args.out}.png")


if __name__ == "__main__":
  main()
