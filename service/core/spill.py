"""`SpillFile`: idle sessions of one model version, one fixed-size record each, in a file on local disk.

A record holds everything a resident session holds: its state rows, seq, step count, times, idle TTL, tenant,
the digest of its last chunk's inputs and the cached outputs of that chunk (exactly-once retries are answered
from them after a resume as before). Records are written with `pwrite` and read with `pread`: the file is
never mapped into the process, so its pages sit in the kernel's page cache (reclaimable, not this process's
RSS). Freed records are reused (a stack of free record numbers); the file does not shrink. A model version has
one file per size class of cached result (`STEP_CLASSES`: its last chunk's timesteps), so a record has room
for exactly its class and the common one-step session's record is its state plus one step of outputs.

The file is unlinked as soon as it is opened: spilled sessions live exactly as long as resident ones (the
process), so nothing is left behind by a crash and nothing on disk needs recovery. The only per-session data
in memory are the id -> record entry of `Tiering.where` and one float64 (the expiry deadline) here.
"""

from __future__ import annotations

import os
from array import array
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.core.types import ModelSpec

ID_BYTES = 64
TENANT_BYTES = 48
DIGEST_BYTES = 16
# The record header (packed, little-endian); a record is the header, the state rows, then room for the cached
# outputs of `steps` timesteps. Built and parsed as numpy structured arrays: a turn of the spiller fills the
# records of hundreds of sessions column by column and writes them with one `pwrite`.
_HEADER_FIELDS = [
    ("id", f"S{ID_BYTES}"),
    ("tenant", f"S{TENANT_BYTES}"),
    ("last_seq", "<i8"),
    ("steps", "<i8"),
    ("gen", "<i8"),
    ("created_at", "<f8"),
    ("last_used", "<f8"),
    ("idle_ttl_s", "<f8"),
    ("charged_steps", "<i4"),
    ("has_digest", "u1"),
    ("digest", f"S{DIGEST_BYTES}"),
    ("out_steps", "<i4"),  # timesteps of the cached result; -1: none
]
HEADER_BYTES = np.dtype(_HEADER_FIELDS).itemsize
STEP_CLASSES = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536)  # cached-result timesteps a record has room for


def step_class(steps: int) -> int | None:
    """Return the smallest step class holding `steps` cached timesteps (None: longer than any)."""
    for c in STEP_CLASSES:
        if steps <= c:
            return c
    return None


@dataclass(slots=True)
class SpilledSession:
    """One session as read back from its record (monotonic times, as `table.Session` keeps them)."""

    session_id: str
    tenant: str
    last_seq: int
    steps: int
    gen: int
    created_at: float
    last_used: float
    idle_ttl_s: float
    charged_steps: int
    digest: bytes | None
    state: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray] | None


class SpillFile:
    """The spill records of one model version and step class (see the module docstring)."""

    def __init__(self, directory: Path, spec: ModelSpec, number: int, steps: int = 1) -> None:
        self.spec = spec
        self.number = number
        self.steps = steps  # cached-result timesteps a record has room for (a STEP_CLASSES entry)
        # Outputs with a dynamic dim (beyond batch and time) have no fixed size: such sessions stay resident.
        self.fixed_outputs = all(
            all(d is not None and d > 0 for d in t.shape[2 if t.time_axis else 1 :]) for t in spec.outputs
        )
        fields: list[tuple] = list(_HEADER_FIELDS)
        fields += [("s_" + st.name, st.dtype.newbyteorder("<"), st.shape) for st in spec.states]
        if self.fixed_outputs:
            for t in spec.outputs:
                dims = tuple(int(d or 0) for d in t.shape[2 if t.time_axis else 1 :])
                room = ((steps,) if t.time_axis else ()) + dims
                fields.append(("o_" + t.name, t.dtype.newbyteorder("<"), room))
        self.dtype = np.dtype(fields)
        self.record_bytes = self.dtype.itemsize
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"spill-{os.getpid()}-{number}-{spec.name}-v{spec.version}-{steps}.bin"
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.unlink(path)  # lives as long as the descriptor: nothing outlives the process
        self._free = array("q")
        self.records = 0  # high-water mark: records the file has room for
        self.count = 0
        self.deadlines = np.full(1024, np.inf)  # per record: monotonic expiry time; inf = free

    # -- records -------------------------------------------------------------------------------------------
    def fits(self, session_id: str, tenant: str, outputs: dict[str, np.ndarray] | None) -> bool:
        """Tell whether a session fits one record (id, tenant and its cached outputs within their room)."""
        if len(session_id.encode()) > ID_BYTES or len(tenant.encode()) > TENANT_BYTES:
            return False
        if "\0" in session_id or "\0" in tenant:
            return False  # fixed-width text fields end at the first NUL
        if outputs is None:
            return True
        if not self.fixed_outputs:
            return False
        steps = cached_steps(self.spec, outputs)
        if steps > self.steps:
            return False
        for t in self.spec.outputs:
            a = outputs.get(t.name)
            want = ((steps,) if t.time_axis else ()) + tuple(t.shape[2 if t.time_axis else 1 :])
            if a is None or a.dtype != t.dtype or a.shape != want:
                return False
        return True

    def room(self, k: int, bytes_left: int) -> int:
        """How many of `k` new records fit when the file may grow by at most `bytes_left`."""
        grow = max(0, bytes_left) // self.record_bytes
        return min(k, len(self._free) + grow)

    def growth(self, k: int) -> int:
        """Bytes the file grows by when `k` records are stored now (freed records are reused first)."""
        return max(0, k - len(self._free)) * self.record_bytes

    def blank(self, k: int) -> np.ndarray:
        """Return `k` zeroed records to fill (structured array of this file's record type)."""
        return np.zeros(k, self.dtype)

    def store(self, recs: np.ndarray, deadlines: np.ndarray) -> np.ndarray:
        """Write filled records (freed ones reused first, the rest appended with one write); their numbers."""
        k = len(recs)
        reuse = min(k, len(self._free))
        numbers = np.empty(k, np.int64)
        for i in range(reuse):
            n = numbers[i] = self._free.pop()
            os.pwrite(self._fd, recs[i : i + 1].tobytes(), n * self.record_bytes)
        if reuse < k:
            first = self.records
            numbers[reuse:] = np.arange(first, first + k - reuse)
            self.records += k - reuse
            if self.records > len(self.deadlines):
                grown = np.full(max(self.records, 2 * len(self.deadlines)), np.inf)
                grown[: len(self.deadlines)] = self.deadlines
                self.deadlines = grown
            os.pwrite(self._fd, recs[reuse:].tobytes(), first * self.record_bytes)
        self.deadlines[numbers] = deadlines
        self.count += k
        return numbers

    def read(self, n: int, *, state: bool = True) -> SpilledSession:
        """Read record `n` back (the header only when `state` is False)."""
        size = self.record_bytes if state else HEADER_BYTES
        buf = os.pread(self._fd, size, n * self.record_bytes)
        if state:
            rec = np.frombuffer(buf, self.dtype, 1)[0]
        else:
            rec = np.frombuffer(buf, np.dtype(_HEADER_FIELDS), 1)[0]
        rows: dict[str, np.ndarray] = {}
        outputs: dict[str, np.ndarray] | None = None
        out_steps = int(rec["out_steps"])
        if state:
            for st in self.spec.states:
                rows[st.name] = np.array(rec["s_" + st.name], dtype=st.dtype)
            if out_steps >= 0:
                outputs = {}
                for t in self.spec.outputs:
                    room = rec["o_" + t.name]
                    outputs[t.name] = np.array(room[:out_steps] if t.time_axis else room, dtype=t.dtype)
        return SpilledSession(
            rec["id"].decode(),
            rec["tenant"].decode(),
            int(rec["last_seq"]),
            int(rec["steps"]),
            int(rec["gen"]),
            float(rec["created_at"]),
            float(rec["last_used"]),
            float(rec["idle_ttl_s"]),
            int(rec["charged_steps"]),
            bytes(rec["digest"]).ljust(DIGEST_BYTES, b"\0") if rec["has_digest"] else None,
            rows,
            outputs,
        )

    def free(self, n: int) -> None:
        """Forget record `n` (its room is reused by the next write)."""
        self.deadlines[n] = np.inf
        self._free.append(n)
        self.count -= 1

    def expired(self, now: float) -> np.ndarray:
        """Record numbers whose deadline has passed (a vectorised scan: ~1 ms per million records)."""
        return np.flatnonzero(self.deadlines[: self.records] <= now)

    @property
    def disk_bytes(self) -> int:
        """Bytes the file holds on disk (allocated blocks)."""
        return os.fstat(self._fd).st_blocks * 512

    @property
    def size_bytes(self) -> int:
        """The file's length: records ever needed at once x record size."""
        return self.records * self.record_bytes

    def close(self) -> None:
        """Release the file (its blocks go back to the file system)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def output_row_bytes(spec: ModelSpec) -> int:
    """Return the bytes of one timestep of a session's outputs: what a cached result costs per step."""
    return sum(_row_bytes(t.shape, t.dtype, t.time_axis) for t in spec.outputs)


def _row_bytes(shape: tuple, dtype: np.dtype, time_axis: bool) -> int:
    n = 1
    for d in shape[2 if time_axis else 1 :]:
        n *= d if d is not None and d > 0 else 1
    return n * dtype.itemsize


def cached_steps(spec: ModelSpec, outputs: dict[str, np.ndarray]) -> int:
    """Return the timesteps of a cached result (0 for a model without a time axis)."""
    for t in spec.outputs:
        if t.time_axis:
            return int(outputs[t.name].shape[0])
    return 0
