"""Dense SwiGLU MLP, the channel mixer of a layer without MoE (docs/design.md §5).

    y = W_down^T ( silu(W_gate^T x) * (W_up^T x) )

Matmul inputs are cast to the compute `dtype` and accumulate in float32; the
SiLU and the product run in float32; the output is in `dtype`. The same math,
with one weight set per expert, is the expert of `jaxlin.layers.moe.MoE`.

Legend: B batch, T time, D model width, F hidden width; any leading axes "...".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlin import validation
from jaxlin.layers.base import Aux
from jaxlin.layers.initializers import dense_initializer

f32 = jnp.float32


def swiglu_param_count(d_model: int, hidden_dim: int) -> int:
  """Parameters of one SwiGLU MLP: 3 * D * F (gate, up and down, no biases)."""
  return 3 * d_model * hidden_dim


def swiglu_hidden(x: jax.Array, w_gate: jax.Array, w_up: jax.Array,
                  dtype: jnp.dtype) -> jax.Array:
  """h = silu(x @ W_gate) * (x @ W_up): x [..., D], W [D, F] -> h [..., F] in `dtype`."""
  x = x.astype(dtype)
  gate = jnp.matmul(x, w_gate.astype(dtype), preferred_element_type=f32)
  up = jnp.matmul(x, w_up.astype(dtype), preferred_element_type=f32)
  return (jax.nn.silu(gate) * up).astype(dtype)


def swiglu(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array,
           dtype: jnp.dtype) -> jax.Array:
  """y = (silu(x W_gate) * (x W_up)) W_down: x [..., D] -> y [..., D] in `dtype`."""
  h = swiglu_hidden(x, w_gate, w_up, dtype)
  return jnp.matmul(h, w_down.astype(dtype), preferred_element_type=f32).astype(dtype)


class SwiGLU(nnx.Module):
  """Dense SwiGLU MLP: y = W_down (silu(W_gate x) * (W_up x)).

  Weights: w_gate, w_up [D, F] and w_down [F, D], no biases, initialised by
  `dense_init` (`jaxlin.layers.initializers`: N(0, init_std^2) or U(+-fan_in^-1/2)). Call: x [B, T, D] -> (y [B, T, D] in `dtype`, {}).
  """

  def __init__(
      self,
      d_model: int,
      hidden_dim: int,
      *,
      dtype: jnp.dtype = f32,
      param_dtype: jnp.dtype = f32,
      rngs: nnx.Rngs,
      init_std: float = 0.02,
      dense_init: str = "normal",
  ) -> None:
    validation.positive_int("d_model", d_model)
    validation.positive_int("hidden_dim", hidden_dim)
    if not init_std >= 0:
      raise ValueError(f"init_std: got {init_std!r}; expected a float >= 0")
    self.d_model = d_model
    self.hidden_dim = hidden_dim
    self.dtype = dtype
    init = dense_initializer(dense_init, init_std)
    self.w_gate = nnx.Param(init(rngs.params(), (d_model, hidden_dim), param_dtype))
    self.w_up = nnx.Param(init(rngs.params(), (d_model, hidden_dim), param_dtype))
    self.w_down = nnx.Param(init(rngs.params(), (hidden_dim, d_model), param_dtype))

  def __call__(self, x: jax.Array) -> tuple[jax.Array, Aux]:
    """x [B, T, D] -> (y [B, T, D], {}) with y = W_down (silu(W_gate x) * (W_up x))."""
    if x.shape[-1] != self.d_model:
      raise ValueError(f"x: got shape {tuple(x.shape)}; expected [..., D] with "
                       f"D = d_model = {self.d_model}")
    y = swiglu(x, self.w_gate[...], self.w_up[...], self.w_down[...], self.dtype)
    return y, {}
