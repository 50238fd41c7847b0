"""Block sizes of the chunk-recurrence kernels, per platform.

The state S [K, V] of one (batch, head) is split along V into independent
column blocks of `block_v` (the recurrence never mixes value columns), so one
program holds a [K, block_v] float32 state on chip. K is never split: the
delta rule needs whole columns of S for W = U - W_k S.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiling of the chunk-recurrence kernels.

  block_v: value columns per program (a power of two on GPU; a multiple of
    128, or all of V, on TPU).
  num_warps, num_stages: Triton launch parameters (GPU only).
  """
  block_v: int
  num_warps: int = 4
  num_stages: int = 1

  @classmethod
  def default(cls, platform: str, key_dim: int, value_dim: int,
              delta: bool = False) -> "BlockSizes":
    """The defaults: on GPU a [K, 64] state, 8 warps for the delta rule (its extra W_k S
    product) or K = 256; on TPU all of V up to 256.

    Measured on an H100 (B=4 T=8192 H=16 K=V=128 bf16, `benchmarks/kernels.py --block-v`),
    forward+backward: simple GLA 6.32 ms at (64, 4 warps) against 6.39-7.61 ms for block_v
    32 / 128 with 4 or 8 warps; Gated DeltaNet 12.57 ms at (64, 8) against 14.39 at (64, 4)
    and 14.49 at (32, 8).
    """
    if platform == "tpu":
      return cls(block_v=value_dim if value_dim <= 256 else 256)
    block_v = min(value_dim, 64)
    return cls(block_v=block_v, num_warps=8 if (delta or key_dim >= 256) else 4)

  def check(self, platform: str, value_dim: int) -> None:
    """Raises ValueError when the blocks cannot tile V on `platform`."""
    if value_dim % self.block_v:
      raise ValueError(f"block_v={self.block_v} must divide V={value_dim}")
    if platform == "gpu" and self.block_v & (self.block_v - 1):
      raise ValueError(f"block_v={self.block_v}: Triton needs a power of two")
    if platform == "tpu" and self.block_v != value_dim and self.block_v % 128:
      raise ValueError(f"block_v={self.block_v}: Mosaic needs a multiple of 128 or all of V={value_dim}")
