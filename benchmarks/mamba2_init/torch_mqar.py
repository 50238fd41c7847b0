"""transformers' Mamba2Mixer (mamba_ssm's math, its PyTorch path) on jaxlin's recall MQAR.

The model of `jaxlin.evals.recall` rebuilt in PyTorch around `Mamba2Mixer`: embedding
N(0, 0.02), 2 pre-RMSNorm blocks of mixer + SwiGLU MLP, final RMSNorm, head; PyTorch's
default init elsewhere. Same data (`recall.examples`), batch order, AdamW (b2 0.95, weight
decay on matrices only, clip 1), 10% warmup and cosine to 10%. Prints held-out answer accuracy
per seed. Needs torch and transformers (`pip install -e '.[peers,hf]'`).

    python benchmarks/mamba2_init/torch_mqar.py --levels 4 --seeds 4   # jaxlin's sizes: ~1 min

Defaults are jaxlin's Mamba2 at the recall benchmark's size (expand 1, head dim 32, a state of
32 per head, one group per head, A ~ U[1, 16]); `--expand 2 --head-dim 64 --state 128 --groups 1`
is the Mamba2 paper's shape. docs/benchmarks.md (Recall, Mamba2) has the results.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np
import torch
from torch import nn
from transformers.models.mamba2.configuration_mamba2 import Mamba2Config
from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from jaxlin.evals import recall  # noqa: E402


class RMSNorm(nn.Module):
  def __init__(self, dim: int) -> None:
    super().__init__()
    self.w = nn.Parameter(torch.ones(dim))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


class Block(nn.Module):
  """h + Mamba2(RMSNorm h), then h + W_down(silu(W_gate x) * W_up x), x = RMSNorm h."""

  def __init__(self, config: Mamba2Config, index: int) -> None:
    super().__init__()
    d = config.hidden_size
    self.n1, self.mix = RMSNorm(d), Mamba2Mixer(config, index)
    self.mlp = nn.ModuleDict(dict(n=RMSNorm(d), up=nn.Linear(d, 4 * d, bias=False),
                                  down=nn.Linear(2 * d, d, bias=False)))

  def forward(self, h: torch.Tensor) -> torch.Tensor:
    h = h + self.mix(self.n1(h))
    gate, up = self.mlp["up"](self.mlp["n"](h)).chunk(2, -1)
    return h + self.mlp["down"](nn.functional.silu(gate) * up)


class LanguageModel(nn.Module):
  def __init__(self, setup: recall.Setup, args: argparse.Namespace) -> None:
    super().__init__()
    d = setup.d_model
    config = Mamba2Config(hidden_size=d, expand=args.expand, head_dim=args.head_dim,
                          num_heads=args.expand * d // args.head_dim, state_size=args.state,
                          n_groups=args.groups, num_hidden_layers=setup.num_layers,
                          chunk_size=32, use_conv_bias=not args.no_conv_bias,
                          vocab_size=setup.vocab_size)
    self.emb = nn.Embedding(setup.vocab_size, d)
    nn.init.normal_(self.emb.weight, std=0.02)
    self.blocks = nn.ModuleList([Block(config, i) for i in range(setup.num_layers)])
    self.norm, self.head = RMSNorm(d), nn.Linear(d, setup.vocab_size, bias=False)
    for block in self.blocks:   # mamba_ssm's A ~ U[1, 16] (transformers': 1..num_heads)
      with torch.no_grad():
        block.mix.A_log.copy_(torch.log(torch.empty_like(block.mix.A_log).uniform_(1, 16)))

  def forward(self, tokens: torch.Tensor) -> torch.Tensor:
    h = self.emb(tokens)
    for block in self.blocks:
      h = block(h)
    return self.head(self.norm(h))


def parse(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--expand", type=int, default=1)
  parser.add_argument("--head-dim", type=int, default=32)
  parser.add_argument("--state", type=int, default=32)
  parser.add_argument("--groups", type=int, default=2)
  parser.add_argument("--no-conv-bias", action="store_true")
  parser.add_argument("--levels", type=int, nargs="+", default=[4])
  parser.add_argument("--seeds", type=int, default=4)
  parser.add_argument("--steps", type=int, default=600)
  parser.add_argument("--learning-rate", type=float, default=1e-2)
  return parser.parse_args(argv)


def model(setup: recall.Setup, args: argparse.Namespace, seed: int) -> LanguageModel:
  """The seed's initial model (the same draws as `from_torch_init.py` copies)."""
  torch.manual_seed(1000 * seed + 17)
  return LanguageModel(setup, args)


def main() -> None:
  args = parse()
  torch.set_num_threads(os.cpu_count() or 1)
  setup = recall.Setup(levels=tuple(args.levels), seeds=args.seeds, steps=args.steps)
  accuracy = {}
  for n in setup.levels:
    held = {k: torch.as_tensor(v).long() for k, v in
            recall.examples(setup, n, 0, "validation", setup.eval_examples).items()}
    for seed in range(args.seeds):
      train = recall.examples(setup, n, seed, "train", setup.train_examples)
      lm = model(setup, args, seed)
      matrices = [p for name, p in lm.named_parameters() if p.ndim >= 2 and "emb" not in name]
      rest = [p for name, p in lm.named_parameters() if not (p.ndim >= 2 and "emb" not in name)]
      opt = torch.optim.AdamW([{"params": matrices, "weight_decay": setup.weight_decay},
                               {"params": rest, "weight_decay": 0.0}],
                              lr=args.learning_rate, betas=(0.9, 0.95))
      warm = max(setup.steps // 10, 1)
      for i in range(setup.steps):
        cosine = 0.5 * (1 + math.cos(math.pi * (i - warm) / (setup.steps - warm)))
        for group in opt.param_groups:
          group["lr"] = args.learning_rate * ((i + 1) / warm if i < warm else 0.1 + 0.9 * cosine)
        order = np.random.default_rng([i // (setup.train_examples // setup.batch_size), 7])
        offset = (i * setup.batch_size) % setup.train_examples
        picks = order.permutation(setup.train_examples)[offset:offset + setup.batch_size]
        x, y, w = (torch.as_tensor(train[k][picks]) for k in ("inputs", "targets", "weights"))
        logits = lm(x.long())
        ce = nn.functional.cross_entropy(logits.flatten(0, 1), y.long().flatten(),
                                         reduction="none")
        loss = (ce * w.flatten()).sum() / w.sum()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        opt.step()
      with torch.no_grad():
        hits = (lm(held["inputs"]).argmax(-1) == held["targets"]).float() * held["weights"]
        accuracy[f"n={n} seed={seed}"] = round(float(hits.sum() / held["weights"].sum()), 4)
      print(f"n={n} seed={seed} accuracy {accuracy[f'n={n} seed={seed}']:.3f}", flush=True)
  print(json.dumps({"args": vars(args), "accuracy": accuracy}))


if __name__ == "__main__":
  main()
