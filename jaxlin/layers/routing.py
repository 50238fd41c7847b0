"""Top-k routing of tokens to experts (MoE) or memories (MoM), and its auxiliary losses.

Float32 throughout, whatever the compute dtype, for logits l = x W_r over E choices:

    p = softmax(l)                    probabilities over all E
    "softmax_topk" (Qwen2-MoE, DeepSeek): (w, e) = top_k(p), NOT renormalised
    "topk_softmax" (Mixtral, MoM):    (v, e) = top_k(l), w = softmax(v) over the k
                                      (= top_k(p) renormalised to sum 1)

    load_balance_loss = E * sum_e f_e P_e      (Switch; 1 for a balanced router)
        f_e = #(assignments to e) / (N k),  P_e = mean over tokens of p_e
    router_z_loss     = mean over tokens of logsumexp(l)^2     (ST-MoE)

Legend: N tokens (any leading dims), E choices, k top_k.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

f32 = jnp.float32
SCORINGS = ("softmax_topk", "topk_softmax")


class Routing(NamedTuple):
  """The router's decision for the tokens (all float32 / int32)."""
  logits: jax.Array   # [..., E] router logits l
  probs: jax.Array    # [..., E] softmax(l) over all experts
  weights: jax.Array  # [..., k] combine weights w of the chosen experts
  experts: jax.Array  # [..., k] int32 chosen experts, best first


def route(logits: jax.Array, top_k: int, scoring: str) -> Routing:
  """Top-k routing from logits [..., E] (see the module docstring)."""
  logits = logits.astype(f32)
  probs = jax.nn.softmax(logits, axis=-1)
  if scoring == "softmax_topk":
    weights, experts = jax.lax.top_k(probs, top_k)
  elif scoring == "topk_softmax":
    top_logits, experts = jax.lax.top_k(logits, top_k)
    weights = jax.nn.softmax(top_logits, axis=-1)
  else:
    raise ValueError(f"scoring: got {scoring!r}; expected one of {SCORINGS}")
  return Routing(logits, probs, weights, experts.astype(jnp.int32))


def load_balance_loss(routing: Routing, num_experts: int) -> jax.Array:
  """Switch loss E * sum_e f_e P_e; f_e = share of the N*k assignments, P_e = mean p_e."""
  counts = jnp.bincount(routing.experts.reshape(-1), length=num_experts)
  fraction = counts.astype(f32) / routing.experts.size
  mean_probs = jnp.mean(routing.probs.reshape(-1, num_experts), axis=0)
  return num_experts * jnp.sum(fraction * mean_probs)


def router_z_loss(logits: jax.Array) -> jax.Array:
  """mean over tokens of logsumexp(l)^2 (ST-MoE router z-loss)."""
  return jnp.mean(jnp.square(jax.nn.logsumexp(logits.astype(f32), axis=-1)))
