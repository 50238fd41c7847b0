"""Pallas kernels of the jaxlin recurrence ops: the lowest layer of the package.

These modules import only jax and each other; they work on the [R, N, C, *] row
layout (R = batch * heads rows of N chunks of C tokens) and never on an op's
[B, T, H, *] arguments. `block_sizes.py` and `dispatch.py` (kernel options,
platform choice, support predicates) sit at the top so that both the kernels
and `jaxlin.ops` import them.

`chunk_recurrence/` is the fused inter-chunk kernel shared by both op families
(TPU Mosaic and GPU Triton, forward and backward, `jax.custom_vjp` wiring);
`fused_terms/` holds the GPU kernels that also form the in-chunk terms. The
adapters from the ops' arguments to these kernels are `jaxlin.ops.gated_pallas`
and `jaxlin.ops.delta_pallas`.
"""
