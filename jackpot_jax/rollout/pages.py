"""``PagePool``: which pages of a paged KV cache each decode slot holds, kept on the host.

Pages are taken as a sequence grows and returned when its request ends, so the KV memory in use is
set by the live tokens, not by ``max_target_length``. With ``parts`` > 1 (a core whose slots are
spread over devices) the slots and the pages split into that many equal, contiguous parts, one per
device: a slot takes pages of its own part, and page ids are local to the part. Each part's page 0
is never handed out: it is the scratch page of :mod:`pallas_kernels.paged`.
"""
from __future__ import annotations

import numpy as np

from pallas_kernels.paged import SCRATCH_PAGE


def table_width(pages: int, most: int) -> int:
    """The page-table width (one compiled decode step each) for ``pages`` pages: the smallest of 1,
    2, 4, 8, 12, 16, 24, 32, 48, ... (powers of two, and from 8 up 1.5 times them: attention reads
    at most a third more than it needs) that holds them, at most ``most``."""
    width = 1 << (max(1, pages) - 1).bit_length()
    if width >= 16 and pages <= 3 * width // 4:
        width = 3 * width // 4
    return min(width, most)


class PagePool:
    def __init__(self, num_pages: int, page_size: int, slots: int, max_pages_per_slot: int, parts: int = 1):
        if num_pages % parts or slots % parts:
            raise ValueError(f"num_pages={num_pages} and slots={slots} must be multiples of parts={parts}.")
        self.page_size, self.max_pages_per_slot = page_size, max_pages_per_slot
        self.pages_per_part, self.slots_per_part = num_pages // parts, slots // parts
        self._free = [[p for p in range(self.pages_per_part - 1, -1, -1) if p != SCRATCH_PAGE] for _ in range(parts)]
        self._owned: list[list[int]] = [[] for _ in range(slots)]

    def pages_for(self, positions: int) -> int:
        """Pages that hold ``positions`` positions."""
        return -(-int(positions) // self.page_size)

    def part_of(self, slot: int) -> int:
        return slot // self.slots_per_part

    def free_pages(self, slot: int = 0) -> int:
        """Free pages of ``slot``'s part."""
        return len(self._free[self.part_of(slot)])

    def roomiest(self, slots, positions: int):
        """Of ``slots`` (empty ones), the last of those whose part has the most free pages, if that
        part holds ``positions`` positions; else None."""
        best = max(reversed(list(slots)), key=self.free_pages, default=None)
        return best if best is not None and self.pages_for(positions) <= self.free_pages(best) else None

    def reserve(self, slot: int, positions: int) -> bool:
        """Give ``slot`` pages for its first ``positions`` positions; False (and nothing taken) when
        its part lacks them."""
        more, free = self.pages_for(positions) - len(self._owned[slot]), self._free[self.part_of(slot)]
        if more > len(free):
            return False
        for _ in range(max(0, more)):
            self._owned[slot].append(free.pop())
        return True

    def release(self, slot: int) -> None:
        self._free[self.part_of(slot)].extend(reversed(self._owned[slot]))
        self._owned[slot] = []

    def table(self, rows=None, width: int | None = None) -> np.ndarray:
        """The page table ``[len(rows), width]`` of slots ``rows`` (default: all; an index past the
        slots gets an empty row), unowned entries the scratch page; ``width`` defaults to the
        :func:`table_width` of the slot holding the most pages."""
        rows = range(len(self._owned)) if rows is None else rows
        owned = [self._owned[r] if 0 <= r < len(self._owned) else [] for r in rows]
        if width is None:
            width = table_width(max([1] + [len(pages) for pages in self._owned]), self.max_pages_per_slot)
        table = np.full((len(owned), width), SCRATCH_PAGE, np.int32)
        for i, pages in enumerate(owned):
            table[i, :min(len(pages), width)] = pages[:width]
        return table
