"""From a family's chunked terms [B, H, N, C, *] to the kernel layout and back.

Legend: B batch, H heads, N chunks, C chunk length, K key dim, V value dim;
the kernel sees R = B*H rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.chunk_recurrence.core import chunk_recurrence
from pallas_kernels.dispatch import KernelOptions


def run_terms(q_in: jax.Array, k_out: jax.Array, scores: jax.Array, values: jax.Array,
              w_k: jax.Array | None, decay: jax.Array, initial_state: jax.Array, *,
              matmul_dtype: jnp.dtype, platform: str,
              options: KernelOptions) -> tuple[jax.Array, jax.Array]:
  """Runs the chunk-recurrence kernel on [B, H, N, C, *] float32 terms.

  decay: [B, H, N] (one value per chunk) or [B, H, N, K]; initial_state
  [B, H, K, V] float32. Matmul operands are cast to `matmul_dtype`.
  Returns (o [B, H, N, C, V] in `matmul_dtype`, final state [B, H, K, V] float32).
  """
  batch, heads, num, chunk, key_dim = q_in.shape
  value_dim = values.shape[-1]
  rows = lambda x: None if x is None else x.reshape(batch * heads, *x.shape[2:])
  operand = lambda x: None if x is None else rows(x).astype(matmul_dtype)
  decay = jnp.broadcast_to(decay[..., None] if decay.ndim == 3 else decay,
                           (batch, heads, num, key_dim))
  o, final = chunk_recurrence(
      operand(q_in), operand(k_out), operand(scores), operand(values), operand(w_k),
      rows(decay)[:, :, None, :].astype(jnp.float32), rows(initial_state),
      platform=platform, blocks=options.block_sizes, interpret=options.interpret)
  return (o.reshape(batch, heads, num, chunk, value_dim),
          final.reshape(batch, heads, key_dim, value_dim))
