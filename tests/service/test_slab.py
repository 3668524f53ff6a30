"""StateSlab unit tests (no server)."""

from __future__ import annotations

import numpy as np

from service.core.slab import StateSlab, block_rows_for
from service.core.types import StateSpec

STATES = (StateSpec("h", np.dtype(np.float32), (2, 3)), StateSpec("n", np.dtype(np.int64), (1,)))


def fill(slab: StateSlab, slot: int, value: float) -> None:
    slab.write(slot, {"h": np.full((2, 3), value, np.float32), "n": np.array([int(value)], np.int64)})


def test_growth_adds_blocks_without_moving_rows():
    slab = StateSlab(STATES, block_rows=4)
    slots = [slab.alloc() for _ in range(4)]
    assert slots == [0, 1, 2, 3] and slab.capacity == 4
    for s in slots:
        fill(slab, s, s + 1)
    first_block = slab.blocks["h"][0]
    more = [slab.alloc() for _ in range(6)]  # grows by two blocks
    assert slab.capacity == 12 and len(slab.blocks["h"]) == 3
    assert slab.blocks["h"][0] is first_block  # the existing block is the same array: nothing copied
    for s in more:
        fill(slab, s, s + 1)
    for s in slots + more:
        row = slab.read(s)
        assert np.all(row["h"] == s + 1) and row["n"][0] == s + 1
    assert slab.used == 10 and slab.used_bytes == 10 * (2 * 3 * 4 + 8)


def test_gather_scatter_fast_path_and_across_blocks():
    slab = StateSlab(STATES, block_rows=4)
    for s in range(12):
        assert slab.alloc() == s
        fill(slab, s, s)
    for slots in ([2, 0, 3], [9, 1, 6, 10, 4]):  # one block, then three blocks in scrambled order
        idx = np.array(slots, np.int64)
        got = slab.gather(idx)
        assert got["h"].shape == (len(slots), 2, 3)
        np.testing.assert_array_equal(got["h"][:, 0, 0], np.array(slots, np.float32))
        np.testing.assert_array_equal(got["n"][:, 0], np.array(slots))
        slab.scatter(idx, {"h": got["h"] + 100, "n": got["n"] + 100})
        for s in slots:
            assert slab.read(s)["h"][0, 0] == s + 100
            fill(slab, s, s)
    untouched = slab.gather(np.arange(12))
    np.testing.assert_array_equal(untouched["n"][:, 0], np.arange(12))


def test_free_resets_and_reuses_lowest_slot_and_initial_state():
    init = np.arange(6, dtype=np.float32).reshape(2, 3)
    states = (StateSpec("h", np.dtype(np.float32), (2, 3), init), STATES[1])
    slab = StateSlab(states, block_rows=4)
    a, b = slab.alloc(), slab.alloc()
    np.testing.assert_array_equal(slab.read(a)["h"], init)  # a declared initial state, not zeros
    slab.write(a, {"h": np.ones((2, 3), np.float32), "n": np.array([7], np.int64)})
    slab.free(a)
    assert slab.alloc() == a
    row = slab.read(a)
    np.testing.assert_array_equal(row["h"], init)
    assert row["n"][0] == 0 and b == 1


def test_block_rows_bounded():
    assert block_rows_for(STATES) == 65536
    big = (StateSpec("h", np.dtype(np.float32), (2, 256)),)
    assert block_rows_for(big) == 4 * 1024 * 1024 // (2 * 256 * 4)


def test_empty_blocks_are_dropped_and_slots_taken_low_first():
    slab = StateSlab(STATES, block_rows=4)
    slots = [slab.alloc() for _ in range(16)]
    for s in slots:
        fill(slab, s, s + 1)
    assert slab.mapped_blocks == 4 and slab.nbytes == 16 * slab.row_bytes
    for s in slots[4:]:  # blocks 1, 2, 3 empty: the lowest stays as the spare, the others are unmapped
        slab.free(s)
    assert slab.mapped_blocks == 2 and slab.blocks["h"][2] is None and slab.blocks["h"][3] is None
    assert slab.used == 4 and slab.nbytes == 8 * slab.row_bytes
    slab.free(slots[1])
    assert slab.alloc() == 1  # a free row of the lowest block first, never a fresh block
    assert sorted(slab.alloc() for _ in range(4)) == [4, 5, 6, 7]  # then the spare
    new = slab.alloc()  # block 2 is mapped again, zeroed
    assert new == 8 and slab.mapped_blocks == 3
    assert np.all(slab.read(new)["h"] == 0) and slab.read(0)["h"][0, 0] == 1
    for s in [0, 1, 2, 3, 4, 5, 6, 7, new]:
        slab.free(s)
    assert slab.used == 0 and slab.mapped_blocks == 1  # everything closed: one spare block left
