"""Tests of jaxlin.generate: sampling filters and cached generation, from the spec.

    prefill(x_{<P}) then decode x_P, x_{P+1}, ... one token at a time
        == the full forward's logits at every position
    greedy generate: x_{t+1} = argmax_v logits(x_{<=t})_v
    top-k keeps the k largest logits; top-p the smallest most-likely set with mass >= p
    temperature -> 0: sampling -> argmax

The model is a tiny hybrid: L N L blocks (GLA with its short conv switched on), the
middle block an MoE (dropless, so a token's output does not depend on the others).

Legend: B batch, P prompt length, N new tokens, T = P + N, V vocab.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlin import generate as gen
from jaxlin.config import ModelConfig
from _model_helpers import build, jitted
from jaxlin.model import LanguageModel

TINY = dict(vocab_size=32, d_model=16, num_layers=3, num_heads=2, pattern="LN",
            linear_variant="gla", use_short_conv=True, chunk_size=16, moe_every=2,
            num_experts=4, moe_top_k=2, expert_hidden=16, mlp_hidden=32, dtype="float32",
            init_std=0.3)
B, P, N = 2, 5, 4
T = P + N


@pytest.fixture(scope="module")
def setup() -> tuple[LanguageModel, Callable[[jax.Array], jax.Array]]:
  """The tiny model and its jitted full forward tokens [B, T] -> logits [B, T, V]."""
  model = build(ModelConfig(**TINY))
  return model, jitted(model, lambda m, t: m(t)[0])


def test_prefill_then_decode_equals_forward(setup: tuple) -> None:
  model, forward = setup
  assert [b.layer_type for b in model.blocks] == ["L", "N", "L"]
  assert [b.is_moe for b in model.blocks] == [False, True, False]
  assert "conv" in model.init_cache(B, T)["layer_0"]  # the conv state is carried too
  tokens = jax.random.randint(jax.random.key(0), (B, T), 0, TINY["vocab_size"])
  full = np.asarray(forward(tokens))

  step = jitted(model, lambda m, t, c: m(t, cache=c)[:2])
  logits, cache = step(tokens[:, :P], model.init_cache(B, T))
  outs = [np.asarray(logits)]
  for t in range(P, T):
    logits, cache = step(tokens[:, t:t + 1], cache)
    assert logits.shape == (B, 1, TINY["vocab_size"])
    outs.append(np.asarray(logits))
  cached = np.concatenate(outs, axis=1)
  assert np.max(np.abs(full)) > 0.1
  np.testing.assert_allclose(cached, full, rtol=1e-5, atol=1e-5)


# Every cache kind: MoM's per-memory states and stream convs, the delta family's K x K state
# and conv, Mamba2's step-scaled values and skip, RWKV6's token shift and bonus.
MIXER_MODELS = {
    "mom-gated_deltanet": dict(mixer="mom", mom_core="gated_deltanet", mom_num_memories=3),
    "mom-gla-noshared": dict(mixer="mom", mom_core="gla", mom_shared_memory=False),
    "deltanet": dict(linear_variant="deltanet"),
    "gated_deltanet": dict(linear_variant="gated_deltanet"),
    "comba": dict(linear_variant="comba"),
    "mamba2": dict(linear_variant="mamba2"),
    "rwkv6": dict(linear_variant="rwkv6"),
}


@pytest.mark.parametrize("mixer", list(MIXER_MODELS))
def test_every_cache_kind_prefill_then_decode_equals_forward(mixer: str) -> None:
  """A two-layer model of one mixer: prefill P tokens, decode the rest one by one (one
  jitted scan) == the full forward's logits."""
  fields = dict(TINY, num_layers=2, pattern="L", moe_every=0, use_short_conv=None, init_std=0.3)
  model = build(ModelConfig(**{**fields, **MIXER_MODELS[mixer]}))
  tokens = jax.random.randint(jax.random.key(2), (B, T), 0, TINY["vocab_size"])

  def cached(m: LanguageModel, tokens: jax.Array) -> jax.Array:
    logits, cache = m(tokens[:, :P], cache=m.init_cache(B, T))[:2]

    def decode(cache: Any, token: jax.Array) -> tuple[Any, jax.Array]:
      step_logits, cache = m(token[:, None], cache=cache)[:2]
      return cache, step_logits[:, 0]

    _, rest = jax.lax.scan(decode, cache, tokens[:, P:].T)
    return jnp.concatenate([logits, jnp.swapaxes(rest, 0, 1)], axis=1)

  full, incremental = jitted(model, lambda m, t: (m(t)[0], cached(m, t)))(tokens)
  assert np.max(np.abs(np.asarray(full))) > 0.1
  np.testing.assert_allclose(np.asarray(incremental), np.asarray(full), rtol=1e-5, atol=1e-5)


def test_linear_cache_does_not_grow(setup: tuple) -> None:
  """An L block's cache has the same size for any max_length (an N block's grows)."""
  model, _ = setup
  size = lambda c: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(c))
  short, long = model.init_cache(B, 8), model.init_cache(B, 800)
  assert size(short["layer_0"]) == size(long["layer_0"]) > 0
  assert size(short["layer_2"]) == size(long["layer_2"])
  assert size(long["layer_1"]) > size(short["layer_1"])


def test_greedy_generate_is_repeated_argmax(setup: tuple) -> None:
  model, forward = setup
  prompt = jax.random.randint(jax.random.key(1), (B, P), 0, TINY["vocab_size"])
  out = gen.generate(model, prompt, max_new_tokens=N, temperature=0.0, rng=jax.random.key(2))
  assert out.shape == (B, T) and out.dtype == jnp.int32
  np.testing.assert_array_equal(out[:, :P], prompt)
  logits = np.asarray(forward(out))
  # the full forward of the generated sequence picks each generated token at t-1
  np.testing.assert_array_equal(np.argmax(logits[:, P - 1:T - 1], axis=-1), out[:, P:])
  top2 = np.sort(logits[:, P - 1:T - 1], axis=-1)[..., -2:]
  assert np.min(top2[..., 1] - top2[..., 0]) > 1e-4  # no near-ties: the check is decisive

  # eos: a row that emits eos_id keeps emitting it
  eos = int(out[0, P + 1])
  stopped = gen.generate(model, prompt, max_new_tokens=N, temperature=0.0,
                         rng=jax.random.key(2), eos_id=eos)
  for row in range(B):
    new = np.asarray(out[row, P:])
    hits = np.flatnonzero(new == eos)
    expected = new.copy()
    if hits.size:
      expected[hits[0]:] = eos
    np.testing.assert_array_equal(stopped[row, P:], expected)
  assert np.all(np.asarray(stopped[0, P + 1:]) == eos)


# --------------------------------------------------------------------- sampling
PROBS = np.array([0.05, 0.4, 0.1, 0.3, 0.15])  # sorted: 1 (.4), 3 (.3), 4 (.15), 2 (.1), 0


@pytest.mark.parametrize("top_k, top_p, allowed", [
    (None, None, {0, 1, 2, 3, 4}),
    (1, None, {1}),
    (3, None, {1, 3, 4}),
    (None, 0.35, {1}),
    (None, 0.5, {1, 3}),
    (None, 0.65, {1, 3}),
    (None, 0.75, {1, 3, 4}),
    (None, 0.9, {1, 3, 4, 2}),
    (2, 0.9, {1, 3}),           # top-k first, then top-p over what is left
    (3, 0.75, {1, 3}),          # renormalised over {1, 3, 4}: mass before 4 is 0.82
])
def test_top_k_top_p_pick_only_allowed_tokens(top_k: int | None, top_p: float | None,
                                              allowed: set[int]) -> None:
  logits = jnp.log(jnp.asarray(PROBS, jnp.float32))
  filtered = gen.filter_logits(logits, top_k=top_k, top_p=top_p)
  assert set(np.flatnonzero(np.isfinite(np.asarray(filtered)))) == allowed
  draws = 4000
  picked = np.asarray(gen.sample_logits(jnp.broadcast_to(logits, (draws, 5)),
                                        jax.random.key(3), top_k=top_k, top_p=top_p))
  assert picked.dtype == np.int32
  assert set(picked.tolist()) == allowed
  # frequencies follow the renormalised probabilities over the kept tokens
  keep = np.array([p if i in allowed else 0.0 for i, p in enumerate(PROBS)])
  expected = keep / keep.sum()
  freq = np.bincount(picked, minlength=5) / draws
  np.testing.assert_allclose(freq, expected, atol=4 * np.sqrt(0.25 / draws))


def test_temperature_to_zero_is_greedy() -> None:
  rows, vocab = 64, 50
  # every row a permutation of 0, 0.05, ..., so the top two differ by 0.05
  keys = jax.random.split(jax.random.key(4), rows)
  logits = jax.vmap(lambda k: jax.random.permutation(k, jnp.arange(vocab) * 0.05))(keys)
  greedy = np.argmax(np.asarray(logits), axis=-1)
  np.testing.assert_array_equal(gen.sample_logits(logits, jax.random.key(5), temperature=0.0),
                                greedy)
  for seed in range(3):
    cold = gen.sample_logits(logits, jax.random.key(seed), temperature=1e-3)
    np.testing.assert_array_equal(cold, greedy)
  warm = gen.sample_logits(logits, jax.random.key(6), temperature=1.0)
  assert np.mean(np.asarray(warm) != greedy) > 0.5  # at temperature 1 it does differ


def test_errors(setup: tuple) -> None:
  model, _ = setup
  logits = jnp.zeros((1, 5))
  with pytest.raises(ValueError, match=r"top_p: got 1.5; expected None or a float in \(0, 1\]"):
    gen.filter_logits(logits, top_p=1.5)
  with pytest.raises(ValueError, match=r"top_k: got 0; expected None or an int >= 1"):
    gen.filter_logits(logits, top_k=0)
  with pytest.raises(ValueError, match=r"temperature: got -1.0; expected a number >= 0"):
    gen.sample_logits(logits, jax.random.key(0), temperature=-1.0)
  with pytest.raises(ValueError, match=r"expected \[B, P\]"):
    gen.generate(model, jnp.zeros((4,), jnp.int32), max_new_tokens=2, rng=jax.random.key(0))
  prompt = jnp.zeros((1, 3), jnp.int32)
  np.testing.assert_array_equal(
      gen.generate(model, prompt, max_new_tokens=0, rng=jax.random.key(0)), prompt)
