"""``PagePool``: which pages of a paged KV cache each decode slot holds, kept on the host.

Pages are taken as a sequence grows and returned when its request ends, so the KV memory in use is
set by the live tokens, not by ``max_target_length``. Page 0 is never handed out: it is the scratch
page of :mod:`pallas_kernels.paged`.
"""
from __future__ import annotations

import numpy as np

from pallas_kernels.paged import SCRATCH_PAGE


class PagePool:
    def __init__(self, num_pages: int, page_size: int, slots: int, max_pages_per_slot: int):
        self.page_size, self.max_pages_per_slot = page_size, max_pages_per_slot
        self._free = [p for p in range(num_pages - 1, -1, -1) if p != SCRATCH_PAGE]
        self._owned: list[list[int]] = [[] for _ in range(slots)]

    def pages_for(self, positions: int) -> int:
        """Pages that hold ``positions`` positions."""
        return -(-int(positions) // self.page_size)

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def reserve(self, slot: int, positions: int) -> bool:
        """Give ``slot`` pages for its first ``positions`` positions; False (and nothing taken) when
        the pool lacks them."""
        more = self.pages_for(positions) - len(self._owned[slot])
        if more > len(self._free):
            return False
        for _ in range(max(0, more)):
            self._owned[slot].append(self._free.pop())
        return True

    def release(self, slot: int) -> None:
        self._free.extend(reversed(self._owned[slot]))
        self._owned[slot] = []

    def table(self, rows=None, width: int | None = None) -> np.ndarray:
        """The page table ``[len(rows), width]`` of slots ``rows`` (default: all; an index past the
        slots gets an empty row), unowned entries the scratch page; ``width`` defaults to the
        smallest power of two (at most ``max_pages_per_slot``) that holds every slot's pages."""
        rows = range(len(self._owned)) if rows is None else rows
        owned = [self._owned[r] if r < len(self._owned) else [] for r in rows]
        if width is None:
            longest = max([1] + [len(pages) for pages in self._owned])
            width = min(1 << (longest - 1).bit_length(), self.max_pages_per_slot)
        table = np.full((len(owned), width), SCRATCH_PAGE, np.int32)
        for i, pages in enumerate(owned):
            table[i, :min(len(pages), width)] = pages[:width]
        return table
