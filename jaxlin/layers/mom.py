"""Mixture-of-Memories (MoM, arXiv 2502.13685) over any linear-attention variant as its core.

Router (float32, `jaxlin.layers.routing` "topk_softmax"), for token x_t with M
routed memories and top_k = k:

    p_t = softmax(x_t W_r)                      [M]
    (w_t, m_t) = top_k(p_t),  w_t <- w_t / sum(w_t)      (renormalised over the k)

The core is a variant row of `jaxlin.layers.linear_attention.VARIANTS` (the paper's
cores are GLA and Gated DeltaNet, `CORES`; any row runs): its family's op, its gate
(`gates.GATES[row.gate]`, one module per memory), feature map and the other stages
(`OpStages`). Memory m has its own key / value / gate (and beta) projections; the
query projection is shared. Memory m keeps its own state S^m, updated only by the
tokens routed to it (a memory's tokens form its own stream, in time order):

    gated: S^m <- Diag(exp(g^m_t)) S^m + k^m_t v^m_t^T
    delta: S^m <- exp(g^m_t) (I - beta^m_t k^m_t k^m_t^T) S^m + beta^m_t k^m_t v^m_t^T
    o_t  = sum_{j<k} w_tj scale S^{m_tj}_t^T q^{m_tj}_t  +  o^shared_t

The optional shared memory (slot M, weight 1) sees every token. Then, as in the
core's layer: y = W_o OutputNorm(o, x W_z) (per head RMSNorm(o) * silu(z); Mamba2:
per head RMSNorm(o * silu(z)); RMSNorm or nothing when the row has no output gate).
The short causal conv (SiLU) on q, k, v runs inside each memory's stream (its taps
are the previous tokens routed to the same memory, as in fla's MoM), and so does a
convolved gate's own conv (HGRN2's logits, no activation); without it, a core whose row
has a conv applies SiLU to q, k, v instead (fla's GDN). Then the feature maps, the row's L2 normalisation of q and k, RoPE at
the tokens' positions, and the row's op inputs.

Efficient exact form (no cache): the T*k' routed copies of every token
(k' = k + 1 with the shared memory) are sorted per batch row by (memory,
position) (stable argsort), and ONE op call runs over the length T*k'
sequence whose segment ids change at every memory boundary (and at every
document boundary of the caller's segment_ids); the outputs are unsorted and
combined. Packed-document support in the op makes this exact and dropless.

With a cache (each memory has its own state [B, M', H, K, V], which the single
sorted call cannot take): the routed copies are scattered into a masked
[B*M', T] layout (a token not routed to a memory has k = 0, v = 0, g = 0 there,
so it leaves that state untouched) and ONE op call runs with the M' initial
states (T > 1), or the `*_step` op on all M' memories (T = 1). Exact, M'/k'
times the op work of the sorted form; used only for prefill / decode. The conv
states of every stream are prepended to their streams in the sorted layout.

Aux: mom_load_balance_loss = aux_loss_coef * M * sum_m f_m P_m, over the B*T
tokens of the call, f_m = #(assignments to m) / (B T k), P_m = mean_t p_tm.

Cost note: the per-memory k / v / gate projections are computed for every token
and memory ([B, T, M', .]) and then gathered per copy, M'/k' times the minimum.
RWKV6's token shift and RoPE positions follow the tokens' time order, not the streams.

Legend: B batch, T time, D model width, H heads, K key dim (K' after the feature map),
V value dim (per head; V' = V + 1 for a normalised core), M routed memories, M' = M (+1 shared) memory slots, k top_k,
k' = k (+1 shared) copies per token, N = T*k' copies per row, P = conv size - 1.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlin import validation
from jaxlin.layers import base, feature_maps, gates, routing
from jaxlin.layers.base import Aux, Cache, MixerOutput
from jaxlin.layers.conv import ShortConv
from jaxlin.layers.linear_attention import (VARIANTS, OpStages, OutputNorm,
                                            check_keys_feature_map, token_mixes)
from jaxlin.ops import arguments, documents

f32 = jnp.float32
CORES = ("gla", "gated_deltanet")   # the paper's cores (and fla's); any variant row runs


def _check_config(d_model: int, num_heads: int, num_memories: int, top_k: int,
                  head_dim: int | None, aux_loss_coef: float, conv_size: int,
                  chunk_size: int, impl: str, init_std: float) -> None:
  """Raises ValueError naming the argument, its value and what is allowed."""
  for name, value in (("d_model", d_model), ("num_heads", num_heads),
                      ("num_memories", num_memories), ("conv_size", conv_size)):
    validation.positive_int(name, value)
  validation.require(validation.is_int(top_k) and 1 <= top_k <= num_memories, "top_k", top_k,
                     f"an int in [1, num_memories={num_memories}]")
  if head_dim is None:
    validation.require(d_model % num_heads == 0, "num_heads", num_heads,
                       f"a divisor of d_model={d_model} (or pass head_dim)")
  validation.positive_int("head_dim", head_dim, optional=True)
  validation.non_negative("aux_loss_coef", aux_loss_coef)
  validation.non_negative("init_std", init_std)
  arguments.check_chunk_size(chunk_size)
  validation.choice("impl", impl, arguments.IMPLS)


class _Copies:
  """The routed copies of a [B, T] call, sorted per row by (memory, position).

  mem, tok, seg, order: [B, N]. order[b, p] is the flat copy index (t*k' + j)
  at sorted position p; seg = mem * (T + 1) + document index changes at every
  memory and document boundary.
  """

  def __init__(self, memories: jax.Array, segment_ids: jax.Array | None) -> None:
    batch, time, copies = memories.shape
    n = time * copies
    flat = memories.reshape(batch, n)
    tok = jnp.repeat(jnp.arange(time, dtype=jnp.int32), copies)
    self.order = jnp.argsort(flat * time + tok[None], axis=1, stable=True).astype(jnp.int32)
    self.mem = jnp.take_along_axis(flat, self.order, axis=1)
    self.tok = self.order // copies
    doc = (jnp.zeros((batch, time), jnp.int32) if segment_ids is None
           else documents.document_index(segment_ids))
    self.stride = time + 1
    self.seg = self.mem * self.stride + jnp.take_along_axis(doc, self.tok, axis=1)
    self.rows = jnp.arange(batch)[:, None]

  def gather(self, per_memory: jax.Array) -> jax.Array:
    """[B, T, M', ...] per token and memory -> [B, N, ...] per sorted copy."""
    return per_memory[self.rows, self.tok, self.mem]

  def unsort(self, sorted_values: jax.Array) -> jax.Array:
    """[B, N, ...] in sorted order -> [B, N, ...] in flat copy order (t*k' + j)."""
    inverse = jnp.argsort(self.order, axis=1)
    return sorted_values[self.rows, inverse]


def _stream_conv(conv: ShortConv, x: jax.Array, copies: _Copies, slots: int,
                 prefix: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The short conv inside every memory's stream of sorted copies.

  Each stream is preceded by its P conv-state rows (prefix [B, M', P, C]),
  scattered into one [B, N + M'P, C] sequence whose segment ids change at
  every stream (and document); one ShortConv call runs over it.
  Returns (y [B, N, C] for the copies, new state [B, M', P, C]: the last P rows
  of every stream, prefix rows included when the stream is shorter).
  """
  batch, n, channels = x.shape
  p = conv.kernel_size - 1
  counts = jnp.sum(jax.nn.one_hot(copies.mem, slots, dtype=jnp.int32), axis=1)   # [B, M']
  before = jnp.cumsum(counts, axis=1) - counts
  slot_ids = jnp.arange(slots, dtype=jnp.int32)
  real_pos = jnp.arange(n, dtype=jnp.int32)[None] + (copies.mem + 1) * p       # [B, N]
  prefix_pos = (before + slot_ids * p)[..., None] + jnp.arange(p, dtype=jnp.int32)  # [B, M', P]
  length = n + slots * p
  rows = jnp.zeros((batch, length, channels), x.dtype)
  rows = rows.at[copies.rows, real_pos].set(x)
  rows = rows.at[copies.rows[..., None], prefix_pos].set(prefix.astype(x.dtype))
  ids = jnp.zeros((batch, length), jnp.int32).at[copies.rows, real_pos].set(copies.seg)
  prefix_ids = jnp.broadcast_to((slot_ids * copies.stride)[None, :, None], prefix_pos.shape)
  ids = ids.at[copies.rows[..., None], prefix_pos].set(prefix_ids)   # stream m, document 0
  y = conv(rows, segment_ids=ids, sequence_axis=False)   # memory streams, not the sequence
  end = (before + counts + (slot_ids + 1) * p)[..., None]                        # [B, M', 1]
  state = rows[copies.rows[..., None], end - p + jnp.arange(p, dtype=jnp.int32)]
  return y[copies.rows, real_pos], state


class MixtureOfMemories(nnx.Module):
  """MoM token mixer over the core variant `core` (see the module docstring).

  y = W_o GatedRMSNorm(sum_j w_j o^{m_j} + o^shared, x W_z), o^m the core's output from
  memory m's own state. The projections start as the core layer's (LeCun normal);
  `init_std` is the router's. Cache: {"state": [B, M', H, K', V'] float32} plus {"conv_q",
  "conv_k", "conv_v" (and "conv_gate"): [B, M', P, C]} with the short conv, "shift" [B, D] for RWKV6's
  token shift, "position" [B] for RoPE.
  """

  def __init__(
      self,
      d_model: int,
      num_heads: int,
      *,
      core: str,
      num_memories: int = 4,
      top_k: int = 2,
      shared_memory: bool = True,
      aux_loss_coef: float = 0.01,
      head_dim: int | None = None,
      use_short_conv: bool = True,
      use_output_gate: bool | None = None,
      conv_size: int = 4,
      gate_low_rank: int = 16,
      gate_options: dict[str, Any] | None = None,
      norm_eps: float = 1e-5,
      chunk_size: int = 64,
      impl: str = "auto",
      init_std: float = 0.02,
      layer_index: int = 0,
      num_layers: int = 1,
      rope_theta: float = 10000.0,
      dtype: jnp.dtype = f32,
      param_dtype: jnp.dtype = f32,
      rngs: nnx.Rngs,
  ) -> None:
    _check_config(d_model, num_heads, num_memories, top_k, head_dim, aux_loss_coef,
                  conv_size, chunk_size, impl, init_std)
    row = VARIANTS[validation.choice("core", core, tuple(VARIANTS))]
    spec = gates.gate_spec(row.gate)
    self.d_model, self.num_heads, self.core, self.row = d_model, num_heads, core, row
    self.num_memories, self.top_k = num_memories, top_k
    self.shared_memory = bool(shared_memory)
    self.num_slots = num_memories + int(self.shared_memory)           # M'
    self.aux_loss_coef = float(aux_loss_coef)
    self.head_dim = d_model // num_heads if head_dim is None else head_dim
    self.key_dim = row.default_key_dim or self.head_dim
    check_keys_feature_map(spec, row.feature_map, self.key_dim)
    self.feature_dim = feature_maps.feature_dim(row.feature_map, self.key_dim)
    self.state_value_dim = self.head_dim + 1 if row.normalised else self.head_dim
    self.use_short_conv = bool(use_short_conv)
    self.stages = OpStages(row, rope_theta=rope_theta)
    self.chunk_size, self.impl = chunk_size, impl
    self.dtype, self.param_dtype = dtype, param_dtype
    hk, hv = num_heads * self.key_dim, num_heads * self.head_dim
    slots = self.num_slots
    # The projections start as the core layer's nnx.Linear kernels (LeCun normal over the
    # fan-in), one draw per memory, and the norm takes the core's eps: a one-memory MoM is
    # its core layer at init (in distribution). The router ~ N(0, init_std^2).
    lecun = lambda batch_axis: jax.nn.initializers.lecun_normal(batch_axis=batch_axis)
    param = lambda *shape: nnx.Param(lecun(())(rngs.params(), shape, param_dtype))
    per_slot = lambda *shape: nnx.Param(lecun(0)(rngs.params(), (slots, *shape), param_dtype))
    kw = {"rngs": rngs, "dtype": dtype, "param_dtype": param_dtype}
    self.router = nnx.Param(jax.nn.initializers.normal(init_std)(
        rngs.params(), (d_model, num_memories), param_dtype))
    self.shift_mix = (gates.RWKV6TokenShift(d_model, **kw) if row.token_shift else None)
    self.q_proj = param(d_model, hk)
    self.k_proj = None if spec.gives_keys else per_slot(d_model, hk)
    self.v_proj = per_slot(d_model, hv)
    context = gates.GateContext(d_model, num_heads, self.key_dim, layer_index, num_layers,
                                {"gate_low_rank": gate_low_rank, **dict(row.gate_options),
                                 **(gate_options or {})}, **kw)
    self.gates = nnx.List([spec.build(context) for _ in range(slots)])
    self.beta_proj = per_slot(d_model, num_heads) if row.recurrence.write_strength else None
    self.removal_logit = nnx.Param(jnp.ones((num_heads,), param_dtype)) if row.removal else None
    self.correction = (nnx.Param(jnp.ones((num_heads,), param_dtype))
                       if row.query_correction else None)
    self.bonus = (nnx.Param(0.5 + 0.1 * jax.random.normal(
        rngs.params(), (num_heads, self.key_dim), param_dtype)) if row.bonus else None)
    self.skip = nnx.Param(jnp.ones((num_heads,), param_dtype)) if row.skip else None
    self.q_map = feature_maps.FeatureMap(row.feature_map, self.key_dim, rngs=rngs,
                                         param_dtype=param_dtype)
    self.k_map = (None if self.k_proj is None else feature_maps.FeatureMap(
        row.feature_map, self.key_dim, rngs=rngs, param_dtype=param_dtype))
    conv = lambda channels: (ShortConv(channels, kernel_size=conv_size, activation="silu",
                                       use_bias=row.conv_bias, rngs=rngs,
                                       param_dtype=param_dtype)
                             if self.use_short_conv else None)
    self.q_conv, self.v_conv = conv(hk), conv(hv)
    self.k_conv = None if self.k_proj is None else conv(hk)
    self.gate_conv = (ShortConv(self.gates[0].logit_features, kernel_size=conv_size,
                                activation=None, rngs=rngs, param_dtype=param_dtype)
                      if spec.convolved and self.use_short_conv else None)
    gated = row.output_gate if use_output_gate is None else bool(use_output_gate)
    self.out_gate_proj = param(d_model, hv) if gated else None
    self.o_norm = (OutputNorm(row, gated=gated, num_heads=num_heads,
                              value_dim=self.head_dim, eps=norm_eps, param_dtype=param_dtype)
                   if gated or row.norm else None)
    self.o_proj = param(hv, d_model)

  # ------------------------------------------------------------------ pieces
  def router_logits(self, x: jax.Array) -> jax.Array:
    """x [B, T, D] -> l = x W_r [B, T, M], float32."""
    return jnp.einsum("btd,dm->btm", x.astype(f32), self.router[...].astype(f32))

  def memory_inputs(self, x: jax.Array, *, previous: jax.Array | None = None,
                    segment_ids: jax.Array | None = None) -> dict[str, jax.Array]:
    """Projections of every token for every memory slot (before conv / feature map).

    x [B, T, D] (previous [B, D]: RWKV6's token before x) -> q [B, T, H*K] (shared),
    v [B, T, M', H*V], k [B, T, M', H*K] (not when the gate gives the keys), the gate's
    g [B, T, M', H(, K)] float32 log gates, dt [B, T, M', H] and keys [B, T, M', H, K]
    where it gives them, beta [B, T, M', H] (delta family), and z [B, T, H*V], the output
    gate's input x W_z (from RWKV6's "g" mix), when the core has an output gate.
    """
    xc = x.astype(self.dtype)
    xs = token_mixes(self.shift_mix, xc, previous, segment_ids)
    w = lambda p: p[...].astype(self.dtype)
    per_slot = lambda a, p: jnp.einsum("btd,mde->btme", a, w(p))
    out = {"q": xs["r"] @ w(self.q_proj), "v": per_slot(xs["v"], self.v_proj)}
    if self.k_proj is not None:
      out["k"] = per_slot(xs["k"], self.k_proj)
    if self.gate_conv is not None:
      out["gate"] = jnp.stack([gate.project(xs["w"]) for gate in self.gates], axis=2)
    else:
      outs = [gate(xs["w"]) for gate in self.gates]
      for name in gates.GateOut._fields:
        if getattr(outs[0], name) is not None:
          out[name] = jnp.stack([getattr(o, name) for o in outs], axis=2)
    if self.beta_proj is not None:
      out["beta"] = jax.nn.sigmoid(per_slot(xc, self.beta_proj).astype(f32))
    if self.out_gate_proj is not None:
      out["z"] = xs["g"] @ w(self.out_gate_proj)
    return out

  def _convs(self) -> tuple[tuple[ShortConv, str, str], ...]:
    """(conv, cache name, input name) of every stream conv."""
    named = ((self.q_conv, "conv_q", "q"), (self.k_conv, "conv_k", "k"),
             (self.v_conv, "conv_v", "v"), (self.gate_conv, "conv_gate", "gate"))
    return tuple(c for c in named if c[0] is not None)

  def init_cache(self, batch_size: int, max_length: int) -> Cache:
    """Zero cache: every memory's state [B, M', H, K', V'] (and conv, shift, position)."""
    del max_length  # a memory's size does not grow with the sequence
    slots = self.num_slots
    cache: Cache = {"state": jnp.zeros((batch_size, slots, self.num_heads, self.feature_dim,
                                        self.state_value_dim), f32)}
    for conv, name, _ in self._convs():
      cache[name] = jnp.zeros((batch_size, slots, conv.kernel_size - 1, conv.channels),
                              self.dtype)
    if self.shift_mix is not None:
      cache["shift"] = jnp.zeros((batch_size, self.d_model), self.dtype)
    if self.row.rope:
      cache["position"] = jnp.zeros((batch_size,), jnp.int32)
    return cache

  # ----------------------------------------------------------------- forward
  def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None = None,
               cache: Cache | None = None) -> MixerOutput:
    """x [B, T, D] -> MixerOutput(y [B, T, D], cache, {"mom_load_balance_loss"})."""
    base.check_mixer_call(x, self.d_model, segment_ids, cache)
    batch, time, _ = x.shape
    arguments.check_segment_ids(segment_ids, batch, time)
    heads, slots, row = self.num_heads, self.num_slots, self.row

    routed = routing.route(self.router_logits(x), self.top_k, "topk_softmax")
    memories, weights = routed.experts, routed.weights
    aux: Aux = {"mom_load_balance_loss":
                self.aux_loss_coef * routing.load_balance_loss(routed, self.num_memories)}
    if self.shared_memory:
      memories = jnp.concatenate(
          [memories, jnp.full((batch, time, 1), self.num_memories, jnp.int32)], axis=-1)
      weights = jnp.concatenate([weights, jnp.ones((batch, time, 1), f32)], axis=-1)
    copies = _Copies(memories, segment_ids)
    proj = self.memory_inputs(x, previous=None if cache is None else cache.get("shift"),
                              segment_ids=segment_ids)
    new_cache: Cache | None = None if cache is None else {}
    if self.shift_mix is not None and new_cache is not None:
      new_cache["shift"] = x[:, -1].astype(self.dtype)
    streams = {"q": proj["q"][copies.rows, copies.tok], "v": copies.gather(proj["v"])}
    for stream in ("k", "gate"):
      if stream in proj:
        streams[stream] = copies.gather(proj[stream])
    if self.use_short_conv:
      for conv, name, stream in self._convs():
        value = streams[stream]
        prefix = (jnp.zeros((batch, slots, conv.kernel_size - 1, value.shape[-1]), value.dtype)
                  if cache is None else cache[name])
        streams[stream], state = _stream_conv(conv, value, copies, slots, prefix)
        if new_cache is not None:
          new_cache[name] = state.astype(cache[name].dtype)
    elif row.short_conv:   # the core's conv carries a SiLU; without the conv it stays
      streams = {n: jax.nn.silu(a) for n, a in streams.items()}
    split = lambda a: a.reshape(batch, a.shape[1], heads, -1)
    gate = (self.gates[0].activate(streams.pop("gate")) if self.gate_conv is not None else
            gates.GateOut(*(None if n not in proj else copies.gather(proj[n])
                            for n in gates.GateOut._fields)))
    q = self.q_map(split(streams["q"]))
    k = gate.keys if self.k_map is None else self.k_map(split(streams["k"]))
    v = split(streams["v"])
    positions = None
    if row.rope:
      start = jnp.zeros((batch,), jnp.int32) if cache is None else cache["position"]
      positions = start[:, None] + copies.tok
      if new_cache is not None:
        new_cache["position"] = start + time
    q, k, v_in, inputs = self.stages.inputs(
        q, k, v, gate, None if "beta" not in proj else copies.gather(proj["beta"]),
        positions=positions,
        removal_logit=None if self.removal_logit is None else self.removal_logit[...],
        correction=None if self.correction is None else self.correction[...])
    head_inputs = {} if self.bonus is None else {"bonus": self.bonus[...].astype(f32)}

    if cache is None:
      o_sorted, _ = self.stages.run(q, k, v_in, inputs, head_inputs, dtype=self.dtype,
                                    segment_ids=copies.seg, state=None, decode=False,
                                    chunk_size=self.chunk_size, impl=self.impl)
    else:
      o_sorted, new_cache["state"] = self._masked(q, k, v_in, inputs, head_inputs, copies,
                                                  time, cache["state"])
    o_sorted = self.stages.output(o_sorted, v, None if self.skip is None else self.skip[...])
    o = copies.unsort(o_sorted).reshape(batch, time, -1, heads, self.head_dim)
    o = jnp.einsum("btjhv,btj->bthv", o, weights)
    if self.o_norm is not None:
      o = self.o_norm(o, proj.get("z"))
    y = o.reshape(batch, time, -1).astype(self.dtype) @ self.o_proj[...].astype(self.dtype)
    return MixerOutput(y, new_cache, aux)

  def _masked(self, q: jax.Array, k: jax.Array, v: jax.Array, inputs: dict[str, jax.Array],
              head_inputs: dict[str, jax.Array], copies: _Copies, time: int,
              state: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Every memory over the whole call from its own state, unrouted tokens masked.

    Sorted copies [B, N, ...] are scattered to [B*M', T, ...] (zeros where a token is
    not routed: k = v = 0, g = 0, beta = removal = 0 leave the state as it is); one op
    call (T > 1) or the step op (T = 1). Returns (o per sorted copy [B, N, H, V'],
    new states [B, M', H, K', V']).
    """
    batch, slots = q.shape[0], self.num_slots
    rows, mem, tok = copies.rows, copies.mem, copies.tok

    def masked(a: jax.Array) -> jax.Array:
      out = jnp.zeros((batch, slots, time) + a.shape[2:], a.dtype).at[rows, mem, tok].set(a)
      return out.reshape((batch * slots, time) + a.shape[2:])

    o, new_state = self.stages.run(
        masked(q), masked(k), masked(v), {n: masked(a) for n, a in inputs.items()},
        head_inputs, dtype=self.dtype, segment_ids=None,
        state=state.reshape((batch * slots,) + state.shape[2:]), decode=time == 1,
        chunk_size=self.chunk_size, impl=self.impl)
    o = o.reshape((batch, slots, time) + o.shape[2:])
    return o[rows, mem, tok], new_state.reshape(state.shape)

