"""The chunk-recurrence kernels for GPU (Pallas Triton backend).

Grid (R, V / block_v): one program per (batch*head row, value block). It walks
the N chunks in a `fori_loop` with the [K, block_v] float32 state in registers
(forward: chunk 0 -> N-1; backward: N-1 -> 0 with the state gradient), so the
state never goes through HBM except the per-chunk snapshot the backward reads.

Legend: R rows (batch*heads), N chunks, C chunk length, K key dim, V value dim,
P value blocks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from pallas_kernels.chunk_recurrence import chunk_math
from pallas_kernels.chunk_recurrence.block_sizes import BlockSizes
from pallas_kernels.chunk_recurrence.operands import present, with_absent

f32 = jnp.float32


def _row(*block: int) -> pl.BlockSpec:
  """All chunks of one row: block (None, *block), value block p on the last axis if asked."""
  return pl.BlockSpec((None, *block), lambda r, p: (r,) + (0,) * len(block))


def _row_vblock(*block: int) -> pl.BlockSpec:
  return pl.BlockSpec((None, *block), lambda r, p: (r,) + (0,) * (len(block) - 1) + (p,))


def _row_partial(*block: int) -> pl.BlockSpec:
  """Per value block partial sums: array [R, P, ...]."""
  return pl.BlockSpec((None, None, *block), lambda r, p: (r, p) + (0,) * len(block))


def _chunk_operands(q_in: jax.Array, k_out: jax.Array, scores: jax.Array, values: jax.Array,
                    w_k: jax.Array | None, decay: jax.Array, bv: int) -> list[tuple]:
  """(array, spec) of the per-chunk inputs both kernels read (w_k may be None)."""
  num, chunk, key_dim = q_in.shape[1:]
  return [(q_in, _row(num, chunk, key_dim)), (k_out, _row(num, chunk, key_dim)),
          (scores, _row(num, chunk, chunk)), (values, _row_vblock(num, chunk, bv)),
          (w_k, _row(num, chunk, key_dim)), (decay, _row(num, 1, key_dim))]


def _params(blocks: BlockSizes) -> pl_triton.CompilerParams:
  return pl_triton.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages)


def forward(q_in: jax.Array, k_out: jax.Array, scores: jax.Array, values: jax.Array,
            w_k: jax.Array | None, decay: jax.Array, initial_state: jax.Array, *,
            blocks: BlockSizes, interpret: bool = False) -> tuple[jax.Array, ...]:
  """(o [R,N,C,V] f32, states [R,N,K,V] f32, final [R,K,V] f32); see chunk_math."""
  rows, num, chunk, key_dim = q_in.shape
  value_dim, bv = values.shape[-1], blocks.block_v
  has_wk = w_k is not None

  def kernel(*refs):
    q_ref, k_ref, a_ref, u_ref, wk_ref, d_ref, h0_ref, o_ref, s_ref, f_ref = with_absent(
        refs, [True] * 4 + [has_wk] + [True] * 5)

    def body(c, state):
      s_ref[c] = state
      o, state = chunk_math.forward_chunk(
          state, q_ref[c], k_ref[c], a_ref[c], u_ref[c],
          None if wk_ref is None else wk_ref[c], d_ref[c])
      o_ref[c] = o
      return state

    f_ref[...] = jax.lax.fori_loop(0, num, body, h0_ref[...].astype(f32))

  inputs, in_specs = present(_chunk_operands(q_in, k_out, scores, values, w_k, decay, bv) +
                             [(initial_state, _row_vblock(key_dim, bv))])
  return pl.pallas_call(
      kernel,
      grid=(rows, value_dim // bv),
      in_specs=in_specs,
      out_specs=[_row_vblock(num, chunk, bv), _row_vblock(num, key_dim, bv),
                 _row_vblock(key_dim, bv)],
      out_shape=[jax.ShapeDtypeStruct((rows, num, chunk, value_dim), f32),
                 jax.ShapeDtypeStruct((rows, num, key_dim, value_dim), f32),
                 jax.ShapeDtypeStruct((rows, key_dim, value_dim), f32)],
      compiler_params=_params(blocks),
      interpret=interpret,
      name="chunk_recurrence_fwd",
  )(*inputs)


def backward(q_in: jax.Array, k_out: jax.Array, scores: jax.Array, values: jax.Array,
             w_k: jax.Array | None, decay: jax.Array, states: jax.Array, d_o: jax.Array,
             d_final: jax.Array, *, blocks: BlockSizes,
             interpret: bool = False) -> tuple[jax.Array, ...]:
  """Gradients (dQ_in, dK_out, dA, dW_k: [R,P,...] partial over value blocks;
  dU [R,N,C,V]; dd [R,P,N,1,K]; dS_0 [R,K,V]), all float32."""
  rows, num, chunk, key_dim = q_in.shape
  value_dim, bv = values.shape[-1], blocks.block_v
  parts = value_dim // bv
  has_wk = w_k is not None

  def kernel(*refs):
    (q_ref, k_ref, a_ref, u_ref, wk_ref, d_ref, s_ref, do_ref, df_ref, dq_ref, dk_ref, da_ref,
     du_ref, dwk_ref, dd_ref, dh0_ref) = with_absent(
         refs, [True] * 4 + [has_wk] + [True] * 8 + [has_wk] + [True] * 2)

    def body(i, d_state):
      c = num - 1 - i
      dq, dk, da, du, dwk, dd, d_state = chunk_math.backward_chunk(
          s_ref[c], d_state, do_ref[c], q_ref[c], k_ref[c], a_ref[c], u_ref[c],
          None if wk_ref is None else wk_ref[c], d_ref[c])
      dq_ref[c], dk_ref[c], da_ref[c], du_ref[c], dd_ref[c] = dq, dk, da, du, dd
      if dwk_ref is not None:
        dwk_ref[c] = dwk
      return d_state

    dh0_ref[...] = jax.lax.fori_loop(0, num, body, df_ref[...].astype(f32))

  inputs, in_specs = present(
      _chunk_operands(q_in, k_out, scores, values, w_k, decay, bv) +
      [(states, _row_vblock(num, key_dim, bv)), (d_o, _row_vblock(num, chunk, bv)),
       (d_final, _row_vblock(key_dim, bv))])
  partial = lambda *shape: (jax.ShapeDtypeStruct((rows, parts, *shape), f32),
                            _row_partial(*shape))
  out_shape, out_specs = present(
      [partial(num, chunk, key_dim), partial(num, chunk, key_dim), partial(num, chunk, chunk),
       (jax.ShapeDtypeStruct((rows, num, chunk, value_dim), f32), _row_vblock(num, chunk, bv)),
       partial(num, chunk, key_dim) if has_wk else (None, None), partial(num, 1, key_dim),
       (jax.ShapeDtypeStruct((rows, key_dim, value_dim), f32), _row_vblock(key_dim, bv))])
  return pl.pallas_call(
      kernel,
      grid=(rows, parts),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=_params(blocks),
      interpret=interpret,
      name="chunk_recurrence_bwd",
  )(*inputs)
