"""The delta rule (scalar gate or none) on GPU with its in-chunk terms formed in the kernels.

Given the UT-transform outputs U = T diag(beta) V and W_k = T diag(b a) P of every
chunk (`ut_transform`), the recurrence

    W = U - W_k S        o = Diag(a) q S + A W        S_next = d S + (Diag(c) k)^T W

runs as: the delta state kernel (`chunk_recurrence.gpu.state_pass`, fed Diag(c) k
and d), then `scalar_kernels.output_pass` (A formed in registers). Backward:
`scalar_kernels.value_gradient_pass` (A^T dO), the delta state-gradient kernel (G_{n+1}
and dW), then `scalar_kernels.gradient_pass` (dq, dk, dW_k, db; dU = dW).

Legend: R rows, N chunks, C chunk length, K key dim, V value dim.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.chunk_recurrence import gpu as state_kernels
from pallas_kernels.block_sizes import BlockSizes
from pallas_kernels.fused_terms import scalar_kernels as kernels
from pallas_kernels.fused_terms.state_operands import state_operands


def delta_chunks(q: jax.Array, k: jax.Array, b: jax.Array, rel: jax.Array | None,
                 u: jax.Array, w_k: jax.Array, initial_state: jax.Array, *,
                 blocks: BlockSizes, interpret: bool = False) -> tuple[jax.Array, jax.Array]:
  """(o [R,N,C,V] in the matmul dtype, final state [R,K,V] float32).

  q (scaled), k, w_k: [R,N,C,K]; u: [R,N,C,V], all in the matmul dtype; b: [R,N,C]
  float32 plain in-chunk cumulative log gates; rel: [R,N,C] int32 documents started
  in the chunk (None: one document); initial_state [R,K,V] float32.
  Differentiable in q, k, b, u, w_k and initial_state.
  """
  return _delta(blocks, interpret, q, k, b, rel, u, w_k, initial_state)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _delta(blocks, interpret, q, k, b, rel, u, w_k, initial_state):
  return _forward(blocks, interpret, q, k, b, rel, u, w_k, initial_state)[0]


def _forward(blocks, interpret, q, k, b, rel, u, w_k, initial_state):
  _, k_out, decay = state_operands(q, k, b, rel)
  states, w, final = state_kernels.state_pass(k_out, u, w_k, decay, initial_state,
                                              blocks=blocks, interpret=interpret)
  o = kernels.output_pass(q, k, b, rel, states, w, blocks=blocks, interpret=interpret)
  return (o, final), (q, k, b, rel, u, w_k, states, w)


def _backward(blocks, interpret, residuals, grads):
  q, k, b, rel, u, w_k, states, w = residuals
  d_o, d_final = grads
  d_o = d_o.astype(q.dtype)
  q_in, k_out, decay = state_operands(q, k, b, rel)
  a_t_do = kernels.value_gradient_pass(q, k, b, rel, d_o, None, jnp.float32, blocks=blocks,
                                       interpret=interpret)
  d_states, d_w, d_initial = state_kernels.state_grad_pass(
      q_in, k_out, d_o, a_t_do, w_k, decay, d_final, blocks=blocks, interpret=interpret)
  d_q, d_k, d_w_k, d_b = kernels.gradient_pass(q, k, w, b, rel, states, d_states, d_o, d_w,
                                               blocks=blocks, interpret=interpret)
  return d_q, d_k, d_b, None, d_w.astype(u.dtype), d_w_k, d_initial


_delta.defvjp(_forward, _backward)
