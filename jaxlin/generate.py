"""Sampling and autoregressive generation for `jaxlin.model.LanguageModel`.

Sampling from logits l [B, V] (all float32), in this order:

    temperature: l / tau                   (tau = 0: greedy, argmax l)
    top-k:       keep l_i >= the k-th largest value
    top-p:       keep the smallest set of most likely tokens whose total
                 probability >= p (the most likely token is always kept)
    draw:        x ~ softmax(l) over the kept tokens

Generation: one forward over the prompt fills the caches (prefill: the linear
layers' chunked ops return their final states, the softmax layers store keys
and values), then a `jax.lax.scan` feeds one sampled token at a time. A linear
layer's cache is its [B, H, K, V] state plus a conv window, so its memory per
step does not grow with the sequence. The whole loop is one `jax.jit`
(the model is `nnx.split` outside and `nnx.merge`d inside).

Legend: B batch, P prompt length, N max_new_tokens, V vocab_size.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlin import validation

f32 = jnp.float32


def filter_logits(logits: jax.Array, *, top_k: int | None = None,
                  top_p: float | None = None) -> jax.Array:
  """logits [..., V] with the tokens outside top-k / top-p set to -inf (float32).

  top-k keeps l_i >= (k-th largest l); top-p keeps token i when the probability
  of the tokens strictly more likely than it is < p (so the kept set is the
  smallest one reaching mass p; ties with the last kept value are kept).
  """
  logits = logits.astype(f32)
  vocab = logits.shape[-1]
  if top_k is not None:
    validation.positive_int("top_k", top_k, optional=True)
    if top_k < vocab:
      kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
      logits = jnp.where(logits >= kth, logits, -jnp.inf)
  if top_p is not None:
    validation.require(0.0 < top_p <= 1.0, "top_p", top_p, "None or a float in (0, 1]")
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]                 # descending
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs                      # exclusive
    keep = mass_before < top_p                                            # prefix, [0] kept
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits >= threshold, logits, -jnp.inf)
  return logits


def sample_logits(logits: jax.Array, rng: jax.Array, *, temperature: float = 1.0,
                  top_k: int | None = None, top_p: float | None = None) -> jax.Array:
  """Draw one token per row from logits [B, V] -> [B] int32 (module docstring)."""
  validation.require(temperature >= 0, "temperature", temperature, "a number >= 0 (0: greedy)")
  logits = logits.astype(f32)
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = filter_logits(logits / temperature, top_k=top_k, top_p=top_p)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature",
                                             "top_k", "top_p"))
def _generate(graphdef: nnx.GraphDef, state: nnx.State, prompt: jax.Array, rng: jax.Array,
              eos_id: jax.Array, *, max_new_tokens: int, temperature: float,
              top_k: int | None, top_p: float | None) -> jax.Array:
  """Prefill + scanned decode; returns the new tokens [B, N] int32 (eos_id -1: none)."""
  batch, prompt_len = prompt.shape
  model = nnx.merge(graphdef, state)
  sample = functools.partial(sample_logits, temperature=temperature, top_k=top_k, top_p=top_p)
  cache = model.init_cache(batch, prompt_len + max_new_tokens)
  logits, cache, _ = model(prompt, cache=cache)
  rng, sub = jax.random.split(rng)
  first = sample(logits[:, -1], sub)
  done = first == eos_id

  def step(carry: tuple, _: None) -> tuple[tuple, jax.Array]:
    cache, token, rng, done = carry
    step_model = nnx.merge(graphdef, state)
    logits, cache, _ = step_model(token[:, None], cache=cache)
    rng, sub = jax.random.split(rng)
    nxt = sample(logits[:, 0], sub)
    nxt = jnp.where(done, eos_id, nxt)  # a finished row repeats eos
    done = done | (nxt == eos_id)
    return (cache, nxt, rng, done), nxt

  _, rest = jax.lax.scan(step, (cache, first, rng, done), None, length=max_new_tokens - 1)
  return jnp.concatenate([first[:, None], rest.T], axis=1)


def generate(model: nnx.Module, prompt_tokens: jax.Array, *, max_new_tokens: int,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             rng: jax.Array, eos_id: int | None = None) -> jax.Array:
  """Sample continuations: prompt [B, P] int -> tokens [B, P + N] int32.

  x_{t+1} ~ sample(model(x_{<=t})[-1]) for N = max_new_tokens steps, with the
  prompt prefilled in one forward and the steps decoded from the caches.
  temperature=0 is greedy. After a row samples `eos_id`, it repeats `eos_id`.
  """
  prompt = jnp.asarray(prompt_tokens, jnp.int32)
  if prompt.ndim != 2 or prompt.shape[1] < 1:
    raise ValueError(f"prompt_tokens: got shape {tuple(prompt.shape)}; expected [B, P], P >= 1")
  validation.non_negative_int("max_new_tokens", max_new_tokens)
  validation.require(temperature >= 0, "temperature", temperature, "a number >= 0 (0: greedy)")
  validation.require(eos_id is None or eos_id >= 0, "eos_id", eos_id, "None or a token id >= 0")
  if max_new_tokens == 0:
    return prompt
  graphdef, state = nnx.split(model)
  eos = jnp.int32(-1 if eos_id is None else eos_id)  # traced: no recompile per eos_id
  new = _generate(graphdef, state, prompt, rng, eos, max_new_tokens=max_new_tokens,
                  temperature=float(temperature), top_k=top_k,
                  top_p=None if top_p is None else float(top_p))
  return jnp.concatenate([prompt, new], axis=1)
