"""From the ops' [B, T, H, *] arguments to the row layout of `pallas_kernels.fused_terms` and back.

Legend: B batch, T time, H heads, N chunks, C chunk length; the kernels see
R = B*H rows of [N, C, *] chunks.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxlin.ops import chunking


@dataclasses.dataclass(frozen=True)
class RowLayout:
  """The chunking of one call: `batch`, `heads`, `time` and the kernel `chunk`."""
  batch: int
  heads: int
  time: int
  chunk: int

  def rows(self, x: jax.Array, dtype: jnp.dtype | None = None) -> jax.Array:
    """[B, T, H, *] -> [R, N, C, *] (front-padded like `chunking.to_chunks`)."""
    x = chunking.to_chunks(x, self.chunk)
    x = x.reshape(self.batch * self.heads, *x.shape[2:])
    return x if dtype is None else x.astype(dtype)

  def unrows(self, x: jax.Array) -> jax.Array:
    """[R, N, C, *] -> [B, T, H, *] (front padding dropped)."""
    return chunking.from_chunks(x.reshape(self.batch, self.heads, *x.shape[1:]), self.time)

  def states(self, x: jax.Array) -> jax.Array:
    """[B, H, K, V] <-> [R, K, V]."""
    if x.ndim == 4:
      return x.reshape(self.batch * self.heads, *x.shape[2:])
    return x.reshape(self.batch, self.heads, *x.shape[1:])

  def cumulative_gate(self, g: jax.Array | None,
                      segment_ids: jax.Array | None) -> jax.Array:
    """[R, N, C] float32 in-chunk cumulative log gate (zeros for no gate); its gradient
    reaches only gates of the token's own document (`chunking.chunk_cumsum`)."""
    if g is None:
      return jnp.zeros((self.batch * self.heads, -(-self.time // self.chunk), self.chunk),
                       jnp.float32)
    docs = chunking.document_masks(segment_ids, self.chunk)
    b = chunking.chunk_cumsum(chunking.to_chunks(g, self.chunk),
                              None if docs is None else docs.same)
    return b.reshape(self.batch * self.heads, *b.shape[2:])

  def documents(self, segment_ids: jax.Array | None) -> jax.Array | None:
    """[R, N, C] int32 `chunking.documents_in_chunk` of every row, or None."""
    if segment_ids is None:
      return None
    rel = chunking.documents_in_chunk(segment_ids, self.chunk)
    rel = jnp.broadcast_to(rel, (self.batch, self.heads, *rel.shape[2:]))
    return rel.reshape(self.batch * self.heads, *rel.shape[2:])
