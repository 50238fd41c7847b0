"""GPU kernels that form the in-chunk terms themselves (Pallas Triton).

The generic path (`chunk_recurrence/`) takes in-chunk terms formed in XLA in
float32 (the scores A, Q_in = a o q, K_out = c o k, the UT transform) and
returns their gradients for XLA to differentiate further. These kernels form
the terms in registers from q, k and the in-chunk cumulative gate, one program
per chunk:
- `scalar_kernels.py`: a scalar gate or none (simple GLA, Lightning, RetNet,
  Mamba2; the whole D family): A = (q k^T) o exp(b_i - b_j) in one matmul.
- `key_kernels.py`: a per-key gate (GLA, HGRN2): A by 16-token blocks, through a
  reference point between blocks and elementwise inside them, exact for gates
  of any strength.
- `ut_transform.py`: the delta rule's UT transform, (I + L)^-1 per chunk in
  float32 by 16 x 16 blocks.
The state recurrence reuses the generic GPU state kernels. `gated.py` and
`delta.py` hold the `jax.custom_vjp` wiring, `state_operands.py` the XLA operands
of the state kernels, `layout.py` the [B, T, H, *] <-> [R, N, C, *] bookkeeping,
`specs.py` the shared BlockSpecs.
"""

from pallas_kernels.fused_terms.delta import delta_chunks
from pallas_kernels.fused_terms.gated import gated_chunks

__all__ = ["delta_chunks", "gated_chunks"]
