"""BlockSpecs and launch parameters shared by the per-chunk kernels of `fused_terms`.

Every kernel here runs one program per (row, chunk) (grid (R, N)) or per (row,
chunk, value or key block) (grid (R, N, P)) over [R, N, ...] arrays.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from pallas_kernels.block_sizes import BlockSizes

OUTPUT_BLOCK_V = 128     # value columns per program of the chunk-parallel (R, N, P) kernels


def chunk_spec(*block: int, blocked: bool = False) -> pl.BlockSpec:
  """Chunk n of row r of a [R, N, *block] array; with `blocked`, the last axis is split into
  blocks and the grid's third index p picks one (a value block, or a key block)."""
  def index(r: jax.Array, n: jax.Array, p: jax.Array | int = 0) -> tuple:
    return (r, n) + (0,) * (len(block) - 1) + ((p,) if blocked else (0,))
  return pl.BlockSpec((None, None, *block), index)


def key_rows_spec(key_block: int, value_dim: int) -> pl.BlockSpec:
  """Rows kappa (the grid's third index) of chunk n of row r of a [R, N, K, V] state."""
  return pl.BlockSpec((None, None, key_block, value_dim), lambda r, n, p: (r, n, p, 0))


def compiler_params(blocks: BlockSizes) -> pl_triton.CompilerParams:
  """Triton launch parameters of the per-chunk kernels (`BlockSizes.chunk_warps`)."""
  return pl_triton.CompilerParams(num_warps=blocks.chunk_warps, num_stages=blocks.num_stages)


def gate_operands(q: jax.Array, k: jax.Array, b: jax.Array,
                  rel: jax.Array | None) -> tuple[list[jax.Array], list[pl.BlockSpec]]:
  """(inputs, in_specs) of q, k [R,N,C,K], the gate b [R,N,C] or [R,N,C,K] and rel
  [R,N,C] if present."""
  chunk, key_dim = q.shape[2:]
  inputs = [q, k, b] + ([] if rel is None else [rel])
  specs = [chunk_spec(chunk, key_dim), chunk_spec(chunk, key_dim), chunk_spec(*b.shape[2:])]
  return inputs, specs + [chunk_spec(chunk)] * (len(inputs) - 3)


def value_block_call(kernel: Callable, q: jax.Array, k: jax.Array, b: jax.Array,
                     rel: jax.Array | None, extra: list[tuple[jax.Array, int]],
                     out_dtype: jnp.dtype, *, blocks: BlockSizes, interpret: bool, name: str,
                     whole_chunk: Sequence[tuple[jax.Array, pl.BlockSpec]] = ()) -> jax.Array:
  """Runs `kernel` on a grid (R, N, V / OUTPUT_BLOCK_V): inputs q, k, b, rel (if present),
  each (array, spec) of `whole_chunk`, then each (array, rows) of `extra` as a [rows, block]
  block of a [R, N, rows, V] array; output [R, N, C, V] of `out_dtype`, value block p of
  chunk n per program."""
  rows, num, chunk = q.shape[:3]
  value_dim = extra[0][0].shape[-1]
  bv = min(value_dim, OUTPUT_BLOCK_V)
  inputs, in_specs = gate_operands(q, k, b, rel)
  inputs += [x for x, _ in whole_chunk]
  in_specs += [spec for _, spec in whole_chunk]
  inputs += [x for x, _ in extra]
  in_specs += [chunk_spec(height, bv, blocked=True) for _, height in extra]
  return pl.pallas_call(
      kernel, grid=(rows, num, value_dim // bv), in_specs=in_specs,
      out_specs=chunk_spec(chunk, bv, blocked=True),
      out_shape=jax.ShapeDtypeStruct((rows, num, chunk, value_dim), out_dtype),
      compiler_params=compiler_params(blocks), interpret=interpret, name=name,
  )(*inputs)


def gradient_operands(q: jax.Array, k: jax.Array, w: jax.Array, b: jax.Array,
                      rel: jax.Array | None, states: jax.Array, d_states: jax.Array,
                      d_o: jax.Array, key_block: int | None = None
                      ) -> tuple[list[jax.Array], list[pl.BlockSpec]]:
  """(inputs, in_specs) of a per-chunk gradient kernel: q, k [R,N,C,K], w [R,N,C,V], b, rel
  (if present), states and d_states [R,N,K,V], d_o [R,N,C,V]. Grid (R, N), or with
  `key_block` (R, N, K / key_block): then q, k, a per-key gate b, states and d_states come
  as the key block's columns (rows of the states)."""
  chunk, key_dim = q.shape[2:]
  value_dim = w.shape[-1]
  inputs = [q, k, w, b] + ([] if rel is None else [rel]) + [states, d_states, d_o]
  gate = chunk_spec(*b.shape[2:])
  if key_block is None:
    keys, state = chunk_spec(chunk, key_dim), chunk_spec(key_dim, value_dim)
  else:
    keys, state = chunk_spec(chunk, key_block, blocked=True), key_rows_spec(key_block, value_dim)
    gate = keys if b.ndim == 4 else gate             # a per-key gate: its key block
  specs = [keys, keys, chunk_spec(chunk, value_dim), gate]
  specs += [] if rel is None else [chunk_spec(chunk)]
  return inputs, specs + [state, state, chunk_spec(chunk, value_dim)]
