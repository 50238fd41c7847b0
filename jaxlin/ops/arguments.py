"""Argument checking shared by the recurrence ops.

Every public op validates its inputs here before any tracing work, so that a
wrong shape, dtype or option fails with a `ValueError` that names the argument,
what it got and what was expected. Value checks (gates must be <= 0) run only
when the array is concrete (an eager call); under `jax.jit` they are skipped,
since a traced value cannot be inspected without a host round trip.

Shape legend: B batch, T time, H heads, K key dim, V value dim.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

IMPLS = ("auto", "reference", "xla", "pallas")
MIN_CHUNK, MAX_CHUNK, CHUNK_MULTIPLE = 16, 256, 16


def _describe(x: jax.Array) -> str:
  return f"shape {tuple(x.shape)} dtype {x.dtype}"


def check_impl(impl: str) -> str:
  """Returns `impl` after checking it is one of IMPLS ("auto" and "pallas" are
  resolved per call by `pallas_kernels.dispatch.kernel_platform`)."""
  if impl not in IMPLS:
    raise ValueError(f"impl: got {impl!r}; expected one of {IMPLS}")
  return impl


def check_chunk_size(chunk_size: int) -> None:
  ok = (isinstance(chunk_size, (int, np.integer)) and not isinstance(chunk_size, bool)
        and MIN_CHUNK <= chunk_size <= MAX_CHUNK and chunk_size % CHUNK_MULTIPLE == 0)
  if not ok:
    raise ValueError(
        f"chunk_size: got {chunk_size!r}; expected an int, a multiple of "
        f"{CHUNK_MULTIPLE} in [{MIN_CHUNK}, {MAX_CHUNK}]")


def check_float(name: str, x: jax.Array) -> None:
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{name}: got {_describe(x)}; expected a floating dtype")


def check_shape(name: str, x: jax.Array | None, expected: Sequence[int],
                legend: str) -> None:
  """Raises unless `x` is None or has exactly shape `expected` (named `legend`)."""
  if x is None:
    return
  if tuple(x.shape) != tuple(expected):
    raise ValueError(
        f"{name}: got {_describe(x)}; expected {legend} = {tuple(expected)}")
  check_float(name, x)


def check_qkv(q: jax.Array, k: jax.Array, v: jax.Array,
              *, step: bool = False) -> tuple[int, ...]:
  """Checks q, k [B,T,H,K] and v [B,T,H,V] ([B,H,*] for a step); returns dims."""
  rank, legend = (3, "[B,H,K]") if step else (4, "[B,T,H,K]")
  for name, x in (("q", q), ("k", k), ("v", v)):
    if x.ndim != rank:
      raise ValueError(f"{name}: got {_describe(x)}; expected rank {rank} "
                       f"({legend.replace('K', 'V') if name == 'v' else legend})")
    check_float(name, x)
  check_shape("k", k, q.shape, f"{legend} like q")
  if v.shape[:-1] != q.shape[:-1]:
    vlegend = legend.replace("K", "V")
    raise ValueError(f"v: got {_describe(v)}; expected {vlegend} with leading "
                     f"dims {tuple(q.shape[:-1])} like q")
  return (*q.shape, v.shape[-1])


def check_gate(g: jax.Array | None, lead: tuple[int, ...], key_dim: int,
               *, allow_vector: bool) -> None:
  """g: None, scalar gate `lead`, or (if allowed) per-key gate `lead + (K,)`; g <= 0."""
  if g is None:
    return
  names = "[B,H]" if len(lead) == 2 else "[B,T,H]"
  allowed = [tuple(lead)] + ([(*lead, key_dim)] if allow_vector else [])
  if tuple(g.shape) not in allowed:
    legend = names + (f" or {names[:-1]},K]" if allow_vector else "")
    raise ValueError(f"g: got {_describe(g)}; expected {legend} = "
                     f"{' or '.join(map(str, allowed))} (log-space gate, <= 0)")
  check_float("g", g)
  check_nonpositive("g", g)


def check_nonpositive(name: str, x: jax.Array) -> None:
  """For concrete arrays, raises if any value is > 0 or NaN (log-space decays)."""
  try:
    values = np.asarray(x, np.float32)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return  # traced under jit: the value is not known here
  worst = float(values.max()) if values.size else 0.0
  if not worst <= 0.0:
    raise ValueError(f"{name}: log-space gates must be <= 0 (decay = exp({name}) "
                     f"<= 1); got max value {worst}")


def check_segment_ids(segment_ids: jax.Array | None, batch: int, time: int) -> None:
  if segment_ids is None:
    return
  if tuple(segment_ids.shape) != (batch, time):
    raise ValueError(f"segment_ids: got {_describe(segment_ids)}; expected "
                     f"[B,T] = {(batch, time)}")
  if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
    raise ValueError(f"segment_ids: got {_describe(segment_ids)}; expected an "
                     "integer dtype (one id per document; the state resets "
                     "where the id changes)")


def state_or_zeros(state: jax.Array | None, shape: Sequence[int]) -> jax.Array:
  """The float32 state, or zeros of `shape` [B, H, K, V] when None."""
  if state is None:
    return jnp.zeros(tuple(shape), jnp.float32)
  return state.astype(jnp.float32)


def check_integer_array(name: str, x: jax.Array | None,
                        allowed: Sequence[Sequence[int]], legend: str) -> None:
  """Raises unless `x` is None or an integer array whose shape is one of `allowed`."""
  if x is None:
    return
  shapes = [tuple(s) for s in allowed]
  if tuple(x.shape) not in shapes:
    raise ValueError(f"{name}: got {_describe(x)}; expected {legend} = "
                     f"{' or '.join(map(str, shapes))}")
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise ValueError(f"{name}: got {_describe(x)}; expected an integer dtype")
