"""Softmax attention token mixer (the N layer): RoPE, GQA, causal, sliding window, packed documents.

    q = rope(norm_q(x W_q + b_q)), k = rope(norm_k(x W_k + b_k)), v = x W_v + b_v
                            (norms only with qk_norm; biases only with qkv_bias, as Qwen2)
    o_t = sum_{s visible from t} softmax_s(<q_t, k_s> / sqrt(D)) v_s   (GQA: head h reads kv
          head h // (H / Hkv)),  visible: s <= t, s > t - window, same document
    y = concat_h(o) W_o [+ b_o with out_bias]

RoPE positions restart at 0 at every document (a document is a maximal run of equal
`segment_ids`; a later document may reuse an id) and, with a cache, continue from the number of
tokens the cache has seen. The attention itself is `jaxlin.ops.dot_product_attention` (`impl`).

Cache (`init_cache`): {"keys", "values": [B, L, Hkv, D] in `dtype` (after RoPE), "length": int32
scalar, the tokens seen}. Without a window L = max_length and token p sits in slot p. With a
window L = window: a ring buffer, token p in slot p % window, so memory stays bounded. A call of
T new tokens attends over the cache plus its own keys (the ring's slot positions are derived from
"length"; empty slots carry a far-future position that the causal mask hides), then writes the
new keys. Prefill of any length followed by decode equals the full forward.

`rope_scaling` is a checkpoint's context-extension rule (`jaxlin.layers.rope`: linear, llama3);
`lora` puts low-rank adapters on some projections (`jaxlin.layers.lora`).

Legend: B batch, T time, d d_model, H query heads, Hkv key/value heads, D head dim, L cache slots.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlin import validation
from jaxlin.layers.base import Cache, MixerOutput
from jaxlin.layers.lora import LoRASpec, projection
from jaxlin.layers.norm import RMSNorm
from jaxlin.layers.rope import apply_rope, check_scaling
from jaxlin.ops import documents
from jaxlin.ops.attention import IMPLS, dot_product_attention
from jaxlin.ops import lasp2

f32 = jnp.float32
EMPTY_SLOT = 2 ** 30  # position given to never-written ring slots: after every query


def _divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


def document_positions(segment_ids: jax.Array) -> jax.Array:
  """[B, T] int32 position of each token inside its document (0 at every document start)."""
  t = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)
  start = jax.lax.cummax(jnp.where(documents.document_starts(segment_ids), t, 0), axis=1)
  return t - start


def ring_positions(length: jax.Array, slots: int) -> jax.Array:
  """[slots] int32: the position held by each ring slot after `length` tokens (EMPTY_SLOT if none).

  Slot i holds the latest p < length with p % slots == i, i.e. p = length-1 - ((length-1-i) % slots).
  """
  i = jnp.arange(slots, dtype=jnp.int32)
  p = length - 1 - jnp.remainder(length - 1 - i, slots)
  return jnp.where(p >= 0, p, EMPTY_SLOT).astype(jnp.int32)


class SoftmaxAttention(nnx.Module):
  """Multi-head softmax attention with RoPE, GQA, optional sliding window and QK RMSNorm.

  y = softmax(mask(rope(q) rope(k)^T / sqrt(D))) v W_o per head; see the module docstring.
  Projection weights are drawn from N(0, init_std^2); biases (qkv_bias, out_bias) start at 0.
  Implements the token-mixer contract of `jaxlin.layers.base` (aux is empty).
  """

  def __init__(self, d_model: int, num_heads: int, *, num_kv_heads: int | None = None,
               head_dim: int | None = None, rope_theta: float = 10000.0,
               window: int | None = None, qk_norm: bool = False, impl: str = "auto",
               qkv_bias: bool = False, out_bias: bool = False,
               rope_scaling: Mapping[str, Any] | None = None, lora: LoRASpec | None = None,
               init_std: float = 0.02, dtype: jnp.dtype = f32, param_dtype: jnp.dtype = f32,
               rngs: nnx.Rngs) -> None:
    validation.positive_int("d_model", d_model)
    validation.positive_int("num_heads", num_heads)
    if head_dim is None:
      if d_model % num_heads:
        raise ValueError(f"num_heads: got {num_heads}, which does not divide d_model={d_model}; "
                         f"allowed: {_divisors(d_model)} (or pass head_dim)")
      head_dim = d_model // num_heads
    if not isinstance(head_dim, int) or head_dim < 2 or head_dim % 2:
      raise ValueError(f"head_dim: got {head_dim!r}; expected a positive even int (RoPE pairs "
                       "dimension j with j + head_dim/2)")
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if not isinstance(num_kv_heads, int) or num_kv_heads < 1 or num_heads % num_kv_heads:
      raise ValueError(f"num_kv_heads: got {num_kv_heads!r}; expected a divisor of "
                       f"num_heads={num_heads}, allowed: {_divisors(num_heads)}")
    validation.positive_int("window", window, optional=True)
    validation.choice("impl", impl, IMPLS)
    validation.non_negative("init_std", init_std)
    check_scaling(rope_scaling)
    self.rope_scaling = None if not rope_scaling else dict(rope_scaling)
    self.d_model, self.num_heads, self.num_kv_heads = d_model, num_heads, num_kv_heads
    self.head_dim, self.rope_theta, self.window = head_dim, float(rope_theta), window
    self.impl, self.dtype = impl, dtype
    linear = dict(lora=lora, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                  kernel_init=jax.nn.initializers.normal(init_std))
    q_width, kv_width = num_heads * head_dim, num_kv_heads * head_dim
    self.q_proj = projection("q_proj", d_model, q_width, use_bias=qkv_bias, **linear)
    self.k_proj = projection("k_proj", d_model, kv_width, use_bias=qkv_bias, **linear)
    self.v_proj = projection("v_proj", d_model, kv_width, use_bias=qkv_bias, **linear)
    self.o_proj = projection("o_proj", q_width, d_model, use_bias=out_bias, **linear)
    self.q_norm = RMSNorm(head_dim, param_dtype=param_dtype) if qk_norm else None
    self.k_norm = RMSNorm(head_dim, param_dtype=param_dtype) if qk_norm else None

  def init_cache(self, batch_size: int, max_length: int) -> Cache:
    """Empty KV cache: [B, L, Hkv, D] keys and values (L = window or max_length), length 0."""
    validation.positive_int("batch_size", batch_size)
    validation.positive_int("max_length", max_length)
    slots = self.window if self.window is not None else max_length
    shape = (batch_size, slots, self.num_kv_heads, self.head_dim)
    return {"keys": jnp.zeros(shape, self.dtype), "values": jnp.zeros(shape, self.dtype),
            "length": jnp.zeros((), jnp.int32)}

  def _project(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q [B,T,H,D], k, v [B,T,Hkv,D] before RoPE (q, k normalised when qk_norm)."""
    B, T, _ = x.shape
    q = self.q_proj(x).reshape(B, T, self.num_heads, self.head_dim)
    k = self.k_proj(x).reshape(B, T, self.num_kv_heads, self.head_dim)
    v = self.v_proj(x).reshape(B, T, self.num_kv_heads, self.head_dim)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    return q, k, v

  def _check_call(self, x: jax.Array, segment_ids: jax.Array | None, cache: Cache | None) -> None:
    if x.ndim != 3 or x.shape[-1] != self.d_model:
      raise ValueError(f"x: got shape {tuple(x.shape)} dtype {x.dtype}; expected [B,T,d] with "
                       f"d = d_model = {self.d_model}")
    if segment_ids is not None:
      if cache is not None:
        raise ValueError("segment_ids: got segment ids together with a cache; a cache holds one "
                         "sequence per batch row, expected segment_ids=None")
      if tuple(segment_ids.shape) != tuple(x.shape[:2]) or not jnp.issubdtype(
          segment_ids.dtype, jnp.integer):
        raise ValueError(f"segment_ids: got shape {tuple(segment_ids.shape)} dtype "
                         f"{segment_ids.dtype}; expected integer [B,T] = {tuple(x.shape[:2])}")
    if cache is not None:
      want = (x.shape[0], self.num_kv_heads, self.head_dim)
      keys = cache.get("keys")
      if keys is None or (keys.shape[0], *keys.shape[2:]) != want or "length" not in cache:
        raise ValueError(f"cache: got {jax.tree.map(jnp.shape, cache)}; expected the dict of "
                         f"init_cache({x.shape[0]}, max_length): keys/values [B,L,Hkv,D] with "
                         f"B, Hkv, D = {want}, and length")
      if self.window is not None and keys.shape[1] != self.window:
        raise ValueError(f"cache: got {keys.shape[1]} key slots; expected a ring buffer of "
                         f"window = {self.window} slots (from this layer's init_cache)")
      if self.window is None:
        try:
          seen = int(np.asarray(cache["length"]))
        except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
          return  # under jit the length is not known here
        if seen + x.shape[1] > keys.shape[1]:
          raise ValueError(f"cache: holds {keys.shape[1]} tokens (max_length), has seen {seen}; "
                           f"got {x.shape[1]} more. Expected length + T <= max_length")

  def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None = None,
               cache: Cache | None = None) -> MixerOutput:
    """x [B,T,d] -> MixerOutput(y [B,T,d], updated cache or None, aux={})."""
    self._check_call(x, segment_ids, cache)
    B, T, _ = x.shape
    x = x.astype(self.dtype)
    q, k, v = self._project(x)
    o, new_cache = self.attend(q, k, v, segment_ids=segment_ids, cache=cache)
    y = self.o_proj(o.reshape(B, T, self.num_heads * self.head_dim))
    return MixerOutput(y, new_cache, {})

  def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, *,
             segment_ids: jax.Array | None = None,
             cache: Cache | None = None) -> tuple[jax.Array, Cache | None]:
    """Softmax attention of projected q [B,T,H,D], k, v [B,T,Hkv,D] before RoPE (RoPE, mask,
    cache here) -> (o [B,T,H,D], updated cache or None)."""
    if cache is not None:
      return self._attend_with_cache(q, k, v, cache)
    B, T = q.shape[:2]
    if segment_ids is None:
      pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
      docs = None
    else:
      pos, docs = document_positions(segment_ids), documents.document_index(segment_ids)
    q = apply_rope(q, pos, theta=self.rope_theta, scaling=self.rope_scaling)
    k = apply_rope(k, pos, theta=self.rope_theta, scaling=self.rope_scaling)
    # LASP-2H when the active mesh splits the sequence (K, V gathered); one device otherwise
    o = lasp2.sequence_attention(q, k, v, window=self.window, document_ids=docs, impl=self.impl)
    return o, None

  def _attend_with_cache(self, q: jax.Array, k: jax.Array, v: jax.Array,
                         cache: Cache) -> tuple[jax.Array, Cache]:
    """Attention of T new tokens over the cache and themselves; returns (o, updated cache)."""
    B, T = q.shape[:2]
    n = cache["length"].astype(jnp.int32)
    pos = n + jnp.arange(T, dtype=jnp.int32)                            # [T]
    q = apply_rope(q, jnp.broadcast_to(pos, (B, T)), theta=self.rope_theta,
                   scaling=self.rope_scaling)
    k = apply_rope(k, jnp.broadcast_to(pos, (B, T)), theta=self.rope_theta,
                   scaling=self.rope_scaling)
    k, v = k.astype(cache["keys"].dtype), v.astype(cache["values"].dtype)
    slots = cache["keys"].shape[1]
    if self.window is None:
      keys = jax.lax.dynamic_update_slice(cache["keys"], k, (0, n, 0, 0))
      values = jax.lax.dynamic_update_slice(cache["values"], v, (0, n, 0, 0))
      o = dot_product_attention(q, keys, values, causal=True, q_positions=pos,
                                kv_positions=jnp.arange(slots, dtype=jnp.int32), impl=self.impl)
    else:
      kv_pos = jnp.concatenate([ring_positions(n, slots), pos])         # [L + T]
      o = dot_product_attention(
          q, jnp.concatenate([cache["keys"], k], axis=1),
          jnp.concatenate([cache["values"], v], axis=1), causal=True, window=self.window,
          q_positions=pos, kv_positions=kv_pos, impl=self.impl)
      m = min(T, slots)                 # only the last `slots` new tokens survive in the ring
      where = jnp.remainder(pos[T - m:], slots)                        # distinct slots
      keys = cache["keys"].at[:, where].set(k[:, T - m:])
      values = cache["values"].at[:, where].set(v[:, T - m:])
    return o, {"keys": keys, "values": values, "length": n + T}
