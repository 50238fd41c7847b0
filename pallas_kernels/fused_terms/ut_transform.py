"""GPU kernels (Pallas Triton) for the UT transform of the delta rule, one chunk per program.

One chunk of C tokens of one row (a batch*head pair): keys k and their
projections p [C, K], values v [C, V] (matmul dtype), write strengths beta,
gate strengths s ("strength") and the in-chunk cumulative log gate cum [C]
(float32), and rel [C] int32, the documents started in the chunk up to each
token (`jaxlin.ops.chunking.documents_in_chunk`; absent: one document):

    M_ij = [j < i] [rel_i = rel_j]                      (strict causal, same document)
    E_ij = exp(cum_i - cum_j) M_ij                       (masked before the exp)
    L_ij = s_i (p_i . k_j) E_ij                          (strictly lower)
    T    = (I + L)^{-1}
    a_i  = exp(cum_i) [rel_i = 0]                        (reach of the incoming state)
    U    = T Diag(beta) V        W_k = T Diag(s a) P

as `u_wk` of `jaxlin.ops.delta.chunk_terms`. T is built as in
`jaxlin.ops.triangular`: 16-row blocks, each 16 x 16 diagonal block of I + L
inverted by forward substitution (a rank-1 update per column, 15 of them), the
blocks below the diagonal by matmuls T_IJ = -T_II sum_{J <= M < I} L_IM T_MJ.
The forward reads P, K and V by 128-column blocks (P K^T summed over them; U and
W_k written by them), so at K = 256 only half of P and K is live at a time.

Backward, with X = [Diag(beta) V | Diag(s a) P], Y = T X = [U | W_k] and the
cotangents dY = [dU | dW_k]:

    dX = T^T dY                  dL = -(T^T dY X^T T^T) o M = -(dX Y^T) o M
    G  = Diag(s) (dL o E)        dp = G k + Diag(s a) dX_P      dk = G^T p
    dv = Diag(beta) dX_V         dbeta_i = dX_V,i . v_i
    ds_i   = sum_j (dL o E o P K^T)_ij + a_i (dX_P,i . p_i)
    dcum_i = sum_j (dL o L)_ij - sum_j (dL o L)_ji + s_i a_i (dX_P,i . p_i)

T [C, C] float32 is kept from the forward pass for the backward one. Products
that apply T take T and X in the matmul dtype (float32 accumulation); the
inverse itself is float32 throughout.

Legend: R rows (batch * heads), N chunks, C chunk length, K key dim, V value dim.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from pallas_kernels.chunk_recurrence.chunk_math import dot
from pallas_kernels.chunk_recurrence.operands import with_absent
from pallas_kernels.fused_terms.specs import chunk_spec

f32 = jnp.float32
BLOCK = 16                 # rows of a block of the inverse
COLUMN_BLOCK = 64          # columns of K or V per step of the backward kernels
FORWARD_COLUMN_BLOCK = 128  # ... and of the forward kernel (K = 256 takes two steps)
CHUNKS = (16, 32, 64)      # chunk lengths the kernels take
DIM_RANGE = (16, 256)      # K and V: powers of two in this range


class Rows(NamedTuple):
  """One chunk's per-token terms, split into 16-row blocks (lists indexed by block)."""
  beta: list[jax.Array]       # [16] float32
  strength: list[jax.Array]   # [16] float32: s
  cum: list[jax.Array]        # [16] float32
  rel: list[jax.Array | None]  # [16] int32 or None
  incoming: list[jax.Array]   # [16] float32: a = exp(cum) [rel = 0]


def _row_block(i: int) -> Any:
  """The static rows 16 i .. 16 i + 15 of a chunk."""
  return pl.ds(i * BLOCK, BLOCK)


def _rows(num: int, beta_ref: Any, s_ref: Any, cum_ref: Any, rel_ref: Any | None) -> Rows:
  """Loads the per-token terms of the `num` 16-row blocks of one chunk."""
  blocks = lambda ref: [ref[_row_block(i)] for i in range(num)]
  cum = blocks(cum_ref)
  rel = [None] * num if rel_ref is None else blocks(rel_ref)
  incoming = [jnp.exp(c) if r is None else jnp.where(r == 0, jnp.exp(c), 0.0)
              for c, r in zip(cum, rel)]
  return Rows(blocks(beta_ref), blocks(s_ref), cum, rel, incoming)


def _column_blocks(dim: int, width: int = COLUMN_BLOCK) -> list[Any]:
  """Static slices of the `width`-column blocks of a dimension (all of it when smaller)."""
  width = min(width, dim)
  return [pl.ds(c * width, width) for c in range(dim // width)]


def _block_scores(p_ref: Any, k_ref: Any, num: int) -> dict[tuple[int, int], jax.Array]:
  """P_I K_J^T [16, 16] float32 of every block row I and block column J <= I, summed over
  column blocks of K (one [C, 128] slice of P and of K live at a time)."""
  scores = {(i, j): jnp.zeros((BLOCK, BLOCK), f32) for i in range(num) for j in range(i + 1)}
  for cols in _column_blocks(k_ref.shape[1], FORWARD_COLUMN_BLOCK):
    p = [p_ref[_row_block(i), cols] for i in range(num)]
    k = [k_ref[_row_block(j), cols] for j in range(num)]
    for i, j in scores:
      scores[i, j] += dot(p[i], k[j], trans_b=True)
  return scores


def _apply_inverse(inverse: dict[tuple[int, int], jax.Array], scale: list[jax.Array],
                   src_ref: Any, out_ref: Any, num: int) -> None:
  """out = T Diag(scale) src, written by blocks of FORWARD_COLUMN_BLOCK columns; T by its
  blocks T_IJ (J <= I) in the matmul dtype, scale by 16-row blocks."""
  mm = src_ref.dtype
  for cols in _column_blocks(src_ref.shape[1], FORWARD_COLUMN_BLOCK):
    x = [(scale[j][:, None] * src_ref[_row_block(j), cols].astype(f32)).astype(mm)
         for j in range(num)]
    for i in range(num):
      y = dot(inverse[i, 0], x[0])
      for j in range(1, i + 1):
        y += dot(inverse[i, j], x[j])
      out_ref[_row_block(i), cols] = y.astype(out_ref.dtype)


def _decays(rows: Rows, i: int, j: int) -> jax.Array:
  """E_IJ [16, 16] float32 of block row i and block column j <= i."""
  mask = None
  if i == j:
    row = jax.lax.broadcasted_iota(jnp.int32, (BLOCK, BLOCK), 0)
    col = jax.lax.broadcasted_iota(jnp.int32, (BLOCK, BLOCK), 1)
    mask = col < row
  if rows.rel[i] is not None:
    same = rows.rel[i][:, None] == rows.rel[j][None, :]
    mask = same if mask is None else mask & same
  gaps = rows.cum[i][:, None] - rows.cum[j][None, :]
  if mask is None:
    return jnp.exp(gaps)
  return jnp.where(mask, jnp.exp(jnp.where(mask, gaps, 0.0)), 0.0)


def _invert_diagonal(lower: jax.Array) -> jax.Array:
  """(I + L)^{-1} of one strictly lower [16, 16] block by forward substitution.

  Column by column: once row j of T is final, its share -L_ij T_j is taken
  from every later row i (a rank-1 update; L_ij = 0 for i <= j).
  """
  row = jax.lax.broadcasted_iota(jnp.int32, (BLOCK, BLOCK), 0)
  col = jax.lax.broadcasted_iota(jnp.int32, (BLOCK, BLOCK), 1)

  def take_column(j: jax.Array, inverse: jax.Array) -> jax.Array:
    done = jnp.sum(jnp.where(row == j, inverse, 0.0), axis=0)         # T_j, [16] over columns
    weights = jnp.sum(jnp.where(col == j, lower, 0.0), axis=1)        # L_:j, [16] over rows
    return inverse - weights[:, None] * done[None, :]

  identity = jnp.where(row == col, 1.0, 0.0).astype(f32)
  return jax.lax.fori_loop(0, BLOCK - 1, take_column, identity)


def _inverse(lower: dict[tuple[int, int], jax.Array], num: int) -> dict[tuple[int, int], jax.Array]:
  """The blocks T_IJ (J <= I) of (I + L)^{-1} from the blocks L_IJ (J <= I), float32."""
  inverse = {(i, i): _invert_diagonal(lower[i, i]) for i in range(num)}
  for i in range(1, num):
    for j in range(i):
      acc = dot(lower[i, j], inverse[j, j])
      for m in range(j + 1, i):
        acc += dot(lower[i, m], inverse[m, j])
      inverse[i, j] = -dot(inverse[i, i], acc)
  return inverse


def _params(num_warps: int) -> pl_triton.CompilerParams:
  return pl_triton.CompilerParams(num_warps=num_warps, num_stages=1)


def _chunk_operands(k: jax.Array, p: jax.Array, v: jax.Array, beta: jax.Array,
                    strength: jax.Array, cum: jax.Array,
                    rel: jax.Array | None) -> tuple[list[jax.Array], list[pl.BlockSpec]]:
  """(inputs, in_specs) of the per-chunk operands both kernels take (rel only if present)."""
  chunk, key_dim = k.shape[2:]
  inputs = [k, p, v, beta, strength, cum] + ([] if rel is None else [rel])
  specs = [chunk_spec(chunk, key_dim), chunk_spec(chunk, key_dim), chunk_spec(chunk, v.shape[-1])]
  return inputs, specs + [chunk_spec(chunk)] * (len(inputs) - 3)


def _check(k: jax.Array, p: jax.Array, v: jax.Array, beta: jax.Array, strength: jax.Array,
           cum: jax.Array, rel: jax.Array | None) -> None:
  rows, num, chunk, key_dim = k.shape
  value_dim = v.shape[-1]
  if chunk not in CHUNKS:
    raise ValueError(f"chunk length {chunk} must be one of {CHUNKS}")
  for name, dim in (("K", key_dim), ("V", value_dim)):
    if dim & (dim - 1) or not DIM_RANGE[0] <= dim <= DIM_RANGE[1]:
      raise ValueError(f"{name} = {dim} must be a power of two in {list(DIM_RANGE)}")
  if p.shape != k.shape or v.shape[:3] != k.shape[:3]:
    raise ValueError(f"shapes k {k.shape}, p {p.shape}, v {v.shape} do not agree")
  if not k.dtype == p.dtype == v.dtype:
    raise ValueError(f"k, p, v must share one dtype, got {k.dtype}, {p.dtype}, {v.dtype}")
  for name, x in (("beta", beta), ("strength", strength), ("cum", cum)):
    if x.shape != (rows, num, chunk) or x.dtype != f32:
      raise ValueError(f"{name} must be float32 {(rows, num, chunk)}, got {x.dtype} {x.shape}")
  if rel is not None and (rel.shape != (rows, num, chunk) or rel.dtype != jnp.int32):
    raise ValueError(f"rel must be int32 {(rows, num, chunk)}, got {rel.dtype} {rel.shape}")


def ut_transform(k: jax.Array, p: jax.Array, v: jax.Array, beta: jax.Array,
                 strength: jax.Array, cum: jax.Array, rel: jax.Array | None, *,
                 num_warps: int = 4, interpret: bool = False) -> tuple[jax.Array, jax.Array]:
  """(U [R,N,C,V], W_k [R,N,C,K]) of every chunk, in the matmul dtype.

  With M_ij = [j < i][rel_i = rel_j], E_ij = exp(cum_i - cum_j) M_ij,
  L_ij = s_i (p_i . k_j) E_ij, T = (I + L)^{-1} and a_i = exp(cum_i) [rel_i = 0]:

      U = T Diag(beta) V        W_k = T Diag(s a) P        (s = strength)

  k, p: [R,N,C,K]; v: [R,N,C,V] (bf16, f16 or float32, one dtype); beta,
  strength, cum: [R,N,C] float32; rel: [R,N,C] int32 documents started in the
  chunk up to each token, or None (one document). C in {16, 32, 64}; K and V
  powers of two in [16, 256]. Differentiable in k, p, v, beta, strength, cum
  (one Pallas kernel each way, a program per chunk); rel gets no gradient.
  """
  _check(k, p, v, beta, strength, cum, rel)
  return _ut(num_warps, interpret, k, p, v, beta, strength, cum, rel)


def _forward_call(num_warps: int, interpret: bool, k: jax.Array, p: jax.Array, v: jax.Array,
                  beta: jax.Array, strength: jax.Array, cum: jax.Array,
                  rel: jax.Array | None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(U, W_k, T [R,N,C,C] float32) of every chunk."""
  rows, num, chunk, key_dim = k.shape
  value_dim = v.shape[-1]
  blocks = chunk // BLOCK
  docs = rel is not None

  def kernel(*refs: Any) -> None:
    k_ref, p_ref, v_ref, beta_ref, s_ref, cum_ref, rel_ref, u_ref, w_ref, t_ref = with_absent(
        refs, (True,) * 6 + (docs,) + (True,) * 3)
    mm = k_ref.dtype
    x = _rows(blocks, beta_ref, s_ref, cum_ref, rel_ref)
    scores = _block_scores(p_ref, k_ref, blocks)
    lower = {(i, j): x.strength[i][:, None] * scores[i, j] * _decays(x, i, j)
             for i, j in scores}
    inverse = _inverse(lower, blocks)
    for i in range(blocks):
      for j in range(blocks):
        t_ij = inverse[i, j] if j <= i else jnp.zeros((BLOCK, BLOCK), f32)
        t_ref[_row_block(i), pl.ds(j * BLOCK, BLOCK)] = t_ij
    inverse = {ij: t.astype(mm) for ij, t in inverse.items()}
    _apply_inverse(inverse, x.beta, v_ref, u_ref, blocks)                    # U = T Diag(beta) V
    _apply_inverse(inverse, [s * a for s, a in zip(x.strength, x.incoming)],  # W_k = T Diag(s a) P
                   p_ref, w_ref, blocks)

  inputs, in_specs = _chunk_operands(k, p, v, beta, strength, cum, rel)
  out_shape = [jax.ShapeDtypeStruct(v.shape, v.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype),
               jax.ShapeDtypeStruct((rows, num, chunk, chunk), f32)]
  out_specs = [chunk_spec(chunk, value_dim), chunk_spec(chunk, key_dim), chunk_spec(chunk, chunk)]
  return tuple(pl.pallas_call(
      kernel, grid=(rows, num), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      compiler_params=_params(num_warps), interpret=interpret, name="ut_transform_fwd",
  )(*inputs))


def _backward_call(num_warps: int, interpret: bool, k: jax.Array, p: jax.Array, v: jax.Array,
                   beta: jax.Array, strength: jax.Array, cum: jax.Array, rel: jax.Array | None,
                   inverse: jax.Array, u: jax.Array, w: jax.Array, d_u: jax.Array,
                   d_w: jax.Array) -> tuple[jax.Array, ...]:
  """(dk, dp, dv in the inputs' dtype, dbeta, dstrength, dcum float32) of every chunk.

  Two kernels, each holding [C, C] tiles and one 64-column block of [C, K] or [C, V] at a
  time (the whole chunk's dX and dp, dk at once do not fit in registers):
    `ut_transform_bwd_columns`  dX = T^T dY by column blocks: dv, dbeta, dX_P . p and
                                dL = -(dX Y^T) (summed over the blocks, not yet masked);
    `ut_transform_bwd_keys`     G, ds, dcum from dL, then dp = Diag(s a) dX_P + G k and
                                dk = G^T p by key blocks (dX_P = T^T dW_k recomputed).
  """
  inputs, in_specs = _chunk_operands(k, p, v, beta, strength, cum, rel)
  docs = rel is not None
  d_v, d_beta, reach, d_lower = _backward_columns(num_warps, interpret, docs, inputs, in_specs,
                                                  inverse, u, w, d_u, d_w)
  d_k, d_p, d_s, d_cum = _backward_keys(num_warps, interpret, docs, inputs, in_specs, inverse,
                                        d_w, reach, d_lower)
  return d_k, d_p, d_v, d_beta, d_s, d_cum


def _chunk_terms(s_ref: Any, cum_ref: Any,
                 rel_ref: Any | None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(s, a [C, 1], E [C, C]) of one chunk, float32 (module docstring)."""
  chunk = cum_ref.shape[0]
  row = jax.lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0)
  col = jax.lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1)
  cum = cum_ref[...]
  mask, incoming = col < row, jnp.exp(cum)
  if rel_ref is not None:
    rel = rel_ref[...]
    mask = mask & (rel[:, None] == rel[None, :])
    incoming = jnp.where(rel == 0, incoming, 0.0)
  gaps = cum[:, None] - cum[None, :]
  decays = jnp.where(mask, jnp.exp(jnp.where(mask, gaps, 0.0)), 0.0)
  return s_ref[...][:, None], incoming[:, None], decays


def _backward_columns(num_warps: int, interpret: bool, docs: bool, inputs: list[jax.Array],
                      in_specs: list[pl.BlockSpec], inverse: jax.Array, u: jax.Array,
                      w: jax.Array, d_u: jax.Array,
                      d_w: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """(dv, dbeta, reach = dX_P . p [R,N,C], dL [R,N,C,C] float32) of every chunk; `inputs`,
  `in_specs` from `_chunk_operands` (with rel when `docs`)."""
  k, _, v = inputs[:3]
  rows, num, chunk, key_dim = k.shape
  value_dim = v.shape[-1]

  def kernel(*refs: Any) -> None:
    (_, p_ref, v_ref, beta_ref, _, _, _, t_ref, u_ref, w_ref, du_ref, dw_ref, dv_ref, dbeta_ref,
     reach_ref, dl_ref) = with_absent(refs, (True,) * 6 + (docs,) + (True,) * 9)
    mm = p_ref.dtype
    beta = beta_ref[...][:, None]
    t = t_ref[...].astype(mm)
    d_lower = jnp.zeros((chunk, chunk), f32)
    d_beta = jnp.zeros((chunk,), f32)
    reach = jnp.zeros((chunk,), f32)
    for cols in _column_blocks(value_dim):                      # the V half: U = T Diag(beta) V
      d_x = dot(t, du_ref[:, cols].astype(mm), trans_a=True)
      d_lower -= dot(d_x.astype(mm), u_ref[:, cols], trans_b=True)
      dv_ref[:, cols] = (beta * d_x).astype(dv_ref.dtype)
      d_beta += jnp.sum(d_x * v_ref[:, cols].astype(f32), axis=1)
    for cols in _column_blocks(key_dim):                        # the P half: W_k = T Diag(s a) P
      d_x = dot(t, dw_ref[:, cols].astype(mm), trans_a=True)
      d_lower -= dot(d_x.astype(mm), w_ref[:, cols], trans_b=True)
      reach += jnp.sum(d_x * p_ref[:, cols].astype(f32), axis=1)
    dbeta_ref[...] = d_beta
    reach_ref[...] = reach
    dl_ref[...] = d_lower

  vector = jax.ShapeDtypeStruct((rows, num, chunk), f32)
  out_shape = [jax.ShapeDtypeStruct(v.shape, v.dtype), vector, vector,
               jax.ShapeDtypeStruct((rows, num, chunk, chunk), f32)]
  out_specs = [chunk_spec(chunk, value_dim), chunk_spec(chunk), chunk_spec(chunk),
               chunk_spec(chunk, chunk)]
  in_specs = in_specs + [chunk_spec(chunk, chunk), chunk_spec(chunk, value_dim),
                         chunk_spec(chunk, key_dim), chunk_spec(chunk, value_dim),
                         chunk_spec(chunk, key_dim)]
  return tuple(pl.pallas_call(
      kernel, grid=(rows, num), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      compiler_params=_params(num_warps), interpret=interpret, name="ut_transform_bwd_columns",
  )(*inputs, inverse, u, w, d_u, d_w))


def _backward_keys(num_warps: int, interpret: bool, docs: bool, inputs: list[jax.Array],
                   in_specs: list[pl.BlockSpec], inverse: jax.Array, d_w: jax.Array,
                   reach: jax.Array, d_lower: jax.Array) -> tuple[jax.Array, ...]:
  """(dk, dp, dstrength, dcum) of every chunk, from dL and dX_P . p (`_backward_columns`);
  `docs`, `inputs` and `in_specs` as there."""
  k = inputs[0]
  rows, num, chunk, key_dim = k.shape

  def kernel(*refs: Any) -> None:
    (k_ref, p_ref, _, _, s_ref, cum_ref, rel_ref, t_ref, dw_ref, reach_ref, dl_ref, dk_ref,
     dp_ref, ds_ref, dcum_ref) = with_absent(refs, (True,) * 6 + (docs,) + (True,) * 8)
    mm = k_ref.dtype
    strength, incoming, decays = _chunk_terms(s_ref, cum_ref, rel_ref)
    scores = jnp.zeros((chunk, chunk), f32)                     # P K^T
    for cols in _column_blocks(key_dim):
      scores += dot(p_ref[:, cols], k_ref[:, cols], trans_b=True)
    d_scaled = dl_ref[...] * decays                             # dL o E (E is 0 off M)
    through = d_scaled * scores                                 # dL o E o P K^T
    gaps = strength * through                                   # dL o L
    reach = incoming[:, 0] * reach_ref[...]                     # a_i (dX_P,i . p_i)
    ds_ref[...] = jnp.sum(through, axis=1) + reach
    dcum_ref[...] = (jnp.sum(gaps, axis=1) - jnp.sum(gaps, axis=0)
                     + strength[:, 0] * reach)
    g = (strength * d_scaled).astype(mm)                        # G
    t = t_ref[...].astype(mm)
    for cols in _column_blocks(key_dim):
      d_x = dot(t, dw_ref[:, cols].astype(mm), trans_a=True)   # dX_P, recomputed
      dp_ref[:, cols] = (strength * incoming * d_x
                         + dot(g, k_ref[:, cols])).astype(dp_ref.dtype)
      dk_ref[:, cols] = dot(g, p_ref[:, cols], trans_a=True).astype(dk_ref.dtype)

  vector = jax.ShapeDtypeStruct((rows, num, chunk), f32)
  out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype),
               vector, vector]
  out_specs = [chunk_spec(chunk, key_dim), chunk_spec(chunk, key_dim), chunk_spec(chunk),
               chunk_spec(chunk)]
  in_specs = in_specs + [chunk_spec(chunk, chunk), chunk_spec(chunk, key_dim), chunk_spec(chunk),
                         chunk_spec(chunk, chunk)]
  return tuple(pl.pallas_call(
      kernel, grid=(rows, num), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      compiler_params=_params(num_warps), interpret=interpret, name="ut_transform_bwd_keys",
  )(*inputs, inverse, d_w, reach, d_lower))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _ut(num_warps: int, interpret: bool, k: jax.Array, p: jax.Array, v: jax.Array,
        beta: jax.Array, strength: jax.Array, cum: jax.Array,
        rel: jax.Array | None) -> tuple[jax.Array, jax.Array]:
  u, w, _ = _forward_call(num_warps, interpret, k, p, v, beta, strength, cum, rel)
  return u, w


def _ut_forward(num_warps: int, interpret: bool, k: jax.Array, p: jax.Array, v: jax.Array,
                beta: jax.Array, strength: jax.Array, cum: jax.Array,
                rel: jax.Array | None) -> tuple[tuple[jax.Array, jax.Array], tuple]:
  u, w, inverse = _forward_call(num_warps, interpret, k, p, v, beta, strength, cum, rel)
  return (u, w), (k, p, v, beta, strength, cum, rel, inverse, u, w)


def _ut_backward(num_warps: int, interpret: bool, residuals: tuple,
                 cotangents: tuple[jax.Array, jax.Array]) -> tuple:
  d_u, d_w = cotangents
  grads = _backward_call(num_warps, interpret, *residuals, d_u.astype(residuals[2].dtype),
                         d_w.astype(residuals[0].dtype))
  return (*grads, None)


_ut.defvjp(_ut_forward, _ut_backward)
