"""Rotary position embeddings, Hugging Face Llama ("rotate_half") convention.

Dimension j of the first half is paired with dimension j + D/2 (not
interleaved), so Llama-family checkpoints load unchanged:

    inv_freq_j = theta^(-2j/D)                       j = 0 .. D/2 - 1
    a          = positions * inv_freq, repeated twice along D -> [.., D]
    rope(x)    = x * cos(a) + rotate_half(x) * sin(a)
    rotate_half([x1, x2]) = [-x2, x1]                (x1, x2 the two halves)

The score <rope(q, p), rope(k, p')> depends on p - p' only. Math is float32;
outputs take x's dtype.

Legend: B batch, T time, H heads, D head dim (even).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

f32 = jnp.float32


def rope_frequencies(head_dim: int, theta: float = 10000.0) -> jax.Array:
  """Inverse frequencies theta^(-2j/head_dim), [head_dim // 2] float32."""
  if head_dim <= 0 or head_dim % 2:
    raise ValueError(f"rope needs a positive even head_dim, got head_dim={head_dim}")
  return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=f32) / head_dim))


def _rotate_half(x: jax.Array) -> jax.Array:
  """[x1, x2] -> [-x2, x1] over the last axis."""
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x: jax.Array, positions: jax.Array, *, theta: float = 10000.0) -> jax.Array:
  """Rotate x [B, T, H, D] by its integer positions [B, T]; same shape and dtype."""
  inv_freq = rope_frequencies(x.shape[-1], theta)
  angles = positions.astype(f32)[..., None] * inv_freq           # [B, T, D/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, D]
  x32 = x.astype(f32)
  return (x32 * jnp.cos(angles) + _rotate_half(x32) * jnp.sin(angles)).astype(x.dtype)
