"""Mixture-of-Memories over Gated DeltaNet (MoM, arXiv 2502.13685) on the default corpus.

    python run.py --config configs/mom_gdn.py

The MoM paper's setup: 4 memories, each token routed to the top-2, plus a
shared memory every token writes to, and a 0.01 load-balancing aux loss (its
value is logged as mlp/... and mixer/mom_* in metrics.jsonl). The rest is
configs/default.py: LLLN hybrid, MoE every 2nd block. MoM layers run the k
routed copies of every token as one op call, so a step costs ~(k+1)x the
linear work of configs/gated_deltanet.py.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  """configs/default.py with MoM (Gated DeltaNet cores) in the linear layers."""
  config = default.get_config()
  config.workdir = "/tmp/jaxlin/mom_gdn"
  config.model.mixer = "mom"
  config.model.mom_core = "gated_deltanet"
  config.model.mom_num_memories = 4
  config.model.mom_top_k = 2
  config.model.mom_shared_memory = True
  config.model.mom_aux_coef = 0.01
  return config
