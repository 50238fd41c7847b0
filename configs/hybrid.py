"""A deeper Gated DeltaNet + softmax hybrid (pattern LLLN) with shared-expert MoE.

    python run.py --config configs/hybrid.py

8 blocks: L L L N L L L N (Gated DeltaNet, then softmax attention with RoPE
every 4th block), MoE in every block with 8 experts top-2 plus one
sigmoid-gated shared expert (Qwen2-MoE style). This is the layout LASP-2H
parallelises across the sequence: --config.mesh.sequence=P runs LASP-2 in the
linear layers (XLA partitions the softmax ones; LASP-2H's explicit K/V gather is
not built yet).
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  """An 8-block LLLN hybrid with shared-expert MoE."""
  config = default.get_config()
  config.workdir = "/tmp/jaxlin/hybrid"
  config.model.update(
      num_layers=8, pattern="LLLN", linear_variant="gated_deltanet",
      moe_every=1, num_experts=8, moe_top_k=2, expert_hidden=128,
      num_shared_experts=1, shared_expert_hidden=256, moe_shared_gate=True)
  return config
