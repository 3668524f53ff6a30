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
import struct
from array import array
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.core.types import ModelSpec

ID_BYTES = 64
TENANT_BYTES = 48
DIGEST_BYTES = 16
# id, tenant, last_seq, steps, gen, created_at, last_used, idle_ttl_s, charged_steps, digest flag, digest,
# cached-output timesteps (-1: no cached result)
_HEADER = struct.Struct(f"<B{ID_BYTES}sB{TENANT_BYTES}sqqqdddiB{DIGEST_BYTES}si")
HEADER_BYTES = _HEADER.size
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
    """The spill records of one model version (see the module docstring)."""

    def __init__(self, directory: Path, spec: ModelSpec, number: int, steps: int = 1) -> None:
        self.spec = spec
        self.number = number
        self.steps = steps  # cached-result timesteps a record has room for (a STEP_CLASSES entry)
        self.state_bytes = sum(s.row_bytes for s in spec.states)
        # Outputs with a dynamic dim (beyond batch and time) have no fixed size: such sessions stay resident.
        self.fixed_outputs = all(
            all(d is not None and d > 0 for d in t.shape[2 if t.time_axis else 1 :]) for t in spec.outputs
        )
        time_bytes = sum(_row_bytes(t.shape, t.dtype, True) for t in spec.outputs if t.time_axis)
        self.output_bytes = output_row_bytes(spec) + (steps - 1) * time_bytes
        self.record_bytes = HEADER_BYTES + self.state_bytes + self.output_bytes
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
        return sum(a.nbytes for a in outputs.values()) <= self.output_bytes

    def grows(self) -> int:
        """Bytes the file grows by if one more record is written now (0 when a freed record is reused)."""
        return 0 if self._free else self.record_bytes

    def write(self, rec: SpilledSession, deadline: float) -> int:
        """Write a record (into a freed one if any); return its number."""
        if self._free:
            n = self._free.pop()
        else:
            n = self.records
            self.records += 1
            if n >= len(self.deadlines):
                self.deadlines = np.concatenate([self.deadlines, np.full(len(self.deadlines), np.inf)])
        steps = -1 if rec.outputs is None else cached_steps(self.spec, rec.outputs)
        header = _HEADER.pack(
            *_text(rec.session_id, ID_BYTES),
            *_text(rec.tenant, TENANT_BYTES),
            rec.last_seq,
            rec.steps,
            rec.gen,
            rec.created_at,
            rec.last_used,
            rec.idle_ttl_s,
            rec.charged_steps,
            rec.digest is not None,
            rec.digest or b"",
            steps,
        )
        parts = [header]
        parts += [np.ascontiguousarray(rec.state[s.name]).tobytes() for s in self.spec.states]
        if rec.outputs is not None:
            parts += [np.ascontiguousarray(rec.outputs[t.name]).tobytes() for t in self.spec.outputs]
        os.pwrite(self._fd, b"".join(parts), n * self.record_bytes)
        self.deadlines[n] = deadline
        self.count += 1
        return n

    def read(self, n: int, *, state: bool = True) -> SpilledSession:
        """Read record `n` back (the header only when `state` is False)."""
        size = self.record_bytes if state else HEADER_BYTES
        buf = os.pread(self._fd, size, n * self.record_bytes)
        (
            id_len, sid, t_len, tenant, last_seq, steps, gen, created, used, ttl, charged, has_digest, digest,
            out_steps,
        ) = _HEADER.unpack_from(buf)  # fmt: skip
        rows: dict[str, np.ndarray] = {}
        outputs: dict[str, np.ndarray] | None = None
        if state:
            off = HEADER_BYTES
            for s in self.spec.states:
                count = int(np.prod(s.shape))
                rows[s.name] = np.frombuffer(buf, s.dtype, count, off).reshape(s.shape).copy()
                off += s.row_bytes
            if out_steps >= 0:
                outputs = {}
                for t in self.spec.outputs:
                    dims = [int(d or 0) for d in t.shape[2 if t.time_axis else 1 :]]  # all fixed (`fits`)
                    shape = tuple([out_steps] + dims if t.time_axis else dims)
                    count = int(np.prod(shape))
                    outputs[t.name] = np.frombuffer(buf, t.dtype, count, off).reshape(shape).copy()
                    off += count * t.dtype.itemsize
        return SpilledSession(
            sid[:id_len].decode(),
            tenant[:t_len].decode(),
            last_seq,
            steps,
            gen,
            created,
            used,
            ttl,
            charged,
            digest if has_digest else None,
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


def _text(value: str, room: int) -> tuple[int, bytes]:
    data = value.encode()
    return len(data), data.ljust(room, b"\0")


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
