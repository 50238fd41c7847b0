"""Mixture-of-Experts channel mixer with SwiGLU experts (docs/design.md §5).

Router (float32 throughout, whatever the compute dtype), for token x:

    l = x W_r                         logits [E]
    p = softmax(l)                    probabilities over all E experts
    "softmax_topk" (Qwen2-MoE, DeepSeek): (w, e) = top_k(p), NOT renormalised
    "topk_softmax" (Mixtral):         (v, e) = top_k(l), w = softmax(v) over the k

Output, with SwiGLU experts f_e and optional shared experts f_s:

    y = sum_{j<k} w_j f_{e_j}(x) + g(x) f_s(x)
    g(x) = sigmoid(x w_g) (shared_gate=True, Qwen2-MoE) or 1 (DeepSeek)

`num_shared_experts` = S shared experts of width `shared_hidden_dim` are one
SwiGLU of width S * shared_hidden_dim (the sum of S SwiGLUs is exactly a SwiGLU
over their concatenated hidden units).

Dispatch:
* "dropless": the N*k (token, expert) assignments are sorted by expert (stable,
  so token order within an expert), every expert runs on its contiguous group
  with `jax.lax.ragged_dot`, and the outputs are unsorted and combined.
* "capacity": each expert takes at most C = min(N, ceil(capacity_factor*N*k/E))
  assignments. PRIORITY RULE: first come, first served in token order, where
  the N tokens are the [B, T] tokens flattened row-major (batch row 0 first,
  then time); an expert keeps its first C assignments and drops the rest (a
  token never picks one expert twice, so the slot of a choice within a token
  does not matter). A dropped assignment contributes 0 (its weight is not
  redistributed); the shared experts still see every token.
  aux["moe_dropped_fraction"] = dropped assignments / (N*k).

Aux (see jaxlin.layers.base), over the N tokens of the call:

    moe_load_balance_loss = aux_loss_coef * E * sum_e f_e P_e
        f_e = #(assignments to e) / (N k)   (routed choices, before any drop;
              sum_e f_e = 1; Hugging Face's Mixtral/Qwen2 loss is k times this)
        P_e = mean over tokens of p_e (full softmax, for both scorings)
    moe_z_loss = z_loss_coef * mean(logsumexp(l)^2)       (only if z_loss_coef > 0)

Parameter counts for the paper sizes without allocating: `moe_param_counts`
(arithmetic; the tests check it against `nnx.eval_shape(lambda: MoE(...))`).

Legend: B batch, T time, N = B*T tokens, D model width, E routed experts,
k top_k, F expert hidden width, C expert capacity, A = N*k assignments.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlin import parallel, validation
from jaxlin.layers.base import Aux, ParamCounts
from jaxlin.layers.initializers import dense_initializer
from jaxlin.layers.mlp import SwiGLU, swiglu_param_count
from jaxlin.layers.routing import (SCORINGS, Routing, load_balance_loss, route,
                                  router_z_loss)

f32 = jnp.float32
DISPATCHES = ("dropless", "capacity")


# ----------------------------------------------------------------------------- helpers
def _check_config(d_model: int, num_experts: int, top_k: int, expert_hidden_dim: int,
                  scoring: str, num_shared_experts: int, shared_hidden_dim: int | None,
                  shared_gate: bool, aux_loss_coef: float, z_loss_coef: float,
                  dispatch: str, capacity_factor: float) -> None:
  """Raises ValueError naming the argument, its value and what is allowed."""
  for name, value in (("d_model", d_model), ("num_experts", num_experts),
                      ("expert_hidden_dim", expert_hidden_dim)):
    validation.positive_int(name, value)
  validation.require(validation.is_int(top_k) and 1 <= top_k <= num_experts, "top_k", top_k,
                     f"an int in [1, num_experts={num_experts}]")
  validation.choice("scoring", scoring, SCORINGS)
  validation.choice("dispatch", dispatch, DISPATCHES)
  if isinstance(capacity_factor, bool) or not isinstance(capacity_factor, (int, float)) \
      or not capacity_factor > 0 or not math.isfinite(capacity_factor):
    raise ValueError(f"capacity_factor: got {capacity_factor!r}; expected a finite "
                     "number > 0 (capacity C = ceil(capacity_factor * tokens * "
                     "top_k / num_experts))")
  validation.non_negative_int("num_shared_experts", num_shared_experts)
  validation.require(shared_hidden_dim is None or (validation.is_int(shared_hidden_dim)
                                                   and shared_hidden_dim >= 1),
                     "shared_hidden_dim", shared_hidden_dim,
                     "None (= expert_hidden_dim) or an int >= 1")
  if shared_gate and num_shared_experts == 0:
    raise ValueError("shared_gate: got True with num_shared_experts=0; a gate "
                     "needs shared experts (num_shared_experts >= 1)")
  validation.non_negative("aux_loss_coef", aux_loss_coef)
  validation.non_negative("z_loss_coef", z_loss_coef)


def moe_param_counts(d_model: int, *, num_experts: int, top_k: int,
                     expert_hidden_dim: int, num_shared_experts: int = 0,
                     shared_hidden_dim: int | None = None,
                     shared_gate: bool = False) -> ParamCounts:
  """Parameters of one MoE layer from its constructor arguments (no allocation).

      router  = D E
      experts = E * 3 D F
      shared  = 3 D (S F_s) + (D if shared_gate)
      total   = router + experts + shared
      active  = router + shared + k * 3 D F      (what one token computes with)

  E.g. Linear-MoE A0.3B-2B (D 1024, E 64, k 8, F 896) per layer:
  moe_param_counts(1024, num_experts=64, top_k=8, expert_hidden_dim=896).
  """
  fs = expert_hidden_dim if shared_hidden_dim is None else shared_hidden_dim
  router = d_model * num_experts
  expert = swiglu_param_count(d_model, expert_hidden_dim)
  shared = (swiglu_param_count(d_model, num_shared_experts * fs) if num_shared_experts
            else 0) + (d_model if shared_gate else 0)
  return ParamCounts(total=router + num_experts * expert + shared,
                     active=router + shared + top_k * expert)


def expert_capacity(num_tokens: int, num_experts: int, top_k: int,
                    capacity_factor: float) -> int:
  """C = min(N, ceil(capacity_factor * N * k / E)) (>= 1 for N >= 1).

  The product is rounded to 9 decimals before the ceil so that e.g. 1.1 * 10
  gives 11, not 12. No expert can take more than N assignments, hence the min.
  """
  raw = math.ceil(round(capacity_factor * num_tokens * top_k / num_experts, 9))
  return max(1, min(num_tokens, raw))


def _sort_by_expert(experts: jax.Array, num_experts: int
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Stable sort of the flat [A] assignments (token-major) by expert.

  Returns order [A] (sorted position -> assignment), group_sizes [E] int32 and
  rank [A] (each sorted assignment's position within its expert's group).
  """
  flat = experts.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
  starts = jnp.cumsum(group_sizes) - group_sizes
  rank = jnp.arange(flat.size, dtype=jnp.int32) - starts[flat[order]]
  return order, group_sizes, rank


def _experts_dropless(x: jax.Array, routing: Routing, w_gate: jax.Array,
                      w_up: jax.Array, w_down: jax.Array, dtype: jnp.dtype) -> jax.Array:
  """sum_j w_j f_{e_j}(x) for x [N, D] by grouped matmuls; float32 [N, D]."""
  n, k = routing.experts.shape
  order, group_sizes, _ = _sort_by_expert(routing.experts, w_gate.shape[0])
  xs = x.astype(dtype)[order // k]                                      # [A, D]

  def dot(a: jax.Array, w: jax.Array) -> jax.Array:   # [A, in] x [E, in, out] -> [A, out]
    return jax.lax.ragged_dot(a, w.astype(dtype), group_sizes, preferred_element_type=f32)

  h = (jax.nn.silu(dot(xs, w_gate)) * dot(xs, w_up)).astype(dtype)      # [A, F]
  out_sorted = dot(h, w_down)                                           # [A, D]
  inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.size, dtype=order.dtype))
  out = out_sorted[inverse].reshape(n, k, -1)                           # [N, k, D]
  return jnp.einsum("nkd,nk->nd", out, routing.weights)


def _experts_all_to_all(x: jax.Array, routing: Routing, w_gate: jax.Array, w_up: jax.Array,
                        w_down: jax.Array, dtype: jnp.dtype, axes: tuple[str, ...],
                        num_experts: int) -> jax.Array:
  """Expert-parallel dropless experts inside shard_map: this device holds experts
  [s E_l, (s + 1) E_l) of E (E_l = E / P over the P devices of `axes`) and tokens x [n, D].

  Each of the A = n k assignments is sent to the device of its expert with one all_to_all
  (buffers [P, A, D]: the worst case, every assignment to one device, so nothing drops), the
  received rows run through the local experts (grouped matmul; empty rows go to a zero
  expert), and a second all_to_all brings the outputs back. float32 [n, D]."""
  n, k = routing.experts.shape
  local = w_gate.shape[0]                                              # E_l experts here
  shards = num_experts // local
  a = n * k
  order, _, _ = _sort_by_expert(routing.experts, num_experts)       # by expert = by device
  expert_sorted = routing.experts.reshape(-1)[order]                   # [A]
  device = expert_sorted // local                                      # [A] destination
  counts = jnp.bincount(device, length=shards)
  row = jnp.arange(a) - (jnp.cumsum(counts) - counts)[device]          # position in its buffer
  send = jnp.zeros((shards, a, x.shape[-1]), dtype).at[device, row].set(
      x.astype(dtype)[order // k])
  send_expert = jnp.full((shards, a), local, jnp.int32).at[device, row].set(
      expert_sorted % local)                                           # local id; `local` = empty
  recv = jax.lax.all_to_all(send, axes, 0, 0)                          # [P, A, D] from each peer
  recv_expert = jax.lax.all_to_all(send_expert, axes, 0, 0).reshape(-1)
  zero = lambda w: jnp.concatenate([w, jnp.zeros((1, *w.shape[1:]), w.dtype)])
  h = _experts_dropless(recv.reshape(-1, x.shape[-1]),
                        Routing(None, None, jnp.ones((shards * a, 1), f32), recv_expert[:, None]),
                        zero(w_gate), zero(w_up), zero(w_down), dtype)  # [P A, D]
  back = jax.lax.all_to_all(h.reshape(shards, a, -1), axes, 0, 0)      # [P, A, D] to senders
  out_sorted = back[device, row]                                       # [A, D]
  out = jnp.zeros_like(out_sorted).at[order].set(out_sorted).reshape(n, k, -1)
  return jnp.einsum("nkd,nk->nd", out, routing.weights)


def _experts_capacity(x: jax.Array, routing: Routing, w_gate: jax.Array,
                      w_up: jax.Array, w_down: jax.Array, dtype: jnp.dtype,
                      capacity: int) -> tuple[jax.Array, jax.Array]:
  """Capacity-limited experts for x [N, D]; returns (float32 [N, D], the fraction of each
  token's k assignments kept [N]).

  Assignment (n, j) gets slot e*C + r, r = its rank among expert e's assignments
  in token order; r >= C is dropped and reads the zero row at slot E*C.
  """
  n, k = routing.experts.shape
  num_experts, d = w_gate.shape[0], x.shape[-1]
  order, _, rank_sorted = _sort_by_expert(routing.experts, num_experts)
  rank = jnp.zeros_like(rank_sorted).at[order].set(rank_sorted)        # [A]
  flat = routing.experts.reshape(-1)
  kept = rank < capacity
  dummy = num_experts * capacity
  slot = jnp.where(kept, flat * capacity + rank, dummy)                 # [A]
  token = jnp.arange(n * k, dtype=jnp.int32) // k
  # slot -> token (n = the zero row for empty slots); the dummy slot is discarded
  table = jnp.full((dummy + 1,), n, jnp.int32).at[slot].set(token)[:dummy]
  x_pad = jnp.concatenate([x.astype(dtype), jnp.zeros((1, d), dtype)])
  xe = x_pad[table].reshape(num_experts, capacity, d)                   # [E, C, D]

  def mm(eq: str, a: jax.Array, w: jax.Array) -> jax.Array:
    return jnp.einsum(eq, a, w.astype(dtype), preferred_element_type=f32)

  h = (jax.nn.silu(mm("ecd,edf->ecf", xe, w_gate))
       * mm("ecd,edf->ecf", xe, w_up)).astype(dtype)                    # [E, C, F]
  out = mm("ecf,efd->ecd", h, w_down).reshape(dummy, d)                 # [E*C, D]
  out = jnp.concatenate([out, jnp.zeros((1, d), f32)])[slot]            # [A, D]
  y = jnp.einsum("nkd,nk->nd", out.reshape(n, k, d), routing.weights)
  return y, jnp.mean(kept.astype(f32).reshape(n, k), axis=1)


# ------------------------------------------------------------------------------- module
class MoE(nnx.Module):
  """Top-k Mixture of SwiGLU experts with optional shared experts.

  y = sum_{j<k} w_j f_{e_j}(x) + g(x) f_shared(x) (module docstring for the
  router, dispatch and losses). Parameters: router [D, E]; expert weights
  stacked as w_gate, w_up [E, D, F] and w_down [E, F, D]; `shared` (a SwiGLU of
  width S * shared_hidden_dim, or None); shared_gate_weight [D, 1] or None. The
  router and the shared gate are initialised from N(0, init_std^2), the experts by
  `dense_init` (`jaxlin.layers.initializers`). Call: x [B, T, D] -> (y [B, T, D] in
  `dtype`, aux).
  """

  def __init__(
      self,
      d_model: int,
      *,
      num_experts: int,
      top_k: int,
      expert_hidden_dim: int,
      scoring: str = "softmax_topk",
      num_shared_experts: int = 0,
      shared_hidden_dim: int | None = None,
      shared_gate: bool = False,
      aux_loss_coef: float = 0.01,
      z_loss_coef: float = 0.0,
      dispatch: str = "dropless",
      capacity_factor: float = 1.25,
      dtype: jnp.dtype = f32,
      param_dtype: jnp.dtype = f32,
      rngs: nnx.Rngs,
      init_std: float = 0.02,
      dense_init: str = "normal",
  ) -> None:
    _check_config(d_model, num_experts, top_k, expert_hidden_dim, scoring,
                  num_shared_experts, shared_hidden_dim, shared_gate, aux_loss_coef,
                  z_loss_coef, dispatch, capacity_factor)
    self.d_model = d_model
    self.num_experts = num_experts
    self.top_k = top_k
    self.expert_hidden_dim = expert_hidden_dim
    self.scoring = scoring
    self.num_shared_experts = num_shared_experts
    self.shared_hidden_dim = (expert_hidden_dim if shared_hidden_dim is None
                              else shared_hidden_dim)
    self.aux_loss_coef = float(aux_loss_coef)
    self.z_loss_coef = float(z_loss_coef)
    self.dispatch = dispatch
    self.capacity_factor = float(capacity_factor)
    self.dtype = dtype
    init = jax.nn.initializers.normal(init_std)
    e, d, f = num_experts, d_model, expert_hidden_dim
    self.router = nnx.Param(init(rngs.params(), (d, e), param_dtype))
    expert_init = dense_initializer(dense_init, init_std, ndim=3)   # E is a batch axis
    self.w_gate = nnx.Param(expert_init(rngs.params(), (e, d, f), param_dtype))
    self.w_up = nnx.Param(expert_init(rngs.params(), (e, d, f), param_dtype))
    self.w_down = nnx.Param(expert_init(rngs.params(), (e, f, d), param_dtype))
    self.shared = (SwiGLU(d, num_shared_experts * self.shared_hidden_dim, dtype=dtype,
                          param_dtype=param_dtype, rngs=rngs, init_std=init_std,
                          dense_init=dense_init)
                   if num_shared_experts else None)
    self.shared_gate_weight = (nnx.Param(init(rngs.params(), (d, 1), param_dtype))
                               if shared_gate else None)

  def route(self, x: jax.Array) -> Routing:
    """Router decision for x [..., D] flattened to N tokens (float32 math)."""
    x = x.reshape(-1, self.d_model).astype(f32)
    logits = jnp.matmul(x, self.router[...].astype(f32), precision="highest")
    return route(logits, self.top_k, self.scoring)

  def capacity(self, num_tokens: int) -> int:
    """Expert capacity C for a call with `num_tokens` = B*T tokens."""
    return expert_capacity(num_tokens, self.num_experts, self.top_k, self.capacity_factor)

  def __call__(self, x: jax.Array) -> tuple[jax.Array, Aux]:
    """x [B, T, D] -> (y [B, T, D], aux); y = sum_j w_j f_{e_j}(x) + g(x) f_s(x)."""
    if x.ndim < 2 or x.shape[-1] != self.d_model:
      raise ValueError(f"x: got shape {tuple(x.shape)}; expected [B, T, D] with "
                       f"D = d_model = {self.d_model}")
    flat = x.reshape(-1, self.d_model)
    routing = self.route(flat)
    weights = (self.w_gate[...], self.w_up[...], self.w_down[...])
    aux: Aux = {}
    # each batch shard sorts its own tokens by expert (on a mesh: jaxlin.parallel); the
    # capacity path's C is then per shard, C = ceil(factor * (N / shards) * k / E)
    expert_axes = parallel.mesh_axes("expert")
    if self.dispatch == "dropless" and expert_axes:   # experts split over devices: all_to_all
      y = parallel.map_over_batch(
          lambda f, r, *w: _experts_all_to_all(f, r, *w, self.dtype, expert_axes,
                                               self.num_experts),
          (flat, routing), weights, whole_logical=("expert",) * 3)
    elif self.dispatch == "dropless":
      y = parallel.map_over_batch(
          lambda f, r, *w: _experts_dropless(f, r, *w, self.dtype), (flat, routing), weights)
    else:
      y, kept = parallel.map_over_batch(
          lambda f, r, *w: _experts_capacity(f, r, *w, self.dtype, self.capacity(f.shape[0])),
          (flat, routing), weights)
      aux["moe_dropped_fraction"] = 1.0 - jnp.mean(kept)
    if self.shared is not None:
      shared_y, _ = self.shared(flat)
      shared_y = shared_y.astype(f32)
      if self.shared_gate_weight is not None:
        gate_logit = jnp.matmul(flat.astype(f32), self.shared_gate_weight[...].astype(f32),
                                precision="highest")
        shared_y = jax.nn.sigmoid(gate_logit) * shared_y
      y = y + shared_y
    aux["moe_load_balance_loss"] = self.aux_loss_coef * load_balance_loss(
        routing, self.num_experts)
    if self.z_loss_coef > 0:
      aux["moe_z_loss"] = self.z_loss_coef * router_z_loss(routing.logits)
    return y.reshape(x.shape).astype(self.dtype), aux
