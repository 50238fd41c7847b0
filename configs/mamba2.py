"""The default run with mamba2 token mixers: Mamba2 / SSD: scalar data-dependent decay per head, short conv, gated RMSNorm.

    python run.py --config configs/mamba2.py

Same data, sizes, optimizer and schedule as configs/default.py (LLLN hybrid,
MoE every 2nd block); only the linear layers change, so metrics.jsonl and
loss.png compare directly with the default (GLA) run.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  """configs/default.py with linear_variant="mamba2"."""
  config = default.get_config()
  config.workdir = "/tmp/jaxlin/mamba2"
  config.model.linear_variant = "mamba2"
  return config
