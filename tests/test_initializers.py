"""The dense-weight initialisers (`jaxlin.layers.initializers`) and where the model uses them.

"fan_in" must be PyTorch's nn.Linear default, U(-a, a) with a = fan_in^-1/2 (kaiming_uniform
with a = sqrt(5): gain sqrt(1/3), bound gain sqrt(3 / fan_in)); an MoE's expert axis is not
part of the fan-in. "normal" is N(0, init_std^2). The checks are on the drawn values: the
bound (no value outside, and values near it), and the standard deviation a / sqrt(3).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlin.config import ModelConfig
from jaxlin.layers.initializers import dense_initializer
from jaxlin.model import LanguageModel


def _assert_fan_in_uniform(w: jax.Array, fan_in: int, name: str) -> None:
  """w ~ U(-a, a), a = fan_in^-1/2: inside the bound, reaching it, std a / sqrt(3)."""
  w = np.asarray(w, np.float64).ravel()
  bound = fan_in ** -0.5
  assert np.abs(w).max() <= bound, f"{name}: max |w| {np.abs(w).max()} > {bound}"
  assert np.abs(w).max() > 0.97 * bound, f"{name}: max |w| {np.abs(w).max()} far below {bound}"
  # std of U(-a, a) is a / sqrt(3); the sample std's relative error is ~0.45 / sqrt(n)
  np.testing.assert_allclose(w.std(), bound / np.sqrt(3), rtol=3 / np.sqrt(w.size),
                             err_msg=name)


def _assert_normal(w: jax.Array, std: float, name: str) -> None:
  w = np.asarray(w, np.float64).ravel()
  # the sample std's relative error is ~0.71 / sqrt(n): 3 / sqrt(n) is over 4 of them
  np.testing.assert_allclose(w.std(), std, rtol=3 / np.sqrt(w.size), err_msg=name)
  # a normal has tails (1.2% of draws beyond 2.5 std); a uniform stops at sqrt(3) std
  assert np.abs(w).max() > 2.5 * std, f"{name}: no tail beyond 2.5 std"


@pytest.mark.parametrize("shape,fan_in", [((64, 100), 64), ((8, 48, 40), 48), ((300, 20), 300)])
def test_fan_in_is_pytorch_linear_default(shape: tuple[int, ...], fan_in: int) -> None:
  w = dense_initializer("fan_in", 0.02, ndim=len(shape))(jax.random.key(0), shape, jnp.float32)
  assert w.shape == shape and w.dtype == jnp.float32
  _assert_fan_in_uniform(w, fan_in, f"fan_in {shape}")


def test_normal_ignores_the_fan_in() -> None:
  w = dense_initializer("normal", 0.05, ndim=3)(jax.random.key(1), (4, 64, 80), jnp.float32)
  _assert_normal(w, 0.05, "normal")


def test_bad_scheme_and_rank() -> None:
  with pytest.raises(ValueError, match=r"dense_init: got 'xavier'; expected one of "
                                       r"\('normal', 'fan_in'\)"):
    dense_initializer("xavier", 0.02)
  with pytest.raises(ValueError, match=r"ndim: got 1"):
    dense_initializer("fan_in", 0.02, ndim=1)


def test_model_dense_init_reaches_head_mlp_and_experts_only() -> None:
  """dense_init="fan_in": head, SwiGLU, MoE experts and shared expert follow their fan-in;
  the embedding and the router stay N(0, init_std^2)."""
  d, hidden, expert, vocab, std = 48, 96, 40, 200, 0.03
  config = ModelConfig(vocab_size=vocab, d_model=d, num_layers=2, num_heads=2, pattern="L",
                       linear_variant="gla", moe_every=2, num_experts=8, moe_top_k=2,
                       expert_hidden=expert, num_shared_experts=1, mlp_hidden=hidden,
                       dtype="float32", init_std=std, dense_init="fan_in")
  model = LanguageModel(config, rngs=nnx.Rngs(0))
  dense, moe = model.blocks[0].mlp, model.blocks[1].mlp
  _assert_fan_in_uniform(model.head[...], d, "head")
  _assert_fan_in_uniform(dense.w_gate[...], d, "w_gate")
  _assert_fan_in_uniform(dense.w_up[...], d, "w_up")
  _assert_fan_in_uniform(dense.w_down[...], hidden, "w_down")
  _assert_fan_in_uniform(moe.w_gate[...], d, "expert w_gate")       # [E, D, F]: fan-in D
  _assert_fan_in_uniform(moe.w_down[...], expert, "expert w_down")  # [E, F, D]: fan-in F
  _assert_fan_in_uniform(moe.shared.w_down[...], expert, "shared w_down")
  _assert_normal(model.embedding[...], std, "embedding")
  _assert_normal(moe.router[...], std, "router")
  # the default is the N(0, init_std^2) of every earlier release
  default = LanguageModel(ModelConfig(**{**config.__dict__, "dense_init": "normal"}),
                          rngs=nnx.Rngs(0))
  _assert_normal(default.head[...], std, "normal head")
  _assert_normal(default.blocks[1].mlp.w_down[...], std, "normal expert w_down")
