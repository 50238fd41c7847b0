"""Multi-query associative recall (Zoology's MQAR): which token mixer can recall?

    python run.py --config configs/mqar.py --config.model.linear_variant=gated_deltanet

Each example is 16 key-value pairs, then the keys again in random order; the
model must emit each key's value (loss and accuracy only on those answer
positions). The token mixer is selectable: any `--config.model.linear_variant`
(gla, mamba2, deltanet, gated_deltanet, comba, ...), MoM with
`--config.model.mixer=mom`, or softmax attention with `--config.model.pattern=N`
as the upper reference. The eval `accuracy` in metrics.jsonl is the recall
accuracy. Two plateaus are not recall: a uniform guess over the 4096 values
scores 1/4096 (loss ln 4096 = 8.32), and a model that answers with any value it
saw in the context, without binding it to its key, scores about 1/num_kv_pairs
= 1/16. Recall is accuracy clearly above 1/16.

What to expect: on the 2-core CPU machine a step took ~5 s while another job
shared the cores (4096 tokens per step), and 60 steps only moved the eval loss
from 9.0 (ln 8192) to 8.49, near ln 4096 = 8.32, a uniform guess over the values
(accuracy 0: it has learnt "a value comes here", not which). At this vocabulary
recall needs far more steps: 2000 steps is an accelerator job. For a comparison of
the mixers that runs on a CPU, `benchmarks/recall.py` trains every mixer on a small
MQAR (vocabulary 32, T = 32, n = 4 and 8) and reports accuracy per seed; there,
with 600 steps, the short causal conv decides whether a linear layer leaves the 1/n
plateau (`--config.model.use_short_conv=True` turns it on for gla, bla, lightning,
retention, hgrn2, rwkv6, based, rebased, which default to no conv).
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  """MQAR with a 2-layer pure linear model (variant selectable)."""
  config = default.get_config()
  config.workdir = "/tmp/jaxlin/mqar"

  # Data
  config.data.source = "mqar"
  config.data.seq_len = 128                # 16 pairs (32 tokens), then 96 query/filler tokens
  config.data.batch_size = 32
  config.data.mqar.vocab_size = 8192       # keys in [1, 4096), values in [4096, 8192)
  config.data.mqar.num_kv_pairs = 16

  # Model
  config.model.update(
      d_model=128, num_layers=2, num_heads=2, pattern="L", linear_variant="gated_deltanet",
      moe_every=0, mlp_hidden=256, tie_embeddings=False)

  # Optimizer
  config.optimizer.learning_rate = 1e-3
  config.optimizer.end_learning_rate = 1e-4
  config.optimizer.warmup_steps = 100
  config.optimizer.weight_decay = 0.1
  config.train.num_steps = 2000

  # Checkpointing / Eval / Logging
  config.checkpoint.every_steps = 500
  config.eval.every_steps = 250
  config.eval.num_batches = 8
  config.sample.num_samples = 0            # nothing to sample: recall is measured by eval accuracy
  return config
