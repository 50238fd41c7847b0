"""jaxlin's Mamba2 model on the recall MQAR, trained from `torch_mqar.py`'s initial weights.

Each seed's PyTorch model (the same draws `torch_mqar.py` trains) is copied into jaxlin's
`LanguageModel` (mamba2 mixer, the recall harness's sizes) and trained by the recall harness
(`jaxlin.evals.recall.run_mixer`, its `trainer` wrapped so that its init returns the copied
weights). `--part mixer` copies only the Mamba2 mixers (jaxlin's own init elsewhere), `--part
rest` only the embedding, MLPs and head, `--part mlp` the MLPs, `--part head` the embedding and
head. Needs torch and transformers.

    python benchmarks/mamba2_init/from_torch_init.py --seeds 8            # ~3 min on 2 cores

Measured (docs/benchmarks.md, Recall, Mamba2): all 8 seeds of n = 4 0.65, 0.27, 1.00, 1.00,
0.51, 0.83, 0.40, 0.53, where jaxlin's own init gives 0.06-0.23.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import torch_mqar  # noqa: E402
from jaxlin.evals import recall  # noqa: E402
from jaxlin.interop import mamba2 as interop_mamba2  # noqa: E402


def copy_weights(lm: Any, params: dict[str, Any], part: str, heads: int) -> dict[str, Any]:
  """The PyTorch model's weights into jaxlin's pure parameter dict (one group per head)."""
  value = lambda t: jnp.asarray(t.detach().numpy(), jnp.float32)
  if part in ("all", "rest", "head"):
    params["embedding"] = value(lm.emb.weight)
    params["head"] = value(lm.head.weight).T
  for i, block in enumerate(lm.blocks):
    ours, mixer = params["blocks"][i], block.mix
    if part in ("all", "rest", "mlp"):
      up = value(block.mlp["up"].weight)
      hidden = up.shape[0] // 2
      ours["mlp"]["w_gate"], ours["mlp"]["w_up"] = up[:hidden].T, up[hidden:].T
      ours["mlp"]["w_down"] = value(block.mlp["down"].weight).T
    if part in ("all", "mixer"):
      tensors = {name: t.detach().numpy() for name, t in mixer.state_dict().items()}
      ours["mixer"] = interop_mamba2.mixer_params(tensors, n_groups=heads)
  return params


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--seeds", type=int, default=8)
  parser.add_argument("--levels", type=int, nargs="+", default=[4])
  parser.add_argument("--part", choices=("all", "mixer", "rest", "mlp", "head"), default="all")
  args = parser.parse_args()
  setup = recall.Setup(levels=tuple(args.levels), seeds=args.seeds, steps=600)
  torch_args = torch_mqar.parse([])          # jaxlin's sizes: groups = heads = 2
  if torch_args.groups != setup.num_heads:
    raise ValueError("the copy needs one group per head")
  harness_trainer = recall.trainer

  def trainer(config: Any, setup_: recall.Setup) -> tuple[Any, Any, Any]:
    init, step, evaluate = harness_trainer(config, setup_)

    def init_from_torch(keys: jax.Array) -> tuple[Any, Any]:
      params, opt_state = init(keys)         # AdamW's initial state does not read the values
      stacked = nnx.to_pure_dict(params)     # jaxlin's own init, where nothing is copied
      copies = []
      for r, (_, _, seed) in enumerate(setup_.replicas):
        own = jax.tree.map(lambda a: a[r], stacked)
        copies.append(copy_weights(torch_mqar.model(setup_, torch_args, seed), own,
                                   args.part, setup_.num_heads))
      nnx.replace_by_pure_dict(params, jax.tree.map(lambda *a: jnp.stack(a), *copies))
      return params, opt_state
    return init_from_torch, step, evaluate

  recall.trainer = trainer
  recall.run(setup, ["mamba2"])


if __name__ == "__main__":
  main()
