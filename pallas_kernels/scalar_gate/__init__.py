"""GPU kernels for scalar (per-head) gates that form the in-chunk terms themselves.

The generic path (`chunk_recurrence/`) takes in-chunk terms formed in XLA in
float32 (the scores A, Diag(a) q, Diag(c) k) and returns their gradients for
XLA to differentiate further; for the common scalar gate (simple GLA,
Lightning, RetNet, Mamba2) and no gate at all, these kernels form the terms
in registers from q, k and the cumulative gate (`kernels.py`).
"""

from pallas_kernels.scalar_gate.gated import gated_chunks

__all__ = ["gated_chunks"]
