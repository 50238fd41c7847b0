"""RMS normalisation over the last axis, plain and with a SiLU output gate.

    rmsnorm(x) = x / sqrt(mean(x^2) + eps) * w
    gated(x, z) = rmsnorm(x) * silu(z)
    l2_normalise(x) = x / sqrt(sum(x^2) + eps)

The gated form is the output gate of GLA and Gated DeltaNet (the norm is applied
before the gate; Mamba2 gates first, `linear_attention.OutputNorm`). All math is float32; outputs take x's dtype.

Legend: D the normalised (last) dimension; any leading axes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

f32 = jnp.float32


def rms_normalise(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
  """float32 x / sqrt(mean(x^2) + eps) * weight over the last axis."""
  x = x.astype(f32)
  inv_rms = jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)
  return x * inv_rms * weight.astype(f32)


def l2_normalise(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """x / sqrt(sum(x^2) + eps) over the last axis, in float32 (the delta-rule keys and queries)."""
  x = x.astype(f32)
  return x * jax.lax.rsqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True) + eps)


class RMSNorm(nnx.Module):
  """Root-mean-square normalisation over the last axis with a learned scale [D]."""

  def __init__(self, dim: int, *, eps: float = 1e-6, param_dtype: jnp.dtype = f32) -> None:
    self.dim = dim
    self.eps = eps
    self.weight = nnx.Param(jnp.ones((dim,), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    """x [..., D] -> rmsnorm(x) [..., D] in x's dtype."""
    return rms_normalise(x, self.weight[...], self.eps).astype(x.dtype)


class GatedRMSNorm(nnx.Module):
  """RMSNorm followed by a SiLU (swish) output gate: rmsnorm(x) * silu(gate)."""

  def __init__(self, dim: int, *, eps: float = 1e-6, param_dtype: jnp.dtype = f32) -> None:
    self.dim = dim
    self.eps = eps
    self.weight = nnx.Param(jnp.ones((dim,), param_dtype))

  def __call__(self, x: jax.Array, gate: jax.Array) -> jax.Array:
    """x, gate [..., D] -> rmsnorm(x) * silu(gate) [..., D] in x's dtype."""
    y = rms_normalise(x, self.weight[...], self.eps) * jax.nn.silu(gate.astype(f32))
    return y.astype(x.dtype)
