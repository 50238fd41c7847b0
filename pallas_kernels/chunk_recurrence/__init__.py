"""The chunk-recurrence kernel shared by both op families (see core.py)."""

from pallas_kernels.chunk_recurrence.block_sizes import BlockSizes
from pallas_kernels.chunk_recurrence.core import chunk_recurrence

__all__ = ["BlockSizes", "chunk_recurrence"]
