"""The (gated) delta rule: the D family.

Per head, with state S in R^{K x V}, log-space scalar gate g <= 0, write
strength beta, removal strength b and removal key p:

    S_t = exp(g_t) (I - b_t k_t p_t^T) S_{t-1} + beta_t k_t v_t^T     o_t = scale * S_t^T q_t

p defaults to k and b to beta. DeltaNet: g = 0. Gated DeltaNet: scalar g.
Comba: b = beta~/alpha (paper) or p = k * sigmoid(c) with b = beta (fla).

Chunked form (UT transform). Inside a chunk with incoming state S_0, cumulative
gate b^g_i = sum_{s<=i} g_s and Gamma_i = exp(b^g_i), the state is
S_i = Gamma_i S_0 + sum_{j<=i} exp(b^g_i - b^g_j) k_j w_j^T, where the written
rows w solve a unit lower-triangular system

    (I + L) W = diag(beta) V - diag(b Gamma) P S_0,
    L_ij = b_i exp(b^g_i - b^g_j) (p_i . k_j)   for j < i.

So W = U - W_k S_0 with U = (I+L)^{-1} diag(beta) V and
W_k = (I+L)^{-1} diag(b Gamma) P (one triangular inverse per chunk), and

    O     = (diag(Gamma) Q - A W_k) S_0 + A U,    A_ij = exp(b^g_i - b^g_j) (q_i . k_j), j <= i
    S_end = (Gamma_C I - K~^T W_k) S_0 + K~^T U,  K~_j = exp(b^g_C - b^g_j) k_j

The chunks are joined by S_{n+1} = M_n S_n + N_n, M_n = Gamma_C I - K~^T W_k
(a K x K matrix per chunk), the only sequential part. The in-chunk terms are
`delta_terms`, the kernel path `delta_pallas`; `delta_span_summary` composes the
M_n of a span (`jaxlin.ops.span`).

Legend: B batch, T time, H heads, K key dim, V value dim; chunked tensors are
[B, H, N, C, D] (N chunks of length C).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlin.ops import arguments
from jaxlin.ops import chunking
from jaxlin.ops import delta_pallas
from jaxlin.ops import delta_terms
from jaxlin.ops import reference
from jaxlin.ops import span
from pallas_kernels import dispatch

f32 = jnp.float32


def delta_rule(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    beta: jax.Array,
    g: jax.Array | None = None,
    *,
    removal_key: jax.Array | None = None,
    removal: jax.Array | None = None,
    scale: float | None = None,
    initial_state: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    impl: str = "auto",
    kernel: dispatch.KernelOptions | None = None,
) -> tuple[jax.Array, jax.Array | None]:
  """The gated delta rule over a sequence (see module docstring).

  Args:
    q, k: [B, T, H, K] queries and keys (the layer L2-normalises keys).
    v: [B, T, H, V] values.
    beta: [B, T, H] write strength.
    g: optional [B, T, H] log-space scalar gate (<= 0).
    removal_key: optional [B, T, H, K] removal key p (default k).
    removal: optional [B, T, H] removal strength b (default beta).
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
  lead = (batch, time, heads)
  arguments.check_shape("beta", beta, lead, "[B,T,H]")
  arguments.check_gate(g, lead, key_dim, allow_vector=False)
  arguments.check_shape("removal_key", removal_key, q.shape, "[B,T,H,K]")
  arguments.check_shape("removal", removal, lead, "[B,T,H]")
  arguments.check_shape("initial_state", initial_state,
                        (batch, heads, key_dim, value_dim), "[B,H,K,V]")
  arguments.check_segment_ids(segment_ids, batch, time)
  arguments.check_chunk_size(chunk_size)
  impl = arguments.check_impl(impl)

  scale = key_dim ** -0.5 if scale is None else scale
  cast = lambda x: None if x is None else x.astype(f32)
  q = q.astype(f32) * scale
  k, v32, beta, g = cast(k), cast(v), cast(beta), cast(g)
  p = k if removal_key is None else cast(removal_key)
  b = beta if removal is None else cast(removal)
  initial_state = arguments.state_or_zeros(initial_state, (batch, heads, key_dim, value_dim))

  if impl == "reference":
    step = lambda state, *xs: _step(*xs, state)
    o, final = reference.scan_tokens(step, initial_state, (q, k, v32, beta, g, p, b),
                                     segment_ids)
  else:
    supports = lambda platform: dispatch.supports_dims(platform, key_dim, value_dim, v.dtype)
    platform = dispatch.kernel_platform(impl, kernel, supports)
    if platform is None:
      o, final = _chunked(q, k, v32, beta, g, p, b, initial_state, segment_ids,
                          chunking.chunk_length(time, chunk_size))
    else:
      o, final = delta_pallas.chunked(
          q, k, v32, beta, g, p, b, initial_state, segment_ids, matmul_dtype=v.dtype,
          platform=platform, options=kernel or dispatch.KernelOptions())
  return o.astype(v.dtype), (final if output_final_state else None)


def delta_span_summary(
    k: jax.Array,
    v: jax.Array,
    beta: jax.Array,
    g: jax.Array | None = None,
    *,
    removal_key: jax.Array | None = None,
    removal: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    chunk_size: int = 64,
    impl: str = "xla",
    kernel: dispatch.KernelOptions | None = None,
) -> span.SpanSummary:
  """The span's affine effect on the state, S_end = M S_start + N (`jaxlin.ops.span`).

  M = prod_t exp(g_t)(I - b_t k_t p_t^T) (later tokens on the left), composed from the
  chunked form's own per-chunk transitions Gamma_C I - K~^T W_k (`delta_terms`), 0 when a
  document starts inside the span; N = the span's final state from zero (this op with
  `impl`).

  Args: k [B, T, H, K]; v [B, T, H, V]; beta, removal [B, T, H]; g None or [B, T, H];
    removal_key [B, T, H, K]; as the op.
  Returns: SpanSummary(M [B, H, K, K] float32, N [B, H, K, V] float32).
  """
  _, final = delta_rule(jnp.zeros_like(k), k, v, beta, g, removal_key=removal_key,
                        removal=removal, segment_ids=segment_ids, output_final_state=True,
                        chunk_size=chunk_size, impl=impl, kernel=kernel)
  cast = lambda x: None if x is None else x.astype(f32)
  k32, beta32 = cast(k), cast(beta)
  p = k32 if removal_key is None else cast(removal_key)
  b = beta32 if removal is None else cast(removal)
  chunk = chunking.chunk_length(k.shape[1], chunk_size)
  no_values = jnp.zeros(k.shape[:3] + (0,), f32)
  terms = delta_terms.chunk_terms(k32, k32, no_values, beta32, cast(g), p, b, segment_ids, chunk)
  eye = jnp.eye(k.shape[-1], dtype=f32)
  transitions = (terms.decay[..., None, None] * eye
                 - jnp.einsum("bhnck,bhncl->bhnkl", terms.k_out, terms.w_k))
  first = jnp.broadcast_to(eye, transitions.shape[:2] + eye.shape)
  product, _ = jax.lax.scan(lambda m, t: (jnp.einsum("bhkl,bhlm->bhkm", t, m), None),
                            first, jnp.moveaxis(transitions, 2, 0))
  keep = span.no_reset_inside(segment_ids, k.shape[0])[:, None, None, None]
  return span.SpanSummary(product * keep, final)


def delta_rule_step(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    beta: jax.Array,
    g: jax.Array | None = None,
    *,
    state: jax.Array,
    removal_key: jax.Array | None = None,
    removal: jax.Array | None = None,
    scale: float | None = None,
) -> tuple[jax.Array, jax.Array]:
  """One decoding step of `delta_rule`.

  Args:
    q, k: [B, H, K]; v: [B, H, V]; beta: [B, H]; g: None or [B, H] (<= 0).
    state: [B, H, K, V] state before this token.
    removal_key: optional [B, H, K]; removal: optional [B, H]; scale: default K**-0.5.
  Returns:
    (o [B, H, V] in v's dtype, new float32 state [B, H, K, V]).
  """
  batch, heads, key_dim, value_dim = arguments.check_qkv(q, k, v, step=True)
  arguments.check_shape("beta", beta, (batch, heads), "[B,H]")
  arguments.check_gate(g, (batch, heads), key_dim, allow_vector=False)
  arguments.check_shape("removal_key", removal_key, q.shape, "[B,H,K]")
  arguments.check_shape("removal", removal, (batch, heads), "[B,H]")
  arguments.check_shape("state", state, (batch, heads, key_dim, value_dim), "[B,H,K,V]")
  scale = key_dim ** -0.5 if scale is None else scale
  cast = lambda x: None if x is None else x.astype(f32)
  k32 = cast(k)
  p = k32 if removal_key is None else cast(removal_key)
  b = cast(beta) if removal is None else cast(removal)
  o, new_state = _step(q.astype(f32) * scale, k32, cast(v), cast(beta), cast(g),
                       p, b, state.astype(f32))
  return o.astype(v.dtype), new_state


def _step(q: jax.Array, k: jax.Array, v: jax.Array, beta: jax.Array,
          g: jax.Array | None, p: jax.Array, b: jax.Array,
          state: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Float32 step on [B, H, *] (q already scaled): returns (o, new state)."""
  read = jnp.einsum("bhk,bhkv->bhv", p, state)                   # p^T S
  state = state - (b[..., None] * k)[..., :, None] * read[..., None, :]
  if g is not None:
    state = state * jnp.exp(g)[..., None, None]
  state = state + (beta[..., None] * k)[..., :, None] * v[..., None, :]
  return jnp.einsum("bhk,bhkv->bhv", q, state), state


def _chunked(q: jax.Array, k: jax.Array, v: jax.Array, beta: jax.Array,
             g: jax.Array | None, p: jax.Array, b: jax.Array,
             initial_state: jax.Array, segment_ids: jax.Array | None,
             chunk: int) -> tuple[jax.Array, jax.Array]:
  """The chunked UT-transform form: per-chunk K x K transitions, one scan."""
  terms = delta_terms.chunk_terms(q, k, v, beta, g, p, b, segment_ids, chunk)
  value_dim = v.shape[-1]
  u_wk = jnp.concatenate([terms.values, terms.w_k], axis=-1)
  a_u_wk = terms.scores @ u_wk
  q_in = terms.q_in - a_u_wk[..., value_dim:]                     # Gamma Q - A W_k
  kt_u_wk = jnp.einsum("bhnck,bhncx->bhnkx", terms.k_out, u_wk)
  updates = kt_u_wk[..., :value_dim]                              # K~^T U
  transition = (terms.decay[..., None, None] * jnp.eye(q.shape[-1], dtype=f32)
                - kt_u_wk[..., value_dim:])                       # Gamma_C I - K~^T W_k
  states, final = _scan_transitions(transition, updates, initial_state)
  o = jnp.einsum("bhnck,bhnkv->bhncv", q_in, states) + a_u_wk[..., :value_dim]
  return chunking.from_chunks(o, q.shape[1]), final


def _scan_transitions(transition: jax.Array, update: jax.Array,
                      initial: jax.Array) -> tuple[jax.Array, jax.Array]:
  """S_{n+1} = M_n S_n + N_n over chunks; M [B,H,N,K,K], N [B,H,N,K,V].

  Returns (the state before each chunk [B, H, N, K, V], the final state).
  """
  def body(state, xs):
    m, n = xs
    return jnp.einsum("bhkl,bhlv->bhkv", m, state) + n, state

  final, states = jax.lax.scan(
      body, initial, (jnp.moveaxis(transition, 2, 0), jnp.moveaxis(update, 2, 0)))
  return jnp.moveaxis(states, 0, 2), final
