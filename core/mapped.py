"""Memory-mapped embeddings without resident growth: drop the pages a pass is done with.

Reading or writing every row of an ``np.memmap`` makes each touched page resident in the process,
so a pass over N rows would grow resident memory by the whole file even though the data stays in
the file and the page cache. :class:`MappedPages` hands pages back to the operating system once a
pass has moved beyond them (Linux ``MADV_DONTNEED``; a later access faults them back in from the
page cache or the file). Elsewhere nothing is dropped and the arrays work as before.
"""
from __future__ import annotations

import mmap
import sys
from dataclasses import dataclass

import numpy as np

# Linux keeps the data of a shared file mapping when its pages are dropped with MADV_DONTNEED
# (a later read faults them back in from the page cache or the file); elsewhere nothing is dropped.
_DROP_PAGES = getattr(mmap, "MADV_DONTNEED", None) if sys.platform.startswith("linux") else None


@dataclass
class MappedPages:
    """The shared file mapping under a C-contiguous view of an ``np.memmap``.

    :meth:`release` drops the pages holding the first rows from this process's resident memory;
    the rows stay in the file and the page cache.
    """

    mapping: mmap.mmap
    row_zero: int
    """Byte offset of the view's first row in ``mapping``."""
    row_bytes: int
    released: int
    """Bytes of ``mapping`` released so far (a multiple of the page size)."""

    @classmethod
    def of(cls, array: np.ndarray) -> "MappedPages | None":
        """The mapping under ``array``, or None when there is none whose pages can be dropped safely."""
        if _DROP_PAGES is None or array.size == 0 or not array.flags.c_contiguous:
            return None
        memmap, base = None, array
        while base is not None and not isinstance(base, mmap.mmap):
            if memmap is None and isinstance(base, np.memmap):
                memmap = base
            base = getattr(base, "base", None)
        # Copy-on-write ("c") pages hold the only copy of what was written: they are never dropped.
        if base is None or memmap is None or memmap.mode not in ("r", "r+", "w+"):
            return None
        row_zero = array.ctypes.data - np.frombuffer(base, np.uint8).ctypes.data
        return cls(base, row_zero, array.strides[0], row_zero // mmap.PAGESIZE * mmap.PAGESIZE)

    def release(self, rows: int) -> None:
        """Drop the whole pages holding rows ``[0, rows)`` that are still resident."""
        end = (self.row_zero + rows * self.row_bytes) // mmap.PAGESIZE * mmap.PAGESIZE
        if end > self.released:
            self.mapping.madvise(_DROP_PAGES, self.released, end - self.released)
            self.released = end
