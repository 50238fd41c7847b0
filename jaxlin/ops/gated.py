"""Diagonal-gated linear attention: the G family.

Per head, with state S in R^{K x V} and log-space gate g <= 0:

    S_t = Diag(exp(g_t)) S_{t-1} + k_t v_t^T          o_t = scale * S_t^T q_t

g is absent (basic linear attention), one scalar per head and token
(Lightning, Retention, Mamba2/SSD, simple GLA) or one value per key dim (GLA,
HGRN2, RWKV6). With the RWKV6 `bonus` u in R^{H x K} the output reads the
previous state plus a boosted current token:

    o_t = scale * (S_{t-1} + Diag(u) k_t v_t^T)^T q_t

Chunked form (chunk length C, cumulative gate b_i = sum_{s<=i} g_s inside a
chunk, state S_0 entering it, b^q = b, or b - g with a bonus):

    o_i   = (q_i * exp(b^q_i))^T S_0 + sum_{j<=i} (q_i * exp(b^q_i - b_j)) . k_j v_j
    S_end = Diag(exp(b_C)) S_0 + sum_j (k_j * exp(b_C - b_j)) v_j^T

Every exponent above is <= 0 (b decreases), so nothing overflows. For per-key
gates the in-chunk scores sum over K inside the exp and cannot be one matmul
in general; `gated_terms` picks, at run time, the cheapest of three exact
forms that the observed gate span allows (midpoint factorisation over the
chunk, over 16-token sub-chunks, or a masked [16, 16, K] exponent). The
kernel path is `gated_pallas`; `gated_span_summary` gives a span's affine
effect on the state (`jaxlin.ops.span`).

Legend: B batch, T time, H heads, K key dim, V value dim; chunked tensors are
[B, H, N, C, D] (N chunks of length C).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlin.ops import arguments
from jaxlin.ops import chunking
from jaxlin.ops import gated_pallas
from jaxlin.ops import gated_terms
from jaxlin.ops import reference
from jaxlin.ops import span
from pallas_kernels import dispatch

f32 = jnp.float32


def gated_linear_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array | None = None,
    *,
    bonus: jax.Array | None = None,
    scale: float | None = None,
    initial_state: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    impl: str = "auto",
    kernel: dispatch.KernelOptions | None = None,
) -> tuple[jax.Array, jax.Array | None]:
  """Diagonal-gated linear attention over a sequence (see module docstring).

  Args:
    q, k: [B, T, H, K] queries and keys.
    v: [B, T, H, V] values.
    g: optional log-space gate (<= 0): [B, T, H] scalar or [B, T, H, K] per key.
    bonus: optional RWKV6 bonus u, [H, K].
    scale: query scale, default K**-0.5.
    initial_state: optional [B, H, K, V] state before the first token.
    segment_ids: optional [B, T] integer ids of packed documents; the state
      resets wherever the id changes and no token sees another document.
    output_final_state: return the [B, H, K, V] float32 state after the last token.
    chunk_size: chunk length of the chunked form, a multiple of 16 in [16, 256].
    impl: "reference" (token-by-token float32 scan), "xla" (chunked), "pallas"
      (the Pallas kernel where it supports the call, else "xla") or "auto"
      (the kernel on GPU/TPU where supported, else "xla").
    kernel: options of the Pallas path (platform, interpreter, block sizes).
  Returns:
    (o [B, T, H, V] in v's dtype, final_state or None).
  """
  batch, time, heads, key_dim, value_dim = arguments.check_qkv(q, k, v)
  arguments.check_gate(g, (batch, time, heads), key_dim, allow_vector=True)
  arguments.check_shape("bonus", bonus, (heads, key_dim), "[H,K]")
  arguments.check_shape("initial_state", initial_state,
                        (batch, heads, key_dim, value_dim), "[B,H,K,V]")
  arguments.check_segment_ids(segment_ids, batch, time)
  arguments.check_chunk_size(chunk_size)
  impl = arguments.check_impl(impl)

  scale = key_dim ** -0.5 if scale is None else scale
  q = q.astype(f32) * scale
  k, v32 = k.astype(f32), v.astype(f32)
  g = None if g is None else g.astype(f32)
  bonus = None if bonus is None else bonus.astype(f32)
  initial_state = arguments.state_or_zeros(initial_state, (batch, heads, key_dim, value_dim))

  if impl == "reference":
    step = lambda state, *xs: _step(*xs, bonus, state)
    o, final = reference.scan_tokens(step, initial_state, (q, k, v32, g), segment_ids)
  else:
    supports = lambda platform: dispatch.supports_dims(platform, key_dim, value_dim, v.dtype)
    platform = dispatch.kernel_platform(impl, kernel, supports)
    if platform is None:
      o, final = _chunked(q, k, v32, g, bonus, initial_state, segment_ids,
                          chunking.chunk_length(time, chunk_size))
    else:
      o, final = gated_pallas.chunked(
          q, k, v32, g, bonus, initial_state, segment_ids, matmul_dtype=v.dtype,
          platform=platform, options=kernel or dispatch.KernelOptions())
  return o.astype(v.dtype), (final if output_final_state else None)


def gated_span_summary(
    k: jax.Array,
    v: jax.Array,
    g: jax.Array | None = None,
    *,
    bonus: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    chunk_size: int = 64,
    impl: str = "xla",
    kernel: dispatch.KernelOptions | None = None,
) -> span.SpanSummary:
  """The span's affine effect on the state, S_end = M S_start + N (`jaxlin.ops.span`).

  M = Diag(exp(sum_t g_t)) over the span (no gate: the identity; a scalar gate is
  broadcast over K), 0 when a document starts inside the span; N = the span's final state
  from zero (this op with `impl`). The bonus does not touch the state.

  Args: k [B, T, H, K]; v [B, T, H, V]; g None, [B, T, H] or [B, T, H, K]; as the op.
  Returns: SpanSummary(M [B, H, K] float32, N [B, H, K, V] float32).
  """
  del bonus
  batch, _, heads, key_dim = k.shape
  _, final = gated_linear_attention(jnp.zeros_like(k), k, v, g, segment_ids=segment_ids,
                                    output_final_state=True, chunk_size=chunk_size, impl=impl,
                                    kernel=kernel)
  if g is None:
    total = jnp.zeros((batch, heads, key_dim), f32)
  else:
    total = jnp.sum(g.astype(f32), axis=1)
    total = jnp.broadcast_to(total[..., None] if g.ndim == 3 else total,
                             (batch, heads, key_dim))
  keep = span.no_reset_inside(segment_ids, batch)[:, None, None]
  return span.SpanSummary(jnp.exp(total) * keep, final)


def gated_linear_attention_step(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array | None = None,
    *,
    state: jax.Array,
    bonus: jax.Array | None = None,
    scale: float | None = None,
) -> tuple[jax.Array, jax.Array]:
  """One decoding step of `gated_linear_attention`.

  Args:
    q, k: [B, H, K]; v: [B, H, V]; g: None, [B, H] or [B, H, K] (<= 0).
    state: [B, H, K, V] state before this token.
    bonus: optional [H, K]; scale: default K**-0.5.
  Returns:
    (o [B, H, V] in v's dtype, new float32 state [B, H, K, V]).
  """
  batch, heads, key_dim, value_dim = arguments.check_qkv(q, k, v, step=True)
  arguments.check_gate(g, (batch, heads), key_dim, allow_vector=True)
  arguments.check_shape("bonus", bonus, (heads, key_dim), "[H,K]")
  arguments.check_shape("state", state, (batch, heads, key_dim, value_dim), "[B,H,K,V]")
  scale = key_dim ** -0.5 if scale is None else scale
  o, new_state = _step(q.astype(f32) * scale, k.astype(f32), v.astype(f32),
                       None if g is None else g.astype(f32),
                       None if bonus is None else bonus.astype(f32),
                       state.astype(f32))
  return o.astype(v.dtype), new_state


def _step(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array | None,
          bonus: jax.Array | None, state: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Float32 step on [B, H, *] (q already scaled): returns (o, new state)."""
  if bonus is not None:
    o = (jnp.einsum("bhk,bhkv->bhv", q, state)
         + jnp.sum(q * bonus * k, axis=-1)[..., None] * v)
  if g is not None:
    state = state * jnp.exp(g)[..., None] if g.ndim == 3 else (
        state * jnp.exp(g)[..., None, None])
  state = state + k[..., :, None] * v[..., None, :]
  if bonus is None:
    o = jnp.einsum("bhk,bhkv->bhv", q, state)
  return o, state


def _chunked(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array | None,
             bonus: jax.Array | None, initial_state: jax.Array,
             segment_ids: jax.Array | None, chunk: int) -> tuple[jax.Array, jax.Array]:
  """The chunked form: in-chunk terms in parallel, one scan over chunk states."""
  terms = gated_terms.chunk_terms(q, k, v, g, bonus, segment_ids, chunk)
  updates = jnp.einsum("bhnck,bhncv->bhnkv", terms.k_out, terms.values)
  states, final = chunking.scan_chunk_states(terms.decay, updates, initial_state)
  o = (jnp.einsum("bhnij,bhnjv->bhniv", terms.scores, terms.values)
       + jnp.einsum("bhnck,bhnkv->bhncv", terms.q_in, states))
  return chunking.from_chunks(o, q.shape[1]), final
