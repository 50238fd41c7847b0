"""`chunk_recurrence`: the fused inter-chunk kernel with its custom VJP.

For every row r (a batch*head pair) and chunk n, with S_0 = initial_state:

    W_n     = U_n - W_k,n S_n           (W_n = U_n when w_k is None)
    o_n     = Q_in,n S_n + A_n W_n
    S_{n+1} = Diag(d_n) S_n + K_out,n^T W_n

Both op families reduce to this once their per-chunk terms are formed in XLA
(`jaxlin.ops.gated_pallas`, `jaxlin.ops.delta_pallas`). `jax.grad` does not pass
through `pallas_call`, so each platform module gives a `forward` returning
(o, final state, residuals) and a `backward` walking the chunks in reverse:
on TPU one fused kernel per direction (`tpu.py`), on GPU a sequential state
kernel plus chunk-parallel outputs and gradients (`gpu.py`).

Legend: R rows, N chunks, C chunk length, K key dim, V value dim.
"""

from __future__ import annotations

import functools

import jax

from pallas_kernels.chunk_recurrence import gpu, tpu
from pallas_kernels.block_sizes import BlockSizes

PLATFORMS = {"gpu": gpu, "tpu": tpu}


def chunk_recurrence(q_in: jax.Array, k_out: jax.Array, scores: jax.Array, values: jax.Array,
                     w_k: jax.Array | None, decay: jax.Array, initial_state: jax.Array, *,
                     platform: str, blocks: BlockSizes | None = None,
                     interpret: bool = False) -> tuple[jax.Array, jax.Array]:
  """Runs the recurrence of the module docstring with the `platform` kernel.

  Args:
    q_in, k_out: [R, N, C, K]; scores: [R, N, C, C]; values: [R, N, C, V];
      w_k: [R, N, C, K] or None. All in the matmul dtype (bf16/f16/f32).
    decay: [R, N, 1, K] float32; initial_state: [R, K, V] float32.
    platform: "gpu" (Triton) or "tpu" (Mosaic) — which kernel to build.
    blocks: tiling; default `BlockSizes.default(platform, K, V, delta=w_k is not None)`.
    interpret: run the kernel in the Pallas interpreter (CPU tests).
  Returns:
    (o [R, N, C, V] in the matmul dtype (rounded once from float32 accumulation),
     final state [R, K, V] float32).
  """
  if platform not in PLATFORMS:
    raise ValueError(f"platform: got {platform!r}; expected one of {sorted(PLATFORMS)}")
  key_dim, value_dim = q_in.shape[-1], values.shape[-1]
  blocks = blocks or BlockSizes.default(platform, key_dim, value_dim, delta=w_k is not None)
  blocks.check(platform, value_dim)
  return _recurrence(platform, blocks, interpret, q_in, k_out, scores, values, w_k, decay,
                     initial_state)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _recurrence(platform, blocks, interpret, q_in, k_out, scores, values, w_k, decay,
                initial_state):
  o, final, _ = PLATFORMS[platform].forward(q_in, k_out, scores, values, w_k, decay,
                                            initial_state, blocks=blocks, interpret=interpret)
  return o, final


def _recurrence_fwd(platform, blocks, interpret, q_in, k_out, scores, values, w_k, decay,
                    initial_state):
  o, final, residuals = PLATFORMS[platform].forward(
      q_in, k_out, scores, values, w_k, decay, initial_state, blocks=blocks,
      interpret=interpret)
  return (o, final), residuals


def _recurrence_bwd(platform, blocks, interpret, residuals, grads):
  d_o, d_final = grads
  return PLATFORMS[platform].backward(residuals, d_o, d_final, blocks=blocks,
                                      interpret=interpret)


_recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)
