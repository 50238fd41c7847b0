"""Short depthwise causal convolution over time (docs/design.md §5: size 4, SiLU).

Per channel c, with kernel w in R^{K x C} (tap K-1 multiplies the current token):

    y_t = act( sum_{i=0}^{K-1} w[K-1-i] * x_{t-i} + bias )

x_{t-i} for t - i < 0 is read from `state`, the K-1 inputs before the first
token (oldest first; zeros when absent). With packed documents (`segment_ids`;
a document is a maximal run of equal ids) a tap that reaches into another
document contributes 0, and the state only feeds the first document. After a
call, the new state is the last K-1 inputs (entries from documents other than
the last one zeroed), ready for `step` or for a following call.

Legend: B batch, T time, C channels, K kernel size.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlin import validation
from jaxlin.ops import documents

f32 = jnp.float32

ACTIVATIONS: dict[str | None, Callable[[jax.Array], jax.Array]] = {
    None: lambda y: y,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


class ShortConv(nnx.Module):
  """Depthwise causal 1-D convolution over time with an optional activation."""

  def __init__(
      self,
      channels: int,
      *,
      kernel_size: int = 4,
      activation: str | None = "silu",
      use_bias: bool = False,
      rngs: nnx.Rngs,
      param_dtype: jnp.dtype = f32,
  ) -> None:
    validation.choice("activation", activation, sorted(ACTIVATIONS, key=str))
    validation.positive_int("kernel_size", kernel_size)
    self.channels = channels
    self.kernel_size = kernel_size
    self.activation = activation
    bound = kernel_size ** -0.5  # fan-in of a depthwise conv is the kernel size
    self.weight = nnx.Param(jax.random.uniform(
        rngs.params(), (kernel_size, channels), param_dtype, -bound, bound))
    self.bias = nnx.Param(jnp.zeros((channels,), param_dtype)) if use_bias else None

  def init_state(self, batch: int, dtype: jnp.dtype = f32) -> jax.Array:
    """Zero state [B, K-1, C]: no input seen yet."""
    return jnp.zeros((batch, self.kernel_size - 1, self.channels), dtype)

  def _finish(self, y: jax.Array) -> jax.Array:
    """Add the bias and apply the activation (float32)."""
    if self.bias is not None:
      y = y + self.bias[...].astype(f32)
    return ACTIVATIONS[self.activation](y)

  def __call__(
      self,
      x: jax.Array,
      *,
      segment_ids: jax.Array | None = None,
      state: jax.Array | None = None,
      return_state: bool = False,
  ) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Convolve x [B, T, C] over time.

    Args:
      x: [B, T, C] inputs.
      segment_ids: optional [B, T] integer ids of packed documents; no tap
        crosses a change of id.
      state: optional [B, K-1, C] inputs before token 0 (oldest first).
      return_state: also return the new [B, K-1, C] state (x's dtype).
    Returns:
      y [B, T, C] in x's dtype, or (y, new_state) when return_state.
    """
    batch, time, channels = x.shape
    k = self.kernel_size
    if channels != self.channels:
      raise ValueError(f"x has {channels} channels, expected channels={self.channels}")
    if state is None:
      state = self.init_state(batch, x.dtype)
    elif state.shape != (batch, k - 1, channels):
      validation.fail("state", f"shape {tuple(state.shape)}",
                      f"[B, K-1, C] = {(batch, k - 1, channels)}")
    padded = jnp.concatenate([state.astype(f32), x.astype(f32)], axis=1)  # [B, T+K-1, C]
    weight = self.weight[...].astype(f32)
    if segment_ids is not None:
      # state rows belong to document 0, the one token 0 belongs to
      doc = documents.document_index(segment_ids)
      padded_doc = jnp.concatenate([jnp.zeros((batch, k - 1), doc.dtype), doc], axis=1)

    y = jnp.zeros((batch, time, channels), f32)
    for lag in range(k):
      start = k - 1 - lag
      tap = padded[:, start:start + time] * weight[k - 1 - lag]
      if segment_ids is not None:
        same_doc = padded_doc[:, start:start + time] == doc
        tap = jnp.where(same_doc[..., None], tap, 0.0)
      y = y + tap
    y = self._finish(y).astype(x.dtype)
    if not return_state:
      return y

    new_state = padded[:, time:]
    if segment_ids is not None:
      keep = padded_doc[:, time:] == doc[:, -1:]
      new_state = jnp.where(keep[..., None], new_state, 0.0)
    return y, new_state.astype(x.dtype)

  def step(self, x_t: jax.Array, state: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One decoding step: x_t [B, C], state [B, K-1, C] -> (y_t [B, C], new state)."""
    window = jnp.concatenate([state.astype(f32), x_t.astype(f32)[:, None]], axis=1)  # [B, K, C]
    y = self._finish(jnp.einsum("bkc,kc->bc", window, self.weight[...].astype(f32)))
    return y.astype(x_t.dtype), window[:, 1:].astype(state.dtype)
