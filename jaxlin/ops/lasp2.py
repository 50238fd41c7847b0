"""LASP-2: a recurrence of any family with its sequence split over the mesh's `sequence` axis.

Shard r (of P) holds the contiguous span r of every row. Each family's recurrence is linear in
the state, so a span maps the state entering it to the state leaving it (`jaxlin.ops.span`):

    S_end = M_r S_start + N_r       M_r: I, exp(sum g) (scalar or over K), or a K x K product
                                    (delta family); N_r: the span's final state from zero

Inside `jax.shard_map`, per shard:

  1. (M_r, N_r) = family.span_summary(k, v, inputs, the span's segment ids);
  2. ONE all_gather over `sequence` of (M_r, N_r), packed into one float32 buffer whose size
     does not depend on T (with packed documents, a second small one of each span's first and
     last segment id);
  3. S_in^r = fold of the earlier spans over the initial state S_0 (float32):
         S^0 = S_0,  S^{j+1} = M_j S^j + N_j   (M_j = 0 where span j's first token starts a
         document: the state before it is dropped), S_in^r = S^r, and S^P the final state;
  4. the family's op over the span from S_in^r (any impl: the Pallas kernels run per shard).

The backward is JAX's transpose of the same program (the all_gather's is a reduce-scatter).
Outside an active mesh with a `sequence` axis of size > 1, `sequence_op` is the family's op.

LASP-2H (`sequence_attention`): a softmax layer all-gathers K and V (GQA: the Hkv heads; one
packed all-gather) and the document ids over `sequence` and attends from its span's queries at their global
positions (causal, sliding window, documents). The short causal conv (`sequence_conv`) takes
the (kernel - 1)-token halo of the previous span with one ppermute; a tap reaching into
another document contributes 0 there as on one device.

Legend: B batch, T time (T_r = T / P per shard), H heads, K key dim, V value dim, P shards.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from jaxlin import validation
from jaxlin.ops import arguments
from jaxlin.ops.attention import dot_product_attention
from jaxlin.ops.families import Family
from jaxlin.ops.span import SpanSummary
from jaxlin.parallel import sharding

f32 = jnp.float32


def _pack(summary: SpanSummary) -> jax.Array:
  """(M, N) -> one float32 buffer [B, H, m + K*V] (m = K or K*K)."""
  batch, heads = summary.state.shape[:2]
  return jnp.concatenate([summary.transition.reshape(batch, heads, -1),
                          summary.state.reshape(batch, heads, -1)], axis=-1).astype(f32)


def _unpack(packed: jax.Array, like: SpanSummary) -> SpanSummary:
  """The inverse of `_pack` for one gathered span."""
  m = math.prod(like.transition.shape[2:])
  return SpanSummary(packed[..., :m].reshape(like.transition.shape),
                     packed[..., m:].reshape(like.state.shape))


def _starts_at_span(segment_ids: jax.Array | None, axis: tuple[str, ...], shards: int,
                    batch: int) -> jax.Array:
  """[P, B] float32: 1 where span j's first token starts a document (its segment id differs
  from the last one of span j - 1); span 0 continues the initial state."""
  if segment_ids is None:
    return jnp.zeros((shards, batch), f32)
  ends = jax.lax.all_gather(jnp.stack([segment_ids[:, 0], segment_ids[:, -1]]), axis,
                            tiled=False)                       # [P, 2, B]
  first, last = ends[:, 0], ends[:, 1]
  starts = (first[1:] != last[:-1]).astype(f32)
  return jnp.concatenate([jnp.zeros((1, batch), f32), starts], axis=0)


def _drop_before(summary: SpanSummary, restart: jax.Array) -> SpanSummary:
  """The span's map with M = 0 for the rows where restart [B] is 1 (a document starts at the
  span's first token: the state entering it is dropped)."""
  keep = (1.0 - restart).reshape(restart.shape + (1,) * (summary.transition.ndim - 1))
  return SpanSummary(summary.transition * keep, summary.state)


def fold_states(summary: SpanSummary, initial_state: jax.Array | None, axis: tuple[str, ...],
                segment_ids: jax.Array | None) -> tuple[jax.Array, jax.Array]:
  """(S_in of this shard, the final state after every span), both [B, H, K, V] float32, from
  this shard's summary and the others' (module docstring, steps 2-3). Inside shard_map."""
  batch = summary.state.shape[0]
  gathered = jax.lax.all_gather(_pack(summary), axis, tiled=False)      # [P, B, H, m + K V]
  shards = gathered.shape[0]
  starts = _starts_at_span(segment_ids, axis, shards, batch)            # [P, B]
  state = arguments.state_or_zeros(initial_state, summary.state.shape)
  incoming = []
  for j in range(shards):
    incoming.append(state)
    state = _drop_before(_unpack(gathered[j], summary), starts[j]).apply(state)
  here = jax.lax.axis_index(axis)
  restart = starts[here].reshape(batch, 1, 1, 1)
  return jnp.stack(incoming)[here] * (1.0 - restart), state


def _compose(later: SpanSummary, earlier: SpanSummary) -> SpanSummary:
  """The affine map of span `earlier` then span `later`: (M_l M_e, M_l N_e + N_l)."""
  if later.transition.ndim == later.state.ndim - 1:
    transition = later.transition * earlier.transition
  else:
    transition = jnp.einsum("bhkl,bhlm->bhkm", later.transition, earlier.transition)
  return SpanSummary(transition, later.apply(earlier.state))


def scan_states(summary: SpanSummary, initial_state: jax.Array | None, axis: tuple[str, ...],
                segment_ids: jax.Array | None) -> tuple[jax.Array, jax.Array]:
  """`fold_states` by a log-depth prefix scan of ppermutes (collective "ppermute_scan"):
  round d = 1, 2, 4, .. composes each span's map with the one d spans before (Hillis-Steele),
  so a shard holds one (M, N) at a time: memory constant in the shard count, log2(P) + 1
  ppermutes and one all-reduce (the final state) instead of one all-gather of P pairs."""
  batch = summary.state.shape[0]
  shards = math.prod(sharding.active_mesh().shape[a] for a in axis)
  here = jax.lax.axis_index(axis)
  shift = lambda a, d: jax.lax.ppermute(a, axis, perm=[(i, i + d) for i in range(shards - d)])
  if segment_ids is None:
    restart = jnp.zeros((batch,), f32)
  else:   # this span's first token starts a document: the state before it is dropped
    before = shift(segment_ids[:, -1], 1)
    restart = ((segment_ids[:, 0] != before) & (here > 0)).astype(f32)
  total = _drop_before(summary, restart)
  d = 1
  while d < shards:
    earlier = _unpack(shift(_pack(total), d), total)
    total = jax.tree.map(lambda new, old: jnp.where(here >= d, new, old),
                         _compose(total, earlier), total)
    d *= 2
  start = arguments.state_or_zeros(initial_state, summary.state.shape)
  end = total.apply(start)                        # the state after this span
  incoming = jnp.where(here == 0, start, shift(end, 1)) * (1.0 - restart)[:, None, None, None]
  final = jax.lax.psum(jnp.where(here == shards - 1, end, 0.0), axis)
  return incoming, final


COLLECTIVES = {"all_gather": fold_states, "ppermute_scan": scan_states}


def check_collective(name: str) -> str:
  """`name` if it is a key of COLLECTIVES, else a ValueError naming mesh.sequence_collective."""
  return validation.choice("mesh.sequence_collective", name, tuple(COLLECTIVES))


def lasp2_span(family: Family, q: jax.Array, k: jax.Array, v: jax.Array,
               inputs: dict[str, jax.Array], head_inputs: dict[str, jax.Array], *,
               axis: tuple[str, ...], scale: float | None, segment_ids: jax.Array | None,
               initial_state: jax.Array | None, chunk_size: int, impl: str,
               collective: str = "all_gather", kernel: Any = None
               ) -> tuple[jax.Array, jax.Array]:
  """One shard's part of `sequence_op` (inside shard_map over `axis`): (o [B, T_r, H, V],
  the final state of the whole sequence [B, H, K, V] float32)."""
  summary = family.span_summary(k, v, **inputs, **head_inputs, segment_ids=segment_ids,
                                chunk_size=chunk_size, impl=impl, kernel=kernel)
  incoming, final = COLLECTIVES[collective](summary, initial_state, axis, segment_ids)
  o, _ = family.op(q, k, v, **inputs, **head_inputs, scale=scale, segment_ids=segment_ids,
                   chunk_size=chunk_size, impl=impl, kernel=kernel, initial_state=incoming,
                   output_final_state=True)
  return o, final


def sequence_op(family: Family, q: jax.Array, k: jax.Array, v: jax.Array,
                inputs: dict[str, jax.Array], head_inputs: dict[str, jax.Array], *,
                scale: float | None, segment_ids: jax.Array | None,
                initial_state: jax.Array | None, output_final_state: bool, chunk_size: int,
                impl: str, kernel: Any = None) -> tuple[jax.Array, jax.Array | None]:
  """family.op(q, k, v, **inputs, **head_inputs, ...) with T split over the active mesh's
  sequence axes (`sharding.activations_on`), LASP-2; the op itself without such an axis.

  q, k [B, T, H, K], v [B, T, H, V], per-token inputs [B, T, H(, K)], head inputs [H, ...],
  segment_ids [B, T], initial_state [B, H, K, V]; kernel: the op's `KernelOptions` (each span's
  op call takes them). Returns (o [B, T, H, V], final state or None).
  """
  op_kwargs = dict(scale=scale, chunk_size=chunk_size, impl=impl)
  batch, time, heads = k.shape[:3]
  axis, _ = _sequence_axes(time)
  if not axis:
    return family.op(q, k, v, **inputs, **head_inputs, segment_ids=segment_ids,
                     initial_state=initial_state, output_final_state=output_final_state,
                     kernel=kernel, **op_kwargs)
  mesh = sharding.active_mesh()
  if segment_ids is not None:
    arguments.check_segment_ids(segment_ids, batch, time)
  rows = sharding.mesh_axes("batch", batch) or None
  split_heads = sharding.mesh_axes("heads", heads) or None
  tokens = PartitionSpec(rows, axis, split_heads)
  per_row = PartitionSpec(rows, split_heads)
  spec = lambda a: tokens if a.ndim >= 3 else PartitionSpec(rows, axis)

  collective = check_collective(sharding.active_option("sequence_collective", "all_gather"))

  def body(q, k, v, inputs, head_inputs, segment_ids, initial_state):
    return lasp2_span(family, q, k, v, inputs, head_inputs, axis=axis,
                      segment_ids=segment_ids, initial_state=initial_state,
                      collective=collective, kernel=kernel, **op_kwargs)

  in_specs = (tokens, tokens, tokens, {n: spec(a) for n, a in inputs.items()},
              {n: PartitionSpec(split_heads) for n in head_inputs},
              PartitionSpec(rows, axis), per_row)
  o, final = jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=(tokens, per_row),
                           check_vma=False)(q, k, v, inputs, head_inputs, segment_ids,
                                            initial_state)
  return o, (final if output_final_state else None)


def _sequence_axes(time: int) -> tuple[tuple[str, ...], int]:
  """(the active mesh's sequence axes, their shard count); ((), 1) without; T must divide."""
  axis = sharding.mesh_axes("length")
  if not axis:
    return (), 1
  mesh = sharding.active_mesh()
  shards = math.prod(mesh.shape[a] for a in axis)
  validation.require(time % shards == 0, "sequence length", time,
                     f"a multiple of the sequence shards {shards} ("
                     + " x ".join(f"mesh.{a}={mesh.shape[a]}" for a in axis) + ")")
  return axis, shards


def sequence_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, window: int | None,
                       document_ids: jax.Array | None, impl: str) -> jax.Array:
  """Causal softmax attention (`dot_product_attention`, positions 0..T-1, an optional sliding
  window, `document_ids` [B, T] equal within a document) with T split over the active mesh's
  sequence axes: LASP-2H (module docstring). q [B, T, H, D]; k, v [B, T, Hkv, D]."""
  batch, time = q.shape[:2]
  axis, shards = _sequence_axes(time)
  if not axis:
    return dot_product_attention(q, k, v, causal=True, window=window,
                                 segment_ids_q=document_ids, impl=impl)
  span = time // shards
  rows = sharding.mesh_axes("batch", batch) or None
  split_heads = sharding.mesh_axes("heads", k.shape[2]) or None   # divides Hkv, so H too
  tokens = PartitionSpec(rows, axis, split_heads)

  def body(q, k, v, ids):
    gather = lambda a: jax.lax.all_gather(a, axis, axis=1, tiled=True)
    here = jax.lax.axis_index(axis)
    q_positions = here * span + jnp.arange(span, dtype=jnp.int32)
    kv = gather(jnp.concatenate([k, v.astype(k.dtype)], axis=-1))   # one collective for both
    keys, values = kv[..., :k.shape[-1]], kv[..., k.shape[-1]:].astype(v.dtype)
    return dot_product_attention(
        q, keys, values, causal=True, window=window,
        segment_ids_q=ids, segment_ids_kv=None if ids is None else gather(ids),
        q_positions=q_positions, kv_positions=jnp.arange(time, dtype=jnp.int32), impl=impl)

  return jax.shard_map(body, mesh=sharding.active_mesh(),
                       in_specs=(tokens, tokens, tokens, PartitionSpec(rows, axis)),
                       out_specs=tokens, check_vma=False)(q, k, v, document_ids)


def sequence_conv(taps: Any, x: jax.Array, document_ids: jax.Array | None,
                  kernel_size: int) -> jax.Array:
  """`taps(padded [B, P' + T, C], padded_ids, ids) -> y [B, T, C]` (a causal conv over inputs
  preceded by P' = kernel_size - 1 earlier ones; the ids None without documents) with T split
  over the active mesh's sequence axes: each span's P' earlier inputs (and their document ids)
  come from the previous span by one ppermute; the first span's are zeros (document 0, the
  first token's), as on one device. x [B, T, C]; document_ids [B, T] (global) or None."""
  batch, time = x.shape[:2]
  axis, shards = _sequence_axes(time)
  halo = kernel_size - 1
  if not axis or halo == 0:
    pad = lambda a: jnp.concatenate([jnp.zeros((batch, halo) + a.shape[2:], a.dtype), a], 1)
    return taps(pad(x), None if document_ids is None else pad(document_ids), document_ids)
  validation.require(time // shards >= halo, "sequence length per shard", time // shards,
                     f">= kernel_size - 1 = {halo} (the conv's halo comes from one neighbour)")
  rows = PartitionSpec(sharding.mesh_axes("batch", batch) or None, axis)
  forward = [(i, i + 1) for i in range(shards - 1)]
  before = lambda a: jax.lax.ppermute(a[:, -halo:], axis, perm=forward)   # span 0: zeros
  joined = lambda a: jnp.concatenate([before(a), a], axis=1)

  if document_ids is None:
    body = lambda x: taps(joined(x), None, None)
    return jax.shard_map(body, mesh=sharding.active_mesh(), in_specs=(rows,), out_specs=rows,
                         check_vma=False)(x)
  body = lambda x, ids: taps(joined(x), joined(ids), ids)
  return jax.shard_map(body, mesh=sharding.active_mesh(), in_specs=(rows, rows),
                       out_specs=rows, check_vma=False)(x, document_ids)
