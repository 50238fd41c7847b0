"""The chunk-recurrence kernel shared by both op families (see core.py)."""

from pallas_kernels.chunk_recurrence.core import chunk_recurrence

__all__ = ["chunk_recurrence"]
