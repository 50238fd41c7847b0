"""MQAR recall of every token mixer at two difficulty levels, over several seeds: JSON + PNG.

    python benchmarks/recall.py                      # every mixer, ~45 min on 2 CPU cores
    python benchmarks/recall.py --mixers gla gated_deltanet mom-gated_deltanet --steps 300
    python benchmarks/recall.py --short-conv -1      # each layer's own conv default
    python benchmarks/recall.py --mixers gated_deltanet --decay-dt-max 0.02  # longer initial memory

The harness, the task and the setup are `jaxlin.evals.recall` (its docstring says what is
measured); every `Setup` field is a flag here (--seq-len 128). Writes PREFIX.json (every
replica's accuracy and loss curve, rewritten after each mixer) and PREFIX.png (accuracy vs n,
mean over seeds with each seed as a dot, state size in the legend).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402

from jaxlin.evals.recall import MIXERS, Setup, plot, run  # noqa: E402


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--mixers", nargs="+", default=list(MIXERS), choices=list(MIXERS))
  for field in dataclasses.fields(Setup):   # every Setup field is a flag (--seq-len 128)
    flag = "--" + field.name.replace("_", "-")
    if isinstance(field.default, tuple):
      parser.add_argument(flag, type=type(field.default[0]), nargs="+",
                          default=list(field.default))
    else:
      parser.add_argument(flag, type=type(field.default), default=field.default)
  parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "recall"),
                      help="path prefix: writes PREFIX.json and PREFIX.png")
  args = parser.parse_args()
  setup = Setup(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Setup)})
  setup = dataclasses.replace(setup, levels=tuple(setup.levels),
                              learning_rates=tuple(setup.learning_rates))
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; {setup}", flush=True)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

  def write(results: list[dict[str, Any]]) -> None:   # after every mixer: nothing lost
    record = {"jax": jax.__version__, "device": jax.devices()[0].device_kind,
              "platform": platform.platform(), "command": " ".join(sys.argv),
              "setup": dataclasses.asdict(setup), "results": results}
    with open(args.out + ".json", "w") as f:
      json.dump(record, f, indent=1)

  results = run(setup, args.mixers, log=lambda s: print(s, flush=True), on_result=write)
  title = (f"MQAR, T={setup.seq_len}, V={setup.vocab_size}, d_model={setup.d_model}, "
           f"{setup.num_layers} layers, {setup.steps} steps, {setup.seeds} seeds "
           f"({jax.devices()[0].device_kind}, jax {jax.__version__})")
  plot(setup, results, args.out + ".png", title)
  print(f"wrote {args.out}.json and {args.out}.png")


if __name__ == "__main__":
  main()
