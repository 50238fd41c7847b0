"""The contract between the layers and `jaxlin.model`.

A *token mixer* (an L layer: linear attention of any variant, MoM; an N layer:
softmax attention) maps x [B, T, D] to y [B, T, D] and can continue from a
decoding cache:

    mixer.init_cache(batch_size, max_length) -> cache
    mixer(x, segment_ids=None, cache=None) -> MixerOutput(y, cache, aux)

* Without a cache the call is the training / full-sequence forward; the
  returned cache is None.
* With a cache the call continues the sequence the cache has seen, for any
  number of new tokens T >= 1 (prefill: T = prompt length on an empty cache;
  decode: T = 1), and returns the updated cache. Prefill followed by decode
  equals the full forward token by token. `segment_ids` with a cache is an
  error (a cache holds one sequence per batch row).
* A cache is a dict pytree of arrays with the batch axis first (or scalars),
  so that it can be carried through `jax.lax.scan` / `jax.jit`. A linear layer
  stores its [B, H, K, V] float32 recurrent state and its [B, 3, C] conv
  state: its memory does not grow with the sequence. A softmax layer stores
  keys and values (a ring buffer of the window for sliding-window attention).
* `aux` holds scalars the model reports: keys ending in "_loss" are added to
  the training loss as they are (the layer has already applied its
  coefficient); other keys are metrics (e.g. the fraction of tokens an MoE
  dropped).

A *channel mixer* (dense SwiGLU MLP or MoE) maps x [B, T, D] to
(y [B, T, D], aux) with the same `aux` convention.

Modules take `dtype` (the compute dtype of matmul inputs and activations) and
`param_dtype` (float32 by default) and are Flax NNX modules.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax

Cache = dict[str, Any]
Aux = dict[str, jax.Array]


class MixerOutput(NamedTuple):
  """What a token mixer returns."""
  y: jax.Array            # [B, T, D]
  cache: Cache | None     # the updated cache when one was passed, else None
  aux: Aux                # scalar losses ("*_loss", already weighted) and metrics


class ParamCounts(NamedTuple):
  """Parameter counts: all of them, and those one token computes with (the top-k of each
  MoE layer's routed experts)."""
  total: int
  active: int


def check_mixer_call(x: jax.Array, d_model: int, segment_ids: jax.Array | None,
                     cache: Cache | None) -> None:
  """The argument checks every token mixer's call shares (x [B, T, D]; no segment ids
  with a cache)."""
  if x.ndim != 3 or x.shape[-1] != d_model:
    raise ValueError(f"x: got shape {tuple(x.shape)}; expected [B, T, D] with "
                     f"D = d_model={d_model}")
  if cache is not None and segment_ids is not None:
    raise ValueError("segment_ids: got an array with a cache; expected None (a cache holds "
                     "one sequence per batch row)")
