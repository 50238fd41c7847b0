"""The chunk-recurrence kernels for TPU (Pallas Mosaic backend).

Grid (R, V / block_v, N) with the chunk axis last and "arbitrary": the
[K, block_v] float32 state (forward) or state gradient (backward) lives in a
VMEM scratch buffer across the chunk steps, and each step sees one chunk's
blocks, which Mosaic double-buffers from HBM. Block shapes are whole
[C, K] / [C, C] / [C, block_v] / [K, block_v] tiles, so they meet the (8, 128)
rule whenever C is a multiple of 8 and block_v a multiple of 128 or all of V.
No cumsum in the kernel: cumulative gates are computed in XLA beforehand.

Legend: R rows (batch*heads), N chunks, C chunk length, K key dim, V value dim,
P value blocks.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.chunk_recurrence import chunk_math
from pallas_kernels.block_sizes import BlockSizes
from pallas_kernels.chunk_recurrence.operands import cast_like, present, with_absent

f32 = jnp.float32
Chunk = Callable[[jax.Array], jax.Array]


def _chunk_spec(chunk_of: Chunk, *block: int, value_block: bool = False) -> pl.BlockSpec:
  """One chunk of a [R, N, *block] array (value block p on the last axis if asked)."""
  def index(r, p, c):
    tail = (0,) * (len(block) - 1) + ((p,) if value_block else (0,))
    return (r, chunk_of(c)) + tail
  return pl.BlockSpec((None, None, *block), index)


def _partial_spec(chunk_of: Chunk, *block: int) -> pl.BlockSpec:
  """One chunk of a [R, P, N, *block] array of per-value-block partial sums."""
  return pl.BlockSpec((None, None, None, *block),
                      lambda r, p, c: (r, p, chunk_of(c)) + (0,) * len(block))


def _state_spec(key_dim: int, bv: int) -> pl.BlockSpec:
  return pl.BlockSpec((None, key_dim, bv), lambda r, p, c: (r, 0, p))


def _chunk_operands(chunk_of: Chunk, q_in: jax.Array, k_out: jax.Array, scores: jax.Array,
                    values: jax.Array, w_k: jax.Array | None, decay: jax.Array,
                    bv: int) -> list[tuple]:
  """(array, spec) of the per-chunk inputs both kernels read (w_k may be None)."""
  chunk, key_dim = q_in.shape[2:]
  return [(q_in, _chunk_spec(chunk_of, chunk, key_dim)),
          (k_out, _chunk_spec(chunk_of, chunk, key_dim)),
          (scores, _chunk_spec(chunk_of, chunk, chunk)),
          (values, _chunk_spec(chunk_of, chunk, bv, value_block=True)),
          (w_k, _chunk_spec(chunk_of, chunk, key_dim)),
          (decay, _chunk_spec(chunk_of, 1, key_dim))]


def _params() -> pltpu.CompilerParams:
  return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


def forward(q_in: jax.Array, k_out: jax.Array, scores: jax.Array, values: jax.Array,
            w_k: jax.Array | None, decay: jax.Array, initial_state: jax.Array, *,
            blocks: BlockSizes, interpret: bool = False) -> tuple[jax.Array, jax.Array, tuple]:
  """(o [R,N,C,V] in the matmul dtype, final [R,K,V] f32, residuals for `backward`)."""
  o, states, final = _forward_kernel(q_in, k_out, scores, values, w_k, decay, initial_state,
                                     blocks=blocks, interpret=interpret)
  return o, final, (q_in, k_out, scores, values, w_k, decay, states)


def backward(residuals: tuple, d_o: jax.Array, d_final: jax.Array, *, blocks: BlockSizes,
             interpret: bool = False) -> tuple[jax.Array | None, ...]:
  """Gradients of (q_in, k_out, scores, values, w_k, decay, initial_state)."""
  q_in, k_out, scores, values, w_k, decay, states = residuals
  d_q, d_k, d_a, d_u, *d_wk, d_decay, d_h0 = _backward_kernel(
      q_in, k_out, scores, values, w_k, decay, states, d_o, d_final, blocks=blocks,
      interpret=interpret)
  total = lambda x: jnp.sum(x, axis=1)            # over value blocks
  grads = (total(d_q), total(d_k), total(d_a), d_u, total(d_wk[0]) if d_wk else None,
           total(d_decay))
  return (*cast_like(grads, (q_in, k_out, scores, values, w_k, decay)), d_h0)


def _forward_kernel(q_in: jax.Array, k_out: jax.Array, scores: jax.Array, values: jax.Array,
                    w_k: jax.Array | None, decay: jax.Array, initial_state: jax.Array, *,
                    blocks: BlockSizes, interpret: bool = False) -> tuple[jax.Array, ...]:
  """(o [R,N,C,V] in the matmul dtype, states [R,N,K,V] f32, final [R,K,V] f32)."""
  rows, num, chunk, key_dim = q_in.shape
  value_dim, bv = values.shape[-1], blocks.block_v
  has_wk = w_k is not None
  same = lambda c: c

  def kernel(*refs):
    q_ref, k_ref, a_ref, u_ref, wk_ref, d_ref, h0_ref, o_ref, s_ref, f_ref, state_ref = (
        with_absent(refs, [True] * 4 + [has_wk] + [True] * 6))
    c = pl.program_id(2)

    @pl.when(c == 0)
    def _():
      state_ref[...] = h0_ref[...].astype(f32)

    state = state_ref[...]
    s_ref[...] = state
    o, state = chunk_math.forward_chunk(
        state, q_ref[...], k_ref[...], a_ref[...], u_ref[...],
        None if wk_ref is None else wk_ref[...], d_ref[...])
    o_ref[...] = o.astype(o_ref.dtype)
    state_ref[...] = state

    @pl.when(c == num - 1)
    def _():
      f_ref[...] = state

  inputs, in_specs = present(_chunk_operands(same, q_in, k_out, scores, values, w_k, decay, bv) +
                             [(initial_state, _state_spec(key_dim, bv))])
  return pl.pallas_call(
      kernel,
      grid=(rows, value_dim // bv, num),
      in_specs=in_specs,
      out_specs=[_chunk_spec(same, chunk, bv, value_block=True),
                 _chunk_spec(same, key_dim, bv, value_block=True), _state_spec(key_dim, bv)],
      out_shape=[jax.ShapeDtypeStruct((rows, num, chunk, value_dim), q_in.dtype),
                 jax.ShapeDtypeStruct((rows, num, key_dim, value_dim), f32),
                 jax.ShapeDtypeStruct((rows, key_dim, value_dim), f32)],
      scratch_shapes=[pltpu.VMEM((key_dim, bv), f32)],
      compiler_params=_params(),
      interpret=interpret,
      name="chunk_recurrence_fwd",
  )(*inputs)


def _backward_kernel(q_in: jax.Array, k_out: jax.Array, scores: jax.Array, values: jax.Array,
                     w_k: jax.Array | None, decay: jax.Array, states: jax.Array, d_o: jax.Array,
                     d_final: jax.Array, *, blocks: BlockSizes,
                     interpret: bool = False) -> tuple[jax.Array, ...]:
  """Gradients (dQ_in, dK_out, dA, dW_k: [R,P,N,...] partial sums over the P value blocks;
  dU [R,N,C,V]; dd [R,P,N,1,K]; dS_0 [R,K,V]), all float32; the grid walks the chunks
  from last to first."""
  rows, num, chunk, key_dim = q_in.shape
  value_dim, bv = values.shape[-1], blocks.block_v
  parts = value_dim // bv
  has_wk = w_k is not None
  rev = lambda c: num - 1 - c

  def kernel(*refs):
    (q_ref, k_ref, a_ref, u_ref, wk_ref, d_ref, s_ref, do_ref, df_ref, dq_ref, dk_ref, da_ref,
     du_ref, dwk_ref, dd_ref, dh0_ref, dstate_ref) = with_absent(
         refs, [True] * 4 + [has_wk] + [True] * 8 + [has_wk] + [True] * 3)
    i = pl.program_id(2)

    @pl.when(i == 0)
    def _():
      dstate_ref[...] = df_ref[...].astype(f32)

    dq, dk, da, du, dwk, dd, d_state = chunk_math.backward_chunk(
        s_ref[...], dstate_ref[...], do_ref[...], q_ref[...], k_ref[...], a_ref[...],
        u_ref[...], None if wk_ref is None else wk_ref[...], d_ref[...])
    dq_ref[...], dk_ref[...], da_ref[...], du_ref[...], dd_ref[...] = dq, dk, da, du, dd
    if dwk_ref is not None:
      dwk_ref[...] = dwk
    dstate_ref[...] = d_state

    @pl.when(i == num - 1)
    def _():
      dh0_ref[...] = d_state

  inputs, in_specs = present(
      _chunk_operands(rev, q_in, k_out, scores, values, w_k, decay, bv) +
      [(states, _chunk_spec(rev, key_dim, bv, value_block=True)),
       (d_o, _chunk_spec(rev, chunk, bv, value_block=True)),
       (d_final, _state_spec(key_dim, bv))])
  partial = lambda *shape: (jax.ShapeDtypeStruct((rows, parts, num, *shape), f32),
                            _partial_spec(rev, *shape))
  out_shape, out_specs = present(
      [partial(chunk, key_dim), partial(chunk, key_dim), partial(chunk, chunk),
       (jax.ShapeDtypeStruct((rows, num, chunk, value_dim), f32),
        _chunk_spec(rev, chunk, bv, value_block=True)),
       partial(chunk, key_dim) if has_wk else (None, None), partial(1, key_dim),
       (jax.ShapeDtypeStruct((rows, key_dim, value_dim), f32), _state_spec(key_dim, bv))])
  return pl.pallas_call(
      kernel,
      grid=(rows, parts, num),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      scratch_shapes=[pltpu.VMEM((key_dim, bv), f32)],
      compiler_params=_params(),
      interpret=interpret,
      name="chunk_recurrence_bwd",
  )(*inputs)
