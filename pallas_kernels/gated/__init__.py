"""Pallas path of `jaxlin.ops.gated_linear_attention` (the G family).

The in-chunk terms (scores with every gate kind, including the exact tiers
for strong per-key gates, the RWKV6 bonus, document masks) are formed in XLA
by `jaxlin.ops.gated.chunk_terms`; the chunk-recurrence kernel runs the
inter-chunk recurrence with the state on chip and writes the outputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlin.ops import chunking
from jaxlin.ops import gated
from pallas_kernels import dispatch
from pallas_kernels.chunk_recurrence.terms import run_terms


def supports(platform: str, key_dim: int, value_dim: int, dtype: jnp.dtype) -> bool:
  """Whether the kernel runs a G-family call with these dims and input dtype."""
  return dispatch.supports_dims(platform, key_dim, value_dim, dtype)


def chunked(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array | None,
            bonus: jax.Array | None, initial_state: jax.Array,
            segment_ids: jax.Array | None, *, matmul_dtype: jnp.dtype, platform: str,
            options: dispatch.KernelOptions) -> tuple[jax.Array, jax.Array]:
  """The G recurrence through the kernel; arguments as `gated._chunked` (float32,
  q scaled). Returns (o [B, T, H, V] in `matmul_dtype`, final state [B, H, K, V])."""
  time = q.shape[1]
  terms = gated.chunk_terms(q, k, v, g, bonus, segment_ids, dispatch.kernel_chunk(time))
  o, final = run_terms(terms.q_in, terms.k_out, terms.scores, terms.values, None,
                       terms.decay, initial_state, matmul_dtype=matmul_dtype,
                       platform=platform, options=options)
  return chunking.from_chunks(o, time), final
