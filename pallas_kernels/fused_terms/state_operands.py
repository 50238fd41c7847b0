"""The operands of the generic GPU state kernels (`chunk_recurrence.gpu`), formed in XLA.

For the chunk's in-chunk cumulative log gate b (one value per token, or per token
and key) and `rel` (documents started in the chunk; see `scalar_kernels.py`):

    Q_in = a o q,  a_i = exp(b_i) [rel_i = 0]
    K_out = c o k, c_j = exp(b_C - b_j) [rel_j = rel_C]   (c_C is the constant 1)
    d = exp(b_C) [rel_C = 0]

Legend: R rows, N chunks, C chunk length, K key dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

f32 = jnp.float32


def state_operands(q: jax.Array, k: jax.Array, b: jax.Array,
                   rel: jax.Array | None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(Q_in, K_out in the matmul dtype, d [R,N,1,K] float32) of every chunk.

  q, k: [R,N,C,K]; b: [R,N,C] or [R,N,C,K] float32, non-increasing down the chunk;
  rel: [R,N,C] int32 or None.
  """
  per_key = b if b.ndim == 4 else b[..., None]                        # [R,N,C,1|K]
  last = per_key[..., -1:, :]
  start = end = carry = None
  if rel is not None:
    rel_last = rel[..., -1:]
    start, end, carry = ((rel == 0)[..., None], (rel == rel_last)[..., None],
                         (rel_last == 0)[..., None])
  masked = lambda x, m: jnp.exp(x if m is None else jnp.where(m, x, -jnp.inf))
  q_in = (q.astype(f32) * masked(per_key, start)).astype(q.dtype)
  to_end = jnp.minimum(last - per_key, 0.0).at[..., -1, :].set(0.0)
  k_out = (k.astype(f32) * masked(to_end, end)).astype(k.dtype)
  decay = jnp.broadcast_to(masked(last, carry), (*q.shape[:2], 1, q.shape[-1]))
  return q_in, k_out, decay
