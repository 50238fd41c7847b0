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


def chunk_length(time: int, chunk_size: int, multiple: int = 16) -> int:
  """The chunk length used for a sequence of `time` tokens.

  `chunk_size`, but no longer than `time` rounded up to `multiple`: a short
  sequence (a prompt, a test) is not padded to a full chunk.
  """
  return min(chunk_size, -(-time // multiple) * multiple)


def to_chunks(x: jax.Array, chunk: int, pad_value: float = 0.0) -> jax.Array:
  """[B, T, H, ...] -> [B, H, N, C, ...], padding T up to N*C with `pad_value`."""
  batch, time, heads = x.shape[:3]
  num = -(-time // chunk)
  pad = [(0, 0)] * x.ndim
  pad[1] = (0, num * chunk - time)
  x = jnp.pad(x, pad, constant_values=pad_value)
  x = x.reshape(batch, num, chunk, heads, *x.shape[3:])
  return jnp.moveaxis(x, 3, 1)


def from_chunks(x: jax.Array, time: int) -> jax.Array:
  """[B, H, N, C, ...] -> [B, T, H, ...], dropping the padding."""
  batch, heads, num, chunk = x.shape[:4]
  x = jnp.moveaxis(x, 1, 3).reshape(batch, num * chunk, heads, *x.shape[4:])
  return x[:, :time]


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
  batch, time = segment_ids.shape
  new_doc = jnp.concatenate(
      [jnp.zeros((batch, 1), jnp.int32),
       (segment_ids[:, 1:] != segment_ids[:, :-1]).astype(jnp.int32)], axis=1)
  doc = jnp.cumsum(new_doc, axis=1)
  num = -(-time // chunk)
  # Padding continues the last document, so the final state is unaffected.
  doc = jnp.pad(doc, [(0, 0), (0, num * chunk - time)], mode="edge")
  doc = doc.reshape(batch, 1, num, chunk)
  last = doc[..., -1]
  incoming = jnp.concatenate([jnp.zeros_like(last[..., :1]), last[..., :-1]], axis=-1)
  return DocumentMasks(
      same=doc[..., :, None] == doc[..., None, :],
      start=doc == incoming[..., None],
      end=doc == last[..., None],
      carry=last == incoming,
  )


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
