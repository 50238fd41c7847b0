"""GPU kernels for scalar (per-head) gates that form the in-chunk terms themselves.

The generic path (`chunk_recurrence/`) takes in-chunk terms formed in XLA in
float32 (the scores A, Diag(a) q, Diag(c) k, the UT transform) and returns
their gradients for XLA to differentiate further. For a scalar gate or none
(simple GLA, Lightning, RetNet, Mamba2; DeltaNet, Gated DeltaNet, Comba) these
kernels form the terms in registers from q, k and the cumulative gate
(`kernels.py`), and the delta rule's UT transform runs per chunk in a kernel
(`ut_transform.py`). The state recurrence itself reuses the generic GPU state
kernels. `gated.py` and `delta.py` hold the `jax.custom_vjp` wiring;
`layout.py` the [B, T, H, *] <-> [R, N, C, *] bookkeeping.
"""

from pallas_kernels.scalar_gate.delta import delta_chunks
from pallas_kernels.scalar_gate.gated import gated_chunks

__all__ = ["delta_chunks", "gated_chunks"]
