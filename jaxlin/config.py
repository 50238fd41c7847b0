"""`ModelConfig`: every choice that defines a `jaxlin.model.LanguageModel`.

A hybrid model has `num_layers` residual blocks; block i has a token mixer of
type `layer_types[i]` and a channel mixer (dense SwiGLU or MoE):

    layer_types = (pattern * ceil(num_layers / len(pattern)))[:num_layers]
    "L": linear attention (`linear_variant`), MoM (mixer="mom") or Liger (mixer="liger": a
         softmax layer's projections run as a gated recurrence, `jaxlin.layers.liger`)
    "N": softmax attention (RoPE, GQA, optional sliding window)
    block i is MoE  <=>  moe_every > 0 and (i + 1) % moe_every == 0

e.g. pattern "LLLN", 8 layers -> L L L N L L L N; moe_every=2 -> MoE in blocks
1, 3, 5, 7 (0-based), moe_every=1 -> every block.

Dtypes are names: `param_dtype` (float32) and `dtype`, the compute dtype;
dtype="auto" means bfloat16 on GPU/TPU and float32 on CPU, resolved by
`ModelConfig.compute_dtype()` when the model is built.

The two Linear-MoE paper sizes (docs/design.md §9) are presets:
`ModelConfig.preset("A0.3B-2B")`, `ModelConfig.preset("A1B-7B")`.

Legend: D = d_model, H = num_heads, E = num_experts, F = hidden width.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections

from jaxlin import validation
from jaxlin.layers import (feature_maps, gates, initializers, liger, linear_attention, lora,
                           moe, rope, routing)
from jaxlin.ops import arguments
from jaxlin.ops import attention as attention_ops

LAYER_TYPES = ("L", "N")
MIXERS = ("linear", "mom", "liger")
IMPLS = tuple(arguments.IMPLS)  # of the linear ops
DTYPES = ("auto", "float32", "bfloat16", "float16")
PARAM_DTYPES = ("float32", "bfloat16")
QWEN2_VOCAB = 151936  # the "152k" vocabulary of the Linear-MoE paper (Qwen2 tokenizer)


def _round_up(x: float, multiple: int) -> int:
  """Smallest multiple of `multiple` that is >= x."""
  return int(math.ceil(x / multiple) * multiple)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A hybrid linear / softmax language model with dense or MoE MLPs.

  Defaults give a small pure-linear (GLA) model with dense MLPs. Widths left
  None are derived: head_dim = D / H, num_kv_heads = H, mlp_hidden =
  round_up(8 D / 3, 64), expert_hidden = shared_expert_hidden = mlp_hidden.
  `linear_options` / `mom_options` / `moe_options` pass further keyword
  arguments to the layer constructors unchanged.
  """
  # sizes
  vocab_size: int = 256
  d_model: int = 256                   # D
  num_layers: int = 4
  num_heads: int = 4                   # H, of every token mixer
  num_kv_heads: int | None = None      # softmax GQA key/value heads (None: H)
  head_dim: int | None = None          # softmax head dim (None: D / H)
  # hybrid layout and token mixers
  pattern: str = "L"                   # over {L, N}, repeated to num_layers
  mixer: str = "linear"                # L blocks: "linear" (LinearAttention), "mom" or "liger"
  linear_variant: str = "gla"          # a key of jaxlin.layers.linear_attention.VARIANTS
  linear_head_dim: int | None = None   # L head dim (None: D / H)
  feature_map: str | None = None       # None: the variant's own
  use_short_conv: bool | None = None   # None: the variant's own (MoM: True)
  conv_size: int = 4
  chunk_size: int = 64                 # of the chunked ops: a multiple of 16 in [16, 256]
  impl: str = "auto"                   # of the linear ops
  linear_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  mom_core: str = "gla"                # the core: any linear_variant (the paper: gla, gated_deltanet)
  mom_num_memories: int = 4
  mom_top_k: int = 2
  mom_shared_memory: bool = True
  mom_aux_coef: float = 0.01
  mom_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  liger_recurrence: str = "gla"        # Liger L blocks: "gla" or "gated_deltanet"
  liger_gate: str | None = None        # gate from the key projection (None: the recurrence's)
  liger_window: int = 64               # Liger Attention's sliding window (0: Liger-GLA only)
  liger_window_weight: float = 0.5     # o = this * SWA + liger_recurrent_weight * recurrence
  liger_recurrent_weight: float = 0.5
  window: int | None = None            # softmax sliding window (None: full causal)
  rope_theta: float = 10000.0
  rope_scaling: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # {}: none; linear, llama3
  qk_norm: bool = False
  qkv_bias: bool = False               # biases on the q, k, v projections (Qwen2)
  out_bias: bool = False               # bias on the attention output projection
  lora_rank: int = 0                   # LoRA adapters on the attention projections (0: none)
  lora_alpha: float = 8.0              # adapter scale alpha / rank
  lora_targets: str = "q_proj,k_proj,v_proj"  # comma-separated subset of q/k/v/o_proj
  attention_impl: str = "auto"         # of jaxlin.ops.dot_product_attention
  # channel mixers
  mlp_hidden: int | None = None        # dense SwiGLU width
  moe_every: int = 0                   # 0: all dense; n: blocks with (i + 1) % n == 0 are MoE
  num_experts: int = 8                 # E
  moe_top_k: int = 2                   # k
  expert_hidden: int | None = None     # F of a routed expert
  num_shared_experts: int = 0
  shared_expert_hidden: int | None = None
  moe_scoring: str = "softmax_topk"    # Qwen2/DeepSeek; "topk_softmax": Mixtral
  moe_shared_gate: bool = False        # sigmoid gate on the shared experts (Qwen2)
  moe_dispatch: str = "dropless"       # or "capacity"
  moe_capacity_factor: float = 1.25
  moe_aux_coef: float = 0.01           # load-balancing loss coefficient
  moe_z_coef: float = 0.001            # router z-loss coefficient
  moe_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  # embedding, numerics, init
  tie_embeddings: bool = False
  param_dtype: str = "float32"
  dtype: str = "auto"                  # compute dtype; "auto": bf16 on GPU/TPU, f32 on CPU
  remat: bool = False                  # nnx.remat every block (training forward)
  scan_layers: bool = False            # training forward as one lax.scan over the blocks
                                       # (stacked weights): one block's gathered weights
                                       # and temporaries live at a time; needs identical
                                       # blocks (one layer type, every block MoE or none)
  init_std: float = 0.02               # N(0, std^2): embedding, softmax, MoM / MoE router; and the
                                       # dense weights under dense_init "normal"
  dense_init: str = "normal"           # head, SwiGLU and MoE experts: "normal" N(0, init_std^2)
                                       # or "fan_in" U(+-fan_in^-1/2), PyTorch's Linear default
                                       # (jaxlin.layers.initializers)
  norm_eps: float = 1e-6               # of the model's RMSNorms

  def __post_init__(self) -> None:
    for name in ("linear_options", "mom_options", "moe_options", "rope_scaling"):
      value = getattr(self, name)
      validation.require(isinstance(value, Mapping), name, value,
                         "a mapping of keyword arguments")
      # an immutable, hashable view: the config can be a static jit argument
      object.__setattr__(self, name, _FrozenDict(value))
    self.validate()

  # ------------------------------------------------------------------ derived
  @property
  def layer_types(self) -> tuple[str, ...]:
    """The pattern repeated to the depth: one of "L"/"N" per block."""
    reps = -(-self.num_layers // len(self.pattern))
    return tuple((self.pattern * reps)[:self.num_layers])

  def is_moe_layer(self, index: int) -> bool:
    """Whether block `index` (0-based) uses the MoE channel mixer."""
    return self.moe_every > 0 and (index + 1) % self.moe_every == 0

  @property
  def moe_layers(self) -> tuple[int, ...]:
    """Indices of the MoE blocks."""
    return tuple(i for i in range(self.num_layers) if self.is_moe_layer(i))

  @property
  def resolved_num_kv_heads(self) -> int:
    """Softmax key/value heads (num_kv_heads, default H)."""
    return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

  @property
  def resolved_head_dim(self) -> int:
    """Softmax head dim (head_dim, default D / H)."""
    return self.d_model // self.num_heads if self.head_dim is None else self.head_dim

  @property
  def resolved_mlp_hidden(self) -> int:
    """Dense SwiGLU width (mlp_hidden, default round_up(8 D / 3, 64))."""
    return _round_up(8 * self.d_model / 3, 64) if self.mlp_hidden is None else self.mlp_hidden

  @property
  def resolved_expert_hidden(self) -> int:
    """Routed expert width F (expert_hidden, default the dense width)."""
    return self.resolved_mlp_hidden if self.expert_hidden is None else self.expert_hidden

  @property
  def resolved_shared_expert_hidden(self) -> int:
    """Width of one shared expert (default F)."""
    if self.shared_expert_hidden is None:
      return self.resolved_expert_hidden
    return self.shared_expert_hidden

  def compute_dtype(self) -> jnp.dtype:
    """The compute dtype; "auto": bfloat16 on GPU/TPU, float32 on CPU."""
    if self.dtype == "auto":
      return jnp.dtype(jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)
    return jnp.dtype(self.dtype)

  def parameter_dtype(self) -> jnp.dtype:
    """The parameter dtype (float32 by default)."""
    return jnp.dtype(self.param_dtype)

  def replace(self, **changes: Any) -> "ModelConfig":
    """A copy with some fields changed (validated again)."""
    return dataclasses.replace(self, **changes)

  # --------------------------------------------------------------- validation
  def validate(self) -> None:
    """Raises ValueError naming the field, the value and what is allowed."""
    for name in ("vocab_size", "d_model", "num_layers", "num_heads", "conv_size",
                 "mom_num_memories", "mom_top_k", "num_experts", "moe_top_k"):
      validation.positive_int(name, getattr(self, name))
    for name in ("num_kv_heads", "head_dim", "linear_head_dim", "window", "mlp_hidden",
                 "expert_hidden", "shared_expert_hidden"):
      validation.positive_int(name, getattr(self, name), optional=True)
    for name in ("moe_every", "num_shared_experts"):
      validation.non_negative_int(name, getattr(self, name))

    arguments.check_chunk_size(self.chunk_size)
    pattern_rule = (f"a non-empty string over {list(LAYER_TYPES)} (L linear, N softmax "
                    "attention), e.g. 'LLLN'")
    validation.require(isinstance(self.pattern, str) and bool(self.pattern)
                       and not set(self.pattern) - set(LAYER_TYPES),
                       "pattern", self.pattern, pattern_rule)
    validation.choice("mixer", self.mixer, MIXERS)
    validation.choice("impl", self.impl, IMPLS)
    validation.choice("dtype", self.dtype, DTYPES)
    validation.choice("param_dtype", self.param_dtype, PARAM_DTYPES)

    if self.head_dim is None or self.linear_head_dim is None:
      validation.require(self.d_model % self.num_heads == 0, "num_heads", self.num_heads,
                         f"a divisor of d_model={self.d_model} (or set head_dim and "
                         "linear_head_dim)")
    validation.require(self.num_heads % self.resolved_num_kv_heads == 0, "num_kv_heads",
                       self.num_kv_heads,
                       f"a divisor of num_heads={self.num_heads}: one of "
                       f"{[h for h in range(1, self.num_heads + 1) if self.num_heads % h == 0]}")
    if "N" in self.layer_types:
      validation.require(self.resolved_head_dim % 2 == 0, "head_dim", self.resolved_head_dim,
                         "an even int (RoPE of the softmax attention layers)")
      validation.choice("attention_impl", self.attention_impl, tuple(attention_ops.IMPLS))
    if "L" in self.layer_types:
      if self.mixer == "linear":
        validation.choice("linear_variant", self.linear_variant, tuple(linear_attention.VARIANTS))
        if self.feature_map is not None:
          validation.choice("feature_map", self.feature_map, tuple(feature_maps.FEATURE_MAPS))
      else:
        validation.choice("mom_core", self.mom_core, tuple(linear_attention.VARIANTS))
        validation.require(self.mom_top_k <= self.mom_num_memories, "mom_top_k", self.mom_top_k,
                           f"an int in [1, mom_num_memories={self.mom_num_memories}]")
    validation.require(self.moe_every <= self.num_layers, "moe_every", self.moe_every,
                       f"0 (dense) or an int in [1, num_layers={self.num_layers}]")
    if self.moe_every:
      validation.require(self.moe_top_k <= self.num_experts, "moe_top_k", self.moe_top_k,
                         f"an int in [1, num_experts={self.num_experts}]")
      validation.choice("moe_scoring", self.moe_scoring, routing.SCORINGS)
      validation.choice("moe_dispatch", self.moe_dispatch, tuple(moe.DISPATCHES))
      validation.require(not self.moe_shared_gate or self.num_shared_experts >= 1,
                         "moe_shared_gate", self.moe_shared_gate,
                         "False without shared experts (a gate needs num_shared_experts >= 1)")
      validation.require(self.moe_capacity_factor > 0, "moe_capacity_factor",
                         self.moe_capacity_factor, "a number > 0")
    if self.scan_layers:
      kinds = sorted({(t, self.is_moe_layer(i)) for i, t in enumerate(self.layer_types)})
      validation.require(len(kinds) == 1, "scan_layers", self.scan_layers,
                         f"False for blocks of different kinds (layer type, MoE) {kinds}: "
                         "a scan needs identical blocks (one pattern letter, moe_every 0 or 1)")
      if "L" in self.layer_types and self.mixer in ("linear", "mom") and self.num_layers > 1:
        row = linear_attention.VARIANTS[self.linear_variant if self.mixer == "linear"
                                        else self.mom_core]
        validation.require(not gates.GATES[row.gate].per_depth, "scan_layers", self.scan_layers,
                           f"False with the {row.gate!r} gate: its constants depend on the "
                           "layer's depth, so the blocks differ")
    for name in ("init_std", "moe_aux_coef", "moe_z_coef", "mom_aux_coef", "norm_eps"):
      validation.non_negative(name, getattr(self, name))
    validation.choice("dense_init", self.dense_init, tuple(initializers.DENSE_INITS))
    validation.require(self.rope_theta > 0, "rope_theta", self.rope_theta, "a number > 0")
    rope.check_scaling(self.rope_scaling)
    self.lora_spec()
    if "L" in self.layer_types and self.mixer == "liger":
      validation.choice("liger_recurrence", self.liger_recurrence, tuple(liger.RECURRENCES))
      if self.liger_gate is not None:
        validation.choice("liger_gate", self.liger_gate, tuple(liger.GATES))
      validation.non_negative_int("liger_window", self.liger_window)
      validation.non_negative("liger_window_weight", self.liger_window_weight)
      validation.non_negative("liger_recurrent_weight", self.liger_recurrent_weight)

  def lora_spec(self) -> lora.LoRASpec | None:
    """The LoRA adapters of the attention projections (None when lora_rank is 0)."""
    spec = lora.LoRASpec.parse(self.lora_rank, self.lora_alpha, self.lora_targets)
    return spec if spec.rank else None

  # ------------------------------------------------------------ construction
  @classmethod
  def from_config_dict(cls, cfg: Any) -> "ModelConfig":
    """From an `ml_collections.ConfigDict` (or a plain mapping) of field values.

    An optional key `preset` names a preset ("A0.3B-2B", "A1B-7B", "tiny")
    whose fields the other keys override. Unknown keys raise ValueError.
    """
    values = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    preset = values.pop("preset", None)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
      raise ValueError(f"unknown ModelConfig keys {unknown}; allowed: {sorted(fields)} "
                       "and 'preset'")
    if preset is not None:
      return cls.preset(preset, **values)
    return cls(**values)

  @classmethod
  def config_dict(cls, preset: str | None = None, **overrides: Any) -> Any:
    """Every field as an `ml_collections.ConfigDict` (for run configs), preset applied.

    Fields whose value is None are typed placeholders (`FieldReference` of the
    field's type), so `--config.model.window=128` works on a locked config.
    `vocab_size=None` (the default without a preset) means "the data's
    vocabulary" (jaxlin.training.train fills it in); a larger vocab_size pads it.
    """
    if preset is not None:
      validation.choice("preset", preset, tuple(PRESETS))
    values = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
              for f in dataclasses.fields(cls)}
    values["vocab_size"] = None
    values.update(PRESETS[preset] if preset else {})
    unknown = sorted(set(overrides) - set(values))
    if unknown:
      raise ValueError(f"unknown ModelConfig keys {unknown}; allowed: {sorted(values)}")
    values.update(overrides)
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    for name, value in values.items():
      if value is None:
        type_name = str(types[name]).split("|")[0].strip()
        values[name] = ml_collections.FieldReference(
            None, field_type={"int": int, "str": str, "bool": bool, "float": float}[type_name])
      elif isinstance(value, Mapping):
        values[name] = dict(value)
    return ml_collections.ConfigDict(values)

  @classmethod
  def preset(cls, name: str, **overrides: Any) -> "ModelConfig":
    """A named preset (see PRESETS) with some fields overridden."""
    validation.choice("preset", name, tuple(PRESETS))
    return cls(**{**PRESETS[name], **overrides})


class _FrozenDict(dict):
  """A read-only, hashable dict (for the *_options fields)."""

  def __hash__(self) -> int:  # type: ignore[override]
    return hash(tuple(sorted((k, repr(v)) for k, v in self.items())))

  def _readonly(self, *args: Any, **kwargs: Any) -> None:
    raise TypeError("ModelConfig options are read-only; use ModelConfig.replace")

  __setitem__ = __delitem__ = update = pop = popitem = clear = setdefault = _readonly  # type: ignore


# The Linear-MoE paper sizes (arXiv 2503.05447; docs/design.md §9): every block MoE,
# 64 experts top-8, untied 152k (Qwen2) vocabulary, init std 0.008. The token
# mixer defaults to pure GLA; override pattern / linear_variant for others.
PRESETS: dict[str, dict[str, Any]] = {
    "A0.3B-2B": dict(vocab_size=QWEN2_VOCAB, d_model=1024, num_layers=12, num_heads=8,
                     moe_every=1, num_experts=64, moe_top_k=8, expert_hidden=896,
                     tie_embeddings=False, init_std=0.008),
    "A1B-7B": dict(vocab_size=QWEN2_VOCAB, d_model=2048, num_layers=16, num_heads=16,
                   moe_every=1, num_experts=64, moe_top_k=8, expert_hidden=1024,
                   tie_embeddings=False, init_std=0.008),
    "tiny": dict(vocab_size=256, d_model=64, num_layers=4, num_heads=2, pattern="LLLN",
                 moe_every=2, num_experts=4, moe_top_k=2, expert_hidden=64, mlp_hidden=128),
}


def model_config_for(config: Any, vocab_size: int) -> ModelConfig:
  """ModelConfig of `config.model`, vocab_size taken from the data when it is None."""
  values = config.model.to_dict()
  if values.get("vocab_size") is None:
    values["vocab_size"] = vocab_size
  elif values["vocab_size"] < vocab_size:
    raise ValueError(f"model.vocab_size={values['vocab_size']}: smaller than the data's "
                     f"vocabulary ({vocab_size} tokens); leave it None to use the data's")
  try:
    return ModelConfig.from_config_dict(values)
  except ValueError as error:  # name the field as the run config does: model.<field>
    message = str(error)
    field = message.split(":", 1)[0].split("=", 1)[0].strip()
    if field in values and not message.startswith("model."):
      raise ValueError(f"model.{message}") from error
    raise
