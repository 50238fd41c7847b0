"""One configurable token mixer for every linear (L) variant, and the variant table.

Pipeline (each stage switched by the variant's row in `VARIANTS`, overridable):

    x -> [RWKV6 token shift: x_r, x_w, x_k, x_v, x_g]
      -> q = W_q x, k = W_k x, v = W_v x          (HGRN2: k = 1 - forget gate)
      -> [short causal conv over (q, k, v), size 4, SiLU; HGRN2: its gate logits too,
          by a conv of their own without activation (`GateSpec.convolved`)]
      -> q, k = phi(q), phi(k)                     (feature map, `feature_maps.py`)
      -> [L2-normalise q, k] [RoPE] [Comba: q' = q - d_h k]
      -> gate (`gates.GATES[row.gate]`: g, [dt], [keys]), [beta = sigmoid(W_b x)]
      -> op of the row's family (`jaxlin.ops.families.FAMILIES[row.family]`):
              gated: S_t = Diag(exp g_t) S_{t-1} + k_t v_t^T,  o_t = scale S_t^T q_t
              delta: S_t = exp(g_t)(I - b_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
      -> [normalised (Based/Rebased): o = o[:V] / (o[V] + eps), v extended by a ones column]
      -> [Mamba2 skip: o += D_h v]
      -> per-head RMSNorm -> [output gate: * silu(W_g x)] -> y = W_o o
         (Mamba2: per-head RMSNorm(o * silu(W_g x)), `OutputNorm`)

Variants (`VARIANTS`; `register_variant` adds one): bla (basic linear attention),
lightning, retention, gla, mamba2, hgrn2, rwkv6, based, rebased, deltanet,
gated_deltanet, comba. A row names its family and its gate; the layer never branches on
either name, and `MixtureOfMemories` runs the same stages (`OpStages`) per memory. Decay gates:
lightning -slope_h (ALiBi, layer dependent), retention log(1 - 2^(-5-h)),
gla logsigmoid(W2 W1 x)/16, mamba2/gated_deltanet/comba -exp(A_log) softplus(W x +
dt_bias), hgrn2 log(sigmoid(W x)) (optional lower bound), rwkv6 -exp(lora(x_w)) with
bonus u. Mamba2 also scales v by its step size dt, adds the skip D_h v, gates before
its norm and gives its short conv a bias (its B, C are per head here, Mamba2 shares them
across heads). Comba removes with strength
b_t = beta_t sigmoid(c_h) (its write strength is beta_t).

Cache (constant size): "state" [B, H, K', V'] float32, "conv" [B, conv_size - 1, C],
"conv_gate" [B, conv_size - 1, H*K] (a convolved gate),
"shift" [B, D] (RWKV6's previous token), "position" [B] int32 (RoPE).

Legend: B batch, T time, D d_model, H heads, K key dim per head, K' key dim after the
feature map, V value dim per head (V' = V + 1 when normalised), C conv channels.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlin import validation
from jaxlin.layers import base, feature_maps, gates
from jaxlin.layers.base import Cache, MixerOutput
from jaxlin.layers.conv import ShortConv
from jaxlin.layers.norm import l2_normalise, rms_normalise
from jaxlin.layers.rope import apply_rope
from jaxlin.ops.families import FAMILIES, Family
from jaxlin.ops import lasp2

f32 = jnp.float32

RWKV6_MIXES = ("r", "w", "k", "v", "g")


@dataclasses.dataclass(frozen=True)
class Variant:
  """One row of the variant table: what each pipeline stage does by default."""
  family: str                       # a key of jaxlin.ops.families.FAMILIES
  gate: str                         # a key of gates.GATES
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
  gate_before_norm: bool = False    # Mamba2: RMSNorm(o_h * silu(z_h)) per head
  conv_bias: bool = False           # Mamba2: its short conv has a bias (U(-1/2, 1/2) at init)
  gate_options: tuple[tuple[str, Any], ...] = ()  # the row's own gate options (the layer's
                                    # gate_options override them)

  def check(self, name: str) -> None:
    """Raises ValueError unless the row's family and gate exist and fit each other."""
    family = FAMILIES[validation.choice(f"{name}.family", self.family, tuple(FAMILIES))]
    spec = gates.gate_spec(self.gate)
    validation.require(family.per_key_gate or not spec.per_key, f"{name}.gate", self.gate,
                       f"a gate without a key axis (family {self.family!r} takes scalar gates)")
    validation.require(not self.bonus or "bonus" in family.head_inputs, f"{name}.bonus",
                       self.bonus, f"False (family {self.family!r} has no bonus)")
    validation.require(not self.removal or "removal" in family.token_inputs, f"{name}.removal",
                       self.removal, f"False (family {self.family!r} has no removal strength)")
    feature_maps.check_name(self.feature_map)

  @property
  def recurrence(self) -> Family:
    """The row's family entry."""
    return FAMILIES[self.family]


# fla's Gated DeltaNet and Comba draw A ~ U(0, 16) (Mamba2: U(1, 16)); dt as Mamba2's
FLA_DECAY_INIT = (("a_init_range", (0.0, 16.0)),)

VARIANTS: dict[str, Variant] = {
    "bla": Variant("gated", "none", "elu", False, False, True),
    "lightning": Variant("gated", "lightning", "swish", False, True, True),
    "retention": Variant("gated", "retention", "identity", False, True, True, rope=True),
    "gla": Variant("gated", "gla", "identity", False, True, True),
    "mamba2": Variant("gated", "mamba2", "identity", True, True, True, scale=1.0,
                      step_scaled_values=True, skip=True, gate_before_norm=True,
                      conv_bias=True),
    "hgrn2": Variant("gated", "hgrn2", "swish", False, False, True),
    "rwkv6": Variant("gated", "rwkv6", "identity", False, True, True, scale=1.0, bonus=True,
                     token_shift=True),
    "based": Variant("gated", "none", "taylor", False, False, False, normalised=True, scale=1.0,
                     default_key_dim=16),
    "rebased": Variant("gated", "none", "rebased", False, False, False, normalised=True,
                       scale=1.0, default_key_dim=16),
    "deltanet": Variant("delta", "none", "identity", True, False, True, qk_l2norm=True),
    "gated_deltanet": Variant("delta", "mamba2", "identity", True, True, True, qk_l2norm=True,
                              gate_options=FLA_DECAY_INIT),
    "comba": Variant("delta", "mamba2", "identity", True, True, True, qk_l2norm=True,
                     removal=True, query_correction=True, gate_options=FLA_DECAY_INIT),
}


def register_variant(name: str, row: Variant) -> None:
  """Adds variant `name` (checked) to VARIANTS; an existing name raises."""
  validation.require(name not in VARIANTS, "variant name", name,
                     f"a new name, not one of {tuple(VARIANTS)}")
  row.check(name)
  VARIANTS[name] = row


def variant_row(name: str) -> Variant:
  """VARIANTS[name], or a ValueError listing the variants."""
  return VARIANTS[validation.choice("variant", name, tuple(VARIANTS))]


# ------------------------------------------------------------ shared stages
@dataclasses.dataclass(frozen=True)
class OpStages:
  """The variant-dependent stages around the op, shared by LinearAttention and MoM.

  `inputs` turns projected q, k, v [B, L, H, *] and a gate's output into the op's
  q, k, v and per-token inputs; `run` calls the family's op (or its step when decoding);
  `output` undoes the Based normalisation and adds Mamba2's skip.
  """
  row: Variant
  rope_theta: float = 10000.0
  normalise_eps: float = 1e-6

  def inputs(self, q: jax.Array, k: jax.Array, v: jax.Array, gate: gates.GateOut,
             beta: jax.Array | None, *, removal_logit: jax.Array | None = None,
             correction: jax.Array | None = None, positions: jax.Array | None = None
             ) -> tuple[jax.Array, jax.Array, jax.Array, dict[str, jax.Array]]:
    """(q, k, v, inputs) for the op: q, k after the feature maps [B, L, H, K'];
    v [B, L, H, V]; gate (g, dt) per token; beta [B, L, H] (delta family);
    positions [B, L] (RoPE rows). Returns v float32 (V + 1 when normalised)."""
    row = self.row
    if row.qk_l2norm:
      q, k = l2_normalise(q), l2_normalise(k)
    if correction is not None:
      q = q - correction.astype(f32)[:, None] * k
    if positions is not None:
      q = apply_rope(q, positions, theta=self.rope_theta)
      k = apply_rope(k, positions, theta=self.rope_theta)
    v_in = v.astype(f32)
    if row.step_scaled_values:
      v_in = v_in * gate.dt[..., None]
    if row.normalised:
      v_in = jnp.concatenate([v_in, jnp.ones_like(v_in[..., :1])], axis=-1)
    inputs: dict[str, jax.Array] = {} if gate.g is None else {"g": gate.g}
    if row.recurrence.write_strength:
      inputs["beta"] = beta
    if removal_logit is not None:
      inputs["removal"] = beta * jax.nn.sigmoid(removal_logit.astype(f32))
    return q, k, v_in, inputs

  def run(self, q: jax.Array, k: jax.Array, v: jax.Array, inputs: dict[str, jax.Array],
          head_inputs: dict[str, jax.Array], *, dtype: Any, segment_ids: jax.Array | None,
          state: jax.Array | None, decode: bool, chunk_size: int,
          impl: str) -> tuple[jax.Array, jax.Array | None]:
    """The family's op over [B, L, H, *] (or its step on L = 1 with `decode`); returns
    (o [B, L, H, V'], the final state when `state` is given, else None)."""
    family, scale = self.row.recurrence, self.row.scale
    q, k, v = q.astype(dtype), k.astype(dtype), v.astype(dtype)
    if decode:
      at0 = {name: a[:, 0] for name, a in inputs.items()}
      o, new_state = family.step(q[:, 0], k[:, 0], v[:, 0], **at0, **head_inputs,
                                 state=state, scale=scale)
      return o[:, None], new_state
    # LASP-2 when the active mesh splits the sequence; the family's op otherwise
    return lasp2.sequence_op(family, q, k, v, inputs, head_inputs, scale=scale,
                             segment_ids=segment_ids, chunk_size=chunk_size, impl=impl,
                             initial_state=state, output_final_state=state is not None)

  def output(self, o: jax.Array, v: jax.Array, skip: jax.Array | None) -> jax.Array:
    """o [B, L, H, V'] -> float32 [B, L, H, V]: Based division, Mamba2 skip D_h v."""
    o = o.astype(f32)
    if self.row.normalised:
      o = o[..., :-1] / (o[..., -1:] + self.normalise_eps)
    if skip is not None:
      o = o + skip.astype(f32)[:, None] * v.astype(f32)
    return o


def token_mixes(shift_mix: nnx.Module | None, x: jax.Array, previous: jax.Array | None,
                segment_ids: jax.Array | None) -> dict[str, jax.Array]:
  """The inputs of each projection: RWKV6's token-shifted mixes, or x for every one."""
  if shift_mix is None:
    return dict.fromkeys(RWKV6_MIXES, x)
  return dict(zip(RWKV6_MIXES, shift_mix(x, gates.shift_tokens(x, previous, segment_ids))))


class OutputNorm(nnx.Module):
  """The per-head norm after the op, and the output gate z when the layer has one.

    every row but Mamba2:     o_h <- RMSNorm(o_h) [* silu(z_h)]          weight [V]
    gate_before_norm (Mamba2): o_h <- RMSNorm(o_h * silu(z_h))            weight [H, V]
                              (mamba_ssm's RMSNormGated, norm_before_gate=False, one group
                              per head: a head here has its own B, C, as a Mamba2 group does)
  """

  def __init__(self, row: Variant, *, gated: bool, num_heads: int, value_dim: int,
               eps: float, param_dtype: jnp.dtype = f32) -> None:
    self.gated, self.eps = gated, eps
    self.gate_first = gated and row.gate_before_norm
    shape = (num_heads, value_dim) if self.gate_first else (value_dim,)
    self.weight = nnx.Param(jnp.ones(shape, param_dtype))

  def __call__(self, o: jax.Array, z: jax.Array | None) -> jax.Array:
    """o [B, T, H, V], z [B, T, H*V] (None unless gated) -> [B, T, H*V] in o's dtype."""
    batch, time = o.shape[:2]
    x = o.astype(f32)
    gate = None if not self.gated else jax.nn.silu(z.astype(f32).reshape(x.shape))
    if self.gate_first:
      y = rms_normalise(x * gate, self.weight[...], self.eps)
    else:
      y = rms_normalise(x, self.weight[...], self.eps)
      y = y if gate is None else y * gate
    return y.reshape(batch, time, -1).astype(o.dtype)


def check_keys_feature_map(spec: gates.GateSpec, feature_map: str, key_dim: int) -> None:
  """A gate that gives the keys (HGRN2) needs a feature map that keeps the key dim."""
  if spec.gives_keys:
    keeping = tuple(f for f in feature_maps.FEATURE_MAPS
                    if feature_maps.feature_dim(f, key_dim) == key_dim)
    validation.require(feature_maps.feature_dim(feature_map, key_dim) == key_dim,
                       "feature_map", feature_map,
                       f"one of {keeping} (the keys come from the gate and keep the key dim)")


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
    gate_options: further options for the gate's builder (`gates.GateContext`), over the
      row's own (`Variant.gate_options`); the "mamba2" gate (Mamba2, Gated DeltaNet, Comba)
      takes a_init_range, dt_min, dt_max, dt_floor (`gates.Mamba2Decay`).
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
      gate_options: dict[str, Any] | None = None,
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
    row = variant_row(variant)
    validation.positive_int("d_model", d_model)
    validation.positive_int("num_heads", num_heads)
    if head_dim is None:
      validation.require(d_model % num_heads == 0, "num_heads", num_heads,
                         f"a divisor of d_model={d_model} (or pass head_dim)")
      head_dim = d_model // num_heads
    head_dim = validation.positive_int("head_dim", head_dim)
    key_dim = validation.positive_int("key_dim", key_dim or row.default_key_dim or head_dim)
    value_dim = validation.positive_int("value_dim", value_dim or head_dim)
    feature_map = row.feature_map if feature_map is None else feature_map
    feature_maps.check_name(feature_map)
    gate_spec = gates.gate_spec(row.gate)
    check_keys_feature_map(gate_spec, feature_map, key_dim)
    self.variant, self.row = variant, row
    self.d_model, self.num_heads = d_model, num_heads
    self.key_dim, self.value_dim = key_dim, value_dim
    self.feature_dim = feature_maps.feature_dim(feature_map, key_dim)
    self.state_value_dim = value_dim + 1 if row.normalised else value_dim
    self.use_short_conv = row.short_conv if use_short_conv is None else use_short_conv
    self.use_output_gate = row.output_gate if use_output_gate is None else use_output_gate
    self.use_rope = row.rope if use_rope is None else use_rope
    validation.require(not self.use_rope or self.feature_dim % 2 == 0, "use_rope", self.use_rope,
                       f"False, or an even key dim after the feature map (got {self.feature_dim}"
                       f" from key_dim={key_dim}, feature_map={feature_map!r})")
    self.stages = OpStages(row, rope_theta=rope_theta, normalise_eps=normalise_eps)
    self.chunk_size, self.impl = chunk_size, impl
    self.dtype = dtype
    heads = num_heads
    lin = lambda i, o, bias=False: nnx.Linear(i, o, use_bias=bias, dtype=dtype,
                                             param_dtype=param_dtype, rngs=rngs)
    kw = {"rngs": rngs, "dtype": dtype, "param_dtype": param_dtype}

    self.shift_mix = (gates.RWKV6TokenShift(d_model, low_rank=rwkv_mix_rank, **kw)
                      if row.token_shift else None)
    self.q_proj = lin(d_model, heads * key_dim)
    self.k_proj = None if gate_spec.gives_keys else lin(d_model, heads * key_dim)
    self.v_proj = lin(d_model, heads * value_dim)
    conv_channels = heads * (key_dim * (1 if self.k_proj is None else 2) + value_dim)
    self.conv = (ShortConv(conv_channels, kernel_size=conv_size, activation="silu",
                           use_bias=row.conv_bias, rngs=rngs, param_dtype=param_dtype)
                 if self.use_short_conv else None)
    self.q_map = feature_maps.FeatureMap(feature_map, key_dim, rngs=rngs,
                                         param_dtype=param_dtype)
    self.k_map = (feature_maps.FeatureMap(feature_map, key_dim, rngs=rngs,
                                          param_dtype=param_dtype)
                  if self.k_proj is not None else None)
    options = {"gate_low_rank": gate_low_rank, "gate_normalizer": gate_normalizer,
               "forget_lower_bound": forget_lower_bound, "rwkv_decay_rank": rwkv_decay_rank,
               **dict(row.gate_options), **(gate_options or {})}
    self.gate = gate_spec.build(gates.GateContext(
        d_model, heads, key_dim, layer_index, num_layers, options, **kw))
    self.gate_conv = (ShortConv(self.gate.logit_features, kernel_size=conv_size,
                                activation=None, rngs=rngs, param_dtype=param_dtype)
                      if gate_spec.convolved and self.use_short_conv else None)
    self.beta_proj = lin(d_model, heads) if row.recurrence.write_strength else None
    self.removal_logit = (nnx.Param(jnp.ones((heads,), param_dtype)) if row.removal else None)
    self.correction = (nnx.Param(jnp.full((heads,), correction, param_dtype))
                       if row.query_correction else None)
    self.bonus = (nnx.Param(0.5 + 0.1 * jax.random.normal(rngs.params(), (heads, key_dim),
                                                          param_dtype))
                  if row.bonus else None)
    self.skip = nnx.Param(jnp.ones((heads,), param_dtype)) if row.skip else None
    self.g_proj = lin(d_model, heads * value_dim) if self.use_output_gate else None
    self.norm = nnx.data(OutputNorm(row, gated=self.use_output_gate, num_heads=heads,
                                    value_dim=value_dim, eps=norm_eps, param_dtype=param_dtype)
                         if self.use_output_gate or row.norm else None)
    self.o_proj = lin(heads * value_dim, d_model)

  # ------------------------------------------------------------------ cache
  def init_cache(self, batch_size: int, max_length: int) -> Cache:
    """Empty cache for `batch_size` sequences; its size does not depend on max_length."""
    del max_length  # constant memory per token
    cache: Cache = {"state": jnp.zeros((batch_size, self.num_heads, self.feature_dim,
                                        self.state_value_dim), f32)}
    if self.conv is not None:
      cache["conv"] = self.conv.init_state(batch_size, self.dtype)
    if self.gate_conv is not None:
      cache["conv_gate"] = self.gate_conv.init_state(batch_size, self.dtype)
    if self.shift_mix is not None:
      cache["shift"] = jnp.zeros((batch_size, self.d_model), self.dtype)
    if self.use_rope:
      cache["position"] = jnp.zeros((batch_size,), jnp.int32)
    return cache

  # ---------------------------------------------------------------- forward
  @staticmethod
  def _convolve(conv: ShortConv, name: str, x: jax.Array, segment_ids: jax.Array | None,
                cache: Cache | None, new_cache: Cache) -> jax.Array:
    """`conv` over x [B, T, C], continuing from cache[name] (and updating it) when given."""
    if cache is None:
      return conv(x, segment_ids=segment_ids)
    if x.shape[1] == 1:
      y, new_cache[name] = conv.step(x[:, 0], cache[name])
      return y[:, None]
    y, new_cache[name] = conv(x, state=cache[name], return_state=True)
    return y

  def _gate(self, x: jax.Array, segment_ids: jax.Array | None, cache: Cache | None,
            new_cache: Cache) -> gates.GateOut:
    """The gate of the "w" mix x [B, T, D]; a convolved gate's logits pass its own conv."""
    if self.gate_conv is None:
      return self.gate(x)
    logits = self._convolve(self.gate_conv, "conv_gate", self.gate.project(x), segment_ids,
                            cache, new_cache)
    return self.gate.activate(logits)

  def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None = None,
               cache: Cache | None = None) -> MixerOutput:
    """x [B, T, D] -> MixerOutput(y [B, T, D], updated cache or None, {}).

    segment_ids [B, T] (packed documents) and cache (continue a sequence) exclude
    each other.
    """
    base.check_mixer_call(x, self.d_model, segment_ids, cache)
    batch, time, _ = x.shape
    heads = self.num_heads
    x = x.astype(self.dtype)
    new_cache: Cache = {}

    xs = token_mixes(self.shift_mix, x, None if cache is None else cache.get("shift"),
                     segment_ids)
    if self.shift_mix is not None:
      new_cache["shift"] = x[:, -1]

    parts = [self.q_proj(xs["r"])]
    if self.k_proj is not None:
      parts.append(self.k_proj(xs["k"]))
    parts.append(self.v_proj(xs["v"]))
    if self.conv is not None:   # one conv over the concatenated projections
      sizes = [p.shape[-1] for p in parts]
      joint = self._convolve(self.conv, "conv", jnp.concatenate(parts, axis=-1), segment_ids,
                             cache, new_cache)
      parts = jnp.split(joint, [sum(sizes[:i + 1]) for i in range(len(sizes) - 1)], axis=-1)
    heads_of = lambda a: a.reshape(batch, time, heads, -1)
    q, v = self.q_map(heads_of(parts[0])), heads_of(parts[-1])
    gate = self._gate(xs["w"], segment_ids, cache, new_cache)
    k = gate.keys if self.k_proj is None else self.k_map(heads_of(parts[1]))

    positions = None
    if self.use_rope:
      start = jnp.zeros((batch,), jnp.int32) if cache is None else cache["position"]
      positions = start[:, None] + jnp.arange(time, dtype=jnp.int32)[None]
      new_cache["position"] = start + time
    beta = (None if self.beta_proj is None
            else jax.nn.sigmoid(self.beta_proj(x).astype(f32)))
    q, k, v_in, inputs = self.stages.inputs(
        q, k, v, gate, beta, positions=positions,
        removal_logit=None if self.removal_logit is None else self.removal_logit[...],
        correction=None if self.correction is None else self.correction[...])
    head_inputs = {} if self.bonus is None else {"bonus": self.bonus[...].astype(f32)}
    o, state = self.stages.run(
        q, k, v_in, inputs, head_inputs, dtype=self.dtype, segment_ids=segment_ids,
        state=None if cache is None else cache["state"],
        decode=cache is not None and time == 1, chunk_size=self.chunk_size, impl=self.impl)
    if cache is not None:
      new_cache["state"] = state

    o = self.stages.output(o, v, None if self.skip is None else self.skip[...])
    o = o.astype(self.dtype)
    if self.norm is not None:
      o = self.norm(o, self.g_proj(xs["g"]) if self.use_output_gate else None)
    y = self.o_proj(o.reshape(batch, time, heads * self.value_dim))
    return MixerOutput(y, new_cache if cache is not None else None, {})
