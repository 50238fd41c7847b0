"""Mixture-of-Memories (MoM, arXiv 2502.13685) over a GLA or Gated DeltaNet core.

Router (float32, `jaxlin.layers.routing` "topk_softmax"), for token x_t with M
routed memories and top_k = k:

    p_t = softmax(x_t W_r)                      [M]
    (w_t, m_t) = top_k(p_t),  w_t <- w_t / sum(w_t)      (renormalised over the k)

Memory m has its own key / value / gate (and beta) projections; the query
projection is shared. Memory m keeps its own state S^m, updated only by the
tokens routed to it (a memory's tokens form its own stream, in time order):

    GLA: S^m <- Diag(exp(g^m_t)) S^m + k^m_t v^m_t^T
    GDN: S^m <- exp(g^m_t) (I - beta^m_t k^m_t k^m_t^T) S^m + beta^m_t k^m_t v^m_t^T
    o_t  = sum_{j<k} w_tj scale S^{m_tj}_t^T q^{m_tj}_t  +  o^shared_t

The optional shared memory (slot M, weight 1) sees every token. Then, as in a
GLA / GDN layer: y = W_o GatedRMSNorm_per_head(o, x W_z). The short causal
conv (SiLU) on q, k, v runs inside each memory's stream (its taps are the
previous tokens routed to the same memory, as in fla's MoM); GDN L2-normalises
q and k after it. Gates: GLA logsigmoid(W2 W1 x + b)/16 per key dim, GDN
-exp(A_log) softplus(W x + dt_bias) per head (one gate module per memory).

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

Legend: B batch, T time, D model width, H heads, K key dim, V value dim (per
head), M routed memories, M' = M (+1 shared) memory slots, k top_k,
k' = k (+1 shared) copies per token, N = T*k' copies per row, P = conv size - 1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlin import ops
from jaxlin.layers.base import Aux, Cache, MixerOutput
from jaxlin.layers.conv import ShortConv
from jaxlin.layers.gates import LowRankLogSigmoidGate, Mamba2Decay
from jaxlin.layers import routing
from jaxlin.layers.norm import GatedRMSNorm, l2_normalise
from jaxlin.ops import arguments, documents

f32 = jnp.float32
CORES = ("gla", "gated_deltanet")


def cores() -> tuple[str, ...]:
  """The variants a MoM layer runs over."""
  return CORES


def _is_int(value: object) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _check_config(d_model: int, num_heads: int, core: str, num_memories: int, top_k: int,
                  head_dim: int | None, aux_loss_coef: float, conv_size: int,
                  chunk_size: int, impl: str, init_std: float) -> None:
  """Raises ValueError naming the argument, its value and what is allowed."""
  for name, value in (("d_model", d_model), ("num_heads", num_heads),
                      ("num_memories", num_memories), ("conv_size", conv_size)):
    if not _is_int(value) or value < 1:
      raise ValueError(f"{name}: got {value!r}; expected an int >= 1")
  if core not in CORES:
    raise ValueError(f"core: got {core!r}; expected one of {CORES}")
  if not _is_int(top_k) or not 1 <= top_k <= num_memories:
    raise ValueError(f"top_k: got {top_k!r}; expected an int in [1, num_memories="
                     f"{num_memories}]")
  if head_dim is None and d_model % num_heads:
    raise ValueError(f"num_heads: got {num_heads}, which does not divide d_model={d_model}; "
                     "pass head_dim explicitly or pick num_heads dividing d_model")
  if head_dim is not None and (not _is_int(head_dim) or head_dim < 1):
    raise ValueError(f"head_dim: got {head_dim!r}; expected None or an int >= 1")
  if not aux_loss_coef >= 0:
    raise ValueError(f"aux_loss_coef: got {aux_loss_coef!r}; expected a float >= 0")
  if not init_std >= 0:
    raise ValueError(f"init_std: got {init_std!r}; expected a float >= 0")
  arguments.check_chunk_size(chunk_size)
  if impl not in arguments.IMPLS:
    raise ValueError(f"impl: got {impl!r}; expected one of {arguments.IMPLS}")


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
  y = conv(rows, segment_ids=ids)
  end = (before + counts + (slot_ids + 1) * p)[..., None]                        # [B, M', 1]
  state = rows[copies.rows[..., None], end - p + jnp.arange(p, dtype=jnp.int32)]
  return y[copies.rows, real_pos], state


class MixtureOfMemories(nnx.Module):
  """MoM token mixer over a GLA or Gated DeltaNet core (see the module docstring).

  y = W_o GatedRMSNorm(sum_j w_j o^{m_j} + o^shared, x W_z), o^m the core's
  output from memory m's own state. Cache: {"state": [B, M', H, K, V] float32}
  plus {"conv_q", "conv_k", "conv_v": [B, M', P, C]} with the short conv.
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
      conv_size: int = 4,
      gate_low_rank: int = 16,
      norm_eps: float = 1e-6,
      chunk_size: int = 64,
      impl: str = "auto",
      init_std: float = 0.02,
      dtype: jnp.dtype = f32,
      param_dtype: jnp.dtype = f32,
      rngs: nnx.Rngs,
  ) -> None:
    _check_config(d_model, num_heads, core, num_memories, top_k, head_dim, aux_loss_coef,
                  conv_size, chunk_size, impl, init_std)
    self.d_model, self.num_heads, self.core = d_model, num_heads, core
    self.num_memories, self.top_k = num_memories, top_k
    self.shared_memory = bool(shared_memory)
    self.num_slots = num_memories + int(self.shared_memory)           # M'
    self.aux_loss_coef = float(aux_loss_coef)
    self.head_dim = d_model // num_heads if head_dim is None else head_dim
    self.use_short_conv = bool(use_short_conv)
    self.chunk_size, self.impl = chunk_size, impl
    self.dtype, self.param_dtype = dtype, param_dtype
    hk = num_heads * self.head_dim
    slots = self.num_slots
    init = jax.nn.initializers.normal(init_std)
    param = lambda *shape: nnx.Param(init(rngs.params(), shape, param_dtype))
    self.router = param(d_model, num_memories)
    self.q_proj = param(d_model, hk)
    self.k_proj = param(slots, d_model, hk)
    self.v_proj = param(slots, d_model, hk)
    if core == "gla":
      self.gates = nnx.List([LowRankLogSigmoidGate(
          d_model, num_heads, self.head_dim, low_rank=gate_low_rank, rngs=rngs, dtype=dtype,
          param_dtype=param_dtype) for _ in range(slots)])
      self.beta_proj = None
    else:
      self.gates = nnx.List([Mamba2Decay(d_model, num_heads, rngs=rngs, dtype=dtype,
                                         param_dtype=param_dtype) for _ in range(slots)])
      self.beta_proj = param(slots, d_model, num_heads)
    if self.use_short_conv:
      conv = lambda: ShortConv(hk, kernel_size=conv_size, activation="silu", rngs=rngs,
                               param_dtype=param_dtype)
      self.q_conv, self.k_conv, self.v_conv = conv(), conv(), conv()
    self.out_gate_proj = param(d_model, hk)
    self.o_norm = GatedRMSNorm(self.head_dim, eps=norm_eps, param_dtype=param_dtype)
    self.o_proj = param(hk, d_model)

  # ------------------------------------------------------------------ pieces
  def router_logits(self, x: jax.Array) -> jax.Array:
    """x [B, T, D] -> l = x W_r [B, T, M], float32."""
    return jnp.einsum("btd,dm->btm", x.astype(f32), self.router[...].astype(f32))

  def memory_inputs(self, x: jax.Array) -> dict[str, jax.Array]:
    """Projections of every token for every memory slot (before conv / norm).

    x [B, T, D] -> q [B, T, H*K] (shared), k, v [B, T, M', H*K], g [B, T, M', H, K]
    (GLA) or [B, T, M', H] (GDN) float32 log gates, beta [B, T, M', H] (GDN).
    """
    xc = x.astype(self.dtype)
    w = lambda p: p[...].astype(self.dtype)
    out = {"q": xc @ w(self.q_proj),
           "k": jnp.einsum("btd,mde->btme", xc, w(self.k_proj)),
           "v": jnp.einsum("btd,mde->btme", xc, w(self.v_proj)),
           "g": jnp.stack([gate(xc) for gate in self.gates], axis=2)}
    if self.beta_proj is not None:
      out["beta"] = jax.nn.sigmoid(
          jnp.einsum("btd,mdh->btmh", xc, w(self.beta_proj)).astype(f32))
    return out

  def init_cache(self, batch_size: int, max_length: int) -> Cache:
    """Zero cache: every memory's state [B, M', H, K, K] (and conv states)."""
    del max_length  # a memory's size does not grow with the sequence
    hk, slots = self.num_heads * self.head_dim, self.num_slots
    cache = {"state": jnp.zeros((batch_size, slots, self.num_heads, self.head_dim,
                                 self.head_dim), f32)}
    if self.use_short_conv:
      p = self.q_conv.kernel_size - 1
      for name in ("conv_q", "conv_k", "conv_v"):
        cache[name] = jnp.zeros((batch_size, slots, p, hk), self.dtype)
    return cache

  # ----------------------------------------------------------------- forward
  def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None = None,
               cache: Cache | None = None) -> MixerOutput:
    """x [B, T, D] -> MixerOutput(y [B, T, D], cache, {"mom_load_balance_loss"})."""
    if x.ndim != 3 or x.shape[-1] != self.d_model:
      raise ValueError(f"x: got shape {tuple(x.shape)}; expected [B, T, D] with "
                       f"D = d_model = {self.d_model}")
    if cache is not None and segment_ids is not None:
      raise ValueError("segment_ids: must be None when a cache is passed (a cache holds "
                       "one sequence per batch row)")
    batch, time, _ = x.shape
    arguments.check_segment_ids(segment_ids, batch, time)
    heads, hd, slots = self.num_heads, self.head_dim, self.num_slots

    routed = routing.route(self.router_logits(x), self.top_k, "topk_softmax")
    memories, weights = routed.experts, routed.weights
    aux: Aux = {"mom_load_balance_loss":
                self.aux_loss_coef * routing.load_balance_loss(routed, self.num_memories)}
    if self.shared_memory:
      memories = jnp.concatenate(
          [memories, jnp.full((batch, time, 1), self.num_memories, jnp.int32)], axis=-1)
      weights = jnp.concatenate([weights, jnp.ones((batch, time, 1), f32)], axis=-1)
    copies = _Copies(memories, segment_ids)
    proj = self.memory_inputs(x)
    q = proj["q"][copies.rows, copies.tok]                                   # [B, N, H*K]
    k, v, g = (copies.gather(proj[n]) for n in ("k", "v", "g"))
    beta = copies.gather(proj["beta"]) if "beta" in proj else None

    new_cache: Cache | None = None if cache is None else {}
    if self.use_short_conv:
      convs = ((self.q_conv, "conv_q", q), (self.k_conv, "conv_k", k), (self.v_conv, "conv_v", v))
      outs = []
      for conv, name, value in convs:
        prefix = (jnp.zeros((batch, slots, conv.kernel_size - 1, value.shape[-1]), value.dtype)
                  if cache is None else cache[name])
        y, state = _stream_conv(conv, value, copies, slots, prefix)
        outs.append(y)
        if new_cache is not None:
          new_cache[name] = state.astype(cache[name].dtype)
      q, k, v = outs
    elif self.core == "gated_deltanet":
      q, k, v = jax.nn.silu(q), jax.nn.silu(k), jax.nn.silu(v)
    split = lambda a: a.reshape(batch, -1, heads, hd)
    q, k, v = split(q), split(k), split(v)
    if self.core == "gated_deltanet":
      q, k = l2_normalise(q).astype(v.dtype), l2_normalise(k).astype(v.dtype)

    if cache is None:
      o_sorted = self._core(q, k, v, g, beta, segment_ids=copies.seg)[0]
    else:
      o_sorted, new_cache["state"] = self._core_masked(q, k, v, g, beta, copies, time,
                                                       cache["state"])
    o = copies.unsort(o_sorted.astype(f32)).reshape(batch, time, -1, heads, hd)
    o = jnp.einsum("btjhv,btj->bthv", o, weights)
    gate = (x.astype(self.dtype) @ self.out_gate_proj[...].astype(self.dtype))
    o = self.o_norm(o, gate.reshape(batch, time, heads, hd)).reshape(batch, time, heads * hd)
    y = o.astype(self.dtype) @ self.o_proj[...].astype(self.dtype)
    return MixerOutput(y, new_cache, aux)

  def _core(self, q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array,
            beta: jax.Array | None, *, segment_ids: jax.Array | None = None,
            initial_state: jax.Array | None = None,
            output_final_state: bool = False) -> tuple[jax.Array, jax.Array | None]:
    """One call of the core op on [B, L, H, *] inputs."""
    common = dict(initial_state=initial_state, segment_ids=segment_ids,
                  output_final_state=output_final_state, chunk_size=self.chunk_size,
                  impl=self.impl)
    if self.core == "gla":
      return ops.gated_linear_attention(q, k, v, g, **common)
    return ops.delta_rule(q, k, v, beta, g, **common)

  def _core_masked(self, q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array,
                   beta: jax.Array | None, copies: _Copies, time: int,
                   state: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Every memory over the whole call from its own state, unrouted tokens masked.

    Sorted copies [B, N, ...] are scattered to [B*M', T, ...] (zeros where a
    token is not routed: k = v = 0, g = 0, beta = 0 leave the state as it is);
    one op call (T > 1) or the step op (T = 1). Returns (o per sorted copy
    [B, N, H, V], new states [B, M', H, K, V]).
    """
    batch, slots = q.shape[0], self.num_slots
    rows, mem, tok = copies.rows, copies.mem, copies.tok

    def masked(a: jax.Array) -> jax.Array:
      out = jnp.zeros((batch, slots, time) + a.shape[2:], a.dtype).at[rows, mem, tok].set(a)
      out = out.reshape((batch * slots, time) + a.shape[2:])
      return out[:, 0] if time == 1 else out

    qm, km, vm, gm = masked(q), masked(k), masked(v), masked(g)
    bm = None if beta is None else masked(beta)
    s0 = state.reshape((batch * slots,) + state.shape[2:])
    if time == 1:
      if self.core == "gla":
        o, s1 = ops.gated_linear_attention_step(qm, km, vm, gm, state=s0)
      else:
        o, s1 = ops.delta_rule_step(qm, km, vm, bm, gm, state=s0)
      o = o[:, None]
    else:
      o, s1 = self._core(qm, km, vm, gm, bm, initial_state=s0, output_final_state=True)
    o = o.reshape((batch, slots, time) + o.shape[2:])
    return o[rows, mem, tok], s1.reshape(state.shape)
