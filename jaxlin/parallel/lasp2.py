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


def fold_states(summary: SpanSummary, initial_state: jax.Array | None, axis: tuple[str, ...],
                segment_ids: jax.Array | None) -> tuple[jax.Array, jax.Array]:
  """(S_in of this shard, the final state after every span), both [B, H, K, V] float32, from
  this shard's summary and the others' (module docstring, steps 2-3). Inside shard_map."""
  batch, heads, key_dim, value_dim = summary.state.shape
  gathered = jax.lax.all_gather(_pack(summary), axis, tiled=False)      # [P, B, H, m + K V]
  shards = gathered.shape[0]
  starts = _starts_at_span(segment_ids, axis, shards, batch)            # [P, B]
  state = (jnp.zeros((batch, heads, key_dim, value_dim), f32) if initial_state is None
           else initial_state.astype(f32))
  incoming = []
  for j in range(shards):
    incoming.append(state)
    span = _unpack(gathered[j], summary)
    keep = (1.0 - starts[j]).reshape((batch,) + (1,) * (span.transition.ndim - 1))
    state = SpanSummary(span.transition * keep, span.state).apply(state)
  here = jax.lax.axis_index(axis)
  restart = starts[here].reshape(batch, 1, 1, 1)
  return jnp.stack(incoming)[here] * (1.0 - restart), state


def lasp2_span(family: Family, q: jax.Array, k: jax.Array, v: jax.Array,
               inputs: dict[str, jax.Array], head_inputs: dict[str, jax.Array], *,
               axis: tuple[str, ...], scale: float | None, segment_ids: jax.Array | None,
               initial_state: jax.Array | None, chunk_size: int,
               impl: str) -> tuple[jax.Array, jax.Array]:
  """One shard's part of `sequence_op` (inside shard_map over `axis`): (o [B, T_r, H, V],
  the final state of the whole sequence [B, H, K, V] float32)."""
  summary = family.span_summary(k, v, **inputs, **head_inputs, segment_ids=segment_ids,
                                chunk_size=chunk_size, impl=impl)
  incoming, final = fold_states(summary, initial_state, axis, segment_ids)
  o, _ = family.op(q, k, v, **inputs, **head_inputs, scale=scale, segment_ids=segment_ids,
                   chunk_size=chunk_size, impl=impl, initial_state=incoming,
                   output_final_state=True)
  return o, final


def sequence_op(family: Family, q: jax.Array, k: jax.Array, v: jax.Array,
                inputs: dict[str, jax.Array], head_inputs: dict[str, jax.Array], *,
                scale: float | None, segment_ids: jax.Array | None,
                initial_state: jax.Array | None, output_final_state: bool, chunk_size: int,
                impl: str) -> tuple[jax.Array, jax.Array | None]:
  """family.op(q, k, v, **inputs, **head_inputs, ...) with T split over the active mesh's
  sequence axes (`sharding.activations_on`), LASP-2; the op itself without such an axis.

  q, k [B, T, H, K], v [B, T, H, V], per-token inputs [B, T, H(, K)], head inputs [H, ...],
  segment_ids [B, T], initial_state [B, H, K, V]. Returns (o [B, T, H, V], final state or None).
  """
  op_kwargs = dict(scale=scale, chunk_size=chunk_size, impl=impl)
  batch, time, heads = k.shape[:3]
  axis = sharding.mesh_axes("length")
  if not axis:
    return family.op(q, k, v, **inputs, **head_inputs, segment_ids=segment_ids,
                     initial_state=initial_state, output_final_state=output_final_state,
                     **op_kwargs)
  mesh = sharding.active_mesh()
  shards = math.prod(mesh.shape[a] for a in axis)
  validation.require(time % shards == 0, "sequence length", time,
                     f"a multiple of the sequence shards {shards} ("
                     + " x ".join(f"mesh.{a}={mesh.shape[a]}" for a in axis) + ")")
  if segment_ids is not None:
    arguments.check_segment_ids(segment_ids, batch, time)
  rows = sharding.mesh_axes("batch", batch) or None
  split_heads = sharding.mesh_axes("heads", heads) or None
  tokens = PartitionSpec(rows, axis, split_heads)
  per_row = PartitionSpec(rows, split_heads)
  spec = lambda a: tokens if a.ndim >= 3 else PartitionSpec(rows, axis)

  def body(q, k, v, inputs, head_inputs, segment_ids, initial_state):
    return lasp2_span(family, q, k, v, inputs, head_inputs, axis=axis,
                      segment_ids=segment_ids, initial_state=initial_state, **op_kwargs)

  in_specs = (tokens, tokens, tokens, {n: spec(a) for n, a in inputs.items()},
              {n: PartitionSpec(split_heads) for n in head_inputs},
              PartitionSpec(rows, axis), per_row)
  o, final = jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=(tokens, per_row),
                           check_vma=False)(q, k, v, inputs, head_inputs, segment_ids,
                                            initial_state)
  return o, (final if output_final_state else None)
