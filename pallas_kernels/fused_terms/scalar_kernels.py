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
registers, and `gradient_pass` returns the gradients of a whole chunk:

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

from pallas_kernels.chunk_recurrence.block_sizes import BlockSizes
from pallas_kernels.chunk_recurrence.chunk_math import dot
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
    q_ref, k_ref, b_ref, *rest = refs
    rel_ref, s_ref, w_ref, o_ref = rest if docs else (None, *rest)
    mm = q_ref.dtype
    dec = chunk_decays(b_ref[...], _rel(rel_ref))
    qv = q_ref[...]
    scores = _scores(qv, k_ref[...], dec).astype(mm)
    o = dec.incoming * dot(qv, s_ref[...]) + dot(scores, w_ref[...])
    o_ref[...] = o.astype(o_ref.dtype)

  return value_block_call(kernel, q, k, b, rel, [(states, key_dim), (w, chunk)], q.dtype,
                          blocks=blocks, interpret=interpret, name="scalar_gate_outputs")


def scores_transpose_pass(q: jax.Array, k: jax.Array, b: jax.Array, rel: jax.Array | None,
                          d_o: jax.Array, *, blocks: BlockSizes,
                          interpret: bool = False) -> jax.Array:
  """A^T dO for every (row, chunk): [R, N, C, V] float32 (the delta rule's state-gradient
  kernel needs it for dW = A^T dO + K_out G). Arguments as `output_pass`."""
  chunk = q.shape[2]
  docs = rel is not None

  def kernel(*refs):
    q_ref, k_ref, b_ref, *rest = refs
    rel_ref, do_ref, out_ref = rest if docs else (None, *rest)
    dec = chunk_decays(b_ref[...], _rel(rel_ref))
    scores = _scores(q_ref[...], k_ref[...], dec).astype(q_ref.dtype)
    out_ref[...] = dot(scores, do_ref[...], trans_a=True)

  return value_block_call(kernel, q, k, b, rel, [(d_o, chunk)], f32, blocks=blocks,
                          interpret=interpret, name="scalar_gate_scores_t")


def gradient_pass(q: jax.Array, k: jax.Array, w: jax.Array, b: jax.Array,
                  rel: jax.Array | None, states: jax.Array, d_states: jax.Array,
                  d_o: jax.Array, d_w: jax.Array | None = None, *, blocks: BlockSizes,
                  interpret: bool = False) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """The per-chunk gradients, one program per (row, chunk), V walked in blocks of `block_v`.

  Gated family (d_w None, w = v): (dq, dk, dv, db). Delta rule (d_w = dL/dW from the state
  gradient kernel, w = W = U - W_k S): (dq, dk, dW_k = -dW S^T, db); dU = dW.
  dq, dk, dv, dW_k [R,N,C,K|V] in the inputs' dtype; db [R,N,C] float32.

  states S_n and d_states G_{n+1} = dL/dS_{n+1}: [R,N,K,V] in the matmul dtype;
  d_o [R,N,C,V] in the matmul dtype; d_w [R,N,C,V] float32; the rest as `output_pass`.
  """
  rows, num, chunk, key_dim = q.shape
  value_dim = w.shape[-1]
  bv = min(blocks.block_v, value_dim)
  docs, delta = rel is not None, d_w is not None

  def kernel(*refs):
    q_ref, k_ref, w_ref, b_ref, *rest = refs
    if not docs:
      rest = [None, *rest]
    if not delta:
      rest = [*rest[:4], None, *rest[4:]]
    rel_ref, s_ref, g_ref, do_ref, dw_ref, dq_ref, dk_ref, dx_ref, db_ref = rest
    mm = q_ref.dtype
    dec = chunk_decays(b_ref[...], _rel(rel_ref))
    qv, kv = q_ref[...], k_ref[...]
    scores = _scores(qv, kv, dec)                                       # A, f32
    scores_mm = scores.astype(mm)
    k_out = (dec.outgoing * kv.astype(f32)).astype(mm)                  # Diag(c) k
    d_scores = jnp.zeros((chunk, chunk), f32)
    d_q_in = jnp.zeros((chunk, key_dim), f32)                           # dO S^T
    d_k_out = jnp.zeros((chunk, key_dim), f32)                          # W G^T
    d_w_k = jnp.zeros((chunk, key_dim), f32)                            # dW S^T
    d_decay = jnp.zeros((), f32)                                        # sum(G o S)
    for p in range(value_dim // bv):
      cols = pl.ds(p * bv, bv)
      do_p, w_p, s_p, g_p = do_ref[:, cols], w_ref[:, cols], s_ref[:, cols], g_ref[:, cols]
      d_scores += dot(do_p, w_p, trans_b=True)
      d_q_in += dot(do_p, s_p, trans_b=True)
      d_k_out += dot(w_p, g_p, trans_b=True)
      d_decay += jnp.sum(g_p.astype(f32) * s_p.astype(f32))
      if delta:
        d_w_k += dot(dw_ref[:, cols].astype(mm), s_p, trans_b=True)
      else:
        d_v = dot(scores_mm, do_p, trans_a=True) + dot(k_out, g_p)
        dx_ref[:, cols] = d_v.astype(dx_ref.dtype)
    if delta:
      dx_ref[...] = (-d_w_k).astype(dx_ref.dtype)
    d_pairs = (d_scores * dec.pairs).astype(mm)                         # dA o E
    d_q_in = dec.incoming * d_q_in
    d_k_out = dec.outgoing * d_k_out
    dq_ref[...] = (dot(d_pairs, kv) + d_q_in).astype(dq_ref.dtype)
    dk_ref[...] = (dot(d_pairs, qv, trans_a=True) + d_k_out).astype(dk_ref.dtype)
    products = jnp.where(dec.strict, d_scores * scores, 0.0)             # P
    to_end = jnp.sum(kv.astype(f32) * d_k_out, axis=1, keepdims=True)  # (Diag(c) k) . W G^T
    to_end = jnp.where(dec.last, 0.0, to_end)
    d_b = (jnp.sum(products, axis=1, keepdims=True)
           - jnp.sum(products, axis=0)[:, None]
           + jnp.sum(qv.astype(f32) * d_q_in, axis=1, keepdims=True)
           - to_end)
    d_b += jnp.where(dec.last, jnp.sum(to_end) + dec.decay * d_decay, 0.0)
    db_ref[...] = d_b[:, 0]

  inputs, in_specs = gradient_operands(q, k, w, b, rel, states, d_states, d_o)
  if delta:
    inputs.append(d_w)
    in_specs.append(chunk_spec(chunk, value_dim))
  third = (jax.ShapeDtypeStruct(k.shape, k.dtype) if delta
           else jax.ShapeDtypeStruct(w.shape, w.dtype))
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype),
               third, jax.ShapeDtypeStruct((rows, num, chunk), f32)]
  out_specs = [chunk_spec(chunk, key_dim), chunk_spec(chunk, key_dim),
               chunk_spec(chunk, key_dim if delta else value_dim), chunk_spec(chunk)]
  return tuple(pl.pallas_call(
      kernel, grid=(rows, num), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      compiler_params=compiler_params(blocks), interpret=interpret, name="scalar_gate_gradients",
  )(*inputs))
