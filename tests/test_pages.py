"""``PagePool``, the host's record of which KV pages each decode slot holds: pages taken as a
sequence grows and returned when it ends, parts kept apart, and the page table's widths."""
import numpy as np

from jackpot_jax.rollout.pages import PagePool, table_width
from pallas_kernels.paged import SCRATCH_PAGE


def test_table_width_is_the_smallest_allowed_width_that_holds_the_pages():
    allowed = sorted({1 << i for i in range(12)} | {3 << i for i in range(2, 11)})  # 1, 2, 4, 8, 12, 16, 24, ...
    for pages in range(1, 1000):
        assert table_width(pages, 10**6) == min(w for w in allowed if w >= pages)
        assert table_width(pages, 576) == min(576, min(w for w in allowed if w >= pages))
    assert table_width(9, 10**6) == 12 and table_width(13, 10**6) == 16 and table_width(5, 10**6) == 8


def test_pages_are_taken_as_a_slot_grows_and_returned_within_its_part():
    pool = PagePool(num_pages=12, page_size=4, slots=4, max_pages_per_slot=4, parts=2)  # 6 pages a part, 1 scratch
    assert pool.reserve(0, 9) and pool.free_pages(0) == 2  # 3 pages of part 0
    assert not pool.reserve(1, 13) and pool.free_pages(1) == 2  # 4 more do not fit: nothing taken
    assert pool.reserve(2, 16) and pool.free_pages(2) == 1 and pool.free_pages(0) == 2  # part 1 is apart
    assert pool.roomiest([1, 3], 5) == 1 and pool.roomiest([1, 3], 12) is None
    table = pool.table()
    assert table.shape == (4, 4) and SCRATCH_PAGE not in table[0, :3] and SCRATCH_PAGE not in table[2]
    np.testing.assert_array_equal(table[0, 3:], SCRATCH_PAGE)
    assert len(set(table[0, :3])) == 3 and len(set(table[2])) == 4  # a slot's pages are distinct, local ids
    assert pool.reserve(0, 10) and pool.free_pages(0) == 2  # a position within the last page takes none
    pool.release(0)
    assert pool.free_pages(0) == 5 and pool.table(width=2)[0].tolist() == [SCRATCH_PAGE] * 2
    assert pool.table([2, 7]).shape == (2, 4) and (pool.table([2, 7])[1] == SCRATCH_PAGE).all()  # past the slots
