"""GPU kernels (Pallas Triton) that form the per-key-gate in-chunk terms themselves.

One chunk of C tokens of one row (a batch*head pair), with the plain in-chunk
cumulative log gate b_ik = sum_{s<=i} g_sk (one value per token and key dim,
g <= 0, so b decreases down the chunk in every key column) and `rel_i`, the
number of documents started in the chunk up to token i (0: the document of
the incoming state; `jaxlin.ops.chunking.documents_in_chunk`):

    M_ij  = [j <= i] [rel_i = rel_j]                      (causal, same document)
    A_ij  = sum_k q_ik k_jk exp(b_ik - b_jk) M_ij
    a_ik  = exp(b_ik) [rel_i = 0]                         (Q_in = a o q)
    c_jk  = exp(b_Ck - b_jk) [rel_j = rel_C]              (K_out = c o k; c_C = 1)
    d_k   = exp(b_Ck) [rel_C = 0]                         (per-key decay of the state)

and, with S the state entering the chunk,

    o = Q_in S + A V            S_next = Diag(d) S + K_out^T V.

A is not one matmul: the decay sits inside the sum over K. Gates can be
strong (g ~ -30 per token), so exp(b_ik - b_jk) is never split into
exp(b_ik) exp(-b_jk) across a span that could overflow. The chunk is cut into
16-row blocks I, J:

  I > J   through the reference point r_J = b at the last row of block J:
          qt_IJ = q_I o exp(b_I - r_J), kt_J = k_J o exp(r_J - b_J), both
          exponents <= 0, A_IJ = (qt_IJ kt_J^T) o M_IJ: exact, and a matmul;
  I = J   elementwise, one column j per step of a 16-step loop:
          A_ij = sum_k q_ik k_jk exp(b_ik - b_jk), masked before the exp.

Kernels (each holds [C, C] tiles and one key or value block of [C, K], [C, V] at a time):
  `scores_pass`        A [C, C] float32, summed over key blocks in a loop;
  `output_pass`        o = Q_in S + A W by value blocks, A from `scores_pass`;
  `gradient_pass`      dv = A^T dO + K_out G by value blocks (A kept from the forward), then
  `key_gradient_pass`  dq, dk, db by key blocks (dA recomputed in each), walking the
                       16-row block columns J in order: dA_IJ (I >= J) formed there, and
                       block J's rows stored as soon as they are complete.

Backward, with G = dL/dS_next and dA = (dO V^T) o M:

    dv   = A^T dO + K_out G            dQ_in = dO S^T         dK_out = V G^T
    dq   = (through A) + a o dQ_in     dk    = (through A) + c o dK_out
    I > J:  dqt = dA_IJ kt_J,  dq_I += dqt o exp(b_I - r_J),  db_I += qt o dqt
            dkt = dA_IJ^T qt,  dk_J += dkt o exp(r_J - b_J),  db_J -= kt o dkt
            (r_J gets no gradient: A_IJ does not depend on it)
    I = J:  P_ijk = dA_ij q_ik k_jk exp(b_ik - b_jk);  db_i += sum_{j<i} P_ij,
            db_j -= sum_{i>j} P_ij (i = j has gap 0 by construction: left out exactly)
    db   += Q_in o dQ_in - [i < C] K_out o dK_out
    db_C += sum_{j<C} (K_out o dK_out)_j + d o sum_v (G o S)

Every term but dA is local to its key column k, so a key block of K computes its
columns of dq, dk and db alone.

db [C, K] is dL/db; the caller turns it into dg (the transpose of the cumsum).

Legend: R rows, N chunks, C chunk length, K key dim, V value dim.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.block_sizes import BlockSizes
from pallas_kernels.chunk_recurrence.chunk_math import dot
from pallas_kernels.chunk_recurrence.operands import with_absent
from pallas_kernels.fused_terms.specs import (chunk_spec, compiler_params, gate_operands,
                                              gradient_operands, value_block_call)

f32 = jnp.float32
BLOCK = 16               # rows of a block of the chunk


class Rows(NamedTuple):
  """One 16-row block I of a chunk and its gates (module docstring)."""
  q: jax.Array                 # [16, K] matmul dtype
  k: jax.Array                 # [16, K]
  b: jax.Array                 # [16, K] float32
  rel: jax.Array | None        # [16] int32
  ref: jax.Array               # r_I: b at the block's last row, [K] float32
  last: jax.Array              # bool [16, 1]: the chunk's last token
  b_end: jax.Array             # b_C: b at the chunk's last row, [K] float32
  rel_end: jax.Array | None    # rel_C (int32 scalar)

  def incoming(self) -> jax.Array:
    """a [16, K] float32 (module docstring)."""
    return _incoming(self.b, self.rel)

  def outgoing(self) -> jax.Array:
    """c [16, K] float32 (module docstring)."""
    return _outgoing(self.b, self.rel, self.last, self.b_end, self.rel_end)


def _incoming(b: jax.Array, rel: jax.Array | None) -> jax.Array:
  """a = exp(b) [rel = 0] for the rows b [n, K], rel [n] of a chunk."""
  a = jnp.exp(b)
  return a if rel is None else jnp.where((rel == 0)[:, None], a, 0.0)


def _outgoing(b: jax.Array, rel: jax.Array | None, last: jax.Array, b_end: jax.Array,
              rel_end: jax.Array | None) -> jax.Array:
  """c = exp(b_C - b) [rel = rel_C] for the rows b [n, K], rel [n] of a chunk; `last` bool
  [n, 1] marks row C, whose c is 1 by definition."""
  c = jnp.exp(jnp.where(last, 0.0, jnp.minimum(b_end[None, :] - b, 0.0)))
  return c if rel is None else jnp.where((rel == rel_end)[:, None], c, 0.0)


class Chunk(NamedTuple):
  """A chunk as its 16-row blocks, with the chunk-level gate terms."""
  rows: list[Rows]
  decay: jax.Array             # d [K] float32


def _row_iota(shape: tuple[int, ...] = (BLOCK, 1)) -> jax.Array:
  return jax.lax.broadcasted_iota(jnp.int32, shape, 0)


def _col_iota() -> jax.Array:
  return jax.lax.broadcasted_iota(jnp.int32, (BLOCK, BLOCK), 1)


def _pick(x: jax.Array, i: int | jax.Array) -> jax.Array:
  """Row i of a [16, K] block ([K]) or entry i of a [16] vector (a scalar)."""
  if x.ndim == 1:
    return jnp.sum(jnp.where(_row_iota((BLOCK,)) == i, x, 0))
  return jnp.sum(jnp.where(_row_iota() == i, x, 0), axis=0)


def _load(q_ref: Any, k_ref: Any, b_ref: Any, rel_ref: Any | None,
          keys: Any = slice(None)) -> Chunk:
  """The blocks of one chunk (static row slices of the refs; the key columns `keys`, all by
  default) and its decay."""
  num = q_ref.shape[0] // BLOCK
  last_rows = pl.ds((num - 1) * BLOCK, BLOCK)
  b_end = _pick(b_ref[last_rows, keys], BLOCK - 1)
  rel_end = None if rel_ref is None else _pick(rel_ref[last_rows], BLOCK - 1)
  blocks = [_load_block(q_ref, k_ref, b_ref, rel_ref, i, keys, b_end, rel_end)
            for i in range(num)]
  decay = jnp.exp(b_end)
  if rel_ref is not None:
    decay = jnp.where(rel_end == 0, decay, 0.0)
  return Chunk(blocks, decay)


def _load_block(q_ref: Any, k_ref: Any, b_ref: Any, rel_ref: Any | None, i: int, keys: Any,
                b_end: jax.Array, rel_end: jax.Array | None) -> Rows:
  """Block i of the chunk (rows 16 i .. 16 i + 15; the key columns `keys`), with the chunk's
  last-row gate b_C and document rel_C."""
  num = q_ref.shape[0] // BLOCK
  rows = pl.ds(i * BLOCK, BLOCK)
  b = b_ref[rows, keys]
  rel = None if rel_ref is None else rel_ref[rows]
  return Rows(q_ref[rows, keys], k_ref[rows, keys], b, rel, _pick(b, BLOCK - 1),
              (_row_iota() == BLOCK - 1) & (i == num - 1), b_end, rel_end)


def _same(x: Rows, y: Rows) -> jax.Array | None:
  """bool [16, 16]: row i of block x and row j of block y are in one document."""
  return None if x.rel is None else x.rel[:, None] == y.rel[None, :]


def _masked(mask: jax.Array | None, x: jax.Array) -> jax.Array:
  return x if mask is None else jnp.where(mask, x, 0.0)


def _to_ref(x: Rows) -> jax.Array:
  """exp(r_J - b_J) [16, K] of block J (exponents <= 0)."""
  return jnp.exp(jnp.minimum(x.ref[None, :] - x.b, 0.0))


def _from_ref(x: Rows, y: Rows) -> jax.Array:
  """exp(b_I - r_J) [16, K] of block row I = x past block column J = y (exponents <= 0)."""
  return jnp.exp(jnp.minimum(x.b - y.ref[None, :], 0.0))


def _column(x: Rows, j: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(k_j [K] float32, the decays exp(b_i - b_j) [16, K] of the block's rows i against its
  row j, masked to i >= j and rel_i = rel_j before the exp)."""
  k_j = _pick(x.k.astype(f32), j)
  b_j = _pick(x.b, j)
  mask = _row_iota() >= j
  if x.rel is not None:
    mask = mask & (x.rel == _pick(x.rel, j))[:, None]
  gaps = jnp.where(mask, jnp.minimum(x.b - b_j[None, :], 0.0), 0.0)
  return k_j, jnp.where(mask, jnp.exp(gaps), 0.0)


def _diagonal_scores(x: Rows) -> jax.Array:
  """A_II [16, 16] float32, elementwise: one column per loop step."""
  col = _col_iota()
  q = x.q.astype(f32)

  def add_column(j: jax.Array, scores: jax.Array) -> jax.Array:
    k_j, decays = _column(x, j)
    return jnp.where(col == j, jnp.sum(q * k_j[None, :] * decays, axis=1)[:, None], scores)

  return jax.lax.fori_loop(0, BLOCK, add_column, jnp.zeros((BLOCK, BLOCK), f32))


def _scores(chunk: Chunk) -> dict[tuple[int, int], jax.Array]:
  """The blocks A_IJ (J <= I) of the scores, float32 [16, 16]."""
  out = {}
  mm = chunk.rows[0].q.dtype
  for j, y in enumerate(chunk.rows):
    out[j, j] = _diagonal_scores(y)
    k_t = (y.k.astype(f32) * _to_ref(y)).astype(mm)
    for i in range(j + 1, len(chunk.rows)):
      x = chunk.rows[i]
      q_t = (x.q.astype(f32) * _from_ref(x, y)).astype(mm)
      out[i, j] = _masked(_same(x, y), dot(q_t, k_t, trans_b=True))
  return out


def scores_pass(q: jax.Array, k: jax.Array, b: jax.Array, rel: jax.Array | None, *,
                blocks: BlockSizes, interpret: bool = False) -> jax.Array:
  """A [R, N, C, C] float32 of every (row, chunk), zero above the diagonal.

  A = sum over key blocks kappa of A_kappa (the scores of keys kappa alone), one key block of
  `BlockSizes.key_block(K)` columns per loop step, so a step holds [16, K_block] tiles.
  Arguments as `output_pass`.
  """
  rows, num, chunk, key_dim = q.shape
  bk = blocks.key_block(key_dim)
  nb = chunk // BLOCK
  pairs = [(i, j) for i in range(nb) for j in range(i + 1)]
  docs = rel is not None

  def kernel(*refs: Any) -> None:
    q_ref, k_ref, b_ref, rel_ref, a_ref = with_absent(refs, (True, True, True, docs, True))

    def add_key_block(kb: jax.Array, acc: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
      scores = _scores(_load(q_ref, k_ref, b_ref, rel_ref, pl.ds(kb * bk, bk)))
      return tuple(a + scores[ij] for a, ij in zip(acc, pairs))

    zeros = tuple(jnp.zeros((BLOCK, BLOCK), f32) for _ in pairs)
    scores = dict(zip(pairs, jax.lax.fori_loop(0, key_dim // bk, add_key_block, zeros)))
    for i in range(nb):
      for j in range(nb):
        a_ij = scores[i, j] if j <= i else jnp.zeros((BLOCK, BLOCK), f32)
        a_ref[pl.ds(i * BLOCK, BLOCK), pl.ds(j * BLOCK, BLOCK)] = a_ij

  inputs, in_specs = gate_operands(q, k, b, rel)
  return pl.pallas_call(
      kernel, grid=(rows, num), in_specs=in_specs, out_specs=chunk_spec(chunk, chunk),
      out_shape=jax.ShapeDtypeStruct((rows, num, chunk, chunk), f32),
      compiler_params=compiler_params(blocks), interpret=interpret, name="key_gate_scores",
  )(*inputs)


def _reach(b: jax.Array, rel: jax.Array | None) -> tuple[jax.Array, jax.Array]:
  """(a, c) [C, K] float32 of one chunk from b [C, K] and rel [C] (module docstring)."""
  last = jax.lax.broadcasted_iota(jnp.int32, (b.shape[0], 1), 0) == b.shape[0] - 1
  b_end = jnp.sum(jnp.where(last, b, 0.0), axis=0)
  rel_end = None if rel is None else jnp.sum(jnp.where(last[:, 0], rel, 0))
  return _incoming(b, rel), _outgoing(b, rel, last, b_end, rel_end)


def output_pass(q: jax.Array, k: jax.Array, b: jax.Array, rel: jax.Array | None,
                states: jax.Array, w: jax.Array, scores: jax.Array, *, blocks: BlockSizes,
                interpret: bool = False) -> jax.Array:
  """o = Q_in S + A W for every (row, chunk): [R, N, C, V] in q's dtype.

  q, k: [R,N,C,K] and states S [R,N,K,V], w [R,N,C,V] in the matmul dtype;
  b: [R,N,C,K] float32; rel: [R,N,C] int32 or None; scores A [R,N,C,C] float32 from
  `scores_pass`.
  """
  chunk, key_dim = q.shape[2:]
  docs = rel is not None

  def kernel(*refs: Any) -> None:
    q_ref, _, b_ref, rel_ref, a_ref, s_ref, w_ref, o_ref = with_absent(
        refs, (True, True, True, docs, True, True, True, True))
    mm = q_ref.dtype
    incoming, _ = _reach(b_ref[...], None if rel_ref is None else rel_ref[...])
    q_in = (incoming * q_ref[...].astype(f32)).astype(mm)
    o = dot(q_in, s_ref[...]) + dot(a_ref[...].astype(mm), w_ref[...])
    o_ref[...] = o.astype(o_ref.dtype)

  return value_block_call(kernel, q, k, b, rel, [(states, key_dim), (w, chunk)], q.dtype,
                          whole_chunk=[(scores, chunk_spec(chunk, chunk))], blocks=blocks,
                          interpret=interpret, name="key_gate_outputs")


def _diagonal_grads(x: Rows, d_scores: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(dq, dk, db) [16, K] float32 of block I through A_II, given dA_II (masked)."""
  col, row = _col_iota(), _row_iota()
  q = x.q.astype(f32)

  def add_column(j: jax.Array, grads: tuple[jax.Array, jax.Array, jax.Array]
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
    d_q, d_k, d_b = grads
    k_j, decays = _column(x, j)
    weights = jnp.sum(jnp.where(col == j, d_scores, 0.0), axis=1)[:, None] * decays
    d_q += weights * k_j[None, :]
    through = q * weights                                   # dA_ij q_ik exp(b_ik - b_jk)
    d_k += jnp.where(row == j, jnp.sum(through, axis=0)[None, :], 0.0)
    products = jnp.where(row > j, through * k_j[None, :], 0.0)   # P_ij, i > j only
    d_b += products - jnp.where(row == j, jnp.sum(products, axis=0)[None, :], 0.0)
    return d_q, d_k, d_b

  zeros = jnp.zeros(q.shape, f32)
  return jax.lax.fori_loop(0, BLOCK, add_column, (zeros, zeros, zeros))


def gradient_pass(q: jax.Array, k: jax.Array, v: jax.Array, b: jax.Array,
                  rel: jax.Array | None, states: jax.Array, d_states: jax.Array,
                  d_o: jax.Array, scores: jax.Array, *, blocks: BlockSizes,
                  interpret: bool = False) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """(dq, dk, dv in the inputs' dtype, db [R,N,C,K] float32) of every chunk.

  dv = A^T dO + K_out G by value blocks (`key_gate_value_gradients`, A the forward's
  `scores_pass`); dq, dk and db by key blocks (`key_gradient_pass`).
  states S_n and d_states G_{n+1} = dL/dS_{n+1}: [R,N,K,V] in the matmul dtype;
  d_o [R,N,C,V] in the matmul dtype; the rest as `output_pass`.
  """
  chunk, key_dim = q.shape[2:]
  docs = rel is not None

  def kernel(*refs: Any) -> None:
    _, k_ref, b_ref, rel_ref, a_ref, do_ref, g_ref, dv_ref = with_absent(
        refs, (True, True, True, docs, True, True, True, True))
    mm = k_ref.dtype
    _, outgoing = _reach(b_ref[...], None if rel_ref is None else rel_ref[...])
    k_out = (outgoing * k_ref[...].astype(f32)).astype(mm)
    d_v = dot(a_ref[...].astype(mm), do_ref[...], trans_a=True) + dot(k_out, g_ref[...])
    dv_ref[...] = d_v.astype(dv_ref.dtype)

  d_v = value_block_call(kernel, q, k, b, rel, [(d_o, chunk), (d_states, key_dim)], v.dtype,
                         whole_chunk=[(scores, chunk_spec(chunk, chunk))], blocks=blocks,
                         interpret=interpret, name="key_gate_value_gradients")
  d_q, d_k, d_b = key_gradient_pass(q, k, v, b, rel, states, d_states, d_o, blocks=blocks,
                                    interpret=interpret)
  return d_q, d_k, d_v, d_b


def key_gradient_pass(q: jax.Array, k: jax.Array, v: jax.Array, b: jax.Array,
                      rel: jax.Array | None, states: jax.Array, d_states: jax.Array,
                      d_o: jax.Array, *, blocks: BlockSizes,
                      interpret: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(dq, dk, db) of every chunk, one program per (row, chunk, key block of
  `BlockSizes.key_block(K)` columns), V walked in blocks of `block_v`.

  Every per-key term is local to its key column; only dA = dO V^T spans all keys, and each
  key block recomputes it. Arguments as `gradient_pass`.
  """
  rows, num, chunk, key_dim = q.shape
  value_dim = v.shape[-1]
  bk = blocks.key_block(key_dim)
  bv = min(blocks.block_v, value_dim)
  nb = chunk // BLOCK
  docs = rel is not None

  def kernel(*refs: Any) -> None:
    q_ref, k_ref, v_ref, b_ref, rel_ref, s_ref, g_ref, do_ref, dq_ref, dk_ref, db_ref = (
        with_absent(refs, (True,) * 4 + (docs,) + (True,) * 6))
    mm = q_ref.dtype
    c = _load(q_ref, k_ref, b_ref, rel_ref)
    row_block = lambda i: pl.ds(i * BLOCK, BLOCK)
    pending_q = [jnp.zeros((BLOCK, bk), f32) for _ in range(nb)]   # dq_I from blocks J < I
    pending_b = [jnp.zeros((BLOCK, bk), f32) for _ in range(nb)]   # db_I from blocks J < I
    ends = jnp.zeros((bk,), f32)                    # sum_{j<C} (K_out o dK_out)_j
    # Block column J at a time: its rows' gradients are complete once it is done (the rows
    # of A_JJ' with J' < J came in earlier steps), so it stores them at once.
    for j, y in enumerate(c.rows):
      d_q_in = jnp.zeros((BLOCK, bk), f32)                                # dO_J S^T
      d_k_out = jnp.zeros((BLOCK, bk), f32)                               # V_J G^T
      d_scores = [jnp.zeros((BLOCK, BLOCK), f32) for _ in range(j, nb)]   # dA_IJ = dO_I V_J^T
      d_decay = jnp.zeros((bk,), f32)                                     # sum_v G o S
      for p in range(value_dim // bv):
        cols = pl.ds(p * bv, bv)
        v_j, g_p = v_ref[row_block(j), cols], g_ref[:, cols]
        d_k_out += dot(v_j, g_p, trans_b=True)
        for i in range(j, nb):
          d_o_i = do_ref[row_block(i), cols]
          d_scores[i - j] += dot(d_o_i, v_j, trans_b=True)
          if i == j:
            d_q_in += dot(d_o_i, s_ref[:, cols], trans_b=True)
        if j == nb - 1:
          d_decay += jnp.sum(g_p.astype(f32) * s_ref[:, cols].astype(f32), axis=1)
      d_q, d_k, d_b = _diagonal_grads(y, _masked(_same(y, y), d_scores[0]))
      d_in = y.incoming() * d_q_in                                          # a o dQ_in
      d_out = y.outgoing() * d_k_out                                        # c o dK_out
      to_end = jnp.where(y.last, 0.0, y.k.astype(f32) * d_out)            # K_out o dK_out
      ends += jnp.sum(to_end, axis=0)
      d_q += d_in + pending_q[j]
      d_k += d_out
      d_b += y.q.astype(f32) * d_in - to_end + pending_b[j]
      to_ref = _to_ref(y)
      k_t = y.k.astype(f32) * to_ref
      k_t_mm = k_t.astype(mm)
      d_k_t = jnp.zeros((BLOCK, bk), f32)
      for i in range(j + 1, nb):
        x = c.rows[i]
        from_ref = _from_ref(x, y)
        q_t = x.q.astype(f32) * from_ref
        d_a = _masked(_same(x, y), d_scores[i - j]).astype(mm)
        d_q_t = dot(d_a, k_t_mm)
        pending_q[i] += d_q_t * from_ref
        pending_b[i] += q_t * d_q_t
        d_k_t += dot(d_a, q_t.astype(mm), trans_a=True)
      d_k += d_k_t * to_ref
      d_b -= k_t * d_k_t
      if j == nb - 1:
        d_b += jnp.where(y.last, (ends + c.decay * d_decay)[None, :], 0.0)
      dq_ref[row_block(j), :] = d_q.astype(dq_ref.dtype)
      dk_ref[row_block(j), :] = d_k.astype(dk_ref.dtype)
      db_ref[row_block(j), :] = d_b

  inputs, in_specs = gradient_operands(q, k, v, b, rel, states, d_states, d_o, key_block=bk)
  key_cols = chunk_spec(chunk, bk, blocked=True)
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype),
               jax.ShapeDtypeStruct(b.shape, f32)]
  return tuple(pl.pallas_call(
      kernel, grid=(rows, num, key_dim // bk), in_specs=in_specs, out_specs=[key_cols] * 3,
      out_shape=out_shape, compiler_params=compiler_params(blocks), interpret=interpret,
      name="key_gate_gradients",
  )(*inputs))
