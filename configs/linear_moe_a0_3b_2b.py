"""Linear-MoE A0.3B-2B (arXiv 2503.05447): 12 layers, hidden 1024, 8 heads, 64 experts top-8, expert FFN 896.

    python run.py --config configs/linear_moe_a0_3b_2b.py \
        --config.data.source=jsonl --config.data.paths='/data/corpus/*.jsonl' \
        --config.data.tokenizer=/models/qwen2/tokenizer.json --config.workdir=/ckpt/a0_3b_2b

The paper's model and optimiser (docs/design.md §9): GLA token mixers in every
block, MoE in every block (64 experts, top-8, no renormalisation), untied
151,936-token (Qwen2) vocabulary, init std 0.008; AdamW (0.9, 0.95), weight
decay 0.1, clipping 1.0, cosine 1e-4 -> 1e-5, sequence length 2048.
2,489,227,776 parameters (639,539,712 active per token). The data and the tokenizer are local paths you give (nothing is
downloaded); the tokenizer must have <= 151,936 tokens (Qwen2's has 151,646 + specials).
The global batch (512 x 2048 = 1M tokens) and the step count (20k, ~21B tokens)
are this config's choices, not the paper's.

What to expect: meant for TPU pods / multi-GPU hosts. The mesh is FSDP over
every device (parameters and Adam state sharded), the batch split over them, 8
micro-batches per step; `python benchmarks/scale.py` compiles this step for 8
and 64 devices and prints the bytes per device (docs/scale.md). Expert
parallelism: --config.mesh.expert=8 (with fsdp=-1); sequence parallelism (LASP-2):
--config.mesh.sequence=4; on a single CPU it will not fit. The blocks run as one remat scan
(model.scan_layers): 14.9 GiB per device on 8 devices by that estimate.
"""

import ml_collections

from configs import default
from jaxlin.config import ModelConfig


def get_config() -> ml_collections.ConfigDict:
  """The Linear-MoE A0.3B-2B model and optimiser."""
  config = default.get_config()
  config.workdir = "/tmp/jaxlin/linear_moe_a0_3b_2b"

  # Data
  config.data.source = "jsonl"             # user data: set data.paths (and data.text_field)
  config.data.tokenizer = "qwen2_tokenizer.json"  # a local Qwen2 tokenizer.json: set the path
  config.data.seq_len = 2048
  config.data.batch_size = 512             # 1M tokens per step
  config.data.worker_count = 4

  # Model
  config.model = ModelConfig.config_dict(preset="A0.3B-2B", linear_variant="gla", remat=True,
                                              scan_layers=True)

  # Mesh: FSDP over every device (parameters + Adam state sharded); see benchmarks/scale.py
  config.mesh.data = 1
  config.mesh.fsdp = -1                    # all devices

  # Optimizer
  config.optimizer.learning_rate = 1e-4
  config.optimizer.end_learning_rate = 1e-5
  config.optimizer.warmup_steps = 1000
  config.optimizer.b1 = 0.9
  config.optimizer.b2 = 0.95
  config.optimizer.weight_decay = 0.1
  config.optimizer.grad_clip = 1.0
  config.train.num_steps = 20_000
  config.train.accumulation_steps = 8      # micro-batches of 64 x 2048 (global)

  # Checkpointing / Eval / Logging
  config.checkpoint.every_steps = 1000
  config.eval.every_steps = 1000
  config.eval.num_batches = 16
  config.logging.every_steps = 10
  config.sample.prompt = "The"
  return config
