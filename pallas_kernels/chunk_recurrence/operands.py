"""Operand bookkeeping shared by the GPU and TPU kernels: the optional W_k
(delta rule only) makes some inputs and outputs absent."""

from __future__ import annotations

from typing import Any, Sequence

import jax


def present(pairs: Sequence[tuple[Any, Any]]) -> tuple[list, list]:
  """(arrays, specs) of the (array, spec) pairs whose array is not None."""
  kept = [(x, spec) for x, spec in pairs if x is not None]
  return [x for x, _ in kept], [spec for _, spec in kept]


def with_absent(refs: Sequence[Any], flags: Sequence[bool]) -> list:
  """The kernel's refs in full order, None where `flags` says an operand is absent."""
  it = iter(refs)
  full = [next(it) if flag else None for flag in flags]
  assert next(it, None) is None, "more refs than operands"
  return full


def cast_like(grads: Sequence[jax.Array | None],
              like: Sequence[jax.Array | None]) -> tuple[jax.Array | None, ...]:
  """Each gradient in its primal's dtype (None stays None)."""
  return tuple(None if g is None else g.astype(x.dtype) for g, x in zip(grads, like))
