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
from jaxlin.ops import lasp2

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
    # weight and bias ~ U(-K^-1/2, K^-1/2): the fan-in of a depthwise conv is the kernel size
    # (PyTorch's Conv1d default, which Mamba2's conv1d keeps)
    bound = kernel_size ** -0.5
    self.weight = nnx.Param(jax.random.uniform(
        rngs.params(), (kernel_size, channels), param_dtype, -bound, bound))
    self.bias = (nnx.Param(jax.random.uniform(rngs.params(), (channels,), param_dtype, -bound,
                                              bound))
                 if use_bias else None)

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
      sequence_axis: bool = True,
  ) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Convolve x [B, T, C] over time.

    Args:
      x: [B, T, C] inputs.
      segment_ids: optional [B, T] integer ids of packed documents; no tap
        crosses a change of id.
      state: optional [B, K-1, C] inputs before token 0 (oldest first).
      return_state: also return the new [B, K-1, C] state (x's dtype).
      sequence_axis: x's T is the model's sequence (the mesh's sequence axis may split it: each
        span's halo then comes from the previous one); False for other time-like axes.
    Returns:
      y [B, T, C] in x's dtype, or (y, new_state) when return_state.
    """
    batch, time, channels = x.shape
    k = self.kernel_size
    if channels != self.channels:
      raise ValueError(f"x has {channels} channels, expected channels={self.channels}")
    # state rows belong to document 0, the one token 0 belongs to
    doc = None if segment_ids is None else documents.document_index(segment_ids)
    if state is None and not return_state and sequence_axis:   # the halo from the previous
      return lasp2.sequence_conv(self._taps, x, doc, k).astype(x.dtype)   # span under LASP-2
    if state is None:
      state = self.init_state(batch, x.dtype)
    elif state.shape != (batch, k - 1, channels):
      validation.fail("state", f"shape {tuple(state.shape)}",
                      f"[B, K-1, C] = {(batch, k - 1, channels)}")
    padded = jnp.concatenate([state.astype(x.dtype), x], axis=1)          # [B, T+K-1, C]
    padded_doc = (None if doc is None else
                  jnp.concatenate([jnp.zeros((batch, k - 1), doc.dtype), doc], axis=1))
    y = self._taps(padded, padded_doc, doc).astype(x.dtype)
    if not return_state:
      return y
    new_state = padded[:, time:]
    if doc is not None:
      keep = padded_doc[:, time:] == doc[:, -1:]
      new_state = jnp.where(keep[..., None], new_state, 0)
    return y, new_state.astype(x.dtype)

  def _taps(self, padded: jax.Array, padded_doc: jax.Array | None,
            doc: jax.Array | None) -> jax.Array:
    """y [B, T, C] float32 from the inputs preceded by K-1 earlier ones, padded [B, K-1+T, C]
    (and their document ids [B, K-1+T] / the tokens' [B, T]; None: one document)."""
    k = self.kernel_size
    time = padded.shape[1] - (k - 1)
    weight = self.weight[...].astype(f32)
    y = jnp.zeros((padded.shape[0], time, padded.shape[2]), f32)
    for lag in range(k):
      start = k - 1 - lag
      tap = padded[:, start:start + time].astype(f32) * weight[k - 1 - lag]
      if doc is not None:
        tap = jnp.where((padded_doc[:, start:start + time] == doc)[..., None], tap, 0.0)
      y = y + tap
    return self._finish(y)

  def step(self, x_t: jax.Array, state: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One decoding step: x_t [B, C], state [B, K-1, C] -> (y_t [B, C], new state)."""
    window = jnp.concatenate([state.astype(f32), x_t.astype(f32)[:, None]], axis=1)  # [B, K, C]
    y = self._finish(jnp.einsum("bkc,kc->bc", window, self.weight[...].astype(f32)))
    return y.astype(x_t.dtype), window[:, 1:].astype(state.dtype)
