"""Hugging Face Llama-family checkpoints <-> jaxlin's `LanguageModel` (no torch needed).

A checkpoint directory holds `config.json` and `model.safetensors` (or shards listed in
`model.safetensors.index.json`), usually with `tokenizer.json`. Supported `model_type`s:
llama (Llama 2 / 3 / 3.1 with `rope_scaling`, GQA, tied or untied embeddings), mistral
(optional sliding window) and qwen2 (biases on q, k, v). The architecture maps onto an all
softmax jaxlin model (pattern "N"), tensor by tensor:

    model.embed_tokens.weight [V, d]                     embedding
    model.layers.i.input_layernorm.weight                blocks.i.mixer_norm.weight
    model.layers.i.self_attn.{q,k,v,o}_proj.weight^T     blocks.i.mixer.{q,k,v,o}_proj.kernel
    model.layers.i.self_attn.{q,k,v,o}_proj.bias         ...bias (qkv_bias / out_bias)
    model.layers.i.post_attention_layernorm.weight       blocks.i.mlp_norm.weight
    model.layers.i.mlp.{gate,up,down}_proj.weight^T      blocks.i.mlp.w_{gate,up,down}
    model.norm.weight                                    final_norm.weight
    lm_head.weight^T                                     head (absent when tied)

A Liger-converted model (mixer="liger", `jaxlin.layers.liger`) has exactly these tensors, so
it exports to the same format; its conversion fields go into config.json under "jaxlin" (which
transformers ignores) and come back on import. LoRA adapters are merged into the kernels on
export. Any mismatch stops with an error naming the tensor: a missing one, an unexpected one,
a wrong shape, a non-float dtype.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx, traverse_util
from safetensors import safe_open
from safetensors.flax import save_file

from jaxlin.config import ModelConfig
from jaxlin.layers.lora import LoRALinear
from jaxlin.model import LanguageModel

Path = tuple[Any, ...]
SUPPORTED = ("llama", "mistral", "qwen2")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM"}
CONFIG_FILE, WEIGHTS_FILE, INDEX_FILE = "config.json", "model.safetensors", \
    "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json")
# ModelConfig fields a conversion may change on an imported architecture (the rest are the
# checkpoint's and must not be overridden)
CONVERSION_FIELDS = ("pattern", "mixer", "liger_recurrence", "liger_gate", "liger_window",
                     "liger_window_weight", "liger_recurrent_weight", "lora_rank", "lora_alpha",
                     "lora_targets", "dtype", "param_dtype", "impl", "attention_impl",
                     "chunk_size", "remat")
EXPORTED_FIELDS = CONVERSION_FIELDS[:6]   # the Liger fields written under config.json "jaxlin"
IGNORED_TENSORS = ("rotary_emb.inv_freq",)  # buffers old checkpoints carry


class CheckpointError(ValueError):
  """A checkpoint directory that does not match the model (names the file or tensor)."""


# ------------------------------------------------------------------------------- config
def read_config(directory: str) -> dict[str, Any]:
  """config.json of a checkpoint directory, or a CheckpointError saying what is missing."""
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.isfile(path):
    raise CheckpointError(f"{directory!r}: no {CONFIG_FILE}; expected a Hugging Face model "
                          "directory (config.json + model.safetensors)")
  with open(path) as f:
    return json.load(f)


def _rope(hf: Mapping[str, Any]) -> tuple[float, dict[str, Any]]:
  """(rope_theta, rope_scaling) from transformers 4's rope_theta/rope_scaling or 5's
  rope_parameters."""
  params = dict(hf.get("rope_parameters") or {})
  theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
  scaling = dict(hf.get("rope_scaling") or params)
  kind = scaling.get("rope_type", scaling.get("type", "default"))
  return theta, ({} if kind == "default" else scaling)


def model_config_from_hf(hf: Mapping[str, Any], **overrides: Any) -> ModelConfig:
  """The all-softmax ModelConfig of a transformers config dict; `overrides` may set only
  CONVERSION_FIELDS (a Liger conversion, LoRA, dtypes). The config's "jaxlin" entry (written
  by `export`) is applied first."""
  model_type = hf.get("model_type")
  if model_type not in SUPPORTED:
    raise CheckpointError(f"config.json: model_type {model_type!r} (architectures "
                          f"{hf.get('architectures')}) is not supported; supported: "
                          f"{list(SUPPORTED)}")
  if hf.get("hidden_act", "silu") != "silu":
    raise CheckpointError(f"config.json: hidden_act {hf['hidden_act']!r}; jaxlin's MLP is "
                          "SwiGLU (silu)")
  if hf.get("mlp_bias"):
    raise CheckpointError("config.json: mlp_bias=true is not supported (jaxlin's MLP has no "
                          "biases)")
  if model_type == "qwen2" and hf.get("use_sliding_window"):
    raise CheckpointError("config.json: qwen2 with use_sliding_window=true is not supported "
                          "(its window applies to some layers only)")
  heads = int(hf["num_attention_heads"])
  head_dim = int(hf.get("head_dim") or hf["hidden_size"] // heads)
  theta, scaling = _rope(hf)
  bias = bool(hf.get("attention_bias", False))
  window = hf.get("sliding_window") if model_type == "mistral" else None
  fields = dict(
      vocab_size=int(hf["vocab_size"]), d_model=int(hf["hidden_size"]),
      num_layers=int(hf["num_hidden_layers"]), num_heads=heads,
      num_kv_heads=int(hf.get("num_key_value_heads") or heads), head_dim=head_dim,
      linear_head_dim=head_dim, pattern="N", mlp_hidden=int(hf["intermediate_size"]),
      window=None if window is None else int(window), rope_theta=theta, rope_scaling=scaling,
      qkv_bias=True if model_type == "qwen2" else bias, out_bias=bias,
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      init_std=float(hf.get("initializer_range", 0.02)), param_dtype="float32")
  saved = dict(hf.get("jaxlin") or {})
  for source in (saved, overrides):
    wrong = sorted(set(source) - set(CONVERSION_FIELDS))
    if wrong:
      raise ValueError(f"model.{wrong[0]}: set by the checkpoint's config.json; a conversion "
                       f"may change only {list(CONVERSION_FIELDS)}")
    fields.update(source)
  return ModelConfig(**fields)


def hf_config_from_model(config: ModelConfig, base: Mapping[str, Any] | None = None
                         ) -> dict[str, Any]:
  """A transformers config dict for `config` (starting from the imported `base` when given);
  a Liger conversion's fields go under "jaxlin"."""
  if config.moe_every or (config.mixer != "liger" and "L" in config.layer_types):
    raise ValueError("export: only models of softmax (N) and Liger (mixer='liger') layers with "
                     "dense MLPs have the Llama format; got pattern "
                     f"{config.pattern!r}, mixer {config.mixer!r}, moe_every {config.moe_every}")
  if base is None:
    model_type = ("qwen2" if config.qkv_bias and not config.out_bias else
                  "mistral" if config.window is not None else "llama")
    base = {"model_type": model_type, "architectures": [ARCHITECTURES[model_type]]}
  hf = dict(base)
  allowed = {"llama": config.qkv_bias == config.out_bias,
             "qwen2": config.qkv_bias and not config.out_bias and config.window is None,
             "mistral": not config.qkv_bias and not config.out_bias}[hf["model_type"]]
  if not allowed:
    raise ValueError(f"export: qkv_bias={config.qkv_bias}, out_bias={config.out_bias}, "
                     f"window={config.window} have no {hf['model_type']!r} checkpoint format")
  hf.update(vocab_size=config.vocab_size, hidden_size=config.d_model,
            num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
            num_key_value_heads=config.resolved_num_kv_heads, head_dim=config.resolved_head_dim,
            intermediate_size=config.resolved_mlp_hidden, hidden_act="silu",
            rms_norm_eps=config.norm_eps, tie_word_embeddings=config.tie_embeddings,
            initializer_range=config.init_std)
  if hf["model_type"] == "llama":
    hf["attention_bias"] = config.qkv_bias
  rope = {"rope_theta": config.rope_theta, "rope_type": "default", **config.rope_scaling}
  if "rope_parameters" in hf or "rope_theta" not in hf:
    hf["rope_parameters"] = rope
  else:
    hf["rope_theta"], hf["rope_scaling"] = config.rope_theta, dict(config.rope_scaling) or None
  if hf["model_type"] == "mistral":
    hf["sliding_window"] = config.window
  liger = {name: getattr(config, name) for name in EXPORTED_FIELDS}
  defaults = ModelConfig(pattern="N")
  changed = {k: v for k, v in liger.items() if v != getattr(defaults, k)}
  hf.pop("jaxlin", None)
  if config.mixer == "liger" and "L" in config.layer_types:
    hf["jaxlin"] = changed
  return hf


# ------------------------------------------------------------------------------ tensors
def tensor_names(config: ModelConfig) -> dict[Path, tuple[str, bool]]:
  """{parameter path in the model's pure dict: (checkpoint tensor name, transposed)}."""
  names: dict[Path, tuple[str, bool]] = {
      ("embedding",): ("model.embed_tokens.weight", False),
      ("final_norm", "weight"): ("model.norm.weight", False)}
  if not config.tie_embeddings:
    names[("head",)] = ("lm_head.weight", True)
  for i in range(config.num_layers):
    layer = f"model.layers.{i}"
    names[("blocks", i, "mixer_norm", "weight")] = (f"{layer}.input_layernorm.weight", False)
    names[("blocks", i, "mlp_norm", "weight")] = (f"{layer}.post_attention_layernorm.weight",
                                                  False)
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
      names[("blocks", i, "mixer", proj, "kernel")] = (f"{layer}.self_attn.{proj}.weight", True)
      if config.qkv_bias if proj != "o_proj" else config.out_bias:
        names[("blocks", i, "mixer", proj, "bias")] = (f"{layer}.self_attn.{proj}.bias", False)
    for ours, theirs in (("w_gate", "gate_proj"), ("w_up", "up_proj"), ("w_down", "down_proj")):
      names[("blocks", i, "mlp", ours)] = (f"{layer}.mlp.{theirs}.weight", True)
  return names


def weight_files(directory: str) -> list[str]:
  """The safetensors files of a checkpoint: one, or the shards its index lists."""
  index = os.path.join(directory, INDEX_FILE)
  if os.path.isfile(index):
    with open(index) as f:
      shards = sorted(set(json.load(f)["weight_map"].values()))
    paths = [os.path.join(directory, s) for s in shards]
  else:
    paths = [os.path.join(directory, WEIGHTS_FILE)]
  missing = [p for p in paths if not os.path.isfile(p)]
  if missing:
    raise CheckpointError(f"{directory!r}: missing weight file {os.path.basename(missing[0])} "
                          f"(expected {WEIGHTS_FILE} or the shards of {INDEX_FILE})")
  return paths


def read_tensors(directory: str) -> dict[str, jax.Array]:
  """Every tensor of the checkpoint's safetensors files (safetensors' flax API, no torch)."""
  tensors: dict[str, jax.Array] = {}
  for path in weight_files(directory):
    with safe_open(path, framework="flax") as f:
      for name in f.keys():
        tensors[name] = f.get_tensor(name)
  return tensors


def _leaves(params: Any) -> dict[Path, Any]:
  return traverse_util.flatten_dict(params)


def _lora_leaf(path: Path) -> bool:
  return path[-1] in ("lora_a", "lora_b")


def _fresh_adapters(config: ModelConfig, seed: int) -> dict[Path, jax.Array]:
  """The initial LoRA leaves of LanguageModel(config) (jit computes only these)."""
  def init() -> dict[Path, jax.Array]:
    model = LanguageModel(config, rngs=nnx.Rngs(seed))
    flat = _leaves(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    return {path: value for path, value in flat.items() if _lora_leaf(path)}
  return jax.jit(init)()


def params_from_tensors(config: ModelConfig, tensors: Mapping[str, jax.Array],
                        seed: int = 0) -> Any:
  """The model's parameter pure dict from checkpoint tensors; LoRA adapters (which a
  checkpoint does not hold) get their initialisation (B = 0: the model is unchanged)."""
  names = tensor_names(config)
  model = nnx.eval_shape(lambda: LanguageModel(config, rngs=nnx.Rngs(seed)))
  shapes = _leaves(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  expected = {name for name, _ in names.values()}
  unexpected = sorted(n for n in tensors if n not in expected
                      and not n.endswith(IGNORED_TENSORS)
                      and not (config.tie_embeddings and n == "lm_head.weight"))
  if unexpected:
    raise CheckpointError(f"unexpected tensor {unexpected[0]!r} in the checkpoint "
                          f"({len(unexpected)} in all) for a {config.num_layers}-layer "
                          "model; is config.json the one of these weights?")
  unmapped = [p for p in shapes if p not in names and not _lora_leaf(p)]
  if unmapped:
    raise CheckpointError(f"the model's parameter {'/'.join(map(str, unmapped[0]))} has no "
                          "checkpoint tensor (only softmax and Liger layers with dense MLPs do)")
  adapters = _fresh_adapters(config, seed) if any(map(_lora_leaf, shapes)) else {}
  out: dict[Path, jax.Array] = dict(adapters)
  for path, shape in shapes.items():
    if _lora_leaf(path):
      continue
    name, transposed = names[path]
    if name not in tensors and name == "lm_head.weight":
      raise CheckpointError("missing tensor 'lm_head.weight' (config.json says "
                            "tie_word_embeddings=false)")
    if name not in tensors:
      raise CheckpointError(f"missing tensor {name!r} in the checkpoint")
    value = tensors[name]
    if not jnp.issubdtype(value.dtype, jnp.floating):
      raise CheckpointError(f"tensor {name!r}: dtype {value.dtype}; expected a float dtype")
    want = tuple(shape.shape[::-1] if transposed else shape.shape)
    if tuple(value.shape) != want:
      raise CheckpointError(f"tensor {name!r}: shape {tuple(value.shape)}; expected {want} "
                            "from config.json")
    out[path] = (value.T if transposed else value).astype(shape.dtype)
  return traverse_util.unflatten_dict(out)


# ---------------------------------------------------------------------- import / export
def load_pretrained(directory: str, *, seed: int = 0,
                    **overrides: Any) -> tuple[ModelConfig, Any]:
  """(ModelConfig, parameter pure dict) of a checkpoint directory; `overrides` convert it
  (e.g. mixer="liger", pattern="L", lora_rank=8: see CONVERSION_FIELDS)."""
  config = model_config_from_hf(read_config(directory), **overrides)
  return config, params_from_tensors(config, read_tensors(directory), seed)


def merged_params(config: ModelConfig, params: Any) -> Any:
  """The parameters with every LoRA adapter folded into its kernel (and removed)."""
  model = nnx.merge(*_split(config, params))
  for _, module in nnx.iter_graph(model):
    if isinstance(module, LoRALinear):
      module.kernel[...] = module.merged_kernel()
  flat = _leaves(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  return traverse_util.unflatten_dict({p: v for p, v in flat.items() if not _lora_leaf(p)})


def _split(config: ModelConfig, params: Any) -> tuple[nnx.GraphDef, nnx.State]:
  graphdef, state = nnx.split(nnx.eval_shape(lambda: LanguageModel(config, rngs=nnx.Rngs(0))),
                              nnx.Param)
  nnx.replace_by_pure_dict(state, params)
  return graphdef, state


def export(config: ModelConfig, params: Any, directory: str, *,
           base_directory: str | None = None, dtype: str | None = None) -> str:
  """Writes config.json + model.safetensors (LoRA merged) to `directory`; copies the tokenizer
  files of `base_directory` (the imported checkpoint) when given. dtype: of the tensors
  (default the parameters')."""
  base = read_config(base_directory) if base_directory else None
  hf = hf_config_from_model(config, base)
  flat = _leaves(merged_params(config, params))
  tensors = {}
  for path, (name, transposed) in tensor_names(config).items():
    value = flat[path]
    value = value.T if transposed else value
    tensors[name] = jnp.asarray(value, dtype or value.dtype)
  os.makedirs(directory, exist_ok=True)
  save_file(tensors, os.path.join(directory, WEIGHTS_FILE), metadata={"format": "pt"})
  with open(os.path.join(directory, CONFIG_FILE), "w") as f:
    json.dump(hf, f, indent=2, sort_keys=True)
  for name in TOKENIZER_FILES if base_directory else ():
    source = os.path.join(base_directory, name)
    if os.path.isfile(source):
      shutil.copyfile(source, os.path.join(directory, name))
  return directory

