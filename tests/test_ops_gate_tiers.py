"""The three exact score tiers of the per-key-dim gate (jaxlin.ops.gated).

Gates are drawn from ranges whose chunk / 16-token sub-chunk spans put every
call in a known tier (chunk 64: tier 0 needs span <= 60 over 64 tokens, tier 1
over 16 tokens). Each tier must match the token-by-token reference in output,
final state and every gradient, with and without the bonus and segment ids.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlin import ops
from jaxlin.ops import chunking, gated_terms

B, T, H, K, V, CHUNK = 1, 150, 2, 16, 8, 64
RTOL, ATOL_REL = 1e-3, 2e-4

# (tier, low, high): g uniform in [low, high].
#   tier 0: 64 * 0.9 = 57.6 <= 60.
#   tier 1: 64 * 2.1 = 134 > 60 per chunk, 16 * 3.7 = 59.2 <= 60 per sub-chunk.
#   tier 2: 16 * 5 = 80 > 60 per sub-chunk.
TIERS = [(0, -0.9, 0.0), (1, -3.7, -2.1), (2, -30.0, -5.0)]


def _inputs(low: float, high: float) -> dict[str, jax.Array]:
  rng = np.random.default_rng(7)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  return dict(
      q=normal(B, T, H, K), k=normal(B, T, H, K), v=normal(B, T, H, V),
      g=jnp.asarray(rng.uniform(low, high, size=(B, T, H, K)), jnp.float32),
      bonus=normal(H, K), initial_state=normal(B, H, K, V))


@pytest.mark.parametrize("tier,low,high", TIERS, ids=[f"tier{t}" for t, _, _ in TIERS])
def test_tier_is_selected(tier: int, low: float, high: float) -> None:
  g = _inputs(low, high)["g"]
  b = jnp.cumsum(chunking.to_chunks(g, CHUNK), axis=3)
  assert int(gated_terms.score_tier(b)) == tier


@pytest.mark.parametrize("segments", [False, True], ids=["noseg", "seg"])
@pytest.mark.parametrize("bonus", [False, True], ids=["nobonus", "bonus"])
@pytest.mark.parametrize("tier,low,high", TIERS, ids=[f"tier{t}" for t, _, _ in TIERS])
def test_tier_matches_reference(tier: int, low: float, high: float, bonus: bool,
                                segments: bool) -> None:
  x = _inputs(low, high)
  seg = jnp.asarray(np.repeat([[0, 1, 2]], 50, axis=1), jnp.int32) if segments else None
  w = jnp.asarray(np.random.default_rng(1).normal(size=(B, T, H, V)), jnp.float32)

  def loss(q, k, v, g, u, s0, impl):
    o, final = ops.gated_linear_attention(
        q, k, v, g, bonus=u if bonus else None, initial_state=s0, segment_ids=seg,
        output_final_state=True, chunk_size=CHUNK, impl=impl)
    return jnp.sum(o * w) + jnp.sum(final), (o, final)

  args = (x["q"], x["k"], x["v"], x["g"], x["bonus"], x["initial_state"])
  grad = jax.grad(loss, argnums=tuple(range(6)), has_aux=True)
  want_grads, (want_o, want_s) = grad(*args, "reference")
  got_grads, (got_o, got_s) = grad(*args, "xla")
  names = ["o", "final_state", "dq", "dk", "dv", "dg", "dbonus", "dinitial_state"]
  pairs = zip([want_o, want_s, *want_grads], [got_o, got_s, *got_grads])
  for name, (want, got) in zip(names, pairs):
    if name == "dbonus" and not bonus:
      continue
    scale = float(jnp.max(jnp.abs(want)))
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL_REL * scale, err_msg=name)
    assert np.all(np.isfinite(np.asarray(got))), name
