"""The chunk-recurrence kernels for GPU (Pallas Triton backend), in two passes.

Only the state recurrence is sequential. The per-chunk outputs (a kernel with
one program per row, chunk and value block) and gradients (batched XLA
matmuls) run over all chunks at once, which keeps the whole GPU busy. The
earlier fused design (one program per row and value block walking its chunks,
every per-chunk matmul on its critical path) took about twice as long for the
recurrence on an H100 (benchmarks/kernel_breakdown.py, B=4 T=8192 H=16 K=V=128).

Forward:
  state pass (kernel)  S_0 = h0;  W_n = U_n - W_k,n S_n;  S_{n+1} = Diag(d_n) S_n + K_n^T W_n
                       stores S_n (and W_n) in the matmul dtype, returns S_N in float32.
  outputs (parallel)   o_n = Q_n S_n + A_n W_n
Backward, with G_n = dL/dS_n (G_N = the final-state cotangent):
  state pass (kernel)  dW_n = A_n^T dO_n + K_n G_{n+1}  (gated family: not needed here)
                       G_n  = Diag(d_n) G_{n+1} + Q_n^T dO_n - W_k,n^T dW_n
                       stores G_{n+1} (and dW_n), returns G_0.
  gradients (XLA)      every per-chunk gradient from S_n, G_{n+1}, W_n, dW_n
                       (`chunk_gradients`).

Grid (R, K / block_k, V / block_v): the gated family's state rows are independent
(Diag(d) scales rows; K^T W writes row k from key column k), so its K is split
too; the delta rule's W_k S needs whole columns, so it takes all of K. Each
program walks the N chunks in a `fori_loop` with its [block_k, block_v] float32
state in registers.

Legend: R rows (batch*heads), N chunks, C chunk length, K key dim, V value dim.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from pallas_kernels.block_sizes import BlockSizes
from pallas_kernels.chunk_recurrence.chunk_math import dot, highest
from pallas_kernels.chunk_recurrence.operands import cast_like, present, with_absent

f32 = jnp.float32
PARALLEL_BLOCK_V = 128     # value columns per program of the output kernel


def _spec(*block: int, key: bool = False, value: bool = False) -> pl.BlockSpec:
  """Block (None, *block) of a [R, ...] array: whole, except key block i on the
  second-to-last axis (`key`) and value block j on the last axis (`value`)."""
  def index(r, i, j):
    tail = [0] * len(block)
    if key:
      tail[-2 if value else -1] = i
    if value:
      tail[-1] = j
    return (r, *tail)
  return pl.BlockSpec((None, *block), index)


def _grid(rows: int, key_dim: int, value_dim: int, blocks: BlockSizes,
          delta: bool) -> tuple[tuple[int, int, int], int, int]:
  bk = key_dim if delta else blocks.key_block(key_dim)
  return (rows, key_dim // bk, value_dim // blocks.block_v), bk, blocks.block_v


def _params(blocks: BlockSizes) -> pl_triton.CompilerParams:
  return pl_triton.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages)


def _run_state_kernel(kernel: Callable, grid: tuple[int, int, int], inputs: list,
                      in_specs: list, chunked: jax.Array, value_dim: int, bk: int,
                      bv: int, *, side_dtype: jnp.dtype | None, blocks: BlockSizes,
                      interpret: bool, name: str) -> tuple[jax.Array, jax.Array | None, jax.Array]:
  """Calls a state kernel whose outputs are (a state per chunk [R,N,K,V] in the matmul dtype,
  a [R,N,C,V] side output of `side_dtype` or None, the last state [R,K,V] f32).

  chunked: an [R,N,C,K] operand in the matmul dtype (gives the shapes and that dtype).
  """
  rows, num, chunk, key_dim = chunked.shape
  mm = chunked.dtype
  side = None if side_dtype is None else jax.ShapeDtypeStruct((rows, num, chunk, value_dim),
                                                              side_dtype)
  out_shape, out_specs = present([
      (jax.ShapeDtypeStruct((rows, num, key_dim, value_dim), mm),
       _spec(num, bk, bv, key=True, value=True)),
      (side, _spec(num, chunk, bv, value=True)),
      (jax.ShapeDtypeStruct((rows, key_dim, value_dim), f32),
       _spec(bk, bv, key=True, value=True))])
  per_chunk, *side_out, last = pl.pallas_call(
      kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      compiler_params=_params(blocks), interpret=interpret, name=name,
  )(*inputs)
  return per_chunk, (side_out[0] if side_out else None), last


def state_pass(k_out: jax.Array, values: jax.Array, w_k: jax.Array | None, decay: jax.Array,
               initial_state: jax.Array, *, blocks: BlockSizes,
               interpret: bool = False) -> tuple[jax.Array, jax.Array | None, jax.Array]:
  """(S_n [R,N,K,V] and W_n [R,N,C,V] or None, in the matmul dtype; S_N [R,K,V] f32)."""
  rows, num, chunk, key_dim = k_out.shape
  value_dim, mm, delta = values.shape[-1], k_out.dtype, w_k is not None
  grid, bk, bv = _grid(rows, key_dim, value_dim, blocks, delta)

  def kernel(*refs):
    k_ref, u_ref, wk_ref, d_ref, h0_ref, s_ref, w_ref, f_ref = with_absent(
        refs, [True, True, delta, True, True, True, delta, True])

    def body(c, state):
      state_mm = state.astype(mm)
      s_ref[c] = state_mm
      w = u_ref[c]
      if delta:
        w = (w.astype(f32) - dot(wk_ref[c], state_mm)).astype(mm)
        w_ref[c] = w
      return d_ref[c].reshape(-1, 1) * state + dot(k_ref[c], w, trans_a=True)

    f_ref[...] = jax.lax.fori_loop(0, num, body, h0_ref[...].astype(f32))

  inputs, in_specs = present([
      (k_out, _spec(num, chunk, bk, key=True)), (values, _spec(num, chunk, bv, value=True)),
      (w_k, _spec(num, chunk, key_dim)), (decay, _spec(num, 1, bk, key=True)),
      (initial_state, _spec(bk, bv, key=True, value=True))])
  return _run_state_kernel(kernel, grid, inputs, in_specs, k_out, value_dim, bk, bv,
                           side_dtype=mm if delta else None, blocks=blocks, interpret=interpret,
                           name="chunk_state_fwd")


def state_grad_pass(q_in: jax.Array, k_out: jax.Array, d_o: jax.Array, a_t_do: jax.Array | None,
                    w_k: jax.Array | None, decay: jax.Array, d_final: jax.Array, *,
                    blocks: BlockSizes,
                    interpret: bool = False) -> tuple[jax.Array, jax.Array | None, jax.Array]:
  """(G_{n+1} [R,N,K,V] in the matmul dtype, dW_n [R,N,C,V] f32 or None, G_0 [R,K,V] f32).

  d_o: [R,N,C,V] in the matmul dtype; a_t_do = A^T dO [R,N,C,V] f32 (delta rule only).
  """
  rows, num, chunk, key_dim = q_in.shape
  value_dim, mm, delta = d_o.shape[-1], q_in.dtype, w_k is not None
  grid, bk, bv = _grid(rows, key_dim, value_dim, blocks, delta)

  def kernel(*refs):
    q_ref, k_ref, do_ref, x_ref, wk_ref, d_ref, df_ref, ds_ref, dw_ref, dh0_ref = with_absent(
        refs, [True, delta, True, delta, delta, True, True, True, delta, True])

    def body(i, d_state):
      c = num - 1 - i
      d_state_mm = d_state.astype(mm)
      ds_ref[c] = d_state_mm
      new = d_ref[c].reshape(-1, 1) * d_state + dot(q_ref[c], do_ref[c], trans_a=True)
      if delta:
        d_w = x_ref[c] + dot(k_ref[c], d_state_mm)
        dw_ref[c] = d_w
        new = new - dot(wk_ref[c], d_w.astype(mm), trans_a=True)
      return new

    dh0_ref[...] = jax.lax.fori_loop(0, num, body, df_ref[...].astype(f32))

  inputs, in_specs = present([
      (q_in, _spec(num, chunk, bk, key=True)), (k_out if delta else None, _spec(num, chunk, bk)),
      (d_o, _spec(num, chunk, bv, value=True)), (a_t_do, _spec(num, chunk, bv, value=True)),
      (w_k, _spec(num, chunk, key_dim)), (decay, _spec(num, 1, bk, key=True)),
      (d_final, _spec(bk, bv, key=True, value=True))])
  return _run_state_kernel(kernel, grid, inputs, in_specs, q_in, value_dim, bk, bv,
                           side_dtype=f32 if delta else None, blocks=blocks, interpret=interpret,
                           name="chunk_state_bwd")


def _parallel_grid(rows: int, num: int, value_dim: int) -> tuple[tuple[int, int, int], int]:
  """Grid (R, N, P) of the output kernel: one program per (row, chunk, value block)."""
  bv = min(value_dim, PARALLEL_BLOCK_V)
  return (rows, num, value_dim // bv), bv


def _chunk(*block: int, value: bool = False) -> pl.BlockSpec:
  """Chunk n of a [R, N, *block] array (value block p on the last axis if asked)."""
  return pl.BlockSpec((None, None, *block),
                      lambda r, n, p: (r, n) + (0,) * (len(block) - 1) + ((p,) if value else (0,)))


def output_pass(q_in: jax.Array, scores: jax.Array, states: jax.Array, w: jax.Array, *,
                blocks: BlockSizes, interpret: bool = False) -> jax.Array:
  """o_n = Q_n S_n + A_n W_n for every (row, chunk) at once: [R,N,C,V] in the matmul dtype."""
  rows, num, chunk, key_dim = q_in.shape
  value_dim = w.shape[-1]
  grid, bv = _parallel_grid(rows, num, value_dim)

  def kernel(q_ref, a_ref, s_ref, w_ref, o_ref):
    o = dot(q_ref[...], s_ref[...]) + dot(a_ref[...], w_ref[...])
    o_ref[...] = o.astype(o_ref.dtype)

  return pl.pallas_call(
      kernel, grid=grid,
      in_specs=[_chunk(chunk, key_dim), _chunk(chunk, chunk), _chunk(key_dim, bv, value=True),
                _chunk(chunk, bv, value=True)],
      out_specs=_chunk(chunk, bv, value=True),
      out_shape=jax.ShapeDtypeStruct((rows, num, chunk, value_dim), q_in.dtype),
      compiler_params=_params(blocks), interpret=interpret, name="chunk_outputs",
  )(q_in, scores, states, w)


def forward(q_in: jax.Array, k_out: jax.Array, scores: jax.Array, values: jax.Array,
            w_k: jax.Array | None, decay: jax.Array, initial_state: jax.Array, *,
            blocks: BlockSizes, interpret: bool = False) -> tuple[jax.Array, jax.Array, tuple]:
  """(o [R,N,C,V] in the matmul dtype, final state [R,K,V] f32, residuals for `backward`)."""
  states, w, final = state_pass(k_out, values, w_k, decay, initial_state, blocks=blocks,
                                interpret=interpret)
  w = values if w is None else w
  o = output_pass(q_in, scores, states, w, blocks=blocks, interpret=interpret)
  return o, final, (q_in, k_out, scores, values, w_k, decay, states, w)


def backward(residuals: tuple, d_o: jax.Array, d_final: jax.Array, *, blocks: BlockSizes,
             interpret: bool = False) -> tuple[jax.Array | None, ...]:
  """Gradients of (q_in, k_out, scores, values, w_k, decay, initial_state)."""
  q_in, k_out, scores, values, w_k, decay, states, w = residuals
  d_o = d_o.astype(q_in.dtype)
  a_t_do = None if w_k is None else _einsum("rnij,rniv->rnjv", scores, d_o)  # for dW
  d_states, d_w, d_h0 = state_grad_pass(q_in, k_out, d_o, a_t_do, w_k, decay, d_final,
                                        blocks=blocks, interpret=interpret)
  grads = chunk_gradients(q_in, k_out, scores, w, w_k, states, d_states, d_o, d_w)
  return (*cast_like(grads, (q_in, k_out, scores, values, w_k, decay)), d_h0)


def _einsum(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.einsum(spec, a, b, preferred_element_type=f32, precision=highest(a.dtype))


def chunk_gradients(q_in: jax.Array, k_out: jax.Array, scores: jax.Array, w: jax.Array,
                    w_k: jax.Array | None, states: jax.Array, d_states: jax.Array,
                    d_o: jax.Array, d_w: jax.Array | None) -> tuple[jax.Array | None, ...]:
  """The per-chunk gradients for every (row, chunk) at once, as batched XLA matmuls:

      dW = A^T dO + K G_{n+1} (gated family; the delta rule's comes from the state pass)
      dQ = dO S^T    dA = dO W^T    dK = W G_{n+1}^T    dU = dW    dW_k = -dW S^T
      dd = sum_v G_{n+1} * S

  Float32 gradients of (q_in, k_out, scores, values, w_k or None, decay). A fused Pallas
  kernel for these (one program per row and chunk) measured 2-5% slower on the H100.
  """
  if d_w is None:
    d_w = _einsum("rnij,rniv->rnjv", scores, d_o) + _einsum("rnck,rnkv->rncv", k_out, d_states)
  d_q = _einsum("rncv,rnkv->rnck", d_o, states)
  d_scores = _einsum("rniv,rnjv->rnij", d_o, w)
  d_k = _einsum("rncv,rnkv->rnck", w, d_states)
  d_wk = None if w_k is None else -_einsum("rncv,rnkv->rnck", d_w.astype(w.dtype), states)
  d_decay = jnp.sum(d_states.astype(f32) * states.astype(f32), axis=-1)[:, :, None, :]
  return d_q, d_k, d_scores, d_w, d_wk, d_decay
