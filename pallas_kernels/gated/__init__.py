"""Pallas path of `jaxlin.ops.gated_linear_attention` (the G family).

On GPU, a scalar gate or none, without the RWKV6 bonus and with K <= 128, runs
the kernels of `pallas_kernels.scalar_gate`, which form the in-chunk terms
themselves. Every other call (per-key gates with the exact tiers for strong
gates, the bonus, TPU) forms the in-chunk terms in XLA with
`jaxlin.ops.gated.chunk_terms`, and the chunk-recurrence kernel runs the
inter-chunk recurrence with the state on chip and writes the outputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlin.ops import chunking
from jaxlin.ops import gated
from pallas_kernels import dispatch
from pallas_kernels.chunk_recurrence.block_sizes import BlockSizes
from pallas_kernels.chunk_recurrence.terms import run_terms
from pallas_kernels.scalar_gate import gated_chunks
from pallas_kernels.scalar_gate.layout import RowLayout

SCALAR_GATE_MAX_K = 128   # the fused gradient kernel holds [C, K] float32 accumulators


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
  if options.scalar_gate and uses_scalar_gate_kernels(platform, g, bonus, q.shape[-1]):
    return _scalar_gate(q, k, v, g, initial_state, segment_ids, matmul_dtype=matmul_dtype,
                        options=options)
  terms = gated.chunk_terms(q, k, v, g, bonus, segment_ids, dispatch.kernel_chunk(time))
  o, final = run_terms(terms.q_in, terms.k_out, terms.scores, terms.values, None,
                       terms.decay, initial_state, matmul_dtype=matmul_dtype,
                       platform=platform, options=options)
  return chunking.from_chunks(o, time), final


def uses_scalar_gate_kernels(platform: str, g: jax.Array | None, bonus: jax.Array | None,
                             key_dim: int) -> bool:
  """Whether a kernel call runs `pallas_kernels.scalar_gate` (GPU, scalar gate or none,
  no bonus, K <= SCALAR_GATE_MAX_K) rather than the XLA terms and `chunk_recurrence`."""
  return (platform == "gpu" and bonus is None and (g is None or g.ndim == 3)
          and key_dim <= SCALAR_GATE_MAX_K)


def _scalar_gate(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array | None,
                 initial_state: jax.Array, segment_ids: jax.Array | None, *,
                 matmul_dtype: jnp.dtype,
                 options: dispatch.KernelOptions) -> tuple[jax.Array, jax.Array]:
  """`chunked` through the scalar-gate GPU kernels (arguments as `chunked`)."""
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
