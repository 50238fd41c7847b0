"""Pallas path of `jaxlin.ops.delta_rule` (the D family, incl. Comba's removal key).

The UT transform of each chunk (the triangular solve, W_k = T diag(b Gamma) P,
U = T diag(beta) V, the in-chunk scores, document masks) runs in XLA in
parallel over chunks (`jaxlin.ops.delta.chunk_terms`); the chunk-recurrence
kernel runs W = U - W_k S, the outputs and the state update chunk by chunk
with the state on chip.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlin.ops import chunking
from jaxlin.ops import delta
from pallas_kernels import dispatch
from pallas_kernels.chunk_recurrence.terms import run_terms


def supports(platform: str, key_dim: int, value_dim: int, dtype: jnp.dtype) -> bool:
  """Whether the kernel runs a D-family call with these dims and input dtype."""
  return dispatch.supports_dims(platform, key_dim, value_dim, dtype)


def chunked(q: jax.Array, k: jax.Array, v: jax.Array, beta: jax.Array, g: jax.Array | None,
            p: jax.Array, b: jax.Array, initial_state: jax.Array,
            segment_ids: jax.Array | None, *, matmul_dtype: jnp.dtype, platform: str,
            options: dispatch.KernelOptions) -> tuple[jax.Array, jax.Array]:
  """The D recurrence through the kernel; arguments as `delta._chunked` (float32,
  q scaled). Returns (o [B, T, H, V] in `matmul_dtype`, final state [B, H, K, V])."""
  time = q.shape[1]
  terms = delta.chunk_terms(q, k, v, beta, g, p, b, segment_ids, dispatch.kernel_chunk(time))
  o, final = run_terms(terms.q_in, terms.k_out, terms.scores, terms.values, terms.w_k,
                       terms.decay, initial_state, matmul_dtype=matmul_dtype,
                       platform=platform, options=options)
  return chunking.from_chunks(o, time), final
