"""The G family on GPU with its in-chunk terms formed in the kernels.

    forward   S_n from the state kernel (`chunk_recurrence.gpu.state_pass`) fed
              K_out and d (`state_operands`, elementwise XLA), then `output_pass`.
    backward  G_{n+1} from `state_grad_pass` fed Q_in, then `gradient_pass`
              gives dq, dk, dv and db of every chunk (a value-block kernel for dv,
              a key-block kernel for dq, dk and db).

A scalar gate b [R, N, C] runs `scalar_kernels` (A = (q k^T) o E in one matmul,
formed again in every kernel that needs it); a per-key gate b [R, N, C, K] runs
`key_kernels` (A by 16-row blocks in a kernel of its own, exact for strong gates),
and A [R, N, C, C] float32 is kept from the forward for the backward (4 C bytes per
token and head: at C = 64, K = V = 128 a third of q, k, v in bf16). The math is in those
modules. Legend: R rows, N chunks, C chunk length, K key dim, V value dim.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.chunk_recurrence import gpu as state_kernels
from pallas_kernels.block_sizes import BlockSizes
from pallas_kernels.fused_terms import key_kernels, scalar_kernels
from pallas_kernels.fused_terms.state_operands import state_operands

f32 = jnp.float32
CHUNKS = (16, 32, 64)      # chunk lengths the kernels take
KEY_RANGE = (16, 256)      # K: a power of two in this range
VALUE_RANGE = (16, 256)    # V: a power of two in this range


def gated_chunks(q: jax.Array, k: jax.Array, v: jax.Array, b: jax.Array,
                 rel: jax.Array | None, initial_state: jax.Array, *, blocks: BlockSizes,
                 interpret: bool = False) -> tuple[jax.Array, jax.Array]:
  """(o [R,N,C,V] in the matmul dtype, final state [R,K,V] float32).

  q (scaled), k: [R,N,C,K]; v: [R,N,C,V], all in the matmul dtype; b: [R,N,C]
  (scalar gate) or [R,N,C,K] (per-key gate) float32 plain in-chunk inclusive
  cumulative log gates, non-increasing down the chunk; rel: [R,N,C] int32
  documents started in the chunk (None: one document); initial_state [R,K,V]
  float32. C in {16, 32, 64}; K and V powers of two in [16, 256].
  Differentiable in q, k, v, b and initial_state.
  """
  check_operands(q, v, b, rel)
  return _gated(blocks, interpret, q, k, v, b, rel, initial_state)


def check_operands(q: jax.Array, v: jax.Array, b: jax.Array, rel: jax.Array | None) -> None:
  """Raises ValueError unless the shapes are ones the per-chunk kernels take."""
  rows, num, chunk, key_dim = q.shape
  value_dim = v.shape[-1]
  if chunk not in CHUNKS:
    raise ValueError(f"chunk length {chunk} must be one of {CHUNKS}")
  for name, dim, (low, high) in (("K", key_dim, KEY_RANGE), ("V", value_dim, VALUE_RANGE)):
    if dim & (dim - 1) or not low <= dim <= high:
      raise ValueError(f"{name} = {dim} must be a power of two in [{low}, {high}]")
  if v.shape[:3] != q.shape[:3]:
    raise ValueError(f"shapes q {q.shape} and v {v.shape} do not agree")
  if b.shape not in (q.shape[:3], q.shape) or b.dtype != f32:
    raise ValueError(f"b must be float32 {q.shape[:3]} or {q.shape}, got {b.dtype} {b.shape}")
  if rel is not None and (rel.shape != (rows, num, chunk) or rel.dtype != jnp.int32):
    raise ValueError(f"rel must be int32 {(rows, num, chunk)}, got {rel.dtype} {rel.shape}")


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _gated(blocks: BlockSizes, interpret: bool, q: jax.Array, k: jax.Array, v: jax.Array,
           b: jax.Array, rel: jax.Array | None,
           initial_state: jax.Array) -> tuple[jax.Array, jax.Array]:
  return _forward(blocks, interpret, q, k, v, b, rel, initial_state)[0]


def _forward(blocks: BlockSizes, interpret: bool, q: jax.Array, k: jax.Array, v: jax.Array,
             b: jax.Array, rel: jax.Array | None,
             initial_state: jax.Array) -> tuple[tuple[jax.Array, jax.Array], tuple]:
  _, k_out, decay = state_operands(q, k, b, rel)
  states, _, final = state_kernels.state_pass(k_out, v, None, decay, initial_state,
                                              blocks=blocks, interpret=interpret)
  if b.ndim == 3:
    o = scalar_kernels.output_pass(q, k, b, rel, states, v, blocks=blocks, interpret=interpret)
    return (o, final), (q, k, v, b, rel, states, None)
  scores = key_kernels.scores_pass(q, k, b, rel, blocks=blocks, interpret=interpret)
  o = key_kernels.output_pass(q, k, b, rel, states, v, scores, blocks=blocks,
                              interpret=interpret)
  return (o, final), (q, k, v, b, rel, states, scores)


def _backward(blocks: BlockSizes, interpret: bool, residuals: tuple,
              grads: tuple[jax.Array, jax.Array]) -> tuple[jax.Array | None, ...]:
  q, k, v, b, rel, states, scores = residuals
  d_o, d_final = grads
  d_o = d_o.astype(q.dtype)
  q_in, _, decay = state_operands(q, k, b, rel)
  d_states, _, d_initial = state_kernels.state_grad_pass(
      q_in, None, d_o, None, None, decay, d_final, blocks=blocks, interpret=interpret)
  if scores is None:
    d_q, d_k, d_v, d_b = scalar_kernels.gradient_pass(q, k, v, b, rel, states, d_states, d_o,
                                                      blocks=blocks, interpret=interpret)
  else:
    d_q, d_k, d_v, d_b = key_kernels.gradient_pass(q, k, v, b, rel, states, d_states, d_o,
                                                   scores, blocks=blocks, interpret=interpret)
  return d_q, d_k, d_v, d_b, None, d_initial


_gated.defvjp(_forward, _backward)
