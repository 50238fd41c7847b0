"""Linear-MoE A1B-7B (arXiv 2503.05447): 16 layers, hidden 2048, 16 heads, 64 experts top-8, expert FFN 1024.

    python run.py --config configs/linear_moe_a1b_7b.py \
        --config.data.source=jsonl --config.data.paths='/data/corpus/*.jsonl' \
        --config.data.tokenizer=/models/qwen2/tokenizer.json --config.workdir=/ckpt/a1b_7b

The paper's model and optimiser (docs/design.md §9; everything but the model is
shared with configs/linear_moe_a0_3b_2b.py): GLA token mixers in every
block, MoE in every block (64 experts, top-8, no renormalisation), untied
151,936-token (Qwen2) vocabulary, init std 0.008; AdamW (0.9, 0.95), weight
decay 0.1, clipping 1.0, cosine 1e-4 -> 1e-5, sequence length 2048.
7,403,573,248 parameters (1,766,428,672 active per token). The data and the tokenizer are local paths you give (nothing is
downloaded); the tokenizer must have <= 151,936 tokens (Qwen2's has 151,646 + specials).
The global batch (512 x 2048 = 1M tokens) and the step count (20k, ~21B tokens)
are this config's choices, not the paper's.

What to expect: meant for TPU pods / multi-GPU hosts. As A0.3B-2B: FSDP over
every device, 8 micro-batches per step; `python benchmarks/scale.py` gives the
bytes per device at 8 and 64 devices (docs/scale.md). Expert parallelism:
--config.mesh.expert=8; sequence parallelism (LASP-2): --config.mesh.sequence=4;
on a single CPU it will not fit. The blocks run as one remat scan
(model.scan_layers): 35.5 GiB per device on 8 devices by that estimate.
"""

import ml_collections

from configs import linear_moe_a0_3b_2b
from jaxlin.config import ModelConfig


def get_config() -> ml_collections.ConfigDict:
  """configs/linear_moe_a0_3b_2b.py (data, optimiser, schedule) with the A1B-7B model."""
  config = linear_moe_a0_3b_2b.get_config()
  config.workdir = "/tmp/jaxlin/linear_moe_a1b_7b"
  config.model = ModelConfig.config_dict(preset="A1B-7B", linear_variant="gla", remat=True,
                                              scan_layers=True)
  return config
