"""BlockSpecs and launch parameters shared by the per-chunk kernels of `fused_terms`.

Every kernel here runs one program per (row, chunk) (grid (R, N)) or per (row,
chunk, value block) (grid (R, N, P)) over [R, N, ...] arrays.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from pallas_kernels.chunk_recurrence.block_sizes import BlockSizes

OUTPUT_BLOCK_V = 128     # value columns per program of the chunk-parallel (R, N, P) kernels


def chunk_spec(*block: int, value: bool = False) -> pl.BlockSpec:
  """Chunk n of row r of a [R, N, *block] array (value block p on the last axis if asked)."""
  def index(r: jax.Array, n: jax.Array, p: jax.Array | int = 0) -> tuple:
    return (r, n) + (0,) * (len(block) - 1) + ((p,) if value else (0,))
  return pl.BlockSpec((None, None, *block), index)


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
                     out_dtype: jnp.dtype, *, blocks: BlockSizes, interpret: bool,
                     name: str) -> jax.Array:
  """Runs `kernel` on a grid (R, N, V / OUTPUT_BLOCK_V): inputs q, k, b, rel (if present),
  then each (array, rows) of `extra` as a [rows, block] block of a [R, N, rows, V] array;
  output [R, N, C, V] of `out_dtype`, value block p of chunk n per program."""
  rows, num, chunk = q.shape[:3]
  value_dim = extra[0][0].shape[-1]
  bv = min(value_dim, OUTPUT_BLOCK_V)
  inputs, in_specs = gate_operands(q, k, b, rel)
  inputs += [x for x, _ in extra]
  in_specs += [chunk_spec(height, bv, value=True) for _, height in extra]
  return pl.pallas_call(
      kernel, grid=(rows, num, value_dim // bv), in_specs=in_specs,
      out_specs=chunk_spec(chunk, bv, value=True),
      out_shape=jax.ShapeDtypeStruct((rows, num, chunk, value_dim), out_dtype),
      compiler_params=compiler_params(blocks), interpret=interpret, name=name,
  )(*inputs)


def gradient_operands(q: jax.Array, k: jax.Array, w: jax.Array, b: jax.Array,
                      rel: jax.Array | None, states: jax.Array, d_states: jax.Array,
                      d_o: jax.Array) -> tuple[list[jax.Array], list[pl.BlockSpec]]:
  """(inputs, in_specs) of a per-chunk gradient kernel on a grid (R, N): q, k [R,N,C,K],
  w [R,N,C,V], b, rel (if present), states and d_states [R,N,K,V], d_o [R,N,C,V]."""
  chunk, key_dim = q.shape[2:]
  value_dim = w.shape[-1]
  inputs = [q, k, w, b] + ([] if rel is None else [rel]) + [states, d_states, d_o]
  specs = [chunk_spec(chunk, key_dim), chunk_spec(chunk, key_dim), chunk_spec(chunk, value_dim),
           chunk_spec(*b.shape[2:])] + ([] if rel is None else [chunk_spec(chunk)])
  specs += [chunk_spec(key_dim, value_dim), chunk_spec(key_dim, value_dim),
            chunk_spec(chunk, value_dim)]
  return inputs, specs
