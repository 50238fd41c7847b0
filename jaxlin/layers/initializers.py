"""Initialisers of the dense weights (the LM head, SwiGLU and MoE experts): a registry.

    "normal":  W ~ N(0, std^2), std = ModelConfig.init_std (GPT-2 / Llama; 0.02)
    "fan_in":  W ~ U(-a, a),   a = fan_in^-1/2 (PyTorch's nn.Linear default;
               std = a / sqrt(3), about 0.072 at fan_in 64)

A weight W [..., fan_in, fan_out] maps its second-to-last axis to its last; leading axes
(the experts of an MoE, [E, D, F]) are batch axes, not part of the fan-in. With "fan_in"
the scale follows the layer's width, so a narrow model's head and MLP start at a larger
scale than 0.02 (mamba2 learns MQAR from it where it stays at chance from 0.02;
docs/benchmarks.md, Recall).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

Initializer = Callable[[jax.Array, tuple[int, ...], jnp.dtype], jax.Array]


def _normal(std: float, batch_axes: tuple[int, ...]) -> Initializer:
  del batch_axes
  return jax.nn.initializers.normal(std)


def _fan_in_uniform(std: float, batch_axes: tuple[int, ...]) -> Initializer:
  del std
  # variance 1 / (3 fan_in) as a uniform is U(+-fan_in^-1/2)
  return jax.nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform",
                                              batch_axis=batch_axes)


DENSE_INITS: dict[str, Callable[[float, tuple[int, ...]], Initializer]] = {
    "normal": _normal,
    "fan_in": _fan_in_uniform,
}


def dense_initializer(scheme: str, std: float, ndim: int = 2) -> Initializer:
  """The initialiser of a weight [..., fan_in, fan_out] with `ndim` axes under `scheme`."""
  if scheme not in DENSE_INITS:
    raise ValueError(f"dense_init: got {scheme!r}; expected one of {tuple(DENSE_INITS)}")
  if ndim < 2:
    raise ValueError(f"ndim: got {ndim}; a dense weight has >= 2 axes [..., fan_in, fan_out]")
  return DENSE_INITS[scheme](std, tuple(range(ndim - 2)))
