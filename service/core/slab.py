"""`StateSlab`: the recurrent state of every session of one model version, one row per session slot.

Each state tensor lives in fixed-size blocks of `block_rows` rows that are never copied or moved: growing adds
a block, so memory stays ~ rows x state bytes (plus partly used blocks), and `np.zeros` pages untouched rows
lazily. A batch is a gather of its rows (`np.take`) and a scatter back, with a vectorised fast path when every
slot sits in one block (the common case).

Memory comes back as sessions end: a slot is always taken from the lowest block that has a free row, so live
rows gather in the low blocks, and a block whose last row is freed is dropped (its arrays are mmapped by
glibc, so dropping them unmaps the pages at once). One empty block is kept as a spare so that a session count
swinging around a block boundary does not map and unmap a block on every open and close. A dropped block's
slots stay addressable: the next slot taken there maps a fresh block of zeros.
"""

from __future__ import annotations

import heapq
from array import array
from typing import Any

import numpy as np

from service.core.types import StateSpec

DEFAULT_BLOCK_BYTES = 4 * 1024 * 1024


def block_rows_for(states: tuple[StateSpec, ...], block_bytes: int = DEFAULT_BLOCK_BYTES) -> int:
    """Rows per block so the largest state's block is about `block_bytes` (between 64 and 65,536 rows)."""
    widest = max((s.row_bytes for s in states), default=1) or 1
    return int(min(65536, max(64, block_bytes // widest)))


class StateSlab:
    """Preallocated state rows of one model version; slots come from the lowest block with a free row."""

    def __init__(self, states: tuple[StateSpec, ...], block_rows: int | None = None) -> None:
        self.states = states
        self.names = tuple(s.name for s in states)
        self.block_rows = block_rows or block_rows_for(states)
        # blocks[name][b] is None while block b is dropped (every row free, no memory held).
        self.blocks: dict[str, list[Any]] = {s.name: [] for s in states}
        self._initial = {
            s.name: (s.initial if s.initial is not None else np.zeros(s.shape, s.dtype)) for s in states
        }
        # Zero initial rows need no write at allocation: fresh blocks are zeros and reset() zeroes rows.
        self._nonzero_initial = tuple(s.name for s in states if s.initial is not None and np.any(s.initial))
        self._live: list[int] = []  # rows in use per block
        self._free_rows: list[array | None] = []  # free rows per mapped block (pop = lowest); None: dropped
        self._open: list[int] = []  # heap of blocks that may have a free row (checked when taken)
        self._in_open: list[bool] = []
        self._spare = -1  # the one empty block kept mapped, or -1
        self.capacity = 0  # addressable slots (mapped or not)
        self.used = 0
        self.mapped_blocks = 0
        self.row_bytes = sum(s.row_bytes for s in states)

    # -- slots ---------------------------------------------------------------------------------------------
    def _map(self, b: int) -> None:
        for s in self.states:
            self.blocks[s.name][b] = np.zeros((self.block_rows, *s.shape), s.dtype)
        self._free_rows[b] = array("i", range(self.block_rows - 1, -1, -1))
        self.mapped_blocks += 1

    def _grow(self) -> int:
        b = len(self._live)
        for s in self.states:
            self.blocks[s.name].append(None)
        self._live.append(0)
        self._free_rows.append(None)
        self._in_open.append(False)
        self.capacity += self.block_rows
        return b

    def _lowest_open(self) -> int:
        heap, in_open, free_rows = self._open, self._in_open, self._free_rows
        while heap:
            b = heap[0]
            rows = free_rows[b]
            if rows is None or rows:
                return b
            heapq.heappop(heap)
            in_open[b] = False
        b = self._grow()
        heapq.heappush(heap, b)
        in_open[b] = True
        return b

    def alloc(self) -> int:
        """Take a free slot holding the initial state (the lowest block with room first)."""
        b = self._lowest_open()
        rows = self._free_rows[b]
        if rows is None:
            self._map(b)
            rows = self._free_rows[b]
        r = rows.pop()  # type: ignore[union-attr]
        if self._live[b] == 0 and self._spare == b:
            self._spare = -1
        self._live[b] += 1
        self.used += 1
        if self._nonzero_initial:
            for name in self._nonzero_initial:
                self.blocks[name][b][r] = self._initial[name]
        return b * self.block_rows + r

    def free(self, slot: int) -> None:
        """Return a slot; its row is reset so a reused slot never leaks an old session's state.

        A block left empty is dropped (its memory unmapped), unless it becomes the one spare.
        """
        b, r = divmod(slot, self.block_rows)
        self.used -= 1
        self._live[b] -= 1
        if not self._in_open[b]:
            heapq.heappush(self._open, b)
            self._in_open[b] = True
        if self._live[b] == 0:
            if self._spare < 0:
                self._spare = b
            else:
                keep = min(b, self._spare)  # the lower empty block stays mapped: slots are taken low first
                self._drop(max(b, self._spare))
                self._spare = keep
                if keep != b:
                    return
        self.reset(slot)
        self._free_rows[b].append(r)  # type: ignore[union-attr]

    def _drop(self, b: int) -> None:
        if self._free_rows[b] is None:
            return
        for name in self.names:
            self.blocks[name][b] = None
        self._free_rows[b] = None
        self.mapped_blocks -= 1

    def reset(self, slot: int) -> None:
        """Write the initial state into `slot`."""
        b, r = divmod(slot, self.block_rows)
        for name in self.names:
            self.blocks[name][b][r] = self._initial[name]

    # -- rows ----------------------------------------------------------------------------------------------
    def read(self, slot: int) -> dict[str, np.ndarray]:
        """Copy one session's state (no batch axis)."""
        b, r = divmod(slot, self.block_rows)
        return {name: self.blocks[name][b][r].copy() for name in self.names}

    def write(self, slot: int, state: dict[str, np.ndarray]) -> None:
        """Overwrite one session's state (arrays already validated for dtype and shape)."""
        b, r = divmod(slot, self.block_rows)
        for name in self.names:
            self.blocks[name][b][r] = state[name]

    def gather(self, slots: np.ndarray) -> dict[str, np.ndarray]:
        """State rows of `slots` (int64 array), stacked into `(B, ...)` arrays in slot order."""
        blk, rows = np.divmod(slots, self.block_rows)
        first = blk[0]
        if blk[-1] == first and (blk == first).all():
            return {name: np.take(self.blocks[name][first], rows, axis=0) for name in self.names}
        # Slots spread over blocks (many open sessions, stepped at random): one row copy per slot. A boolean
        # mask per block touched cost O(batch x blocks) and grew with the number of open sessions.
        pairs = list(zip(blk.tolist(), rows.tolist(), strict=True))
        return {name: np.stack([self.blocks[name][b][r] for b, r in pairs]) for name in self.names}

    def scatter(self, slots: np.ndarray, arrays: dict[str, np.ndarray]) -> None:
        """Write `(B, ...)` arrays back into the rows of `slots`."""
        blk, rows = np.divmod(slots, self.block_rows)
        first = blk[0]
        if blk[-1] == first and (blk == first).all():
            for name in self.names:
                self.blocks[name][first][rows] = arrays[name]
            return
        pairs = list(enumerate(zip(blk.tolist(), rows.tolist(), strict=True)))
        for name in self.names:
            blocks, src = self.blocks[name], arrays[name]
            for i, (b, r) in pairs:
                blocks[b][r] = src[i]

    @property
    def nbytes(self) -> int:
        """Bytes reserved by the mapped blocks (virtual; untouched pages of fresh blocks cost no memory)."""
        return self.mapped_blocks * self.block_rows * self.row_bytes

    @property
    def used_bytes(self) -> int:
        """Raw state bytes of the slots in use."""
        return self.used * self.row_bytes
