"""The default run: a small GLA + softmax hybrid with MoE MLPs on the embedded Shakespeare corpus.

    python run.py --config configs/default.py --config.workdir=/tmp/jaxlin/default

Model: 4 blocks, pattern LLLN (three GLA layers, then one softmax attention
layer), d_model 128, MoE MLPs (4 experts, top-2) in blocks 2 and 4, byte-level
vocabulary (256), 1,440,448 parameters. Data: the Shakespeare plays and poems
shipped in `jaxlin/data/corpus`, packed into rows of 256 bytes; whole works
are held out for validation.

What to expect on 2 CPU cores (measured): 300 steps of 16 x 256 tokens in
about 10.5 minutes (~2.3k tokens/s). Validation loss falls from 5.55 (uniform
over bytes) to 2.61 at step 50 and 1.98 nats per byte at step 300 (accuracy
0.42); `loss.png`, `metrics.jsonl`, checkpoints and `samples.txt`
(Shakespeare-shaped text: speaker names, verse lines, many real words) appear
in the work directory. Rerunning the same
command resumes from the newest checkpoint; then sample with

    python run.py --config configs/default.py --config.workdir=/tmp/jaxlin/default \
        --mode=sample --prompt="ROMEO."
"""

import ml_collections

from jaxlin import data, parallel
from jaxlin.training import distributed, optim, sample
from jaxlin.config import ModelConfig


def get_config() -> ml_collections.ConfigDict:
  """The default run config (every field overridable with --config.<group>.<field>=...)."""
  config = ml_collections.ConfigDict()
  config.workdir = "/tmp/jaxlin/default"   # checkpoints, metrics, plot and samples go here
  config.seed = 0                          # parameter initialisation and sampling

  # Data
  config.data = data.default_config()      # fields and comments: jaxlin/data/pipeline.py
  config.data.source = "shakespeare"       # the embedded corpus; see jaxlin/data for the others
  config.data.seq_len = 256                # T: bytes per row (packed, with segment ids)
  config.data.batch_size = 16              # rows per step, across all processes

  # Model
  config.model = ModelConfig.config_dict(  # fields and comments: jaxlin/config.py ModelConfig
      d_model=128, num_layers=4, num_heads=2,
      pattern="LLLN",                      # 3 linear (GLA) layers, then 1 softmax layer
      linear_variant="gla",
      moe_every=2, num_experts=4, moe_top_k=2, expert_hidden=256,
      mlp_hidden=384,
      tie_embeddings=True)

  # Mesh
  config.distributed = distributed.default_config()  # multi-process: jaxlin/training/distributed.py
  config.mesh = parallel.mesh.default_config()   # data / fsdp / expert / tensor sizes, rules:
  #                                                jaxlin/parallel (default: data-parallel)

  # Optimizer
  config.optimizer = optim.default_config()
  config.optimizer.learning_rate = 3e-3    # peak, after warmup
  config.optimizer.end_learning_rate = 3e-4
  config.optimizer.warmup_steps = 30
  config.train = ml_collections.ConfigDict()
  config.train.num_steps = 300             # optimizer steps (the cosine schedule ends here)
  config.train.accumulation_steps = 1      # micro-batches per step (data.batch_size / this each)

  # Checkpointing
  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every_steps = 100      # also at the end and on SIGTERM / SIGINT (0: only those)
  config.checkpoint.max_to_keep = 3        # newest checkpoints kept

  # Eval
  config.eval = ml_collections.ConfigDict()
  config.eval.every_steps = 50             # validation loss / perplexity / accuracy (0: at the end)
  config.eval.num_batches = 8              # fixed validation batches of data.batch_size rows

  # Logging
  config.logging = ml_collections.ConfigDict()
  config.logging.every_steps = 10          # metrics.jsonl (+ TensorBoard) record: mean over steps
  config.logging.tensorboard = ml_collections.FieldReference("auto", field_type=object)  # "auto": when
  #                                          tensorboardX / tensorboard is installed; True; False
  config.logging.progress = True           # the progress bar (loss, tokens/s, ETA) on stderr

  # Sampling
  config.sample = sample.default_config()  # at the end of training and with run.py --mode=sample
  config.sample.prompt = "ROMEO.\n"
  return config
