"""Inverse of a unit lower-triangular matrix, (I + L)^{-1}, for the UT transform.

XLA's CPU `triangular_solve` loops over tiny blocks and is ~40x slower than a
matmul of the same size, so the delta rule inverts each chunk's (I + L) here
and applies the inverse with matmuls:

* forward: blocks of 16 rows. Each 16 x 16 diagonal block is inverted by
  forward substitution (row i of T is e_i - sum_{j<i} L_ij T_j); block row I of
  the full inverse is then T_{I,<I} = -T_II L_{I,<I} T_{<I,<I} (matmuls).
* backward: for T = A^{-1}, dA = -T^T dT T^T; only the strictly lower part of
  dA reaches L.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

BLOCK = 16


@jax.custom_vjp
def unit_lower_inverse(lower: jax.Array) -> jax.Array:
  """(I + L)^{-1} for strictly lower-triangular L [..., C, C] (upper part ignored)."""
  return _inverse(lower)


def _substitute(lower: jax.Array) -> jax.Array:
  """(I + L)^{-1} by forward substitution, row by row; L [..., c, c], c small."""
  size = lower.shape[-1]
  eye = jnp.eye(size, dtype=lower.dtype)
  rows = [jnp.broadcast_to(eye[0], lower.shape[:-1])]
  for i in range(1, size):
    done = jnp.stack(rows, axis=-2)                              # [..., i, c]
    rows.append(eye[i] - jnp.einsum("...j,...jc->...c", lower[..., i, :i], done))
  return jnp.stack(rows, axis=-2)


def _inverse(lower: jax.Array) -> jax.Array:
  size = lower.shape[-1]
  block = min(BLOCK, size)
  num = size // block
  if num * block != size:
    raise ValueError(f"matrix size {size} must be a multiple of {block}")
  lead = lower.shape[:-2]
  blocks = lower.reshape(*lead, num, block, num, block)
  diag_lower = jnp.moveaxis(jnp.diagonal(blocks, axis1=-4, axis2=-2), -1, -3)
  diag_inv = _substitute(jnp.tril(diag_lower, -1))               # [..., n, c, c]
  inverse = diag_inv[..., 0, :, :]                               # rows/cols < 1 block
  for i in range(1, num):
    rows = slice(i * block, (i + 1) * block)
    left = lower[..., rows, : i * block]                         # L_{I,<I}
    new_rows = -diag_inv[..., i, :, :] @ (left @ inverse)        # T_{I,<I}
    top = jnp.concatenate(
        [inverse, jnp.zeros((*lead, i * block, block), lower.dtype)], axis=-1)
    bottom = jnp.concatenate([new_rows, diag_inv[..., i, :, :]], axis=-1)
    inverse = jnp.concatenate([top, bottom], axis=-2)
  return inverse


def _forward(lower: jax.Array) -> tuple[jax.Array, jax.Array]:
  inverse = _inverse(lower)
  return inverse, inverse


def _backward(inverse: jax.Array, d_inverse: jax.Array) -> tuple[jax.Array]:
  t = jnp.swapaxes(inverse, -1, -2)
  return (jnp.tril(-(t @ d_inverse @ t), -1),)


unit_lower_inverse.defvjp(_forward, _backward)
