"""Low-rank adaptation (LoRA, arXiv 2106.09685) of a linear projection.

    y = x W + b + (alpha / r) (x A) B          W [I, O] pretrained, A [I, r], B [r, O]

A is drawn from N(0, 1/I) and B starts at zero, so a fresh adapter leaves the layer exactly as it
was (step 0 of a fine-tune equals the pretrained or converted model). Training only the adapters
is the optimizer's business (`jaxlin.training.optim`, `optimizer.trainable="lora"`); `merge`
folds an adapter into W for export: W' = W + (alpha / r) A B.

The parameters are named `kernel`, `bias` (as `nnx.Linear`), `lora_a` and `lora_b`, so a
checkpoint without adapters loads into a model with them (the adapters keep their init).

Legend: I input features, O output features, r rank; any leading axes "...".
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlin import validation

f32 = jnp.float32
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")  # the attention projections LoRA may adapt


@dataclasses.dataclass(frozen=True)
class LoRASpec:
  """Which projections get an adapter, of what rank and scale (rank 0: none)."""
  rank: int = 0
  alpha: float = 8.0
  targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")

  def __post_init__(self) -> None:
    validation.non_negative_int("lora_rank", self.rank)
    validation.require(self.alpha > 0, "lora_alpha", self.alpha, "a number > 0")
    unknown = [t for t in self.targets if t not in PROJECTIONS]
    validation.require(not unknown and len(self.targets) > 0, "lora_targets",
                       ",".join(self.targets),
                       f"a comma-separated non-empty subset of {list(PROJECTIONS)}")

  @classmethod
  def parse(cls, rank: int, alpha: float, targets: str) -> "LoRASpec":
    """From the config fields (targets comma-separated, e.g. "q_proj,k_proj,v_proj")."""
    return cls(rank, alpha, tuple(t.strip() for t in targets.split(",") if t.strip()))

  def adapts(self, name: str) -> bool:
    """Whether projection `name` gets an adapter."""
    return self.rank > 0 and name in self.targets


class LoRALinear(nnx.Module):
  """A linear projection with a low-rank adapter: y = x W + b + (alpha / r) (x A) B."""

  def __init__(self, in_features: int, out_features: int, *, rank: int, alpha: float,
               use_bias: bool = False, kernel_init: nnx.Initializer | None = None,
               dtype: jnp.dtype = f32, param_dtype: jnp.dtype = f32, rngs: nnx.Rngs) -> None:
    validation.positive_int("lora_rank", rank)
    init = kernel_init or jax.nn.initializers.lecun_normal()
    self.in_features, self.out_features = in_features, out_features
    self.rank, self.scale, self.dtype = rank, alpha / rank, dtype
    self.kernel = nnx.Param(init(rngs.params(), (in_features, out_features), param_dtype))
    self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else None
    self.lora_a = nnx.Param(jax.random.normal(rngs.params(), (in_features, rank), param_dtype)
                            / jnp.sqrt(in_features).astype(param_dtype))
    self.lora_b = nnx.Param(jnp.zeros((rank, out_features), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    """x [..., I] -> y [..., O] in `dtype` (float32 accumulation)."""
    x = x.astype(self.dtype)
    y = jnp.matmul(x, self.kernel[...].astype(self.dtype), preferred_element_type=f32)
    low = jnp.matmul(x, self.lora_a[...].astype(self.dtype), preferred_element_type=f32)
    y = y + self.scale * jnp.matmul(low.astype(self.dtype), self.lora_b[...].astype(self.dtype),
                                    preferred_element_type=f32)
    if self.bias is not None:
      y = y + self.bias[...].astype(f32)
    return y.astype(self.dtype)

  def merged_kernel(self) -> jax.Array:
    """W + (alpha / r) A B in the parameter dtype (float32 product)."""
    delta = jnp.matmul(self.lora_a[...].astype(f32), self.lora_b[...].astype(f32))
    return (self.kernel[...].astype(f32) + self.scale * delta).astype(self.kernel[...].dtype)


def projection(name: str, in_features: int, out_features: int, *, lora: LoRASpec | None,
               use_bias: bool, kernel_init: nnx.Initializer, dtype: jnp.dtype,
               param_dtype: jnp.dtype, rngs: nnx.Rngs) -> nnx.Module:
  """Projection `name`: a LoRALinear when `lora` adapts it, else an nnx.Linear."""
  if lora is not None and lora.adapts(name):
    return LoRALinear(in_features, out_features, rank=lora.rank, alpha=lora.alpha,
                      use_bias=use_bias, kernel_init=kernel_init, dtype=dtype,
                      param_dtype=param_dtype, rngs=rngs)
  return nnx.Linear(in_features, out_features, use_bias=use_bias, kernel_init=kernel_init,
                    dtype=dtype, param_dtype=param_dtype, rngs=rngs)
