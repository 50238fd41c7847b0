"""The default run with gated_deltanet token mixers: Gated DeltaNet (Yang et al. 2024): the delta rule with a Mamba2-style scalar decay.

    python run.py --config configs/gated_deltanet.py

Same data, sizes, optimizer and schedule as configs/default.py (LLLN hybrid,
MoE every 2nd block); only the linear layers change, so metrics.jsonl and
loss.png compare directly with the default (GLA) run.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  """configs/default.py with linear_variant="gated_deltanet"."""
  config = default.get_config()
  config.workdir = "/tmp/jaxlin/gated_deltanet"
  config.model.linear_variant = "gated_deltanet"
  return config
