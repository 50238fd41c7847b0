"""Feature maps phi of linear attention, applied per head to queries and keys.

The kernel of linear attention is phi(q) . phi(k). Maps (x in R^K, per head):

  identity   phi(x) = x                                                   K
  elu        phi(x) = elu(x) + 1                                          K
  relu       phi(x) = max(x, 0)                                           K
  swish      phi(x) = x * sigmoid(x)                                      K
  hedgehog   phi(x) = softmax([2 y, -2 y]),  y = W x + b (W = I at init)   2K   (learnable)
  t2r        phi(x) = relu(W x + b)                                       K    (learnable)
  dpfp       r = [relu(x), relu(-x)];  phi(x) = concat_{j=1..nu} r * roll(r, j)   2 K nu
  taylor     phi(x) = [1, x / K^(1/4), x_i x_j / sqrt(K) (i<j), x_i^2 / sqrt(2K)]
             so phi(q).phi(k) = 1 + q.k / sqrt(K) + (q.k)^2 / (2K)  (Based)   1 + K + K(K+1)/2
  rebased    y = gamma * layernorm(x) + beta;
             phi(x) = [y_i^2 / sqrt(K), y_i y_j sqrt(2/K) (i<j)]
             so phi(q).phi(k) = (y_q . y_k)^2 / K          (learnable)   K(K+1)/2

All maps compute in float32. Learnable maps share their parameters across heads.

Legend: K the per-head input dim, K' the output dim, any leading axes.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlin import validation

f32 = jnp.float32

FEATURE_MAPS = ("identity", "elu", "relu", "swish", "hedgehog", "t2r", "dpfp", "taylor",
                "rebased")
LEARNABLE = ("hedgehog", "t2r", "rebased")
DPFP_NU = 4


def feature_dim(name: str, head_dim: int) -> int:
  """The output dim K' of feature map `name` on inputs of dim K = head_dim."""
  check_name(name)
  if name == "hedgehog":
    return 2 * head_dim
  if name == "dpfp":
    return 2 * head_dim * DPFP_NU
  if name == "taylor":
    return 1 + head_dim + head_dim * (head_dim + 1) // 2
  if name == "rebased":
    return head_dim * (head_dim + 1) // 2
  return head_dim


def check_name(name: str) -> None:
  """Raises ValueError unless `name` is a known feature map."""
  validation.choice("feature_map", name, FEATURE_MAPS)


def _pairs(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """x [..., K] -> (x_i x_j for i < j [..., K(K-1)/2], x_i^2 [..., K])."""
  rows, cols = np.triu_indices(x.shape[-1], k=1)
  return x[..., rows] * x[..., cols], jnp.square(x)


def dpfp(x: jax.Array, nu: int = DPFP_NU) -> jax.Array:
  """DPFP: r = [relu(x), relu(-x)], phi = concat_{j=1..nu} r * roll(r, j): [..., 2 K nu]."""
  r = jnp.concatenate([jax.nn.relu(x), jax.nn.relu(-x)], axis=-1)
  return jnp.concatenate([r * jnp.roll(r, j, axis=-1) for j in range(1, nu + 1)], axis=-1)


def taylor(x: jax.Array) -> jax.Array:
  """Based's 2nd-order Taylor map of exp(q.k / sqrt(K)): [..., 1 + K + K(K+1)/2]."""
  head_dim = x.shape[-1]
  off, diag = _pairs(x)
  rd = math.sqrt(head_dim)
  return jnp.concatenate([jnp.ones_like(x[..., :1]), x / math.sqrt(rd),
                          diag / (rd * math.sqrt(2.0)), off / rd], axis=-1)


def _layer_norm(x: jax.Array, eps: float = 1e-5) -> jax.Array:
  """(x - mean) / sqrt(var + eps) over the last axis."""
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps)


class FeatureMap(nnx.Module):
  """One feature map phi (see the module docstring): x [..., K] -> phi(x) [..., K'].

  Args:
    name: one of FEATURE_MAPS.
    head_dim: K, the per-head input dim.
    rngs: only used by learnable maps (hedgehog, t2r, rebased).
  """

  def __init__(self, name: str, head_dim: int, *, rngs: nnx.Rngs,
               param_dtype: jnp.dtype = f32) -> None:
    check_name(name)
    self.name, self.head_dim = name, head_dim
    self.output_dim = feature_dim(name, head_dim)
    weight = bias = gamma = None
    if name == "hedgehog":   # identity at init, as in the Hedgehog paper
      weight = nnx.Param(jnp.eye(head_dim, dtype=param_dtype))
    elif name == "t2r":
      bound = head_dim ** -0.5
      weight = nnx.Param(jax.random.uniform(rngs.params(), (head_dim, head_dim), param_dtype,
                                            -bound, bound))
    elif name == "rebased":
      gamma = nnx.Param(jnp.ones((head_dim,), param_dtype))
    if name in LEARNABLE:
      bias = nnx.Param(jnp.zeros((head_dim,), param_dtype))
    self.weight, self.bias, self.gamma = nnx.data(weight), nnx.data(bias), nnx.data(gamma)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x [..., K] -> phi(x) [..., K'] float32."""
    x = x.astype(f32)
    name = self.name
    if name == "identity":
      return x
    if name == "elu":
      return jax.nn.elu(x) + 1.0
    if name == "relu":
      return jax.nn.relu(x)
    if name == "swish":
      return jax.nn.silu(x)
    if name == "dpfp":
      return dpfp(x)
    if name == "taylor":
      return taylor(x)
    if name in ("hedgehog", "t2r"):
      y = x @ self.weight[...].astype(f32) + self.bias[...].astype(f32)
      if name == "t2r":
        return jax.nn.relu(y)
      return jax.nn.softmax(jnp.concatenate([2.0 * y, -2.0 * y], axis=-1), axis=-1)
    # rebased
    y = _layer_norm(x) * self.gamma[...].astype(f32) + self.bias[...].astype(f32)
    off, diag = _pairs(y)
    return jnp.concatenate([diag * self.head_dim ** -0.5,
                            off * math.sqrt(2.0 / self.head_dim)], axis=-1)
