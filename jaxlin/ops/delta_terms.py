"""The in-chunk terms of the D family's UT-transform form (see `jaxlin.ops.delta`).

Inside a chunk with incoming state S_0, cumulative gate b^g_i = sum_{s<=i} g_s and
Gamma_i = exp(b^g_i), the written rows W = U - W_k S_0 solve (I + L) W = diag(beta) V
- diag(b Gamma) P S_0, L_ij = b_i exp(b^g_i - b^g_j) (p_i . k_j) for j < i, so

    U = (I + L)^{-1} diag(beta) V,   W_k = (I + L)^{-1} diag(b Gamma) P,
    A_ij = exp(b^g_i - b^g_j) (q_i . k_j) (j <= i),   K~_j = exp(b^g_C - b^g_j) k_j.

`chunk_terms` forms them for every chunk in parallel (one triangular inverse per
chunk); the XLA form (`delta._chunked`) and the TPU kernel path
(`jaxlin.ops.delta_pallas`) join the chunks.

Legend: B batch, T time, H heads, K key dim, V value dim; chunked tensors are
[B, H, N, C, D] (N chunks of length C).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxlin.ops import chunking
from jaxlin.ops import triangular

f32 = jnp.float32


class ChunkTerms(NamedTuple):
  """The per-chunk terms of the UT-transform form (module docstring), float32.

  With W = U - W_k S_0:  o = q_in S_0 + scores W;  S_end = Diag(decay) S_0 + k_out^T W.
  """
  q_in: jax.Array     # [B, H, N, C, K]  Gamma Q
  k_out: jax.Array    # [B, H, N, C, K]  K~
  scores: jax.Array   # [B, H, N, C, C]  A
  values: jax.Array   # [B, H, N, C, V]  U = T diag(beta) V
  w_k: jax.Array      # [B, H, N, C, K]  T diag(b Gamma) P
  decay: jax.Array    # [B, H, N]        Gamma_C


def chunk_terms(q: jax.Array, k: jax.Array, v: jax.Array, beta: jax.Array,
                g: jax.Array | None, p: jax.Array, b: jax.Array,
                segment_ids: jax.Array | None, chunk: int) -> ChunkTerms:
  """The in-chunk work of the UT-transform form, every chunk in parallel.

  q (already scaled), k, p: [B, T, H, K]; v: [B, T, H, V]; beta, b: [B, T, H];
  g: None or [B, T, H]; all float32.
  """
  qc, kc, vc, pc = (chunking.to_chunks(x, chunk) for x in (q, k, v, p))
  betac, bc = chunking.to_chunks(beta, chunk), chunking.to_chunks(b, chunk)
  docs = chunking.document_masks(segment_ids, chunk)
  same, start, end, carry = ((None,) * 4 if docs is None else
                             (docs.same, docs.start, docs.end, docs.carry))
  inclusive = chunking.combine_masks(chunking.causal_mask(chunk, strict=False), same)
  strict = chunking.combine_masks(chunking.causal_mask(chunk, strict=True), same)

  if g is None:
    zeros = jnp.zeros(qc.shape[:4], f32)
    pair_decay = lambda mask: jnp.where(mask, 1.0, 0.0)
    gamma = zeros + (1.0 if start is None else start)              # Gamma_i
    k_out = kc if end is None else jnp.where(end[..., None], kc, 0.0)
    gamma_last = zeros[..., 0] + (1.0 if carry is None else carry)
  else:
    cum = chunking.chunk_cumsum(chunking.to_chunks(g, chunk), same)  # b^g
    cum_last = cum[..., -1]
    gaps = chunking.pair_gaps(cum, cum, strict=False, key_axis=False)
    pair_decay = lambda mask: chunking.masked_exp(gaps, mask)
    gamma = chunking.masked_exp(cum, start)
    k_out = kc * chunking.masked_exp(chunking.gap_to_end(cum, key_axis=False), end)[..., None]
    gamma_last = chunking.masked_exp(cum_last, carry)

  # Products sharing an operand run as one larger matmul (concatenated).
  qp_k = jnp.einsum("bhnik,bhnjk->bhnij", jnp.concatenate([qc, pc], axis=3), kc)
  scores = qp_k[..., :chunk, :] * pair_decay(inclusive)          # A
  lower = bc[..., None] * qp_k[..., chunk:, :] * pair_decay(strict)  # L
  inverse = triangular.unit_lower_inverse(lower)                  # (I + L)^{-1}
  value_dim = vc.shape[-1]
  u_wk = inverse @ jnp.concatenate([betac[..., None] * vc,
                                    (bc * gamma)[..., None] * pc], axis=-1)
  return ChunkTerms(gamma[..., None] * qc, k_out, scores, u_wk[..., :value_dim],
                    u_wk[..., value_dim:], gamma_last)
