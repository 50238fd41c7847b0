"""The default run with comba token mixers: Comba: delta rule with removal strength != write strength and the query correction.

    python run.py --config configs/comba.py

Same data, sizes, optimizer and schedule as configs/default.py (LLLN hybrid,
MoE every 2nd block); only the linear layers change, so metrics.jsonl and
loss.png compare directly with the default (GLA) run.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  """configs/default.py with linear_variant="comba"."""
  config = default.get_config()
  config.workdir = "/tmp/jaxlin/comba"
  config.model.linear_variant = "comba"
  return config
