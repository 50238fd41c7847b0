"""The per-chunk math of the chunk-recurrence kernels, written once for TPU and GPU.

One chunk of C tokens, a [K, Vb] block of the state S entering it (float32):

    W      = U - W_k S                 (delta rule; W = U for the gated family)
    o      = Q_in S + A W
    S_next = Diag(d) S + K_out^T W

Q_in, K_out [C, K], A [C, C], U [C, Vb], W_k [C, K] arrive in the matmul dtype
(bf16 or f32); d [1, K] and S are float32; every product accumulates in
float32. The backward pass, with dS the gradient of S_next and dO of o:

    dW      = A^T dO + K_out dS                dU   = dW
    dQ_in   = dO S^T          dA = dO W^T      dK_out = W dS^T
    dW_k    = -dW S^T         dd = sum_v dS * S
    dS_prev = Diag(d) dS + Q_in^T dO - W_k^T dW

The gradients that sum over V (dQ_in, dA, dK_out, dW_k, dd) are partial sums
over this program's value block.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

f32 = jnp.float32


def dot(a: jax.Array, b: jax.Array, *, trans_a: bool = False, trans_b: bool = False) -> jax.Array:
  """a @ b with optional transposes, float32 accumulation (full precision for f32)."""
  contract = ((0 if trans_a else 1,), (1 if trans_b else 0,))
  return jax.lax.dot_general(a, b, (contract, ((), ())), precision=highest(a.dtype),
                             preferred_element_type=f32)


def highest(dtype: jnp.dtype) -> jax.lax.Precision | None:
  """Full float32 precision for float32 operands (no TF32), the default otherwise."""
  return jax.lax.Precision.HIGHEST if dtype == f32 else None


def forward_chunk(state: jax.Array, q_in: jax.Array, k_out: jax.Array, scores: jax.Array,
                  values: jax.Array, w_k: jax.Array | None,
                  decay: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(o [C, Vb] f32, S_next [K, Vb] f32) for one chunk (module docstring)."""
  mm = q_in.dtype
  state_mm = state.astype(mm)
  w = values.astype(f32)
  if w_k is not None:
    w = w - dot(w_k, state_mm)
  w_mm = w.astype(mm)
  o = dot(q_in, state_mm) + dot(scores, w_mm)
  new_state = decay.reshape(-1, 1) * state + dot(k_out, w_mm, trans_a=True)
  return o, new_state


def backward_chunk(state: jax.Array, d_state: jax.Array, d_o: jax.Array, q_in: jax.Array,
                   k_out: jax.Array, scores: jax.Array, values: jax.Array,
                   w_k: jax.Array | None, decay: jax.Array) -> tuple[jax.Array, ...]:
  """Gradients of one chunk (module docstring).

  Returns (dQ_in, dK_out, dA, dU, dW_k or None, dd [1, K], dS_prev), float32.
  """
  mm = q_in.dtype
  state_mm = state.astype(mm)
  w = values.astype(f32)
  if w_k is not None:
    w = w - dot(w_k, state_mm)
  w_mm, d_o_mm, d_state_mm = w.astype(mm), d_o.astype(mm), d_state.astype(mm)
  d_w = dot(scores, d_o_mm, trans_a=True) + dot(k_out, d_state_mm)
  d_w_mm = d_w.astype(mm)
  d_q_in = dot(d_o_mm, state_mm, trans_b=True)
  d_scores = dot(d_o_mm, w_mm, trans_b=True)
  d_k_out = dot(w_mm, d_state_mm, trans_b=True)
  d_decay = jnp.sum(d_state * state, axis=1).reshape(1, -1)
  d_prev = decay.reshape(-1, 1) * d_state + dot(q_in, d_o_mm, trans_a=True)
  d_w_k = None
  if w_k is not None:
    d_w_k = -dot(d_w_mm, state_mm, trans_b=True)
    d_prev = d_prev - dot(w_k, d_w_mm, trans_a=True)
  return d_q_in, d_k_out, d_scores, d_w, d_w_k, d_decay, d_prev
