"""GPU kernels (Pallas Triton) that form the in-chunk terms of a scalar gate themselves.

One chunk of C tokens of one row (a batch*head pair), with the plain in-chunk
cumulative log gate b_i = sum_{s<=i} g_s (one scalar per token) and `rel_i`,
the number of documents started in the chunk up to token i (0: the document
of the incoming state; `jaxlin.ops.chunking.documents_in_chunk`):

    M_ij  = [j <= i] [rel_i = rel_j]                 (causal, same document)
    E_ij  = exp(b_i - b_j) M_ij                      A = (q k^T) o E
    a_i   = exp(b_i) [rel_i = 0]                     (reach of the incoming state)
    c_j   = exp(b_C - b_j) [rel_j = rel_C]           (reach to the outgoing state)
    d     = exp(b_C) [rel_C = 0]                     (decay of the state over the chunk)

and, with S the state entering the chunk and W the values (U - W_k S for the
delta rule),

    o = Diag(a) q S + A W        S_next = d S + (Diag(c) k)^T W.

Every exponent is <= 0 where its mask is set (b decreases), so nothing
overflows. The XLA form materialises A, Diag(a) q and Diag(c) k in float32 and
differentiates through them; here `output_pass` forms A from q, k and b in
registers, and the backward kernels return the gradients of a whole chunk
(`key_gradient_pass`: dq, dk, dW_k, db by key blocks; `value_gradient_pass`: dv):

    dA  = dO W^T                     dv = A^T dO + Diag(c) k G     (gated family, W = v)
    dq  = (dA o E) k + Diag(a) dO S^T                              dW_k = -dW S^T (delta rule)
    dk  = (dA o E)^T q + Diag(c) W G^T
    db_i = sum_j P_ij - sum_j P_ji + q_i . (Diag(a) dO S^T)_i - [i < C] (Diag(c) k)_i . (W G^T)_i
    db_C += sum_{j<C} (Diag(c) k)_j . (W G^T)_j + d sum(G o S)

where G = dL/dS_next, dW the delta rule's gradient of W (from its state-gradient
kernel), and P = dA o A off the diagonal (i > j): the gaps that
are 0 by construction (E_ii, c_C) contribute no gradient, as in the XLA form
(`chunking.pair_gaps`), so strong gates keep their small true gradients.
The caller turns db into dg (the transpose of the cumulative sum).

Legend: R rows, N chunks, C chunk length, K key dim, V value dim.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.block_sizes import BlockSizes
from pallas_kernels.chunk_recurrence.chunk_math import dot
from pallas_kernels.chunk_recurrence.operands import with_absent
from pallas_kernels.fused_terms.specs import (chunk_spec, compiler_params, gradient_operands,
                                              value_block_call)

f32 = jnp.float32


class ChunkDecays(NamedTuple):
  """The masks and decays of one chunk (module docstring), float32."""
  pairs: jax.Array      # E [C, C]
  strict: jax.Array     # bool [C, C]: j < i, same document (where P counts)
  incoming: jax.Array   # a [C, 1]
  outgoing: jax.Array   # c [C, 1]
  decay: jax.Array      # d, a scalar
  last: jax.Array       # bool [C, 1]: the chunk's last token


def chunk_decays(b: jax.Array, rel: jax.Array | None) -> ChunkDecays:
  """E, a, c and d of one chunk from b [C] float32 and rel [C] int32 (None: one document)."""
  chunk = b.shape[0]
  row = jax.lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0)
  col = jax.lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1)
  is_last = jax.lax.broadcasted_iota(jnp.int32, (chunk,), 0) == chunk - 1
  b_last = jnp.sum(jnp.where(is_last, b, 0.0))
  causal, strict = col <= row, col < row
  start = end = None
  carry = True
  if rel is not None:
    same = rel[:, None] == rel[None, :]
    causal, strict = causal & same, strict & same
    rel_last = jnp.sum(jnp.where(is_last, rel, 0))
    start, end, carry = rel == 0, rel == rel_last, rel_last == 0
  gaps = b[:, None] - b[None, :]
  pairs = jnp.where(causal, jnp.exp(jnp.where(causal, gaps, 0.0)), 0.0)
  incoming = jnp.exp(b)
  outgoing = jnp.exp(jnp.where(is_last, 0.0, b_last - b))
  if rel is not None:
    incoming = jnp.where(start, incoming, 0.0)
    outgoing = jnp.where(end, outgoing, 0.0)
  decay = jnp.where(carry, jnp.exp(b_last), 0.0)
  return ChunkDecays(pairs, strict, incoming[:, None], outgoing[:, None], decay,
                     is_last[:, None])


def _rel(rel_ref) -> jax.Array | None:
  return None if rel_ref is None else rel_ref[...]


def _scores(q: jax.Array, k: jax.Array, dec: ChunkDecays) -> jax.Array:
  """A = (q k^T) o E of one chunk, float32."""
  return dot(q, k, trans_b=True) * dec.pairs


def output_pass(q: jax.Array, k: jax.Array, b: jax.Array, rel: jax.Array | None,
                states: jax.Array, w: jax.Array, *, blocks: BlockSizes,
                interpret: bool = False) -> jax.Array:
  """o = Diag(a) q S + A W for every (row, chunk): [R, N, C, V] in q's dtype.

  q, k: [R,N,C,K] and states S [R,N,K,V], w [R,N,C,V] in the matmul dtype;
  b: [R,N,C] float32; rel: [R,N,C] int32 or None.
  """
  chunk, key_dim = q.shape[2:]
  docs = rel is not None

  def kernel(*refs):
    q_ref, k_ref, b_ref, rel_ref, s_ref, w_ref, o_ref = with_absent(
        refs, (True, True, True, docs, True, True, True))
    mm = q_ref.dtype
    dec = chunk_decays(b_ref[...], _rel(rel_ref))
    qv = q_ref[...]
    scores = _scores(qv, k_ref[...], dec).astype(mm)
    o = dec.incoming * dot(qv, s_ref[...]) + dot(scores, w_ref[...])
    o_ref[...] = o.astype(o_ref.dtype)

  return value_block_call(kernel, q, k, b, rel, [(states, key_dim), (w, chunk)], q.dtype,
                          blocks=blocks, interpret=interpret, name="scalar_gate_outputs")


def value_gradient_pass(q: jax.Array, k: jax.Array, b: jax.Array, rel: jax.Array | None,
                        d_o: jax.Array, d_states: jax.Array | None, out_dtype: jnp.dtype, *,
                        blocks: BlockSizes, interpret: bool = False) -> jax.Array:
  """dv = A^T dO + Diag(c) k G for every (row, chunk): [R, N, C, V] of `out_dtype`.

  With d_states None, A^T dO alone (the delta rule's state-gradient kernel adds K_out G
  itself to form dW). d_o [R,N,C,V] and d_states G_{n+1} [R,N,K,V] in the matmul dtype;
  the rest as `output_pass`.
  """
  chunk, key_dim = q.shape[2:]
  docs, with_states = rel is not None, d_states is not None

  def kernel(*refs):
    q_ref, k_ref, b_ref, rel_ref, do_ref, g_ref, out_ref = with_absent(
        refs, (True, True, True, docs, True, with_states, True))
    mm = q_ref.dtype
    dec = chunk_decays(b_ref[...], _rel(rel_ref))
    kv = k_ref[...]
    scores = _scores(q_ref[...], kv, dec).astype(mm)
    d_v = dot(scores, do_ref[...], trans_a=True)
    if with_states:
      d_v += dot((dec.outgoing * kv.astype(f32)).astype(mm), g_ref[...])
    out_ref[...] = d_v.astype(out_ref.dtype)

  extra = [(d_o, chunk)] + ([] if d_states is None else [(d_states, key_dim)])
  return value_block_call(kernel, q, k, b, rel, extra, out_dtype, blocks=blocks,
                          interpret=interpret, name="scalar_gate_value_gradients")


def gradient_pass(q: jax.Array, k: jax.Array, w: jax.Array, b: jax.Array,
                  rel: jax.Array | None, states: jax.Array, d_states: jax.Array,
                  d_o: jax.Array, d_w: jax.Array | None = None, *, blocks: BlockSizes,
                  interpret: bool = False) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """The per-chunk gradients of every (row, chunk) (module docstring).

  Gated family (d_w None, w = v): (dq, dk, dv, db); dv from `value_gradient_pass`. Delta
  rule (d_w = dL/dW from the state gradient kernel, w = W = U - W_k S): (dq, dk,
  dW_k = -dW S^T, db); dU = dW. dq, dk, dv, dW_k [R,N,C,K|V] in the inputs' dtype;
  db [R,N,C] float32.

  states S_n and d_states G_{n+1} = dL/dS_{n+1}: [R,N,K,V] in the matmul dtype;
  d_o [R,N,C,V] in the matmul dtype; d_w [R,N,C,V] float32; the rest as `output_pass`.
  """
  d_q, d_k, d_w_k, d_b = key_gradient_pass(q, k, w, b, rel, states, d_states, d_o, d_w,
                                           blocks=blocks, interpret=interpret)
  if d_w is None:
    d_w_k = value_gradient_pass(q, k, b, rel, d_o, d_states, w.dtype, blocks=blocks,
                                interpret=interpret)
  return d_q, d_k, d_w_k, d_b


def key_gradient_pass(q: jax.Array, k: jax.Array, w: jax.Array, b: jax.Array,
                      rel: jax.Array | None, states: jax.Array, d_states: jax.Array,
                      d_o: jax.Array, d_w: jax.Array | None, *, blocks: BlockSizes,
                      interpret: bool = False
                      ) -> tuple[jax.Array, jax.Array, jax.Array | None, jax.Array]:
  """(dq, dk, dW_k or None, db) of every (row, chunk), one program per (row, chunk, key
  block of `BlockSizes.key_block(K)` columns), V walked in blocks of `block_v`.

  Every term is a sum over K, so a key block computes its share: its columns of dq, dk and
  dW_k (dA = dO W^T is recomputed in each), and of db with A restricted to its keys,
  A_kappa = (q_kappa k_kappa^T) o E; the key blocks' db are summed after the kernel. Keeping
  [C, K_block] accumulators instead of [C, K] keeps the kernel within the registers.
  Arguments as `gradient_pass`.
  """
  rows, num, chunk, key_dim = q.shape
  value_dim = w.shape[-1]
  bk = blocks.key_block(key_dim)
  bv = min(blocks.block_v, value_dim)
  docs, delta = rel is not None, d_w is not None

  def kernel(*refs):
    (q_ref, k_ref, w_ref, b_ref, rel_ref, s_ref, g_ref, do_ref, dw_ref, dq_ref, dk_ref,
     dwk_ref, db_ref) = with_absent(refs, (True, True, True, True, docs, True, True, True,
                                           delta, True, True, delta, True))
    mm = q_ref.dtype
    dec = chunk_decays(b_ref[...], _rel(rel_ref))
    qv, kv = q_ref[...], k_ref[...]                                     # [C, bk]

    def add_value_block(p: jax.Array, acc: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
      d_scores, d_q_in, d_k_out, d_decay, *d_w_k = acc
      cols = pl.ds(p * bv, bv)
      do_p, w_p, s_p, g_p = do_ref[:, cols], w_ref[:, cols], s_ref[:, cols], g_ref[:, cols]
      d_scores += dot(do_p, w_p, trans_b=True)
      d_q_in += dot(do_p, s_p, trans_b=True)
      d_k_out += dot(w_p, g_p, trans_b=True)
      d_decay += jnp.sum(g_p.astype(f32) * s_p.astype(f32))
      if delta:
        d_w_k = [d_w_k[0] + dot(dw_ref[:, cols].astype(mm), s_p, trans_b=True)]
      return d_scores, d_q_in, d_k_out, d_decay, *d_w_k

    keys = jnp.zeros((chunk, bk), f32)
    # dO W^T, dO S^T, W G^T, sum(G o S) and, for the delta rule, dW S^T: summed over value blocks
    d_scores, d_q_in, d_k_out, d_decay, *d_w_k = jax.lax.fori_loop(
        0, value_dim // bv, add_value_block,
        (jnp.zeros((chunk, chunk), f32), keys, keys, jnp.zeros((), f32),
         *([keys] if delta else [])))
    if delta:
      dwk_ref[...] = (-d_w_k[0]).astype(dwk_ref.dtype)
    d_pairs = (d_scores * dec.pairs).astype(mm)                         # dA o E
    d_q_in = dec.incoming * d_q_in
    d_k_out = dec.outgoing * d_k_out
    dq_ref[...] = (dot(d_pairs, kv) + d_q_in).astype(dq_ref.dtype)
    dk_ref[...] = (dot(d_pairs, qv, trans_a=True) + d_k_out).astype(dk_ref.dtype)
    products = jnp.where(dec.strict, d_scores * _scores(qv, kv, dec), 0.0)   # P, keys kappa
    to_end = jnp.sum(kv.astype(f32) * d_k_out, axis=1, keepdims=True)  # (Diag(c) k) . W G^T
    to_end = jnp.where(dec.last, 0.0, to_end)
    d_b = (jnp.sum(products, axis=1, keepdims=True)
           - jnp.sum(products, axis=0)[:, None]
           + jnp.sum(qv.astype(f32) * d_q_in, axis=1, keepdims=True)
           - to_end)
    d_b += jnp.where(dec.last, jnp.sum(to_end) + dec.decay * d_decay, 0.0)
    db_ref[...] = d_b[:, 0]

  inputs, in_specs = gradient_operands(q, k, w, b, rel, states, d_states, d_o, key_block=bk)
  if delta:
    inputs.append(d_w)
    in_specs.append(chunk_spec(chunk, value_dim))
  key_cols = chunk_spec(chunk, bk, blocked=True)
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype)]
  out_specs = [key_cols, key_cols]
  if delta:
    out_shape.append(jax.ShapeDtypeStruct(k.shape, k.dtype))
    out_specs.append(key_cols)
  out_shape.append(jax.ShapeDtypeStruct((rows, num, key_dim // bk, chunk), f32))
  out_specs.append(pl.BlockSpec((None, None, None, chunk), lambda r, n, kb: (r, n, kb, 0)))
  outs = pl.pallas_call(
      kernel, grid=(rows, num, key_dim // bk), in_specs=in_specs, out_specs=out_specs,
      out_shape=out_shape, compiler_params=compiler_params(blocks), interpret=interpret,
      name="scalar_gate_gradients",
  )(*inputs)
  d_q, d_k, *d_w_k, d_b = outs
  return d_q, d_k, (d_w_k[0] if delta else None), jnp.sum(d_b, axis=2)
