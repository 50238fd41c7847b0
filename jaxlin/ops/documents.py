"""Packed documents: where each starts and which document each token is in.

A document is a maximal run of equal `segment_ids` [B, T]: it starts wherever
the id changes from one token to the next (never at token 0, which continues
the document the initial state belongs to). Shared by the ops and the layers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def document_starts(segment_ids: jax.Array) -> jax.Array:
  """[B, T] bool: token t starts a new document (never token 0)."""
  change = segment_ids[:, 1:] != segment_ids[:, :-1]
  return jnp.pad(change, [(0, 0), (1, 0)])


def document_index(segment_ids: jax.Array) -> jax.Array:
  """[B, T] int32: index of each token's document, 0 for the first."""
  return jnp.cumsum(document_starts(segment_ids).astype(jnp.int32), axis=1)
