"""`StateSlab`: the recurrent state of every session of one model version, one row per session slot.

Each state tensor lives in fixed-size blocks of `block_rows` rows that are allocated once and never copied or
moved: growing adds a block, so memory stays ~ rows x state bytes (plus at most one partly used block), and
`np.zeros` pages untouched rows lazily. A batch is a gather of its rows (`np.take`) and a scatter back, with a
vectorised fast path when every slot sits in one block (the common case).
"""

from __future__ import annotations

import numpy as np

from service.core.types import StateSpec

DEFAULT_BLOCK_BYTES = 4 * 1024 * 1024


def block_rows_for(states: tuple[StateSpec, ...], block_bytes: int = DEFAULT_BLOCK_BYTES) -> int:
    """Rows per block so the largest state's block is about `block_bytes` (between 64 and 65,536 rows)."""
    widest = max((s.row_bytes for s in states), default=1) or 1
    return int(min(65536, max(64, block_bytes // widest)))


class StateSlab:
    """Preallocated state rows of one model version; slots come from a free list (lowest first)."""

    def __init__(self, states: tuple[StateSpec, ...], block_rows: int | None = None) -> None:
        self.states = states
        self.names = tuple(s.name for s in states)
        self.block_rows = block_rows or block_rows_for(states)
        self.blocks: dict[str, list[np.ndarray]] = {s.name: [] for s in states}
        self._initial = {
            s.name: (s.initial if s.initial is not None else np.zeros(s.shape, s.dtype)) for s in states
        }
        # Zero initial rows need no write at allocation: fresh blocks are zeros and reset() zeroes rows.
        self._nonzero_initial = tuple(s.name for s in states if s.initial is not None and np.any(s.initial))
        self._free: list[int] = []
        self.capacity = 0
        self.used = 0
        self.row_bytes = sum(s.row_bytes for s in states)

    # -- slots ---------------------------------------------------------------------------------------------
    def _grow(self) -> None:
        for s in self.states:
            self.blocks[s.name].append(np.zeros((self.block_rows, *s.shape), s.dtype))
        start = self.capacity
        self.capacity += self.block_rows
        self._free.extend(range(self.capacity - 1, start - 1, -1))  # pop() hands out the lowest slot first

    def alloc(self) -> int:
        """Take a free slot holding the initial state."""
        if not self._free:
            self._grow()
        slot = self._free.pop()
        self.used += 1
        if self._nonzero_initial:
            b, r = divmod(slot, self.block_rows)
            for name in self._nonzero_initial:
                self.blocks[name][b][r] = self._initial[name]
        return slot

    def free(self, slot: int) -> None:
        """Return a slot; its row is reset so a reused slot never leaks an old session's state."""
        self.reset(slot)
        self._free.append(slot)
        self.used -= 1

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
        """Bytes reserved by the blocks (virtual; untouched pages of fresh blocks cost no resident memory)."""
        return self.capacity * self.row_bytes

    @property
    def used_bytes(self) -> int:
        """Raw state bytes of the slots in use."""
        return self.used * self.row_bytes
