"""The router's gradient reaches the loss through the combine weights (MoE and MoM).

With the auxiliary losses off, the directional derivative of a loss along a random change
of the router weights, <dL/dW_r, d>, must equal the central finite difference
(L(W_r + e d) - L(W_r - e d)) / 2e, where e is small enough that no token changes its
top-k choice (checked). A `stop_gradient` on the combine weights would give 0 here.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlin.layers import MixtureOfMemories, MoE

D, B, T = 16, 2, 9
EPS = 1e-2


def _directional_check(module: nnx.Module, apply: Callable, choices: Callable) -> None:
  graph, params, rest = nnx.split(module, nnx.Param, ...)
  x = jax.random.normal(jax.random.key(0), (B, T, D))
  w = jax.random.normal(jax.random.key(1), (B, T, D))
  router = params["router"][...]
  direction = jax.random.normal(jax.random.key(2), router.shape)
  direction = direction / jnp.linalg.norm(direction)

  def with_router(router: jax.Array) -> nnx.Module:
    changed = jax.tree.map(lambda a: a, params)
    changed["router"] = nnx.Param(router)
    return nnx.merge(graph, changed, rest)

  loss = jax.jit(lambda router: jnp.sum(apply(with_router(router), x) * w))
  chosen = jax.jit(lambda router: choices(with_router(router), x))
  grad = jax.jit(jax.grad(loss))(router)
  analytic = float(jnp.sum(grad * direction))
  up, down = router + EPS * direction, router - EPS * direction
  np.testing.assert_array_equal(chosen(up), chosen(down))   # same top-k on both sides
  numeric = (float(loss(up)) - float(loss(down))) / (2 * EPS)
  assert abs(analytic) > 1e-3, analytic
  np.testing.assert_allclose(analytic, numeric, rtol=2e-2)


@pytest.mark.parametrize("scoring", ["softmax_topk", "topk_softmax"])
def test_moe_router_gradient_matches_finite_differences(scoring: str) -> None:
  module = MoE(D, num_experts=4, top_k=2, expert_hidden_dim=8, scoring=scoring,
               aux_loss_coef=0.0, z_loss_coef=0.0, init_std=0.5, rngs=nnx.Rngs(0))
  _directional_check(module, lambda m, x: m(x)[0],
                     lambda m, x: m.route(x.reshape(-1, D)).experts)


@pytest.mark.parametrize("core", ["gla", "gated_deltanet"])
def test_mom_router_gradient_matches_finite_differences(core: str) -> None:
  module = MixtureOfMemories(D, 2, core=core, num_memories=3, top_k=2, aux_loss_coef=0.0,
                             init_std=0.5, impl="xla", rngs=nnx.Rngs(0))
  _directional_check(module, lambda m, x: m(x).y,
                     lambda m, x: jax.lax.top_k(m.router_logits(x), 2)[1])
