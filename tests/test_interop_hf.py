"""Hugging Face Llama-family checkpoints: jaxlin's import gives transformers' logits.

Tiny random models are built with `transformers` inside the test and saved to a temporary
directory (safetensors); jaxlin reads them without torch. Slow: needs torch and transformers
(CI's slow step installs them).
"""
from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from jaxlin.interop import huggingface as hf_io
from jaxlin.model import LanguageModel
from flax import nnx

pytestmark = pytest.mark.slow
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

COMMON = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, rms_norm_eps=1e-5, attn_implementation="eager")
ARCHITECTURES = {
    "llama2": ("LlamaConfig", "LlamaForCausalLM",
               dict(num_key_value_heads=4, tie_word_embeddings=False)),
    "llama3_gqa_rope_scaling": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_key_value_heads=2, tie_word_embeddings=True, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8})),
    "qwen2_qkv_bias": ("Qwen2Config", "Qwen2ForCausalLM",
                       dict(num_key_value_heads=2, tie_word_embeddings=False)),
    "mistral_window": ("MistralConfig", "MistralForCausalLM",
                       dict(num_key_value_heads=2, sliding_window=5, tie_word_embeddings=False)),
}


def _save(name: str, directory: str) -> object:
  config_cls, model_cls, extra = ARCHITECTURES[name]
  torch.manual_seed(0)
  config = getattr(transformers, config_cls)(**COMMON, **extra)
  model = getattr(transformers, model_cls)(config).eval()
  with torch.no_grad():  # random biases and norms, so that a misplaced one shows
    for pname, p in model.named_parameters():
      if pname.endswith("bias") or "norm" in pname:
        p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(directory, safe_serialization=True)
  return model


def _logits(model: object, tokens: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.as_tensor(tokens)).logits.float().numpy()


def _jaxlin_logits(directory: str, tokens: np.ndarray, **overrides) -> np.ndarray:
  config, params = hf_io.load_pretrained(directory, **overrides)
  model = nnx.merge(*hf_io._split(config, params))
  logits, _, _ = model(jnp.asarray(tokens))
  return np.asarray(logits)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_logits_equal_transformers(name: str, tmp_path) -> None:
  directory = str(tmp_path / name)
  reference = _save(name, directory)
  tokens = np.random.RandomState(1).randint(0, 97, size=(2, 19))
  want = _logits(reference, tokens)
  got = _jaxlin_logits(directory, tokens)
  np.testing.assert_allclose(got, want, atol=2e-4, rtol=2e-4)
  config = hf_io.model_config_from_hf(hf_io.read_config(directory))
  assert config.window == (5 if name == "mistral_window" else None)
  assert config.qkv_bias == (name == "qwen2_qkv_bias")


def test_export_loads_in_transformers_with_equal_logits(tmp_path) -> None:
  """jaxlin's export of an imported model is a checkpoint transformers reads back."""
  source, target = str(tmp_path / "in"), str(tmp_path / "out")
  _save("llama3_gqa_rope_scaling", source)
  config, params = hf_io.load_pretrained(source)
  hf_io.export(config, params, target, base_directory=source)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(target).eval()
  tokens = np.random.RandomState(2).randint(0, 97, size=(1, 11))
  np.testing.assert_allclose(_jaxlin_logits(source, tokens), _logits(reloaded, tokens),
                             atol=2e-4, rtol=2e-4)
