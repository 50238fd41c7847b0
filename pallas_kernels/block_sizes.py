"""Block sizes of the chunk-recurrence kernels, per platform.

The state S [K, V] of one (batch, head) is split along V into independent
column blocks of `block_v` (the recurrence never mixes value columns), so one
program holds a [K, block_v] float32 state on chip. The GPU state kernels of
the gated family also split K into row blocks of `block_k` (their state rows
are independent); the delta rule needs whole columns of S for W = U - W_k S,
and the TPU kernel fuses the outputs (Q S sums over K), so both take all of K.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiling of the chunk-recurrence kernels.

  block_v: value columns per program (a power of two on GPU; a multiple of
    128, or all of V, on TPU).
  block_k: key rows per program of the GPU gated-family state kernels, and key
    columns per program (or loop step) of the gradient and score kernels of
    `fused_terms` (a power of two); None: all of K.
  num_warps, num_stages: Triton launch parameters (GPU only).
  chunk_warps: num_warps of the GPU per-chunk kernels of `pallas_kernels.fused_terms`
    (outputs, gradients, UT transform). 8: with K = V = 128 and bf16, Triton 3.9 compiles
    every scalar-gate and delta-rule kernel without spills at 8 warps, and spills at 4
    and 16 (`benchmarks/kernel_resources.py`, no GPU needed); not yet timed.
  """
  block_v: int
  block_k: int | None = None
  num_warps: int = 4
  num_stages: int = 1
  chunk_warps: int = 8

  def key_block(self, key_dim: int) -> int:
    """Key rows per program of a gated-family GPU state kernel."""
    return key_dim if self.block_k is None else min(self.block_k, key_dim)

  @classmethod
  def default(cls, platform: str, key_dim: int, value_dim: int,
              delta: bool = False) -> "BlockSizes":
    """The defaults: on GPU [64, 64] state blocks (the delta rule takes all of K, and at
    K = 256 32 value columns), 8 warps for the delta rule or K = 256; on TPU all of V up
    to 256.

    Measured on an H100 (B=4 T=8192 H=16 K=V=128 bf16, `benchmarks/kernel_timing.py --block-v 64 128
    --block-k 64 128 --num-warps 4 8`): simple GLA forward+backward stayed within 4.18-4.47 ms
    over the eight settings (the state kernels are not the bottleneck); the delta rule's 8 warps
    come from the earlier fused kernel (12.57 ms at 8 warps against 14.39 ms at 4). The delta
    rule's [256, 64] float32 state block spills (Triton 3.9, sm_90: 56 B per thread forward,
    296 B backward; `benchmarks/kernel_resources.py --K 256 --block-v 64`); [256, 32] does not.
    """
    if platform == "tpu":
      return cls(block_v=value_dim if value_dim <= 256 else 256)
    block_v = min(value_dim, 32 if delta and key_dim >= 256 else 64)
    return cls(block_v=block_v, block_k=64,
               num_warps=8 if (delta or key_dim >= 256) else 4)

  def check(self, platform: str, value_dim: int) -> None:
    """Raises ValueError when the blocks cannot tile V on `platform`."""
    if value_dim % self.block_v:
      raise ValueError(f"block_v={self.block_v} must divide V={value_dim}")
    if self.block_k is not None and (self.block_k < 16 or self.block_k & (self.block_k - 1)):
      raise ValueError(f"block_k={self.block_k}: expected a power of two >= 16, or None")
    for name in ("num_warps", "chunk_warps"):
      warps = getattr(self, name)
      if warps not in (1, 2, 4, 8, 16, 32):
        raise ValueError(f"{name}={warps}: expected a power of two in [1, 32]")
    if platform == "gpu" and self.block_v & (self.block_v - 1):
      raise ValueError(f"block_v={self.block_v}: Triton needs a power of two")
    if platform == "tpu" and self.block_v != value_dim and self.block_v % 128:
      raise ValueError(f"block_v={self.block_v}: Mosaic needs a multiple of 128 or all of V={value_dim}")
