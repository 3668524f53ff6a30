"""Which worker owns a KServe sequence: a small hash table in a file that every worker maps (`mmap`).

A sequence belongs to the worker that received its START (its client sends the sequence's calls over one
channel, one connection, so that worker also receives the rest), or to the worker that resumed it from the
shared store. That worker records itself here before the START is answered; a worker that receives a step of
a sequence it does not own reads the owner here and forwards the call (`service.server.routing`). No call
between processes is needed to find an owner.

Layout: one 8-byte header word (slots in use), then a power of two of 8-byte slots, linear probing. A slot is
one word, `fingerprint << 8 | (owner + 1)`, 0 = empty, where the fingerprint is 56 bits of BLAKE2b over
(tenant, model, sequence id); its low bits pick the home slot. Entries are removed by backward shifting, so
probe chains stay short and there are no tombstones.

Concurrency. Writers (claim, release) hold `flock` on the file; Linux drops it when a worker dies, so a
killed worker cannot wedge the table. A slot is written with one aligned 8-byte store (a `memoryview` item of
format "Q"), so a reader never sees half a slot. Readers probe without the lock: a hit is an entry that was
there a moment ago; a miss is checked again under a shared lock (a removal may have been shifting the entry
meanwhile). A reader's answer can be stale only against a call that was in flight at the same time (two calls
of one sequence sent concurrently on two channels have no order anyway); an owner that receives a step for a
sequence it no longer owns answers as for an ended sequence, never from an old copy.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
from pathlib import Path

import numpy as np

from service.errors import ResourceExhausted

OWNER_TABLE = "owners"  # its file in the workers' run directory (made by the supervisor)
MAX_WORKERS = 255  # the owner is one byte (owner + 1; 0 marks an empty slot)
_HEADER = 8
_MAX_LOAD = 0.75  # linear probing stays short below this; claims beyond it are refused
_MAX_REMEMBERED = 65_536  # fingerprints kept per worker (then forgotten all at once and computed again)


def sequence_hash(tenant: str, model: str, sequence_id: int | str) -> int:
    """Return the table's 56-bit fingerprint of a sequence (ids are per tenant and model; 5, "5" differ)."""
    kind = "s" if isinstance(sequence_id, str) else "i"
    data = f"{tenant}\x00{model}\x00{kind}{sequence_id}".encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(data, digest_size=7).digest(), "little") or 1


def create_table(path: Path, slots: int) -> None:
    """Create an empty table of `slots` (a power of two) at `path` (the supervisor, before any worker)."""
    if slots < 2 or slots & (slots - 1):
        raise ValueError(f"owner table slots must be a power of two >= 2, got {slots}")
    with open(path, "wb") as f:
        f.truncate(_HEADER + 8 * slots)  # a sparse file: pages are allocated as slots are written


class OwnerTable:
    """Worker `me`'s view of the shared sequence-owner table (module docstring)."""

    def __init__(self, path: Path, me: int) -> None:
        self.path = path
        self.me = me
        self._fd = os.open(path, os.O_RDWR)
        self._mm = mmap.mmap(self._fd, os.fstat(self._fd).st_size)
        view = memoryview(self._mm)
        self._count = view[:_HEADER].cast("Q")
        self._words = view[_HEADER:].cast("Q")
        self.slots = len(self._words)
        self._mask = self.slots - 1
        self._limit = int(self.slots * _MAX_LOAD)
        self._mine = self.me + 1
        self._fps: dict[tuple[str, str, int | str], int] = {}  # fingerprints of recent sequences

    def fingerprint(self, tenant: str, model: str, sequence_id: int | str) -> int:
        """`sequence_hash`, remembered for the sequences seen lately (a step's routing pays a dict lookup)."""
        key = (tenant, model, sequence_id)
        fp = self._fps.get(key)
        if fp is None:
            if len(self._fps) >= _MAX_REMEMBERED:
                self._fps.clear()
            fp = self._fps[key] = sequence_hash(tenant, model, sequence_id)
        return fp

    def close(self) -> None:
        """Unmap the table (views first: an mmap with exported buffers cannot close)."""
        self._count.release()
        self._words.release()
        self._mm.close()
        os.close(self._fd)

    # -- reading -----------------------------------------------------------------------------------------

    def _probe(self, fp: int) -> tuple[int, int]:
        """(slot, word) of `fp`'s entry, or (-1, 0)."""
        words, mask = self._words, self._mask
        i = fp & mask
        for _ in range(self.slots):
            w = words[i]
            if w == 0:
                return -1, 0
            if w >> 8 == fp:
                return i, w
            i = (i + 1) & mask
        return -1, 0

    def _find(self, fp: int) -> tuple[int, int]:
        found = self._probe(fp)
        if found[0] < 0:  # perhaps shifted by a removal under way: look again under the lock
            with _Locked(self._fd, fcntl.LOCK_SH):
                found = self._probe(fp)
        return found

    def owner(self, fp: int) -> int | None:
        """Return the worker that owns the sequence, or None (no worker holds it)."""
        slot, word = self._find(fp)
        return None if slot < 0 else (word & 0xFF) - 1

    def holds(self, fp: int, slot: int) -> tuple[bool, int]:
        """(whether this worker still owns the sequence, its slot now); `slot` is the last one seen."""
        if 0 <= slot < self.slots and self._words[slot] == (fp << 8 | self._mine):
            return True, slot
        slot, word = self._find(fp)
        return slot >= 0 and word & 0xFF == self._mine, slot

    # -- writing (under the lock) ------------------------------------------------------------------------

    def claim(self, fp: int) -> tuple[int | None, int]:
        """Make this worker the owner; return (the previous owner or None, the slot)."""
        with _Locked(self._fd, fcntl.LOCK_EX):
            slot, word = self._probe(fp)
            if slot >= 0:
                self._words[slot] = fp << 8 | self._mine
                return (word & 0xFF) - 1, slot
            if self._count[0] >= self._limit:
                raise ResourceExhausted(
                    f"the workers' sequence owner table is full ({self._count[0]} live sequences in "
                    f"{self.slots} slots); raise --owner-table-slots or end sequences with sequence_end"
                )
            words, mask = self._words, self._mask
            slot = fp & mask
            while words[slot] != 0:
                slot = (slot + 1) & mask
            words[slot] = fp << 8 | self._mine
            self._count[0] += 1
            return None, slot

    def release(self, fp: int) -> None:
        """Forget the sequence if this worker owns it (another worker's later claim stands)."""
        with _Locked(self._fd, fcntl.LOCK_EX):
            slot, word = self._probe(fp)
            while slot >= 0 and word & 0xFF == self._mine:
                self._remove(slot)
                slot, word = self._probe(fp)  # a duplicate left by a worker killed mid-removal

    def release_all(self, owner: int) -> int:
        """Forget every sequence `owner` holds (its replacement starts empty); return how many."""
        with _Locked(self._fd, fcntl.LOCK_EX):
            words = np.frombuffer(self._mm, dtype=np.uint64, offset=_HEADER)
            hits = words[(words != 0) & ((words & np.uint64(0xFF)) == np.uint64(owner + 1))]
            fps = [int(w) >> 8 for w in hits]
            del words  # no exported buffer may outlive this call (close() needs none)
            for fp in fps:
                slot, word = self._probe(fp)
                if slot >= 0 and word & 0xFF == owner + 1:
                    self._remove(slot)
            return len(fps)

    def _remove(self, slot: int) -> None:
        """Empty `slot`, shifting later entries of its probe chain back (no tombstones)."""
        words, mask = self._words, self._mask
        hole, j = slot, slot
        while True:
            j = (j + 1) & mask
            w = words[j]
            if w == 0:
                break
            home = (w >> 8) & mask
            if (j - home) & mask >= (j - hole) & mask:  # its home is at or before the hole: move it back
                words[hole] = w
                hole = j
        words[hole] = 0
        self._count[0] = max(self._count[0] - 1, 0)


class _Locked:
    """`flock` held for a `with` block."""

    __slots__ = ("_fd", "_how")

    def __init__(self, fd: int, how: int) -> None:
        self._fd, self._how = fd, how

    def __enter__(self) -> None:
        fcntl.flock(self._fd, self._how)

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)
