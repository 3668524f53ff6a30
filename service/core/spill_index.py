"""`SpillIndex`: spilled session id -> record code, in two flat numpy arrays (no Python object per session).

An open-addressing hash table (linear probing) of 64-bit keys: the key is the process's own string hash of the
session id (SipHash, salted per process), the value the record's code (`tiering`). A dict of a million str
keys would keep a million str objects alive (and the slots of the dict); this costs 16 bytes per slot at a
load factor between one quarter and one half. Keys are not ids: two ids with the same 64-bit hash cannot
both be in the index (`put` refuses the second, which simply stays resident), and every hit is confirmed
against the id stored in the record it points to, so a lookup never returns another session's record.
"""

from __future__ import annotations

import numpy as np

_EMPTY, _DELETED = 0, 1
_MASK = (1 << 64) - 1


def key_of(session_id: str) -> int:
    """Return the 64-bit key of a session id (never the empty or deleted marker)."""
    k = hash(session_id) & _MASK
    return k if k > _DELETED else k + 2


class SpillIndex:
    """Hash table of uint64 key -> int64 value (see the module docstring)."""

    def __init__(self, capacity: int = 1024) -> None:
        self._keys = np.zeros(capacity, np.uint64)
        self._vals = np.zeros(capacity, np.int64)
        self._mask = capacity - 1
        self._count = 0  # live entries
        self._filled = 0  # live + deleted markers (what probing walks over)

    def __len__(self) -> int:
        return self._count

    def __contains__(self, session_id: object) -> bool:
        return isinstance(session_id, str) and self.get(session_id) is not None

    @property
    def nbytes(self) -> int:
        """Bytes of the two arrays."""
        return self._keys.nbytes + self._vals.nbytes

    def _find(self, key: int) -> int:
        keys, i, mask = self._keys, key & self._mask, self._mask
        k = np.uint64(key)
        while True:
            at = keys[i]
            if at == k:
                return i
            if at == _EMPTY:
                return -1
            i = (i + 1) & mask

    def get(self, session_id: str) -> int | None:
        """Return the value stored for this id's key, or None."""
        if not self._count:
            return None
        i = self._find(key_of(session_id))
        return None if i < 0 else int(self._vals[i])

    def put(self, session_id: str, value: int) -> bool:
        """Store `value` for a new id; False (nothing stored) if its key is already taken."""
        key = key_of(session_id)
        if self._count and self._find(key) >= 0:
            return False
        if (self._filled + 1) * 2 > len(self._keys):
            self._resize(max(1024, 2 * (self._count + 1)))  # load factor 1/4 to 1/2
        keys, i, mask = self._keys, key & self._mask, self._mask
        while keys[i] > _DELETED:
            i = (i + 1) & mask
        if keys[i] == _EMPTY:
            self._filled += 1
        keys[i] = key
        self._vals[i] = value
        self._count += 1
        return True

    def pop(self, session_id: str) -> int | None:
        """Remove an id's entry; return its value, or None if absent."""
        if not self._count:
            return None
        i = self._find(key_of(session_id))
        if i < 0:
            return None
        self._keys[i] = _DELETED
        self._count -= 1
        value = int(self._vals[i])
        if self._count * 8 < len(self._keys) and len(self._keys) > 1024:
            self._resize(max(1024, 4 * self._count))  # shrink: a drained index gives its memory back
        return value

    def _resize(self, want: int) -> None:
        capacity = 1 << max(10, (want - 1).bit_length())
        live = self._keys > _DELETED
        keys, vals = self._keys[live], self._vals[live]
        self._keys = np.zeros(capacity, np.uint64)
        self._vals = np.zeros(capacity, np.int64)
        self._mask = mask = capacity - 1
        self._filled = self._count = len(keys)
        # Vectorised linear probing: each round places, for every free target slot, one pending key.
        pos = (keys & np.uint64(mask)).astype(np.int64)
        pending = np.arange(len(keys))
        while pending.size:
            p = pos[pending]
            free = self._keys[p] == _EMPTY
            slots, first = np.unique(p[free], return_index=True)
            winners = pending[free][first]
            self._keys[slots] = keys[winners]
            self._vals[slots] = vals[winners]
            placed = np.zeros(len(keys), bool)
            placed[winners] = True
            pending = pending[~placed[pending]]
            pos[pending] = (pos[pending] + 1) & mask
