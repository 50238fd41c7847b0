"""Pallas kernels for the jaxlin recurrence ops (DESIGN.md §7).

`chunk_recurrence/` is the fused inter-chunk kernel shared by both op families
(TPU Mosaic and GPU Triton, forward and backward, `jax.custom_vjp` wiring).
`gated/` and `delta/` prepare each family's per-chunk terms in XLA and call it,
or, on GPU, call `fused_terms/`, whose kernels form those terms themselves. `jaxlin.ops` dispatches to them for `impl="pallas"` / `"auto"`.
"""
