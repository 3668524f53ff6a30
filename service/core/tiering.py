"""Idle-session tiering: sessions idle past `spill_after_s` leave the resident slab and come back on next use.

Two tiers below the slab (docs/DESIGN.md, "Spill tier"):

- the local spill tier (`spill.SpillFile`, one record file per model version), when sessions live only here;
- the shared store, when it is on (`store: redis`): every applied step is already saved there, so spilling is
  dropping the resident copy of a session with nothing unsaved, and the next call resumes it from the store
  exactly as a failover does (`SessionManager.get`).

A spilled session keeps no Python object: its only trace in memory is one slot of `Tiering.where` (a
`spill_index.SpillIndex`: 64-bit key of its id -> file and record number, in flat arrays) and its expiry
deadline in a float64 array. Everything else (state, seq, cached outputs, tenant, times) is in its record,
read back by `resume`, `describe` and the expiry scan. Spilled sessions still count as open (max_sessions,
tenant session quotas) but not against the memory budget, which counts resident bytes only; the spill tier
has its own disk budget (`spill_max_bytes`).

The spiller runs on the event loop in turns of at most `spill_batch` sessions and sleeps so that it takes at
most `spill_duty` of the loop's time; a session with anything in flight is never spilled, and everything runs
on the loop, so no step can interleave with a spill or a resume.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from service.config import Settings
from service.core import limits
from service.core.admission import SESSION_OVERHEAD_BYTES, Admission
from service.core.inputs import input_digest
from service.core.registry import ModelVersion
from service.core.spill import SpilledSession, SpillFile, cached_steps, output_row_bytes, step_class
from service.core.spill_index import SpillIndex
from service.core.table import SPILLED, Session, SessionTable
from service.core.tenancy import CALLER
from service.core.types import SessionInfo, StepResult
from service.metrics import Metrics

_log = logging.getLogger(__name__)
_FILE_BITS = 12  # Tiering.where packs (record << 12) | file number: 4,096 files (version x step class)


class Tiering:
    """The spill tier of one server process and its spiller (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        table: SessionTable,
        admission: Admission,
        unpin: Callable[[ModelVersion], None],
        versions: Callable[[], list[ModelVersion]],
        persist: bool,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.table = table
        self.admission = admission
        self.unpin = unpin
        self.versions = versions  # the loaded model versions (their configs say when to spill)
        self.persist = persist
        self.where = SpillIndex()  # spilled session id -> (record << 12) | file number
        self.files: list[SpillFile] = []
        self._versions: list[ModelVersion] = []  # by file number
        self._file_of: dict[tuple[int, int], int] = {}  # (id(model version), step class) -> file number
        self._dir: Path | None = settings.spill_dir
        self.disk_bytes = 0
        self.drop_resident: Callable[[Session], None] | None = None  # store mode: SessionManager.end
        self._refused = {r: metrics.spill_refusals.labels(r) for r in ("disk_full", "too_large")}
        self._spilled_disk = metrics.spills.labels("disk")
        self._spilled_store = metrics.spills.labels("store")
        self._peak = 0  # most resident sessions since the table's dicts were last compacted
        metrics.spill_budget_bytes.set(settings.spill_max_bytes)

    # -- spilling --------------------------------------------------------------------------------------------
    def candidates(self, now: float, limit: int) -> list[Session]:
        """Return up to `limit` resident sessions idle past their model's spill_after_s (LRU first)."""
        floor = self._min_threshold()
        if floor is None:
            return []
        out: list[Session] = []
        for s in self.table.idle(now - floor):
            after = s.mv.spec.config.spill_after_s
            if after > 0 and now - s.last_used >= after and s.mv.slab is not None:
                out.append(s)
                if len(out) >= limit:
                    break
        return out

    def _min_threshold(self) -> float | None:
        positive = [t for mv in self.versions() if (t := mv.spec.config.spill_after_s) > 0]
        return min(positive) if positive else None

    def spill(self, sessions: list[Session], now: float) -> int:
        """Move these resident, idle sessions out of memory; return how many moved."""
        moved = 0
        by_version: dict[int, list[Session]] = {}
        for s in sessions:
            if self.table.sessions.get(s.session_id) is s and s.pending is None:
                by_version.setdefault(id(s.mv), []).append(s)
        for group in by_version.values():
            moved += self._spill_store(group) if self.persist else self._spill_disk(group, now)
        return moved

    def _spill_store(self, group: list[Session]) -> int:
        moved = 0
        for s in group:
            if s.unsaved == 0 and self.drop_resident is not None:  # the store holds exactly this copy
                self.drop_resident(s)
                self._spilled_store.inc()
                moved += 1
        return moved

    def _spill_disk(self, group: list[Session], now: float) -> int:
        """Spill sessions of one model version: records built column-wise, one write per file and turn."""
        mv = group[0].mv
        by_file: dict[int, tuple[SpillFile, list[Session], list[dict[str, np.ndarray] | None]]] = {}
        for s in group:
            last = s.last_result
            if last is None:
                outputs = None
            elif isinstance(last, StepResult):
                outputs = last.outputs
            else:
                arrays, row = last
                outputs = {t.name: a[row] for t, a in zip(mv.spec.outputs, arrays, strict=True)}
            steps = step_class(cached_steps(mv.spec, outputs) if outputs is not None else 1)
            file = self._file(mv, steps) if steps is not None else None
            if file is None or not file.fits(s.session_id, s.tenant, outputs) or s.session_id in self.where:
                self._refused["too_large"].inc()  # (or another spilled id has the same 64-bit key)
                continue
            entry = by_file.setdefault(file.number, (file, [], []))
            entry[1].append(s)
            entry[2].append(outputs)
        moved = 0
        for file, sessions, outs in by_file.values():
            k = file.room(len(sessions), self.settings.spill_max_bytes - self.disk_bytes)
            if k < len(sessions):
                self._refused["disk_full"].inc(len(sessions) - k)
                del sessions[k:], outs[k:]
            if k:
                self._write(file, mv, sessions, outs)
                moved += k
        self._spilled_disk.inc(moved)
        self._publish()
        return moved

    def _write(
        self,
        file: SpillFile,
        mv: ModelVersion,
        sessions: list[Session],
        outputs: list[dict[str, np.ndarray] | None],
    ) -> None:
        spec, k = mv.spec, len(sessions)
        recs = file.blank(k)
        recs["id"] = [s.session_id.encode() for s in sessions]
        recs["tenant"] = [s.tenant.encode() for s in sessions]
        for field in ("last_seq", "steps", "gen", "created_at", "last_used", "idle_ttl_s", "charged_steps"):
            recs[field] = [getattr(s, field) for s in sessions]
        digests = [
            input_digest(spec, seen) if isinstance(seen := s.last_inputs, tuple) else seen for s in sessions
        ]
        recs["has_digest"] = [d is not None for d in digests]
        recs["digest"] = [d or b"" for d in digests]
        rows = mv.slab.gather(np.fromiter((s.slot for s in sessions), np.int64, k))
        for st in spec.states:
            recs["s_" + st.name] = rows[st.name]
        out_steps = recs["out_steps"]
        out_steps[:] = -1
        for i, out in enumerate(outputs):
            if out is not None:
                n = cached_steps(spec, out)
                out_steps[i] = n
                for t in spec.outputs:
                    if t.time_axis:
                        recs["o_" + t.name][i, :n] = out[t.name]
                    else:
                        recs["o_" + t.name][i] = out[t.name]
        created = recs["created_at"]
        deadlines = np.minimum(recs["last_used"] + recs["idle_ttl_s"], created + self.settings.max_lifetime_s)
        self.disk_bytes += file.growth(k)
        numbers = file.store(recs, deadlines)
        where, table, slab, release = self.where, self.table, mv.slab, self.admission.release
        charges: dict[str, int] = {}
        for s, n in zip(sessions, numbers.tolist(), strict=True):
            where.put(s.session_id, (n << _FILE_BITS) | file.number)
            table.detach(s)
            charges[s.tenant] = charges.get(s.tenant, 0) + s.charge
            s.charge = 0
            slab.free(s.slot)
        for tenant, nbytes in charges.items():
            release(tenant, nbytes)

    def _file(self, mv: ModelVersion, steps: int) -> SpillFile | None:
        number = self._file_of.get((id(mv), steps))
        if number is not None:
            return self.files[number]
        if len(self.files) >= 1 << _FILE_BITS:
            return None  # that many (version, step class) files in one process: keep the rest resident
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="rnnserve-spill-"))
        file = SpillFile(self._dir, mv.spec, len(self.files), steps)
        self.files.append(file)
        self._versions.append(mv)
        self._file_of[(id(mv), steps)] = file.number
        return file

    def _publish(self) -> None:
        self.metrics.spilled_sessions.set(len(self.where))
        self.metrics.spill_disk_bytes.set(self.disk_bytes)

    async def run(self) -> None:
        """Spill idle sessions in turns, taking at most `spill_duty` of the loop (the spiller task)."""
        settings = self.settings
        idle_wait = max(0.05, min(1.0, settings.spill_after_s / 10 if settings.spill_after_s else 1.0))
        while True:
            await asyncio.sleep(idle_wait)
            wave = 0
            while True:
                self._peak = max(self._peak, len(self.table.sessions))
                t0 = time.perf_counter()
                batch = self.candidates(time.monotonic(), settings.spill_batch)
                moved = self.spill(batch, time.monotonic()) if batch else 0
                if not moved:
                    break
                wave += moved
                work = time.perf_counter() - t0
                await asyncio.sleep(work * (1 / settings.spill_duty - 1))
            if wave:
                await self._give_back()

    async def _give_back(self) -> None:
        """After a wave of spills, hand the memory the spilled sessions held back to the OS.

        The table's dicts keep their peak size until rebuilt; freed small objects go back to glibc's heap,
        which keeps them until `malloc_trim` (run off the loop: it walks the heap).
        """
        resident = len(self.table.sessions)
        if self._peak > 4 * max(resident, 1024):
            self.table.compact()
            self._peak = resident
        await asyncio.to_thread(limits.trim_memory)

    # -- coming back -----------------------------------------------------------------------------------------
    def locate(self, session_id: str) -> tuple[SpillFile, int] | None:
        """Return the file and record number of a spilled session, or None."""
        code = self.where.get(session_id) if isinstance(session_id, str) else None
        if code is None:
            return None
        return self.files[code & ((1 << _FILE_BITS) - 1)], code >> _FILE_BITS

    def _read(self, session_id: str, *, state: bool) -> tuple[SpillFile, int, SpilledSession] | None:
        found = self.locate(session_id)
        if found is None:
            return None
        file, n = found
        rec = file.read(n, state=state)
        if rec.session_id != session_id:  # another id with the same key: not this one
            return None
        return file, n, rec

    def resume(self, session_id: str) -> Session | None:
        """Bring a spilled session of the calling tenant back into the slab; None if it is not spilled here.

        Charged to the memory budget like any resident session: RESOURCE_EXHAUSTED (the session stays
        spilled) when it does not fit.
        """
        found = self._read(session_id, state=True)
        if found is None:
            return None
        file, n, rec = found
        if rec.tenant != CALLER.get().tenant:
            return None
        mv = self._versions[file.number]
        steps = max(1, rec.charged_steps)
        charge = SESSION_OVERHEAD_BYTES + mv.slab.row_bytes + steps * output_row_bytes(mv.spec)
        self.admission.regain(rec.tenant, charge)
        s = Session(session_id, mv, mv.slab.alloc(), rec.idle_ttl_s, SPILLED, rec.tenant)
        mv.slab.write(s.slot, rec.state)
        s.charge, s.charged_steps = charge, steps
        s.last_seq, s.steps, s.gen = rec.last_seq, rec.steps, rec.gen
        s.created_at = rec.created_at
        s.last_used = time.monotonic()  # a resume is a use (it sits at the recent end of its bucket)
        s.last_inputs = rec.digest
        if rec.outputs is not None:
            s.last_result = StepResult(rec.last_seq, rec.outputs, False)
        self.where.pop(session_id)
        file.free(n)
        self.table.attach(s)
        self.metrics.unspills.inc()
        self._publish()
        return s

    def describe(self, session_id: str, wall_offset: float) -> SessionInfo | None:
        """Return the client's view of a spilled session of the calling tenant (from its record), or None."""
        found = self._read(session_id, state=False)
        if found is None:
            return None
        file, n, rec = found
        if rec.tenant != CALLER.get().tenant:
            return None
        spec = file.spec
        deadline = float(file.deadlines[n])
        return SessionInfo(
            session_id,
            spec.name,
            spec.version,
            rec.last_seq,
            rec.created_at + wall_offset,
            rec.last_used + wall_offset,
            rec.idle_ttl_s,
            deadline + wall_offset,
            rec.steps,
            "spilled",
            max(0.0, deadline - time.monotonic()),
        )

    # -- ending ----------------------------------------------------------------------------------------------
    def drop(self, session_id: str, reason: str) -> bool:
        """End a spilled session (closed, expired): free its record, uncount it; False if not spilled."""
        found = self._read(session_id, state=False)
        if found is None:
            return False
        file, n, rec = found
        mv = self._versions[file.number]
        self.where.pop(session_id)
        file.free(n)
        self.table.drop_spilled(session_id, mv.spec.name, rec.tenant, reason)
        self.admission.close(rec.tenant, 0)
        self.metrics.sessions_ended.labels(mv.spec.name, reason).inc()
        self.unpin(mv)
        self._publish()
        return True

    def expire(self, now: float) -> int:
        """End spilled sessions past their idle TTL or the maximum lifetime; return how many."""
        ended = 0
        for file in self.files:
            for n in file.expired(now):
                rec = file.read(int(n), state=False)
                idle_end = rec.last_used + rec.idle_ttl_s
                self.drop(rec.session_id, "idle" if idle_end <= now else "lifetime")
                ended += 1
        return ended

    def drop_all(self, reason: str) -> None:
        """End every spilled session at shutdown, in bulk (no record is read), and release the files."""
        for file in self.files:
            mv, k = self._versions[file.number], file.count
            self.table.spilled -= k
            self.table.per_model[mv.spec.name] -= k
            self.metrics.sessions_ended.labels(mv.spec.name, reason).inc(k)
            for _ in range(k):
                self.unpin(mv)
            file.count = 0
            file.close()
        self.where = SpillIndex()
        self._publish()
