"""The chunk recurrence in plain JAX: the specification the kernels match.

Legend: R = batch*heads rows, N chunks, C chunk length, K key dim, V value dim.
"""

from __future__ import annotations

import jax

from pallas_kernels.chunk_recurrence import chunk_math


def chunk_recurrence(q_in: jax.Array, k_out: jax.Array, scores: jax.Array, values: jax.Array,
                     w_k: jax.Array | None, decay: jax.Array,
                     initial_state: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Runs `chunk_math.forward_chunk` over the N chunks of every row.

  q_in, k_out, w_k: [R, N, C, K]; scores [R, N, C, C]; values [R, N, C, V];
  decay [R, N, 1, K] f32; initial_state [R, K, V] f32.
  Returns (o [R, N, C, V] f32, states entering each chunk [R, N, K, V] f32,
  final state [R, K, V] f32).
  """
  def row(q, k, a, u, wk, d, h0):
    def body(state, xs):
      o, new_state = chunk_math.forward_chunk(state, *xs)
      return new_state, (o, state)
    final, (o, states) = jax.lax.scan(body, h0, (q, k, a, u, wk, d))
    return o, states, final

  return jax.vmap(row)(q_in, k_out, scores, values, w_k, decay, initial_state)
