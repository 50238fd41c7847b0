"""One configurable token mixer for every linear (L) variant of DESIGN.md §5.

Pipeline (each stage switched by the variant's row in `VARIANTS`, overridable):

    x -> [RWKV6 token shift: x_r, x_w, x_k, x_v, x_g]
      -> q = W_q x, k = W_k x, v = W_v x          (HGRN2: k = 1 - forget gate)
      -> [short causal conv over (q, k, v), size 4, SiLU]
      -> q, k = phi(q), phi(k)                     (feature map, `feature_maps.py`)
      -> [L2-normalise q, k] [RoPE] [Comba: q' = q - d_h k]
      -> gates g (`gates.py`), [beta = sigmoid(W_b x)]
      -> op:  G: S_t = Diag(exp g_t) S_{t-1} + k_t v_t^T,  o_t = scale S_t^T q_t
              D: S_t = exp(g_t)(I - b_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
      -> [normalised (Based/Rebased): o = o[:V] / (o[V] + eps), v extended by a ones column]
      -> [Mamba2 skip: o += D_h v]
      -> per-head RMSNorm -> [output gate: * silu(W_g x)] -> y = W_o o

Variants: bla (basic linear attention), lightning, retention, gla, mamba2, hgrn2,
rwkv6, based, rebased, deltanet, gated_deltanet, comba. Decay gates:
lightning -slope_h (ALiBi, layer dependent), retention log(1 - 2^(-5-h)),
gla logsigmoid(W2 W1 x)/16, mamba2/gated_deltanet/comba -exp(A_log) softplus(W x +
dt_bias), hgrn2 log(sigmoid(W x)) (optional lower bound), rwkv6 -exp(lora(x_w)) with
bonus u. Mamba2 also scales v by its step size dt and adds the skip D_h v (its B, C
are per head here, Mamba2 shares them across heads). Comba removes with strength
b_t = beta_t sigmoid(c_h) (its write strength is beta_t).

Cache (constant size): "state" [B, H, K', V'] float32, "conv" [B, conv_size - 1, C],
"shift" [B, D] (RWKV6's previous token), "position" [B] int32 (RoPE).

Legend: B batch, T time, D d_model, H heads, K key dim per head, K' key dim after the
feature map, V value dim per head (V' = V + 1 when normalised), C conv channels.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlin import ops
from jaxlin.layers import feature_maps
from jaxlin.layers import gates
from jaxlin.layers.base import Cache, MixerOutput
from jaxlin.layers.conv import ShortConv
from jaxlin.layers.norm import GatedRMSNorm, RMSNorm, l2_normalise
from jaxlin.layers.rope import apply_rope

f32 = jnp.float32

GATE_KINDS = ("none", "lightning", "retention", "gla", "mamba2", "hgrn2", "rwkv6")
RWKV6_MIXES = ("r", "w", "k", "v", "g")


@dataclasses.dataclass(frozen=True)
class Variant:
  """One row of the variant table: what each pipeline stage does by default."""
  family: str                       # "G" (gated_linear_attention) or "D" (delta_rule)
  gate: str                         # one of GATE_KINDS
  feature_map: str                  # default feature map (feature_maps.FEATURE_MAPS)
  short_conv: bool                  # short causal conv over q, k, v
  output_gate: bool                 # swish output gate after the norm
  norm: bool                        # per-head RMSNorm of the op output
  normalised: bool = False          # Based / Rebased: divide by phi(q) . sum phi(k)
  qk_l2norm: bool = False           # L2-normalise q and k (delta family)
  scale: float | None = None        # query scale; None: K'**-0.5
  default_key_dim: int | None = None  # per-head key dim when not given (else head_dim)
  rope: bool = False                # rotary q, k (Retention's xPos-style positions)
  bonus: bool = False               # RWKV6 bonus u [H, K]
  token_shift: bool = False         # RWKV6 data-dependent token shift
  step_scaled_values: bool = False  # Mamba2: v * dt
  skip: bool = False                # Mamba2: o += D_h v
  removal: bool = False             # Comba: removal b = beta sigmoid(c_h)
  query_correction: bool = False    # Comba: q' = q - d_h k


VARIANTS: dict[str, Variant] = {
    "bla": Variant("G", "none", "elu", False, False, True),
    "lightning": Variant("G", "lightning", "swish", False, True, True),
    "retention": Variant("G", "retention", "identity", False, True, True, rope=True),
    "gla": Variant("G", "gla", "identity", False, True, True),
    "mamba2": Variant("G", "mamba2", "identity", True, True, True, scale=1.0,
                      step_scaled_values=True, skip=True),
    "hgrn2": Variant("G", "hgrn2", "swish", False, False, True),
    "rwkv6": Variant("G", "rwkv6", "identity", False, True, True, scale=1.0, bonus=True,
                     token_shift=True),
    "based": Variant("G", "none", "taylor", False, False, False, normalised=True, scale=1.0,
                     default_key_dim=16),
    "rebased": Variant("G", "none", "rebased", False, False, False, normalised=True,
                       scale=1.0, default_key_dim=16),
    "deltanet": Variant("D", "none", "identity", True, False, True, qk_l2norm=True),
    "gated_deltanet": Variant("D", "mamba2", "identity", True, True, True, qk_l2norm=True),
    "comba": Variant("D", "mamba2", "identity", True, True, True, qk_l2norm=True,
                     removal=True, query_correction=True),
}


def _positive_int(name: str, value: int) -> int:
  """Raises ValueError unless value is a positive int."""
  if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
    raise ValueError(f"{name} must be a positive int, got {name}={value!r}")
  return value


class LinearAttention(nnx.Module):
  """A linear-attention token mixer of any `VARIANTS` row (see the module docstring).

  Args:
    d_model: D, the model width.
    num_heads: H.
    variant: a key of VARIANTS.
    head_dim: per-head width; default d_model // num_heads (num_heads must divide).
    key_dim, value_dim: per-head key (before the feature map) and value dims;
      default the variant's default key dim or head_dim.
    feature_map: override the variant's feature map (feature_maps.FEATURE_MAPS).
    use_short_conv, use_output_gate, use_rope: override the variant's defaults.
    conv_size: kernel size of the short conv.
    gate_low_rank, gate_normalizer: GLA's gate rank and divisor (16, 16).
    forget_lower_bound: HGRN2's lower bound of the forget gate (None: 0).
    rwkv_mix_rank, rwkv_decay_rank: RWKV6's token-shift and decay LoRA ranks.
    correction: Comba's initial query correction d_h (1.0; 0.02 suits small models).
    norm_eps: epsilon of the RMSNorms; normalise_eps: of the Based/Rebased division.
    chunk_size, impl: passed to the op (chunk a multiple of 16 in [16, 256]).
    layer_index, num_layers: position in the stack (Lightning's decay).
    dtype, param_dtype: compute and parameter dtypes.
    rngs: parameter initialisation.
  """

  def __init__(
      self,
      d_model: int,
      num_heads: int,
      *,
      variant: str,
      head_dim: int | None = None,
      key_dim: int | None = None,
      value_dim: int | None = None,
      feature_map: str | None = None,
      use_short_conv: bool | None = None,
      use_output_gate: bool | None = None,
      use_rope: bool | None = None,
      conv_size: int = 4,
      rope_theta: float = 10000.0,
      gate_low_rank: int = 16,
      gate_normalizer: float = 16.0,
      forget_lower_bound: float | None = None,
      rwkv_mix_rank: int = 32,
      rwkv_decay_rank: int = 64,
      correction: float = 1.0,
      norm_eps: float = 1e-5,
      normalise_eps: float = 1e-6,
      chunk_size: int = 64,
      impl: str = "auto",
      layer_index: int = 0,
      num_layers: int = 1,
      dtype: jnp.dtype = f32,
      param_dtype: jnp.dtype = f32,
      rngs: nnx.Rngs,
  ) -> None:
    if variant not in VARIANTS:
      raise ValueError(f"unknown variant={variant!r}; allowed: {tuple(VARIANTS)}")
    row = VARIANTS[variant]
    _positive_int("d_model", d_model)
    _positive_int("num_heads", num_heads)
    if head_dim is None:
      if d_model % num_heads:
        raise ValueError(f"num_heads={num_heads} does not divide d_model={d_model}; "
                         f"pick num_heads among the divisors of {d_model} or pass head_dim")
      head_dim = d_model // num_heads
    head_dim = _positive_int("head_dim", head_dim)
    key_dim = _positive_int("key_dim", key_dim or row.default_key_dim or head_dim)
    value_dim = _positive_int("value_dim", value_dim or head_dim)
    feature_map = row.feature_map if feature_map is None else feature_map
    feature_maps.check_name(feature_map)
    if row.gate == "hgrn2" and feature_maps.feature_dim(feature_map, key_dim) != key_dim:
      raise ValueError(f"feature_map={feature_map!r} changes the key dim; hgrn2's keys come "
                       f"from its forget gate, allowed: identity, elu, relu, swish, t2r")
    self.variant, self.row = variant, row
    self.d_model, self.num_heads = d_model, num_heads
    self.key_dim, self.value_dim = key_dim, value_dim
    self.feature_dim = feature_maps.feature_dim(feature_map, key_dim)
    self.state_value_dim = value_dim + 1 if row.normalised else value_dim
    self.use_short_conv = row.short_conv if use_short_conv is None else use_short_conv
    self.use_output_gate = row.output_gate if use_output_gate is None else use_output_gate
    self.use_rope = row.rope if use_rope is None else use_rope
    if self.use_rope and self.feature_dim % 2:
      raise ValueError(f"use_rope needs an even key dim after the feature map, got "
                       f"{self.feature_dim} (key_dim={key_dim}, feature_map={feature_map!r})")
    self.rope_theta, self.norm_eps, self.normalise_eps = rope_theta, norm_eps, normalise_eps
    self.chunk_size, self.impl = chunk_size, impl
    self.layer_index, self.num_layers = layer_index, num_layers
    self.dtype = dtype
    heads = num_heads
    lin = lambda i, o, bias=False: nnx.Linear(i, o, use_bias=bias, dtype=dtype,
                                             param_dtype=param_dtype, rngs=rngs)
    kw = {"rngs": rngs, "dtype": dtype, "param_dtype": param_dtype}

    self.shift_mix = (gates.RWKV6TokenShift(d_model, low_rank=rwkv_mix_rank, **kw)
                      if row.token_shift else None)
    self.q_proj = lin(d_model, heads * key_dim)
    self.k_proj = None if row.gate == "hgrn2" else lin(d_model, heads * key_dim)
    self.v_proj = lin(d_model, heads * value_dim)
    conv_channels = heads * (key_dim * (1 if self.k_proj is None else 2) + value_dim)
    self.conv = (ShortConv(conv_channels, kernel_size=conv_size, activation="silu",
                           rngs=rngs, param_dtype=param_dtype)
                 if self.use_short_conv else None)
    self.q_map = feature_maps.FeatureMap(feature_map, key_dim, rngs=rngs,
                                         param_dtype=param_dtype)
    self.k_map = (feature_maps.FeatureMap(feature_map, key_dim, rngs=rngs,
                                          param_dtype=param_dtype)
                  if self.k_proj is not None else None)

    gate = None
    if row.gate == "gla":
      gate = gates.LowRankLogSigmoidGate(d_model, heads, key_dim, low_rank=gate_low_rank,
                                         normalizer=gate_normalizer, **kw)
    elif row.gate == "mamba2":
      gate = gates.Mamba2Decay(d_model, heads, **kw)
    elif row.gate == "hgrn2":
      gate = gates.HGRN2Gate(d_model, heads, key_dim, lower_bound=forget_lower_bound, **kw)
    elif row.gate == "rwkv6":
      gate = gates.RWKV6Decay(d_model, heads, key_dim, low_rank=rwkv_decay_rank, **kw)
    elif row.gate == "lightning":   # validates layer_index / num_layers now
      gates.lightning_log_decay(heads, layer_index, num_layers)
    self.gate = nnx.data(gate)

    self.beta_proj = lin(d_model, heads) if row.family == "D" else None
    self.removal_logit = (nnx.Param(jnp.ones((heads,), param_dtype)) if row.removal else None)
    self.correction = (nnx.Param(jnp.full((heads,), correction, param_dtype))
                       if row.query_correction else None)
    self.bonus = (nnx.Param(0.5 + 0.1 * jax.random.normal(rngs.params(), (heads, key_dim),
                                                          param_dtype))
                  if row.bonus else None)
    self.skip = nnx.Param(jnp.ones((heads,), param_dtype)) if row.skip else None
    self.g_proj = lin(d_model, heads * value_dim) if self.use_output_gate else None
    norm = None
    if self.use_output_gate:
      norm = GatedRMSNorm(value_dim, eps=norm_eps, param_dtype=param_dtype)
    elif row.norm:
      norm = RMSNorm(value_dim, eps=norm_eps, param_dtype=param_dtype)
    self.norm = nnx.data(norm)
    self.o_proj = lin(heads * value_dim, d_model)

  # ------------------------------------------------------------------ cache
  def init_cache(self, batch_size: int, max_length: int) -> Cache:
    """Empty cache for `batch_size` sequences; its size does not depend on max_length."""
    del max_length  # constant memory per token
    cache: Cache = {"state": jnp.zeros((batch_size, self.num_heads, self.feature_dim,
                                        self.state_value_dim), f32)}
    if self.conv is not None:
      cache["conv"] = self.conv.init_state(batch_size, self.dtype)
    if self.shift_mix is not None:
      cache["shift"] = jnp.zeros((batch_size, self.d_model), self.dtype)
    if self.use_rope:
      cache["position"] = jnp.zeros((batch_size,), jnp.int32)
    return cache

  # ---------------------------------------------------------------- forward
  def _fixed_decay(self) -> jax.Array:
    """Lightning / Retention log decay [H] (float32)."""
    if self.row.gate == "lightning":
      return gates.lightning_log_decay(self.num_heads, self.layer_index, self.num_layers)
    return gates.retention_log_decay(self.num_heads)

  def _convolve(self, parts: list[jax.Array], segment_ids: jax.Array | None,
                cache: Cache | None, new_cache: Cache) -> list[jax.Array]:
    """Short conv over the concatenated projections [B, T, C]; splits them back."""
    sizes = [p.shape[-1] for p in parts]
    joint = jnp.concatenate(parts, axis=-1)
    if cache is None:
      joint = self.conv(joint, segment_ids=segment_ids)
    elif joint.shape[1] == 1:
      y, new_cache["conv"] = self.conv.step(joint[:, 0], cache["conv"])
      joint = y[:, None]
    else:
      joint, new_cache["conv"] = self.conv(joint, state=cache["conv"], return_state=True)
    bounds = [sum(sizes[:i + 1]) for i in range(len(sizes) - 1)]
    return jnp.split(joint, bounds, axis=-1)

  def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None = None,
               cache: Cache | None = None) -> MixerOutput:
    """x [B, T, D] -> MixerOutput(y [B, T, D], updated cache or None, {}).

    segment_ids [B, T] (packed documents) and cache (continue a sequence) exclude
    each other.
    """
    batch, time, width = x.shape
    if width != self.d_model:
      raise ValueError(f"x has width {width}, expected d_model={self.d_model}")
    if cache is not None and segment_ids is not None:
      raise ValueError("segment_ids with a cache: a cache holds one sequence per batch row")
    row, heads = self.row, self.num_heads
    x = x.astype(self.dtype)
    new_cache: Cache = {}

    xs = dict.fromkeys(RWKV6_MIXES, x)
    if self.shift_mix is not None:
      prev = gates.shift_tokens(x, None if cache is None else cache["shift"], segment_ids)
      xs = dict(zip(RWKV6_MIXES, self.shift_mix(x, prev)))
      new_cache["shift"] = x[:, -1]

    parts = [self.q_proj(xs["r"])]
    if self.k_proj is not None:
      parts.append(self.k_proj(xs["k"]))
    parts.append(self.v_proj(xs["v"]))
    if self.conv is not None:
      parts = self._convolve(parts, segment_ids, cache, new_cache)
    heads_of = lambda a: a.reshape(batch, time, heads, -1)
    q, v = heads_of(parts[0]), heads_of(parts[-1])
    q = self.q_map(q)

    g = dt = None
    if row.gate in ("lightning", "retention"):
      g = jnp.broadcast_to(self._fixed_decay(), (batch, time, heads))
    elif row.gate == "gla":
      g = self.gate(x)
    elif row.gate == "mamba2":
      g, dt = self.gate.with_step_size(x)
    elif row.gate == "rwkv6":
      g = self.gate(xs["w"])
    if row.gate == "hgrn2":
      g, k = self.gate(x)
    else:
      k = self.k_map(heads_of(parts[1]))

    if row.qk_l2norm:
      q, k = l2_normalise(q), l2_normalise(k)
    if self.correction is not None:
      q = q - self.correction[...].astype(f32)[:, None] * k
    if self.use_rope:
      start = jnp.zeros((batch,), jnp.int32) if cache is None else cache["position"]
      positions = start[:, None] + jnp.arange(time, dtype=jnp.int32)[None]
      q = apply_rope(q, positions, theta=self.rope_theta)
      k = apply_rope(k, positions, theta=self.rope_theta)
      new_cache["position"] = start + time

    v_in = v.astype(f32)
    if row.step_scaled_values:
      v_in = v_in * dt[..., None]
    if row.normalised:
      v_in = jnp.concatenate([v_in, jnp.ones_like(v_in[..., :1])], axis=-1)
    o, state = self._run_op(q, k, v_in, g, x, segment_ids, cache)
    if cache is not None:
      new_cache["state"] = state

    o = o.astype(f32)
    if row.normalised:
      o = o[..., :-1] / (o[..., -1:] + self.normalise_eps)
    if self.skip is not None:
      o = o + self.skip[...].astype(f32)[:, None] * v.astype(f32)
    o = o.astype(self.dtype)
    if self.use_output_gate:
      o = self.norm(o, heads_of(self.g_proj(xs["g"])))
    elif self.norm is not None:
      o = self.norm(o)
    y = self.o_proj(o.reshape(batch, time, heads * self.value_dim))
    return MixerOutput(y, new_cache if cache is not None else None, {})

  def _run_op(self, q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array | None,
              x: jax.Array, segment_ids: jax.Array | None,
              cache: Cache | None) -> tuple[jax.Array, jax.Array | None]:
    """The recurrence: chunked op (training, prefill) or its step (T = 1 decode)."""
    row = self.row
    dt = self.dtype
    q, k, v = q.astype(dt), k.astype(dt), v.astype(dt)
    bonus = None if self.bonus is None else self.bonus[...].astype(f32)
    extra = {}
    beta = None
    if row.family == "D":
      beta = jax.nn.sigmoid(self.beta_proj(x).astype(f32))
      if self.removal_logit is not None:
        extra["removal"] = beta * jax.nn.sigmoid(self.removal_logit[...].astype(f32))
    decode = cache is not None and q.shape[1] == 1
    if decode:
      at0 = lambda a: None if a is None else a[:, 0]
      extra = {name: at0(a) for name, a in extra.items()}
      if row.family == "G":
        o, state = ops.gated_linear_attention_step(
            q[:, 0], k[:, 0], v[:, 0], at0(g), state=cache["state"], bonus=bonus,
            scale=row.scale)
      else:
        o, state = ops.delta_rule_step(q[:, 0], k[:, 0], v[:, 0], beta[:, 0], at0(g),
                                       state=cache["state"], scale=row.scale, **extra)
      return o[:, None], state
    common = {"scale": row.scale, "segment_ids": segment_ids, "chunk_size": self.chunk_size,
              "impl": self.impl, "output_final_state": cache is not None,
              "initial_state": None if cache is None else cache["state"]}
    if row.family == "G":
      return ops.gated_linear_attention(q, k, v, g, bonus=bonus, **common)
    return ops.delta_rule(q, k, v, beta, g, **extra, **common)
