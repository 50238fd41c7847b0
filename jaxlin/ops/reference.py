"""The token-by-token scan behind every op's impl="reference" (the ground truth).

Legend: B batch, T time, H heads, K key dim, V value dim.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from jaxlin.ops import documents

# step(state [B,H,K,V], *inputs at one token) -> (o_t [B,H,V], new state)
Step = Callable[..., tuple[jax.Array, jax.Array]]


def scan_tokens(step: Step, initial_state: jax.Array,
                inputs: Sequence[jax.Array | None],
                segment_ids: jax.Array | None) -> tuple[jax.Array, jax.Array]:
  """Runs `step` over time, zeroing the state where a new document starts.

  Args:
    step: float32 single-token update, called as step(state, *inputs_t).
    initial_state: [B, H, K, V] state before token 0.
    inputs: [B, T, ...] arrays (or None, passed through as None).
    segment_ids: optional [B, T] document ids.
  Returns:
    (o [B, T, H, V], final state [B, H, K, V]).
  """
  resets = None if segment_ids is None else documents.document_starts(segment_ids)

  def body(state, xs):
    reset_t, *inputs_t = xs
    if reset_t is not None:
      state = jnp.where(reset_t[:, None, None, None], 0.0, state)
    o_t, state = step(state, *inputs_t)
    return state, o_t

  time_major = lambda x: None if x is None else jnp.moveaxis(x, 1, 0)
  final, o = jax.lax.scan(body, initial_state, [time_major(x) for x in (resets, *inputs)])
  return jnp.moveaxis(o, 0, 1), final
