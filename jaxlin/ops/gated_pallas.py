"""The kernel adapter of `jaxlin.ops.gated_linear_attention` (the G family): its Pallas path.

On GPU, every gate kind and every K runs the kernels of
`pallas_kernels.fused_terms`, which form the in-chunk terms themselves (exactly,
by 16-token blocks, for strong per-key gates). The RWKV6 bonus runs them too,
through a shift of the queries (`_fused_terms_with_bonus`). On TPU (and with
`KernelOptions(fused_terms=False)`) the call forms the in-chunk terms in XLA with
`jaxlin.ops.gated_terms.chunk_terms`, and the chunk-recurrence kernel runs the
inter-chunk recurrence with the state on chip and writes the outputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlin.ops import chunking
from jaxlin.ops import documents
from jaxlin.ops import gated_terms
from jaxlin.ops.row_layout import RowLayout
from pallas_kernels import dispatch
from pallas_kernels.block_sizes import BlockSizes
from pallas_kernels.chunk_recurrence.terms import run_terms
from pallas_kernels.fused_terms import gated_chunks

f32 = jnp.float32


def chunked(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array | None,
            bonus: jax.Array | None, initial_state: jax.Array,
            segment_ids: jax.Array | None, *, matmul_dtype: jnp.dtype, platform: str,
            options: dispatch.KernelOptions) -> tuple[jax.Array, jax.Array]:
  """The G recurrence through the kernel; arguments as `gated._chunked` (float32,
  q scaled). Returns (o [B, T, H, V] in `matmul_dtype`, final state [B, H, K, V])."""
  time = q.shape[1]
  if options.fused_terms and dispatch.uses_fused_terms(platform, q.shape[-1]):
    if bonus is not None:
      return _fused_terms_with_bonus(q, k, v, g, bonus, initial_state, segment_ids,
                                     matmul_dtype=matmul_dtype, options=options)
    return _fused_terms(q, k, v, g, initial_state, segment_ids, matmul_dtype=matmul_dtype,
                        options=options)
  terms = gated_terms.chunk_terms(q, k, v, g, bonus, segment_ids, dispatch.kernel_chunk(time))
  o, final = run_terms(terms.q_in, terms.k_out, terms.scores, terms.values, None,
                       terms.decay, initial_state, matmul_dtype=matmul_dtype,
                       platform=platform, options=options)
  return chunking.from_chunks(o, time), final


def _fused_terms_with_bonus(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array | None,
                            bonus: jax.Array, initial_state: jax.Array,
                            segment_ids: jax.Array | None, *, matmul_dtype: jnp.dtype,
                            options: dispatch.KernelOptions) -> tuple[jax.Array, jax.Array]:
  """`chunked` with the RWKV6 bonus u, through the kernels of the plain recurrence.

  RWKV6 reads the state before the token, o_t = S_{t-1}^T q_t + (q_t . u o k_t) v_t; the
  plain recurrence reads it after, o'_s = S_s^T q'_s, with the same states S. Fed the
  queries one token ahead, q'_s = q_{s+1}, it gives o'_{t-1} = S_{t-1}^T q_t, so

      o_t = o'_{t-1} + (q_t . u o k_t) v_t        (t > 0, t not a document start)
      o_0 = S_init^T q_0 + (q_0 . u o k_0) v_0     (the state entering the sequence)

  and at a document start the state term is 0 (the state was reset). The final state is
  the plain recurrence's. Every gradient follows by autodiff of these XLA steps around the
  kernels' own VJP.
  """
  q_ahead = jnp.concatenate([q[:, 1:], jnp.zeros_like(q[:, :1])], axis=1)
  o_ahead, final = _fused_terms(q_ahead, k, v, g, initial_state, segment_ids,
                                matmul_dtype=matmul_dtype, options=options)
  first = jnp.einsum("bhk,bhkv->bhv", q[:, 0], initial_state)
  o_state = jnp.concatenate([first[:, None], o_ahead[:, :-1].astype(f32)], axis=1)
  if segment_ids is not None:
    o_state = jnp.where(documents.document_starts(segment_ids)[:, :, None, None], 0.0, o_state)
  boosted = jnp.sum(q * bonus * k, axis=-1)                                  # [B, T, H]
  return (o_state + boosted[..., None] * v).astype(matmul_dtype), final


def _fused_terms(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array | None,
                 initial_state: jax.Array, segment_ids: jax.Array | None, *,
                 matmul_dtype: jnp.dtype,
                 options: dispatch.KernelOptions) -> tuple[jax.Array, jax.Array]:
  """`chunked` through the `fused_terms` GPU kernels (arguments as `chunked`)."""
  batch, time, heads, key_dim = q.shape
  value_dim = v.shape[-1]
  layout = RowLayout(batch, heads, time, dispatch.kernel_chunk(time))
  blocks = options.block_sizes or BlockSizes.default("gpu", key_dim, value_dim)
  blocks.check("gpu", value_dim)
  o, final = gated_chunks(
      layout.rows(q, matmul_dtype), layout.rows(k, matmul_dtype), layout.rows(v, matmul_dtype),
      layout.cumulative_gate(g, segment_ids), layout.documents(segment_ids),
      layout.states(initial_state), blocks=blocks, interpret=options.interpret)
  return layout.unrows(o), layout.states(final)
