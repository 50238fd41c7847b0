"""A trained run as a Hugging Face directory: `python run.py --config ... --mode=export --out=DIR`.

The newest checkpoint (or `--step`) of `config.workdir` is written as config.json +
model.safetensors with LoRA adapters merged (W + (alpha / r) A B), so `transformers` loads an
all-softmax model and jaxlin re-imports a converted one (its Liger fields ride in config.json's
"jaxlin" entry). A run that started from `init_from` gets that directory's tokenizer files.
"""

from __future__ import annotations

import os

import ml_collections

from jaxlin.interop import huggingface
from jaxlin.training import pretrained, restore


def export_run(config: ml_collections.ConfigDict, out: str, *, step: int | None = None,
               dtype: str | None = None) -> tuple[int, str]:
  """Writes the checkpoint to `out`; returns (step, out). dtype: of the tensors (default the
  parameters')."""
  if not out:
    raise ValueError("--out: required by --mode=export (the directory to write)")
  if os.path.exists(os.path.join(out, huggingface.CONFIG_FILE)):
    raise ValueError(f"--out={out!r} already holds a checkpoint; choose a new directory")
  run = restore.trained(config, step)
  base = pretrained.init_from(config) or None
  huggingface.export(run.model_config, run.params, out, base_directory=base, dtype=dtype)
  return run.step, out
