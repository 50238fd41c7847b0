"""The kernel adapter of `jaxlin.ops.delta_rule` (the D family, incl. Comba's removal key).

On GPU, the kernels of `pallas_kernels.fused_terms` run the whole op: the UT
transform per chunk (`ut_transform`), then the recurrence with the in-chunk
scores formed in registers (`delta_chunks`). Otherwise (TPU, or
`KernelOptions(fused_terms=False)`), the UT transform of each chunk (the triangular solve, W_k = T diag(b Gamma) P,
U = T diag(beta) V, the in-chunk scores, document masks) runs in XLA in
parallel over chunks (`jaxlin.ops.delta_terms.chunk_terms`), and the chunk-recurrence
kernel runs W = U - W_k S, the outputs and the state update chunk by chunk
with the state on chip.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlin.ops import chunking
from jaxlin.ops import delta_terms
from jaxlin.ops.row_layout import RowLayout
from pallas_kernels import dispatch
from pallas_kernels.block_sizes import BlockSizes
from pallas_kernels.chunk_recurrence.terms import run_terms
from pallas_kernels.fused_terms.delta import delta_chunks
from pallas_kernels.fused_terms.ut_transform import ut_transform


def chunked(q: jax.Array, k: jax.Array, v: jax.Array, beta: jax.Array, g: jax.Array | None,
            p: jax.Array, b: jax.Array, initial_state: jax.Array,
            segment_ids: jax.Array | None, *, matmul_dtype: jnp.dtype, platform: str,
            options: dispatch.KernelOptions) -> tuple[jax.Array, jax.Array]:
  """The D recurrence through the kernel; arguments as `delta._chunked` (float32,
  q scaled). Returns (o [B, T, H, V] in `matmul_dtype`, final state [B, H, K, V])."""
  time = q.shape[1]
  if options.fused_terms and dispatch.uses_fused_terms(platform, q.shape[-1]):
    return _fused_terms(q, k, v, beta, g, p, b, initial_state, segment_ids,
                        matmul_dtype=matmul_dtype, options=options)
  terms = delta_terms.chunk_terms(q, k, v, beta, g, p, b, segment_ids, dispatch.kernel_chunk(time))
  o, final = run_terms(terms.q_in, terms.k_out, terms.scores, terms.values, terms.w_k,
                       terms.decay, initial_state, matmul_dtype=matmul_dtype,
                       platform=platform, options=options)
  return chunking.from_chunks(o, time), final


def _fused_terms(q: jax.Array, k: jax.Array, v: jax.Array, beta: jax.Array,
                 g: jax.Array | None, p: jax.Array, b: jax.Array, initial_state: jax.Array,
                 segment_ids: jax.Array | None, *, matmul_dtype: jnp.dtype,
                 options: dispatch.KernelOptions) -> tuple[jax.Array, jax.Array]:
  """`chunked` through the `fused_terms` GPU kernels (arguments as `chunked`)."""
  batch, time, heads, key_dim = q.shape
  value_dim = v.shape[-1]
  layout = RowLayout(batch, heads, time, dispatch.kernel_chunk(time))
  blocks = options.block_sizes or BlockSizes.default("gpu", key_dim, value_dim, delta=True)
  blocks.check("gpu", value_dim)
  cum, rel = layout.cumulative_gate(g, segment_ids), layout.documents(segment_ids)
  k_rows = layout.rows(k, matmul_dtype)
  p_rows = k_rows if p is k else layout.rows(p, matmul_dtype)
  u, w_k = ut_transform(k_rows, p_rows, layout.rows(v, matmul_dtype), layout.rows(beta),
                        layout.rows(b), cum, rel, num_warps=blocks.chunk_warps,
                        interpret=options.interpret)
  o, final = delta_chunks(layout.rows(q, matmul_dtype), k_rows, cum, rel, u, w_k,
                          layout.states(initial_state), blocks=blocks,
                          interpret=options.interpret)
  return layout.unrows(o), layout.states(final)
