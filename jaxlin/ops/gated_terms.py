"""The in-chunk terms of the G family's chunked form (see `jaxlin.ops.gated`).

Chunk length C, cumulative gate b_i = sum_{s<=i} g_s inside a chunk, state S_0
entering it, b^q = b (or b - g with the RWKV6 bonus):

    o_i   = (q_i * exp(b^q_i))^T S_0 + sum_{j<=i} (q_i * exp(b^q_i - b_j)) . k_j v_j
    S_end = Diag(exp(b_C)) S_0 + sum_j (k_j * exp(b_C - b_j)) v_j^T

`chunk_terms` forms every chunk's q_in = q * exp(b^q), k_out = k * exp(b_C - b),
the masked in-chunk scores and the chunk decay, in parallel over chunks; the XLA
form (`gated._chunked`) and the TPU kernel path (`jaxlin.ops.gated_pallas`) join
the chunks. For per-key gates the in-chunk scores sum over K inside the exp and
cannot be one matmul in general; `_vector_gate_scores` picks, at run time, the
cheapest of three exact forms that the observed gate span allows (midpoint
factorisation over the chunk, over 16-token sub-chunks, or a masked [16, 16, K]
exponent).

Legend: B batch, T time, H heads, K key dim, V value dim; chunked tensors are
[B, H, N, C, D] (N chunks of length C).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxlin.ops import chunking

SUB_CHUNK = 16     # sub-chunk length of the per-key-gate score computation
SAFE_SPAN = 60.0   # largest gate span (log units) a midpoint factorisation takes
f32 = jnp.float32


class ChunkTerms(NamedTuple):
  """The per-chunk terms of the G family (module docstring), float32.

  o_i = q_in_i^T S_0 + sum_j scores_ij v_j;  S_end = Diag(decay) S_0 + k_out^T v.
  Masks (causality, documents) and the RWKV6 bonus (on the diagonal of
  `scores`) are folded in.
  """
  q_in: jax.Array     # [B, H, N, C, K]
  k_out: jax.Array    # [B, H, N, C, K]
  scores: jax.Array   # [B, H, N, C, C]
  values: jax.Array   # [B, H, N, C, V]
  decay: jax.Array    # [B, H, N] (scalar or no gate) or [B, H, N, K]


def chunk_terms(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array | None,
                bonus: jax.Array | None, segment_ids: jax.Array | None,
                chunk: int) -> ChunkTerms:
  """The in-chunk work of the chunked form, every chunk in parallel.

  q (already scaled), k: [B, T, H, K]; v: [B, T, H, V]; g: None, [B, T, H] or
  [B, T, H, K]; bonus: [H, K] or None; all float32.
  """
  qc, kc, vc = (chunking.to_chunks(x, chunk) for x in (q, k, v))
  docs = chunking.document_masks(segment_ids, chunk)
  same, start, end, carry = ((None,) * 4 if docs is None else
                             (docs.same, docs.start, docs.end, docs.carry))
  strict = bonus is not None
  in_chunk = chunking.combine_masks(chunking.causal_mask(chunk, strict=strict), same)

  if g is None:
    scores = jnp.where(in_chunk, jnp.einsum("bhnik,bhnjk->bhnij", qc, kc), 0.0)
    q_in = qc if start is None else jnp.where(start[..., None], qc, 0.0)
    k_out = kc if end is None else jnp.where(end[..., None], kc, 0.0)
    decay = jnp.ones(qc.shape[:3], f32) if carry is None else carry.astype(f32)
  else:
    gc = chunking.to_chunks(g, chunk)
    b = chunking.chunk_cumsum(gc, same)
    b_q = chunking.exclusive_from_inclusive(b, axis=3) if strict else b
    b_last = b[:, :, :, -1]
    if g.ndim == 4:
      scores = _vector_gate_scores(qc, kc, b_q, b, same, strict)
      expand = lambda m: None if m is None else m[..., None]
      q_in = qc * chunking.masked_exp(b_q, expand(start))
      k_out = kc * chunking.masked_exp(chunking.gap_to_end(b, key_axis=True), expand(end))
      decay = chunking.masked_exp(b_last, expand(carry))
    else:
      gaps = chunking.pair_gaps(b_q, b, strict=strict, key_axis=False)
      scores = jnp.einsum("bhnik,bhnjk->bhnij", qc, kc) * chunking.masked_exp(gaps, in_chunk)
      q_in = qc * chunking.masked_exp(b_q, start)[..., None]
      k_out = kc * chunking.masked_exp(chunking.gap_to_end(b, key_axis=False), end)[..., None]
      decay = chunking.masked_exp(b_last, carry)
  decay = jnp.broadcast_to(decay, qc.shape[:3] + decay.shape[3:])
  if strict:  # the bonus term u . (q_i * k_i) sits on the (otherwise zero) diagonal
    boosted = jnp.sum(qc * bonus[None, :, None, None, :] * kc, -1)
    scores = jnp.where(jnp.eye(chunk, dtype=bool), boosted[..., None], scores)
  return ChunkTerms(q_in, k_out, scores, vc, decay)


def _vector_gate_scores(q: jax.Array, k: jax.Array, b_q: jax.Array, b: jax.Array,
                        same: jax.Array | None, strict: bool) -> jax.Array:
  """In-chunk scores A_ij = sum_k q_ik k_jk exp(b^q_ik - b_jk), masked causal.

  q, k, b_q, b: [B, H, N, C, K]; same: [B, 1, N, C, C] or None.
  Returns [B, H, N, C, C].

  Three exact forms (tiers), chosen at run time by the largest gate span they
  must cover (b and b^q lie in [b_last, 0] inside a chunk):
    0. span of every chunk <= SAFE_SPAN: one matmul per chunk through the
       midpoint m of the span, exp(b^q_i - m) * exp(m - b_j), both factors
       within e^(+-SAFE_SPAN/2): as cheap as a scalar gate;
    1. span of every 16-token sub-chunk <= SAFE_SPAN: the same inside each
       sub-chunk, exact reference-point products between sub-chunks;
    2. otherwise a [16, 16, K] masked exponent inside each sub-chunk.
  """
  return _tiered_scores(strict, score_tier(b), same, q, k, b_q, b)


def score_tier(b: jax.Array) -> jax.Array:
  """The score tier (0, 1 or 2) `_vector_gate_scores` uses for cumulative gates b.

  b: [B, H, N, C, K] in-chunk inclusive cumulative log gates.
  """
  *lead, chunk, key_dim = b.shape
  sub = min(SUB_CHUNK, chunk)
  bounds = b.reshape(*lead, chunk // sub, sub, key_dim)[..., -1, :]   # r_J
  top = jnp.concatenate([jnp.zeros_like(bounds[..., :1, :]), bounds[..., :-1, :]], -2)
  chunk_span = -jnp.min(b[..., -1, :])
  sub_span = jnp.max(top - bounds)
  return jnp.where(chunk_span <= SAFE_SPAN, 0, jnp.where(sub_span <= SAFE_SPAN, 1, 2))


def _score_tiers(strict: bool, same: jax.Array | None) -> list:
  """The three score functions f(q, k, b_q, b) of `_vector_gate_scores`."""

  def whole_chunk(q, k, b_q, b):
    chunk = q.shape[-2]
    mask = chunking.combine_masks(chunking.causal_mask(chunk, strict=strict), same)
    return jnp.where(mask, _midpoint_scores(q, k, b_q, b, 0.0, b[..., -1:, :]), 0.0)

  def by_sub_chunks(q, k, b_q, b, factorized_diagonal: bool):
    *lead, chunk, key_dim = q.shape
    sub = min(SUB_CHUNK, chunk)
    num = chunk // sub
    split = lambda x: x.reshape(*lead, num, sub, key_dim)       # [.., n, c, K]
    qs, ks, bqs, bs = map(split, (q, k, b_q, b))
    bounds = bs[..., -1, :]                                      # r_J: [.., n, K]
    if factorized_diagonal:
      top = jnp.concatenate([jnp.zeros_like(bounds[..., :1, :]), bounds[..., :-1, :]], -2)
      diag = _midpoint_scores(qs, ks, bqs, bs, top[..., None, :], bounds[..., None, :])
    else:
      causal = chunking.causal_mask(sub, strict=strict)[..., None]
      gaps = chunking.pair_gaps(bqs, bs, strict=strict, key_axis=True)
      expo = chunking.masked_exp(gaps, causal)
      diag = jnp.sum(qs[..., :, None, :] * ks[..., None, :, :] * expo, axis=-1)
    # Blocks I > J through r_J, the gate at the end of block J: factors <= 1.
    k_ref = ks * jnp.exp(chunking.gap_to_end(bs, key_axis=True))  # [.., J, c, K]
    below = chunking.causal_mask(num, strict=True)[:, :, None, None]
    q_gaps = bqs[..., :, None, :, :] - bounds[..., None, :, None, :]
    if strict:  # b^q at the first token of block J+1 is exactly r_J (see pair_gaps)
      zero = (jnp.arange(num)[:, None] - jnp.arange(num)[None, :] == 1)[:, :, None] & (
          jnp.arange(sub) == 0)
      q_gaps = jnp.where(zero[..., None], 0.0, q_gaps)
    q_ref = qs[..., :, None, :, :] * chunking.masked_exp(q_gaps, below)  # [.., I, J, c, K]
    blocks = jnp.einsum("...IJik,...Jjk->...IiJj", q_ref, k_ref)
    blocks = _place_diagonal(blocks, diag).reshape(*lead, chunk, chunk)
    mask = chunking.combine_masks(chunking.causal_mask(chunk, strict=strict), same)
    return jnp.where(mask, blocks, 0.0)

  return [whole_chunk,
          lambda *a: by_sub_chunks(*a, factorized_diagonal=True),
          lambda *a: by_sub_chunks(*a, factorized_diagonal=False)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _tiered_scores(strict: bool, tier: jax.Array, same: jax.Array | None,
                   q: jax.Array, k: jax.Array, b_q: jax.Array, b: jax.Array) -> jax.Array:
  """Runs score tier `tier`. A custom VJP, so that the backward pass too runs
  (and stores) only the chosen tier; autodiff of a `lax.switch` would fill the
  residuals of every tier."""
  return jax.lax.switch(tier, _score_tiers(strict, same), q, k, b_q, b)


def _tiered_scores_fwd(strict, tier, same, q, k, b_q, b):
  return _tiered_scores(strict, tier, same, q, k, b_q, b), (tier, same, q, k, b_q, b)


def _tiered_scores_bwd(strict, residuals, d_scores):
  tier, same, *inputs = residuals
  branches = [lambda d, *xs, f=f: jax.vjp(f, *xs)[1](d)
              for f in _score_tiers(strict, same)]
  grads = jax.lax.switch(tier, branches, d_scores, *inputs)
  return (None, None, *grads)


_tiered_scores.defvjp(_tiered_scores_fwd, _tiered_scores_bwd)


def _midpoint_scores(q: jax.Array, k: jax.Array, b_q: jax.Array, b: jax.Array,
                     top: jax.Array | float, bottom: jax.Array) -> jax.Array:
  """sum_k q_ik k_jk exp(b^q_ik - b_jk) for gates in [bottom, top] (unmasked).

  Factorised through m = (top + bottom) / 2; callers ensure top - bottom <=
  SAFE_SPAN so that no factor leaves e^(+-SAFE_SPAN/2). Entries above the
  diagonal are finite garbage for the caller's mask.
  """
  # Any reference point gives the same scores: no gradient through its choice
  # (else future gates would get rounding-level gradients from past outputs).
  mid = jax.lax.stop_gradient(0.5 * (top + bottom))
  return jnp.einsum("...ik,...jk->...ij", q * jnp.exp(b_q - mid), k * jnp.exp(mid - b))


def _place_diagonal(blocks: jax.Array, diag: jax.Array) -> jax.Array:
  """Adds diag [.., n, c, c] onto the diagonal blocks of blocks [.., n, c, n, c]."""
  num = diag.shape[-3]
  eye = jnp.eye(num, dtype=diag.dtype)                          # [I, J]
  return blocks + jnp.einsum("...Iij,IJ->...IiJj", diag, eye)
