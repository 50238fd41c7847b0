"""The affine effect of a span of tokens on the recurrent state (sequence parallelism's unit).

Every family's recurrence is linear in the state, so a contiguous span of tokens maps the
state entering it to the state leaving it by

    S_end = M S_start + N

with N the span's final state from S_start = 0 and M the product of the span's per-token
transitions: Diag(exp(sum g)) for the G family (a diagonal over K, stored as [B, H, K]),
prod_t exp(g_t)(I - b_t k_t p_t^T) for the D family ([B, H, K, K]). A document that starts
inside the span (a change of segment id after its first token) resets the state there, so
M = 0 and N runs from that start. Float32.

Legend: B batch, H heads, K key dim, V value dim.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxlin.ops import documents


class SpanSummary(NamedTuple):
  """(M, N) of one span: S_end = M S_start + N (module docstring)."""
  transition: jax.Array   # M: [B, H, K] (diagonal) or [B, H, K, K]
  state: jax.Array        # N: [B, H, K, V]

  def apply(self, state: jax.Array) -> jax.Array:
    """S_end for a state S_start [B, H, K, V] entering the span."""
    if self.transition.ndim == state.ndim - 1:
      return self.transition[..., None] * state + self.state
    return jnp.einsum("bhkl,bhlv->bhkv", self.transition, state) + self.state


def no_reset_inside(segment_ids: jax.Array | None, batch: int) -> jax.Array:
  """[B] float32: 1 where no document starts after the span's first token, else 0."""
  if segment_ids is None:
    return jnp.ones((batch,), jnp.float32)
  starts = documents.document_starts(segment_ids)           # never at token 0
  return 1.0 - jnp.any(starts, axis=1).astype(jnp.float32)
