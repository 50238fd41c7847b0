"""Rotary position embeddings, Hugging Face Llama ("rotate_half") convention.

Dimension j of the first half is paired with dimension j + D/2 (not
interleaved), so Llama-family checkpoints load unchanged:

    inv_freq_j = theta^(-2j/D)                       j = 0 .. D/2 - 1
    a          = positions * inv_freq, repeated twice along D -> [.., D]
    rope(x)    = x * cos(a) + rotate_half(x) * sin(a)
    rotate_half([x1, x2]) = [-x2, x1]                (x1, x2 the two halves)

The score <rope(q, p), rope(k, p')> depends on p - p' only. Math is float32;
outputs take x's dtype.

Context extension (`scaling`, a checkpoint's `rope_scaling`) rescales inv_freq:

    "linear" (factor s):  inv_freq / s                  (position interpolation)
    "llama3" (factor s, low_freq_factor l, high_freq_factor h, original_max_position_embeddings
             N): with wavelength w = 2 pi / inv_freq,
             w < N / h:  inv_freq unchanged            (high frequencies)
             w > N / l:  inv_freq / s                   (low frequencies)
             otherwise:  (1 - m) inv_freq / s + m inv_freq,  m = (N / w - l) / (h - l)

Legend: B batch, T time, H heads, D head dim (even).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

f32 = jnp.float32
SCALINGS = ("default", "linear", "llama3")
LLAMA3_FIELDS = ("factor", "low_freq_factor", "high_freq_factor",
                 "original_max_position_embeddings")


def check_scaling(scaling: Mapping[str, Any] | None, field: str = "rope_scaling") -> None:
  """Raises ValueError naming `field` unless `scaling` is empty/None or a supported rule."""
  if not scaling:
    return
  kind = scaling.get("rope_type", scaling.get("type", "default"))
  if kind not in SCALINGS:
    raise ValueError(f"{field}: got rope_type {kind!r}; supported: {list(SCALINGS)}")
  needed = {"default": (), "linear": ("factor",), "llama3": LLAMA3_FIELDS}[kind]
  missing = [name for name in needed if name not in scaling]
  if missing:
    raise ValueError(f"{field}: rope_type {kind!r} needs {list(needed)}; missing {missing} "
                     f"(got {dict(scaling)})")
  if kind == "llama3" and not scaling["high_freq_factor"] > scaling["low_freq_factor"]:
    raise ValueError(f"{field}: high_freq_factor={scaling['high_freq_factor']} must exceed "
                     f"low_freq_factor={scaling['low_freq_factor']}")


def rope_frequencies(head_dim: int, theta: float = 10000.0,
                     scaling: Mapping[str, Any] | None = None) -> jax.Array:
  """Inverse frequencies theta^(-2j/head_dim), rescaled by `scaling`; [head_dim // 2] float32."""
  if head_dim <= 0 or head_dim % 2:
    raise ValueError(f"rope needs a positive even head_dim, got head_dim={head_dim}")
  check_scaling(scaling)
  inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
  kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
  if kind == "linear":
    inv_freq = inv_freq / scaling["factor"]
  elif kind == "llama3":
    factor, low, high, original = (float(scaling[name]) for name in LLAMA3_FIELDS)
    wavelength = 2 * math.pi / inv_freq
    scaled = np.where(wavelength > original / low, inv_freq / factor, inv_freq)
    mix = (original / wavelength - low) / (high - low)
    medium = (wavelength >= original / high) & (wavelength <= original / low)
    inv_freq = np.where(medium, (1 - mix) * scaled / factor + mix * scaled, scaled)
  return jnp.asarray(inv_freq, f32)


def _rotate_half(x: jax.Array) -> jax.Array:
  """[x1, x2] -> [-x2, x1] over the last axis."""
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x: jax.Array, positions: jax.Array, *, theta: float = 10000.0,
               scaling: Mapping[str, Any] | None = None) -> jax.Array:
  """Rotate x [B, T, H, D] by its integer positions [B, T]; same shape and dtype."""
  inv_freq = rope_frequencies(x.shape[-1], theta, scaling)
  angles = positions.astype(f32)[..., None] * inv_freq           # [B, T, D/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, D]
  x32 = x.astype(f32)
  return (x32 * jnp.cos(angles) + _rotate_half(x32) * jnp.sin(angles)).astype(x.dtype)
