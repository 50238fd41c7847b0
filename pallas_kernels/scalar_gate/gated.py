"""The scalar-gate G family on GPU with its in-chunk terms formed in the kernels.

    forward   S_n from the state kernel (`chunk_recurrence.gpu.state_pass`) fed
              Diag(c) k and d (two elementwise XLA ops), then `output_pass`.
    backward  G_{n+1} from `state_grad_pass` fed Diag(a) q, then `gradient_pass`
              gives dq, dk, dv and db of every chunk at once.

The math is in `kernels.py`. Legend: R rows, N chunks, C chunk length, K key dim,
V value dim.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.chunk_recurrence import gpu as state_kernels
from pallas_kernels.chunk_recurrence.block_sizes import BlockSizes
from pallas_kernels.scalar_gate import kernels
from pallas_kernels.scalar_gate.kernels import state_operands

f32 = jnp.float32


def gated_chunks(q: jax.Array, k: jax.Array, v: jax.Array, b: jax.Array,
                 rel: jax.Array | None, initial_state: jax.Array, *, blocks: BlockSizes,
                 interpret: bool = False) -> tuple[jax.Array, jax.Array]:
  """(o [R,N,C,V] in the matmul dtype, final state [R,K,V] float32).

  q (scaled), k: [R,N,C,K]; v: [R,N,C,V], all in the matmul dtype; b: [R,N,C]
  float32 plain in-chunk cumulative log gates; rel: [R,N,C] int32 documents
  started in the chunk (None: one document); initial_state [R,K,V] float32.
  Differentiable in q, k, v, b and initial_state.
  """
  return _gated(blocks, interpret, q, k, v, b, rel, initial_state)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _gated(blocks, interpret, q, k, v, b, rel, initial_state):
  return _forward(blocks, interpret, q, k, v, b, rel, initial_state)[0]


def _forward(blocks, interpret, q, k, v, b, rel, initial_state):
  _, k_out, decay = state_operands(q, k, b, rel)
  states, _, final = state_kernels.state_pass(k_out, v, None, decay, initial_state,
                                              blocks=blocks, interpret=interpret)
  o = kernels.output_pass(q, k, b, rel, states, v, blocks=blocks, interpret=interpret)
  return (o, final), (q, k, v, b, rel, states)


def _backward(blocks, interpret, residuals, grads):
  q, k, v, b, rel, states = residuals
  d_o, d_final = grads
  d_o = d_o.astype(q.dtype)
  q_in, _, decay = state_operands(q, k, b, rel)
  d_states, _, d_initial = state_kernels.state_grad_pass(
      q_in, None, d_o, None, None, decay, d_final, blocks=blocks, interpret=interpret)
  d_q, d_k, d_v, d_b = kernels.gradient_pass(q, k, v, b, rel, states, d_states, d_o,
                                             blocks=blocks, interpret=interpret)
  return d_q, d_k, d_v, d_b, None, d_initial


_gated.defvjp(_forward, _backward)
