"""Gate parametrisations of the linear-attention layers, and their registry `GATES`.

Every gate module maps its input x [..., D] (the token's "w" mix: x itself, or RWKV6's
token-shifted mix) to one `GateOut`: the log-space gate g <= 0 (decay = exp(g)),
float32, and what else the gate gives the layer (Mamba2's step size dt, HGRN2's keys):

  GLA (low-rank logsigmoid, per key dim)   g = logsigmoid(W2 W1 x + b) / tau       tau = 16
  Mamba2 / Gated DeltaNet / Comba (scalar) g = -exp(A_log) * softplus(W x + dt_bias)
  Lightning (fixed scalar per head)        g_h = -slope_h * (1 - l / (L - 1) + 1e-5)
  Retention (fixed scalar per head)        g_h = log(1 - 2^(-5 - h))
  HGRN2 (per dim, forget gate)             f = lb + (1 - lb) sigmoid(W x);  g = log f;  k = 1 - f
                                           (with the short conv: W x convolved first)
  RWKV6 (per key dim, low rank)            g = -exp(b + W2 tanh(W1 x_w))
  RWKV6 token shift (data-dependent lerp)  x_n = x + (x_{t-1} - x) * mu_n
                                           mu_n = bias_n + W2_n tanh(W1 (x + (x_{t-1} - x) mu_x))

`GATES` maps a gate name (a variant row's `gate`) to a `GateSpec`: how to build the
module for a layer (`GateContext`: sizes, position in the stack, options, dtypes) and
whether its g has a key axis. `LinearAttention` and `MixtureOfMemories` build every gate
through it; `register_gate` adds one (a test registers a toy gate at run time).

Legend: B batch, T time, D model width, H heads, K key dim per head, R low rank,
n the index of a token-shift mix.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlin import validation
from jaxlin.ops import documents

f32 = jnp.float32


class GateOut(NamedTuple):
  """What a gate gives the layer for every token (float32)."""
  g: jax.Array | None              # log decay <= 0: [..., H] or [..., H, K]; None: no decay
  dt: jax.Array | None = None      # Mamba2's step size [..., H] (scales the values)
  keys: jax.Array | None = None    # keys tied to the gate [..., H, K] (HGRN2: 1 - f)


def _linear(in_features: int, out_features: int, *, use_bias: bool, rngs: nnx.Rngs,
            dtype: jnp.dtype, param_dtype: jnp.dtype,
            kernel_init: nnx.Initializer | None = None) -> nnx.Linear:
  """nnx.Linear with the module-wide dtypes (default LeCun-normal kernel, zero bias)."""
  kwargs = {} if kernel_init is None else {"kernel_init": kernel_init}
  return nnx.Linear(in_features, out_features, use_bias=use_bias, dtype=dtype,
                    param_dtype=param_dtype, rngs=rngs, **kwargs)


class LowRankLogSigmoidGate(nnx.Module):
  """GLA's per-key gate: g = logsigmoid(W2 W1 x + b) / normalizer, in [-inf, 0].

  W1: D -> R (no bias), W2: R -> H*K (with bias). normalizer = 16 in GLA makes
  the decays start close to 1 (exp(logsigmoid(0)/16) ~ 0.958).
  """

  def __init__(self, in_features: int, num_heads: int, head_dim: int, *,
               low_rank: int = 16, normalizer: float = 16.0, rngs: nnx.Rngs,
               dtype: jnp.dtype = f32, param_dtype: jnp.dtype = f32) -> None:
    validation.require(normalizer > 0, "normalizer", normalizer, "a number > 0")
    self.num_heads, self.head_dim, self.normalizer = num_heads, head_dim, normalizer
    self.down = _linear(in_features, low_rank, use_bias=False, rngs=rngs, dtype=dtype,
                        param_dtype=param_dtype)
    self.up = _linear(low_rank, num_heads * head_dim, use_bias=True, rngs=rngs, dtype=dtype,
                      param_dtype=param_dtype)

  def __call__(self, x: jax.Array) -> GateOut:
    """x [..., D] -> GateOut(g [..., H, K] float32 <= 0)."""
    logits = self.up(self.down(x)).astype(f32)
    g = jax.nn.log_sigmoid(logits) / self.normalizer
    return GateOut(g.reshape(*x.shape[:-1], self.num_heads, self.head_dim))


def inverse_softplus(y: jax.Array) -> jax.Array:
  """x with softplus(x) = y (y > 0): y + log(-expm1(-y))."""
  return y + jnp.log(-jnp.expm1(-y))


A_FLOOR = 1e-4                    # Mamba2Decay's smallest A at init (log(0) is -inf)
MAMBA2_DECAY_OPTIONS = ("a_init_range", "dt_min", "dt_max", "dt_floor")  # its gate_options


class Mamba2Decay(nnx.Module):
  """Mamba2's scalar decay per head: g = -exp(A_log) * dt, dt = softplus(W x + dt_bias).

  A = exp(A_log) starts uniform in `a_init_range` (Mamba2: (1, 16); Gated DeltaNet and
  Comba, as fla initialises them: (0, 16), A floored at A_FLOOR so that A_log is finite);
  dt_bias is the inverse softplus of dt ~ log-uniform in [dt_min, dt_max] (floored at
  dt_floor), as in Mamba2. The output also carries dt (Mamba2 scales its input by dt).
  A smaller dt_max starts every head with a longer memory (-A dt per token is the log decay).
  """

  def __init__(self, in_features: int, num_heads: int, *,
               a_init_range: tuple[float, float] = (1.0, 16.0), dt_min: float = 1e-3,
               dt_max: float = 0.1, dt_floor: float = 1e-4, rngs: nnx.Rngs,
               dtype: jnp.dtype = f32, param_dtype: jnp.dtype = f32) -> None:
    lo, hi = a_init_range
    validation.require(0 <= lo < hi, "a_init_range", a_init_range,
                       "(lo, hi) with 0 <= lo < hi")
    validation.require(0 < dt_min <= dt_max, "dt_min, dt_max", (dt_min, dt_max),
                       "0 < dt_min <= dt_max")
    self.num_heads = num_heads
    self.proj = _linear(in_features, num_heads, use_bias=False, rngs=rngs, dtype=dtype,
                        param_dtype=param_dtype)
    a = jnp.maximum(jax.random.uniform(rngs.params(), (num_heads,), f32, lo, hi), A_FLOOR)
    self.A_log = nnx.Param(jnp.log(a).astype(param_dtype))
    u = jax.random.uniform(rngs.params(), (num_heads,), f32)
    dt = jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    self.dt_bias = nnx.Param(inverse_softplus(jnp.maximum(dt, dt_floor)).astype(param_dtype))

  def __call__(self, x: jax.Array) -> GateOut:
    """x [..., D] -> GateOut(g [..., H] <= 0, dt [..., H] > 0), float32."""
    dt = jax.nn.softplus(self.proj(x).astype(f32) + self.dt_bias[...].astype(f32))
    return GateOut(-jnp.exp(self.A_log[...].astype(f32)) * dt, dt=dt)


def alibi_slopes(num_heads: int) -> np.ndarray:
  """ALiBi head slopes [H]: 2^(-8 (h+1) / n) for n = H a power of two; otherwise
  the slopes of the next-lower power of two, then every other one of the next.
  (numpy: concrete even while a model is built under jit.)"""
  def power_of_two(n: int) -> list[float]:
    start = 2.0 ** (-8.0 / n)
    return [start ** (i + 1) for i in range(n)]
  if num_heads & (num_heads - 1) == 0:
    return np.asarray(power_of_two(num_heads), np.float32)
  lower = 2 ** int(math.floor(math.log2(num_heads)))
  extra = power_of_two(2 * lower)[0::2][:num_heads - lower]
  return np.asarray(power_of_two(lower) + extra, np.float32)


def lightning_log_decay(num_heads: int, layer_index: int = 0, num_layers: int = 1) -> np.ndarray:
  """Lightning / TransNormerLLM fixed decay per head [H] (log space):
  g_h = -slope_h * (1 - l / (L - 1) + 1e-5), slope_h the ALiBi slopes; the
  first layer decays fastest, the last barely (factor 1e-5). L = 1: factor 1."""
  validation.int_in_range("layer_index", layer_index, 0, max(num_layers, 1) - 1)
  factor = 1.0 if num_layers <= 1 else 1.0 - layer_index / (num_layers - 1) + 1e-5
  return -alibi_slopes(num_heads) * factor


def retention_log_decay(num_heads: int) -> np.ndarray:
  """RetNet fixed decay per head [H] (log space): g_h = log(1 - 2^(-5 - h))."""
  return np.log1p(-(2.0 ** (-5.0 - np.arange(num_heads)))).astype(np.float32)


class HGRN2Gate(nnx.Module):
  """HGRN2's forget gate and its tied input key, per head and key dim.

  f = lb + (1 - lb) * sigmoid(a) with an optional lower bound lb in [0, 1), from the
  logits a = W x + b (`project`); g = log f (<= 0) and k = 1 - f = (1 - lb) * sigmoid(-a)
  (`activate`). With the layer's short conv, a runs through a conv of its own between the
  two (as fla's HGRN2 convolves its forget-gate input), so the key sees the tokens before.
  """

  def __init__(self, in_features: int, num_heads: int, head_dim: int, *,
               lower_bound: float | None = None, rngs: nnx.Rngs,
               dtype: jnp.dtype = f32, param_dtype: jnp.dtype = f32) -> None:
    validation.require(lower_bound is None or 0.0 <= lower_bound < 1.0, "lower_bound",
                       lower_bound, "None or a number in [0, 1)")
    self.num_heads, self.head_dim = num_heads, head_dim
    self.lower_bound = 0.0 if lower_bound is None else float(lower_bound)
    self.logit_features = num_heads * head_dim
    self.proj = _linear(in_features, num_heads * head_dim, use_bias=True, rngs=rngs,
                        dtype=dtype, param_dtype=param_dtype)

  def project(self, x: jax.Array) -> jax.Array:
    """x [..., D] -> the forget-gate logits a [..., H*K] (x's dtype)."""
    return self.proj(x)

  def activate(self, logits: jax.Array) -> GateOut:
    """a [..., H*K] -> GateOut(g [..., H, K] <= 0, keys k [..., H, K] in (0, 1]), float32.
    Holds no parameter: MoM applies one memory's to every memory's stream."""
    a = logits.astype(f32).reshape(*logits.shape[:-1], self.num_heads, self.head_dim)
    lb = self.lower_bound
    if lb == 0.0:
      g = jax.nn.log_sigmoid(a)
    else:
      g = jnp.log(lb + (1.0 - lb) * jax.nn.sigmoid(a))
    return GateOut(g, keys=(1.0 - lb) * jax.nn.sigmoid(-a))

  def __call__(self, x: jax.Array) -> GateOut:
    """x [..., D] -> GateOut(g [..., H, K] <= 0, keys k [..., H, K] in (0, 1]), float32."""
    return self.activate(self.project(x))


def shift_tokens(x: jax.Array, previous: jax.Array | None = None,
                 segment_ids: jax.Array | None = None) -> jax.Array:
  """The previous token of every position: x [B, T, D] -> x_{t-1} [B, T, D].

  Token 0 reads `previous` [B, D] (zeros when None); the first token of every
  later packed document reads zeros (no token sees another document).
  """
  first = jnp.zeros_like(x[:, :1]) if previous is None else previous[:, None].astype(x.dtype)
  shifted = jnp.concatenate([first, x[:, :-1]], axis=1)
  if segment_ids is not None:
    shifted = jnp.where(documents.document_starts(segment_ids)[..., None], 0, shifted)
  return shifted


class RWKV6TokenShift(nnx.Module):
  """RWKV6's data-dependent token-shift interpolation (ddlerp) into n mixes.

  With delta = x_{t-1} - x_t:
    z    = tanh(W1 (x + delta * mu_x))               [.., n, R]  (one W1 block per mix)
    mu_n = bias_n + W2_n z_n                          [.., D]
    x_n  = x + delta * mu_n                           n = 0 .. num_mixes - 1
  (bias_n the static part of each mix's lerp, starting uniform in [0, 1); mu_x
  the static lerp of the shared input).
  """

  def __init__(self, d_model: int, *, num_mixes: int = 5, low_rank: int = 32,
               rngs: nnx.Rngs, dtype: jnp.dtype = f32, param_dtype: jnp.dtype = f32) -> None:
    self.d_model, self.num_mixes, self.low_rank = d_model, num_mixes, low_rank
    self.mu_x = nnx.Param(jax.random.uniform(rngs.params(), (d_model,), param_dtype))
    self.down = _linear(d_model, num_mixes * low_rank, use_bias=False, rngs=rngs, dtype=dtype,
                        param_dtype=param_dtype)
    self.up = nnx.Param(0.01 * jax.random.normal(rngs.params(), (num_mixes, low_rank, d_model),
                                                 param_dtype))
    self.bias = nnx.Param(jax.random.uniform(rngs.params(), (num_mixes, d_model), param_dtype))

  def __call__(self, x: jax.Array, x_prev: jax.Array) -> jax.Array:
    """x, x_prev [..., D] -> the n mixed inputs [n, ..., D] (x's dtype)."""
    delta = x_prev - x
    z = jnp.tanh(self.down(x + delta * self.mu_x[...].astype(x.dtype)).astype(f32))
    z = z.reshape(*x.shape[:-1], self.num_mixes, self.low_rank)
    mu = jnp.einsum("...nr,nrd->n...d", z, self.up[...].astype(f32))
    lead = (1,) * (x.ndim - 1)
    mu = mu + self.bias[...].astype(f32).reshape(
        self.num_mixes, *lead, self.d_model)
    return (x.astype(f32) + delta.astype(f32) * mu).astype(x.dtype)


class RWKV6Decay(nnx.Module):
  """RWKV6's per-key decay: g = -exp(b + W2 tanh(W1 x)) (<= 0).

  The bias b starts at the RWKV schedule spanning [-6, -1] over the key dims
  (decays from exp(-e^-6) ~ 0.998 to exp(-e^-1) ~ 0.69); W2 starts at zero.
  """

  def __init__(self, in_features: int, num_heads: int, head_dim: int, *,
               low_rank: int = 64, rngs: nnx.Rngs, dtype: jnp.dtype = f32,
               param_dtype: jnp.dtype = f32) -> None:
    self.num_heads, self.head_dim = num_heads, head_dim
    self.down = _linear(in_features, low_rank, use_bias=False, rngs=rngs, dtype=dtype,
                        param_dtype=param_dtype)
    self.up = _linear(low_rank, num_heads * head_dim, use_bias=False, rngs=rngs, dtype=dtype,
                      param_dtype=param_dtype, kernel_init=nnx.initializers.zeros_init())
    ramp = jnp.linspace(0.0, 1.0, head_dim, dtype=f32) ** 1.5
    self.bias = nnx.Param(jnp.tile(-6.0 + 5.0 * ramp, num_heads).astype(param_dtype))

  def __call__(self, x: jax.Array) -> GateOut:
    """x [..., D] (the decay's token-shift mix) -> GateOut(g [..., H, K] float32 <= 0)."""
    w = self.up(jnp.tanh(self.down(x))).astype(f32) + self.bias[...].astype(f32)
    return GateOut(-jnp.exp(w).reshape(*x.shape[:-1], self.num_heads, self.head_dim))


class FixedDecay(nnx.Module):
  """A data-independent decay per head (Lightning, Retention): g [..., H] = log_decay."""

  def __init__(self, log_decay: np.ndarray) -> None:
    self.log_decay = tuple(float(a) for a in log_decay)   # static: no parameter

  def __call__(self, x: jax.Array) -> GateOut:
    """x [..., D] -> GateOut(g [..., H] float32 <= 0, the same for every token)."""
    decay = jnp.asarray(self.log_decay, f32)
    return GateOut(jnp.broadcast_to(decay, (*x.shape[:-1], decay.shape[0])))


class NoGate(nnx.Module):
  """No decay (basic linear attention, Based, DeltaNet): GateOut(None)."""

  def __call__(self, x: jax.Array) -> GateOut:
    del x
    return GateOut(None)


# ------------------------------------------------------------------ registry
@dataclasses.dataclass(frozen=True)
class GateContext:
  """What a gate's builder may use: the layer's sizes, its place in the stack, the
  layer's gate options (`LinearAttention`'s gate keyword arguments) and dtypes."""
  d_model: int
  num_heads: int
  key_dim: int
  layer_index: int
  num_layers: int
  options: Mapping[str, Any]
  rngs: nnx.Rngs
  dtype: Any = f32
  param_dtype: Any = f32

  @property
  def dtypes(self) -> dict[str, Any]:
    return {"dtype": self.dtype, "param_dtype": self.param_dtype}


@dataclasses.dataclass(frozen=True)
class GateSpec:
  """One gate of `GATES`: `build(context) -> module` with `module(x [..., D]) -> GateOut`."""
  build: Callable[[GateContext], nnx.Module]
  per_key: bool = False          # g has a key axis [..., H, K] (else [..., H] or None)
  gives_keys: bool = False       # GateOut.keys replaces the key projection (HGRN2)
  per_depth: bool = False        # its constants depend on the layer's place in the stack
                                 # (Lightning's decay): blocks differ, so no layer scan
  convolved: bool = False        # with the layer's short conv, the gate's logits
                                 # (module.project(x) [..., module.logit_features]) run
                                 # through a conv of their own, no activation, before
                                 # module.activate (parameter-free): HGRN2's key 1 - f then
                                 # sees the previous tokens, as its q and v do


GATES: dict[str, GateSpec] = {
    "none": GateSpec(lambda c: NoGate()),
    "lightning": GateSpec(lambda c: FixedDecay(
        lightning_log_decay(c.num_heads, c.layer_index, c.num_layers)), per_depth=True),
    "retention": GateSpec(lambda c: FixedDecay(retention_log_decay(c.num_heads))),
    "gla": GateSpec(lambda c: LowRankLogSigmoidGate(
        c.d_model, c.num_heads, c.key_dim, low_rank=c.options.get("gate_low_rank", 16),
        normalizer=c.options.get("gate_normalizer", 16.0), rngs=c.rngs, **c.dtypes),
        per_key=True),
    "mamba2": GateSpec(lambda c: Mamba2Decay(
        c.d_model, c.num_heads, rngs=c.rngs, **c.dtypes,
        **{k: c.options[k] for k in MAMBA2_DECAY_OPTIONS if k in c.options})),
    "hgrn2": GateSpec(lambda c: HGRN2Gate(
        c.d_model, c.num_heads, c.key_dim, lower_bound=c.options.get("forget_lower_bound"),
        rngs=c.rngs, **c.dtypes), per_key=True, gives_keys=True, convolved=True),
    "rwkv6": GateSpec(lambda c: RWKV6Decay(
        c.d_model, c.num_heads, c.key_dim, low_rank=c.options.get("rwkv_decay_rank", 64),
        rngs=c.rngs, **c.dtypes), per_key=True),
}


def register_gate(name: str, spec: GateSpec) -> None:
  """Adds gate `name` to GATES (a variant row may then name it); an existing name raises."""
  validation.require(name not in GATES, "gate name", name, f"a new name, not one of {tuple(GATES)}")
  GATES[name] = spec


def gate_spec(name: str) -> GateSpec:
  """GATES[name], or a ValueError listing the registered gates."""
  return GATES[validation.choice("gate", name, tuple(GATES))]
