"""A byte arena on one torch device with a first-fit, coalescing free list.

The memory tiers allocate every chunk from one preallocated tensor instead of a fresh `torch.empty`
per chunk: a fresh host allocation of megabytes is a new mmap whose pages fault in on first touch,
which makes a put several times slower than a copy into memory that is already mapped. The arena
also makes pinned (page-locked) host memory affordable: it is registered once.

Allocations are few (one per chunk, megabytes each), so a Python free list is not a cost. Offsets are
aligned to `ALIGN` bytes, enough for any dtype and for vectorized copies. Not thread-safe: the owning
tier serializes calls under its lock.
"""

from __future__ import annotations

import bisect

import torch

ALIGN = 512


def _round_up(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


class Arena:
    def __init__(self, capacity: int, device: torch.device, pin_memory: bool = False) -> None:
        self.capacity = capacity // ALIGN * ALIGN
        self.device = device
        # uint8 [capacity]; pages of a CPU arena fault in lazily as they are first written.
        self.buffer = torch.empty(self.capacity, dtype=torch.uint8, device=device, pin_memory=pin_memory)
        self._free_offsets: list[int] = [0] if self.capacity else []
        self._free_sizes: list[int] = [self.capacity] if self.capacity else []
        self.used = 0

    def alloc(self, nbytes: int) -> int | None:
        """Offset of a free region of at least `nbytes`, or None if no free region is large enough."""
        size = _round_up(max(nbytes, 1))
        for i, free in enumerate(self._free_sizes):
            if free >= size:
                offset = self._free_offsets[i]
                if free == size:
                    del self._free_offsets[i], self._free_sizes[i]
                else:
                    self._free_offsets[i] += size
                    self._free_sizes[i] -= size
                self.used += size
                return offset
        return None

    def free(self, offset: int, nbytes: int) -> None:
        size = _round_up(max(nbytes, 1))
        self.used -= size
        i = bisect.bisect_left(self._free_offsets, offset)
        # Coalesce with the following and the preceding free region.
        if i < len(self._free_offsets) and self._free_offsets[i] == offset + size:
            size += self._free_sizes[i]
            del self._free_offsets[i], self._free_sizes[i]
        if i > 0 and self._free_offsets[i - 1] + self._free_sizes[i - 1] == offset:
            self._free_sizes[i - 1] += size
        else:
            self._free_offsets.insert(i, offset)
            self._free_sizes.insert(i, size)

    def largest_free(self) -> int:
        return max(self._free_sizes, default=0)

    def view(self, offset: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        n = dtype.itemsize
        for d in shape:
            n *= d
        return self.buffer[offset : offset + n].view(dtype).view(shape)
