"""Liger (arXiv 2503.01496): a pretrained softmax layer's weights run as a gated recurrence.

No new parameters: the layer holds exactly the projections of `SoftmaxAttention` (same names,
same shapes), so a Llama-family layer converts by changing its config. For x [B, T, d]:

    q = x W_q, k = x W_k, v = x W_v                  (+ biases; before RoPE) [B,T,H|Hkv,D]
    g = GATES[gate](k)                                the gate from the key projection, pooled
                                                      to its shape, repeated over the GQA groups
    phi(u) = softmax over D of u                      (the feature map of q and k; no RoPE)

    recurrence "gla"             S_t = Diag(exp g_t) S_{t-1} + phi(k_t) v_t^T
    recurrence "gated_deltanet"  S_t = exp(g_t) (I - b_t k'_t k'_t^T) S_{t-1} + b_t k'_t v_t^T,
                                 k' = l2norm(phi(k)), q' = l2norm(phi(q)), b_t = sigmoid(pool k)
    o_rec_t = S_t^T phi(q_t)                          (scale 1)

The paper converts into GLA (and its Table 1 gates); "gated_deltanet" is jaxlin's extension, not
in the paper: the same pretrained q/k/v feed a delta rule, with the write strength b_t and the
l2-normalised feature maps the delta rule needs to stay stable.

    Liger Attention (window w > 0):  o = a * SWA_w(rope(q), rope(k), v) + c * o_rec
                                     (a, c = window_weight, recurrent_weight; paper 0.5, 0.5, w 64)
    Liger-GLA        (window 0):     o = o_rec
    y = o W_o (+ b_o)

The gates (`GATES`, the paper's Table 1; pool = mean of k over each head's D channels when the
gate is one scalar per head, k itself when it has a key axis):

    gla      g = logsigmoid(k) / 16                   [.., Hkv, D]
    mamba2   g = -softplus(pool k)                    [.., Hkv]
    hgrn2    g = log(gamma + (1 - gamma) sigmoid(k))  [.., Hkv, D]   (gamma = 0 by default)
    rwkv6    g = -exp(k)                              [.., Hkv, D]

With window_weight 1, recurrent_weight 0 and w >= T the layer is its softmax layer exactly.

Cache: "state" [B, H, D, D] float32, and with a window the ring buffer of `SoftmaxAttention`
("keys", "values" [B, w, Hkv, D], "length"): memory per token is constant.

Legend: B batch, T time, d d_model, H query heads, Hkv key/value heads, D head dim.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxlin import validation
from jaxlin.layers.attention import SoftmaxAttention
from jaxlin.layers import base
from jaxlin.layers.base import Cache, MixerOutput
from jaxlin.layers.lora import LoRASpec
from jaxlin.layers.norm import l2_normalise
from jaxlin.ops import lasp2
from jaxlin.ops.families import FAMILIES

f32 = jnp.float32
GATE_NORMALIZER = 16.0  # GLA's logsigmoid(.) / 16


@dataclasses.dataclass(frozen=True)
class LigerGate:
  """One gate of Table 1: `log_decay(k [.., Hkv, D], gamma) -> g <= 0` ([.., Hkv] if scalar)."""
  log_decay: Callable[[jax.Array, float], jax.Array]
  scalar: bool   # one value per head (pooled over D), else one per key channel


def _hgrn2(k: jax.Array, gamma: float) -> jax.Array:
  return jnp.log(gamma + (1.0 - gamma) * jax.nn.sigmoid(k))


GATES: dict[str, LigerGate] = {
    "gla": LigerGate(lambda k, gamma: jax.nn.log_sigmoid(k) / GATE_NORMALIZER, scalar=False),
    "mamba2": LigerGate(lambda k, gamma: -jax.nn.softplus(jnp.mean(k, axis=-1)), scalar=True),
    "hgrn2": LigerGate(_hgrn2, scalar=False),
    "rwkv6": LigerGate(lambda k, gamma: -jnp.exp(k), scalar=False),
}


@dataclasses.dataclass(frozen=True)
class LigerRecurrence:
  """A recurrence Liger converts into: its family, default gate and whether it is a delta rule."""
  family: str
  default_gate: str
  delta: bool


RECURRENCES: dict[str, LigerRecurrence] = {
    "gla": LigerRecurrence("gated", "gla", delta=False),
    "gated_deltanet": LigerRecurrence("delta", "mamba2", delta=True),
}


def _repeat_groups(x: jax.Array, groups: int) -> jax.Array:
  """[B, T, Hkv, ...] -> [B, T, Hkv * groups, ...]: kv head j serves query heads j*groups.."""
  return x if groups == 1 else jnp.repeat(x, groups, axis=2)


class LigerAttention(SoftmaxAttention):
  """A softmax layer's projections run as Liger-GLA / Liger Attention (module docstring).

  Args beyond `SoftmaxAttention`'s (whose `window` this layer does not take):
    recurrence: a key of RECURRENCES ("gla", "gated_deltanet").
    gate: a key of GATES (None: the recurrence's own; gated_deltanet takes scalar gates).
    liger_window: the sliding window w of Liger Attention (0: no softmax branch, Liger-GLA).
    window_weight, recurrent_weight: a and c of o = a SWA + c o_rec.
    hgrn2_gamma: gamma of the hgrn2 gate, in [0, 1).
    chunk_size, recurrent_impl: of the recurrence's op (`jaxlin.ops`).
  """

  def __init__(self, d_model: int, num_heads: int, *, recurrence: str = "gla",
               gate: str | None = None, liger_window: int = 64, window_weight: float = 0.5,
               recurrent_weight: float = 0.5, hgrn2_gamma: float = 0.0, chunk_size: int = 64,
               recurrent_impl: str = "auto", lora: LoRASpec | None = None,
               **attention: Any) -> None:
    validation.require("window" not in attention, "window", attention.get("window"),
                       "not given: a Liger layer's window is liger_window")
    spec = RECURRENCES[validation.choice("liger_recurrence", recurrence, tuple(RECURRENCES))]
    gate = spec.default_gate if gate is None else gate
    validation.choice("liger_gate", gate, tuple(GATES))
    validation.require(not spec.delta or GATES[gate].scalar, "liger_gate", gate,
                       f"a scalar gate for {recurrence!r}: one of "
                       f"{[n for n, g in GATES.items() if g.scalar]}")
    validation.non_negative_int("liger_window", liger_window)
    for name, value in (("liger_window_weight", window_weight),
                        ("liger_recurrent_weight", recurrent_weight)):
      validation.non_negative(name, value)
    validation.require(0.0 <= hgrn2_gamma < 1.0, "hgrn2_gamma", hgrn2_gamma, "in [0, 1)")
    super().__init__(d_model, num_heads, window=liger_window or None, lora=lora, **attention)
    self.recurrence, self.gate_name, self.spec = recurrence, gate, spec
    self.liger_window = liger_window
    self.window_weight, self.recurrent_weight = float(window_weight), float(recurrent_weight)
    self.hgrn2_gamma = float(hgrn2_gamma)
    self.chunk_size, self.recurrent_impl = chunk_size, recurrent_impl

  def init_cache(self, batch_size: int, max_length: int) -> Cache:
    """{"state": [B, H, D, D] float32} plus, with a window, the ring buffer of w tokens."""
    cache = super().init_cache(batch_size, max_length) if self.liger_window else {}
    cache["state"] = jnp.zeros((batch_size, self.num_heads, self.head_dim, self.head_dim), f32)
    return cache

  def _check_call(self, x: jax.Array, segment_ids: jax.Array | None,
                  cache: Cache | None) -> None:
    base.check_mixer_call(x, self.d_model, segment_ids, cache)
    if cache is None:
      super()._check_call(x, segment_ids, None)
      return
    if self.liger_window:
      super()._check_call(x, None, cache)
    want = (x.shape[0], self.num_heads, self.head_dim, self.head_dim)
    state = cache.get("state")
    if state is None or tuple(state.shape) != want:
      raise ValueError(f"cache: got {jax.tree.map(jnp.shape, cache)}; expected the dict of "
                       f"init_cache({x.shape[0]}, max_length) with state [B, H, D, D] = {want}")

  def recurrent_inputs(self, q: jax.Array, k: jax.Array, v: jax.Array
                       ) -> tuple[jax.Array, jax.Array, jax.Array, dict[str, jax.Array]]:
    """Pre-RoPE q [B,T,H,D], k, v [B,T,Hkv,D] -> the recurrence's q, k, v [B,T,H,D] (float32)
    and token inputs (g, and beta for the delta rule), every kv head repeated to its group."""
    groups = self.num_heads // self.num_kv_heads
    k32 = k.astype(f32)
    g = GATES[self.gate_name].log_decay(k32, self.hgrn2_gamma)
    q_map = jax.nn.softmax(q.astype(f32), axis=-1)
    k_map = jax.nn.softmax(k32, axis=-1)
    inputs = {"g": _repeat_groups(g, groups)}
    if self.spec.delta:
      q_map, k_map = l2_normalise(q_map), l2_normalise(k_map)
      inputs["beta"] = _repeat_groups(jax.nn.sigmoid(jnp.mean(k32, axis=-1)), groups)
    return (q_map, _repeat_groups(k_map, groups), _repeat_groups(v.astype(f32), groups), inputs)

  def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None = None,
               cache: Cache | None = None) -> MixerOutput:
    """x [B,T,d] -> MixerOutput(y [B,T,d], updated cache or None, aux={})."""
    self._check_call(x, segment_ids, cache)
    B, T, _ = x.shape
    x = x.astype(self.dtype)
    q, k, v = self._project(x)
    family = FAMILIES[self.spec.family]
    rq, rk, rv, inputs = self.recurrent_inputs(q, k, v)
    rq, rk, rv = rq.astype(self.dtype), rk.astype(self.dtype), rv.astype(self.dtype)
    new_cache: Cache | None = None
    if cache is not None and T == 1:
      o_rec, state = family.step(rq[:, 0], rk[:, 0], rv[:, 0],
                                 **{n: a[:, 0] for n, a in inputs.items()},
                                 state=cache["state"], scale=1.0)
      o_rec = o_rec[:, None]
    else:
      o_rec, state = lasp2.sequence_op(   # LASP-2 when the mesh splits the sequence
          family, rq, rk, rv, inputs, {}, scale=1.0, segment_ids=segment_ids,
          chunk_size=self.chunk_size, impl=self.recurrent_impl,
          initial_state=None if cache is None else cache["state"],
          output_final_state=cache is not None)
    o = self.recurrent_weight * o_rec.astype(f32)
    if self.liger_window:
      window_cache = None if cache is None else {n: cache[n] for n in ("keys", "values", "length")}
      o_window, new_window_cache = self.attend(q, k, v, segment_ids=segment_ids,
                                               cache=window_cache)
      o = o + self.window_weight * o_window.astype(f32)
      new_cache = new_window_cache
    if cache is not None:
      new_cache = {**(new_cache or {}), "state": state}
    y = self.o_proj(o.astype(self.dtype).reshape(B, T, self.num_heads * self.head_dim))
    return MixerOutput(y, new_cache, {})

