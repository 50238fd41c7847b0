"""Chunking machinery shared by the chunked (impl="xla") forms of the ops.

Legend (this file and the chunked ops): B batch, H heads, N chunks, C chunk
length, K key dim, V value dim. Chunked tensors are laid out [B, H, N, C, D].

Packed documents. With `segment_ids`, a document starts wherever the id
changes from one token to the next. `doc[t]` counts those changes up to t, so
two tokens belong to one document iff their `doc` agree. Token 0 is in document
0, the one the initial state belongs to. The chunked forms need four masks:

  same[i, j]   token i and token j (same chunk) are in one document;
  start[i]     token i is in the document the chunk's incoming state belongs to;
  end[j]       token j is in the document of the chunk's last token;
  carry        the chunk contains no document start (the state passes through).

All four are None when there are no segment ids (everything connected).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxlin.ops import documents


def chunk_length(time: int, chunk_size: int, multiple: int = 16) -> int:
  """The chunk length used for a sequence of `time` tokens.

  `chunk_size`, but no longer than `time` rounded up to `multiple`: a short
  sequence (a prompt, a test) is not padded to a full chunk.
  """
  return min(chunk_size, -(-time // multiple) * multiple)


def to_chunks(x: jax.Array, chunk: int, pad_value: float = 0.0) -> jax.Array:
  """[B, T, H, ...] -> [B, H, N, C, ...], padding T up to N*C with `pad_value`.

  The padding goes in FRONT of the sequence: zero keys, values and log gates
  pass the initial state through unchanged, and the last real token ends the
  last chunk, so no gap to the chunk end spans padding (see `pair_gaps`).
  """
  batch, time, heads = x.shape[:3]
  num = -(-time // chunk)
  pad = [(0, 0)] * x.ndim
  pad[1] = (num * chunk - time, 0)
  x = jnp.pad(x, pad, constant_values=pad_value)
  x = x.reshape(batch, num, chunk, heads, *x.shape[3:])
  return jnp.moveaxis(x, 3, 1)


def from_chunks(x: jax.Array, time: int) -> jax.Array:
  """[B, H, N, C, ...] -> [B, T, H, ...], dropping the (front) padding."""
  batch, heads, num, chunk = x.shape[:4]
  x = jnp.moveaxis(x, 1, 3).reshape(batch, num * chunk, heads, *x.shape[4:])
  return x[:, num * chunk - time:]


@dataclasses.dataclass(frozen=True)
class DocumentMasks:
  """The document masks of a chunked sequence (see the module docstring).

  Shapes broadcast against [B, H, N, ...]: same [B,1,N,C,C], start and end
  [B,1,N,C], carry [B,1,N].
  """
  same: jax.Array
  start: jax.Array
  end: jax.Array
  carry: jax.Array


def document_masks(segment_ids: jax.Array | None, chunk: int) -> DocumentMasks | None:
  """Masks for `segment_ids` [B, T] (None -> None: one document throughout)."""
  if segment_ids is None:
    return None
  rel = documents_in_chunk(segment_ids, chunk)
  last = rel[..., -1]
  return DocumentMasks(
      same=rel[..., :, None] == rel[..., None, :],
      start=rel == 0,
      end=rel == last[..., None],
      carry=last == 0,
  )


def documents_in_chunk(segment_ids: jax.Array, chunk: int) -> jax.Array:
  """[B, 1, N, C] int32: how many documents have started in token i's chunk up to i.

  0 marks the document of the chunk's incoming state; two tokens of a chunk share
  a document iff their counts agree (the masks of `document_masks` follow).
  """
  batch, time = segment_ids.shape
  doc = documents.document_index(segment_ids)
  num = -(-time // chunk)
  # Front padding belongs to the first document (the initial state's).
  doc = jnp.pad(doc, [(0, 0), (num * chunk - time, 0)], mode="edge")
  doc = doc.reshape(batch, 1, num, chunk)
  last = doc[..., -1]
  incoming = jnp.concatenate([jnp.zeros_like(last[..., :1]), last[..., :-1]], axis=-1)
  return doc - incoming[..., None]


def masked_exp(x: jax.Array, mask: jax.Array | None) -> jax.Array:
  """exp(x) where mask, else 0; the mask is applied BEFORE exp (no overflow)."""
  if mask is None:
    return jnp.exp(x)
  return jnp.exp(jnp.where(mask, x, -jnp.inf))


def combine_masks(*masks: jax.Array | None) -> jax.Array | None:
  """Logical AND of the masks that are not None (None if all are None)."""
  present = [m for m in masks if m is not None]
  if not present:
    return None
  out = present[0]
  for m in present[1:]:
    out = out & m
  return out


def causal_mask(chunk: int, *, strict: bool) -> jax.Array:
  """[C, C] lower-triangular mask: j <= i (or j < i if strict)."""
  i = jnp.arange(chunk)[:, None]
  j = jnp.arange(chunk)[None, :]
  return j < i if strict else j <= i


def scan_chunk_states(decay: jax.Array, update: jax.Array,
                      initial: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Runs S_{n+1} = decay_n * S_n + update_n over chunks (diagonal decay).

  Args:
    decay: [B, H, N] or [B, H, N, K] decay of the state across chunk n.
    update: [B, H, N, K, V] the state chunk n writes from a zero start.
    initial: [B, H, K, V] state before chunk 0.
  Returns:
    (states [B, H, N, K, V], the state before each chunk; final [B, H, K, V]).
  """
  if decay.ndim == 3:
    decay = decay[..., None, None]
  else:
    decay = decay[..., None]

  def body(state, xs):
    d, u = xs
    return d * state + u, state

  xs = (jnp.moveaxis(decay, 2, 0), jnp.moveaxis(update, 2, 0))
  final, states = jax.lax.scan(body, initial, xs)
  return jnp.moveaxis(states, 0, 2), final


def chunk_cumsum(g: jax.Array, same: jax.Array | None) -> jax.Array:
  """Inclusive cumulative log gates b_i = sum_{j <= i} g_j inside each chunk.

  g: [B, H, N, C] or [B, H, N, C, K]; same: [B, 1, N, C, C] or None.
  With documents the value is the plain cumsum (monotone over the chunk, which
  the span checks and reference points rely on), but its gradient flows only
  to gates of the token's own document: b = r + stop_gradient(cumsum - r),
  where r_i = sum_{j <= i, same document} g_j is a masked matmul whose
  coefficients on other documents are exactly 0. Every gap b_i - b_j the ops
  use lies inside one document, so no gradient crosses a document boundary
  (with a plain cumsum the earlier document's gates cancel only up to
  rounding in the backward pass).
  """
  plain = jnp.cumsum(g, axis=3)
  if same is None:
    return plain
  lower = (causal_mask(g.shape[3], strict=False) & same).astype(g.dtype)
  spec = "bhnij,bhnj->bhni" if g.ndim == 4 else "bhnij,bhnjk->bhnik"
  own = jnp.einsum(spec, lower, g, precision=jax.lax.Precision.HIGHEST)
  return own + jax.lax.stop_gradient(plain - own)


def exclusive_from_inclusive(b: jax.Array, axis: int) -> jax.Array:
  """sum_{s<i} g_s from the inclusive cumsum b along `axis`, by a shift (exact zeros)."""
  first = jnp.zeros_like(jax.lax.slice_in_dim(b, 0, 1, axis=axis))
  return jnp.concatenate([first, jax.lax.slice_in_dim(b, 0, -1, axis=axis)], axis=axis)


def pair_gaps(b_q: jax.Array, b: jax.Array, *, strict: bool,
              key_axis: bool) -> jax.Array:
  """b^q_i - b_j for every pair (i, j) of a chunk: [..., C, C] (or [..., C, C, K]).

  The gaps that are zero by construction (i == j for inclusive b^q = b; j ==
  i - 1 for exclusive b^q, `strict`) are the constant 0 instead of a difference
  of equal numbers: no gradient passes through them, so the O(1) terms that
  would cancel in d/dg are never formed and the tiny true gradients of strong
  gates (g ~ -30) stay accurate.

  b_q, b: [..., C] or, with `key_axis`, [..., C, K].
  """
  if key_axis:
    gaps, chunk = b_q[..., :, None, :] - b[..., None, :, :], b.shape[-2]
  else:
    gaps, chunk = b_q[..., :, None] - b[..., None, :], b.shape[-1]
  offsets = jnp.arange(chunk)[:, None] - jnp.arange(chunk)[None, :]
  zero = offsets == (1 if strict else 0)
  return jnp.where(zero[..., None] if key_axis else zero, 0.0, gaps)


def gap_to_end(b: jax.Array, *, key_axis: bool) -> jax.Array:
  """b_last - b_j over a chunk, the last entry the constant 0 (see `pair_gaps`)."""
  if key_axis:
    return (b[..., -1:, :] - b).at[..., -1, :].set(0.0)
  return (b[..., -1:] - b).at[..., -1].set(0.0)
