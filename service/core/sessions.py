"""Sessions and their lifecycle: open, end, expire, resume from the shared store, and one operation at a time.

`SessionManager` owns the session table (`table.SessionTable`), the session store seam (`stores.base`) and the
leases a replica holds on the sessions it serves (the store side: `leases.StoreLeases`). A session has at most
one operation in flight (`Session.pending`): a step, or an exclusive operation (get/set state, fork, reset,
close, a generation); others wait their turn (`wait_idle`, `exclusive`).

With a persistent store, a replica claims a session's lease before it loads or saves it, renews the lease as
it steps, and gives it back at shutdown. A session this replica does not hold is resumed from the store on
first use (`get`), after waiting at most one lease for a crashed owner's lease to lapse. Every write is fenced
by the version the resident copy was read at (`Session.gen`); a replica that renews a lapsed lease and finds
the store at another version drops its resident copy and reloads (docs/DESIGN.md, "Fenced ownership").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator

import numpy as np

from service.config import Settings
from service.core.admission import SESSION_OVERHEAD_BYTES, Admission
from service.core.holds import Holds
from service.core.inputs import input_digest
from service.core.leases import FINAL_REASONS, StoreLeases, cached_steps
from service.core.models import ModelHost
from service.core.registry import ModelVersion
from service.core.spill import output_row_bytes
from service.core.table import SPILLED, PendingOp, Session, SessionTable
from service.core.tasks import Background
from service.core.tenancy import CALLER
from service.core.tiering import Tiering
from service.core.types import ModelSpec, SessionInfo, StepResult
from service.errors import InvalidArgument, OutOfRange, Unavailable
from service.metrics import Metrics
from service.stores.base import SessionRecord, SessionStore

_log = logging.getLogger(__name__)
_caller = CALLER.get

__all__ = ["FINAL_REASONS", "SessionManager", "cached_steps", "new_session_id"]


def new_session_id(prefix: str = "") -> str:
    """Return an unguessable session id (128 random bits) that never starts with "-".

    URL-safe base64 may begin with "-", and then a command line (argparse, grpcurl) reads the id as an
    option: `rnnserve session -Xy...` fails. Redrawing costs 1/64 of the ids one more draw.
    """
    while (token := secrets.token_urlsafe(16))[0] == "-":
        pass
    return prefix + token


class SessionManager(StoreLeases):
    """The open sessions of this replica, their lifecycle and their leases (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        store: SessionStore,
        host: ModelHost,
        background: Background,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.store = store
        self.persist = bool(store.persistent)
        self.host = host
        self.background = background
        self.table = SessionTable(settings.max_sessions, settings.max_tombstones, settings.tombstone_ttl_s)
        self.wall_offset = time.time() - time.monotonic()  # monotonic -> wall clock, fixed once
        self.draining = False
        self._resuming: dict[str, asyncio.Future[None]] = {}
        self._store_log: dict[str, tuple[float, int]] = {}  # kind -> (last logged, failures since)
        self.admission = Admission(settings, metrics)
        self.holds = Holds(settings.stream_holds_sessions)  # sessions open streams hold (core.holds)
        self._local = self.table.sessions.get  # bound once: `lookup` runs for every step
        self.tiering = Tiering(
            settings, metrics, self.table, self.admission, host.unpin, host.repository.loaded, self.persist
        )
        self.tiering.drop_resident = lambda s: self.end(s, SPILLED, delete=False)

    # -- opening and ending ---------------------------------------------------------------------------------
    def ttl(self, mv: ModelVersion, idle_ttl_s: float | None) -> float:
        """Return a new session's idle TTL: the model's default, or the client's within the maximum."""
        if idle_ttl_s is None or idle_ttl_s == 0:
            return mv.spec.config.idle_ttl_s
        if not np.isfinite(idle_ttl_s) or idle_ttl_s < 0:
            raise InvalidArgument(f"idle_ttl_s must be a positive number of seconds, got {idle_ttl_s}")
        if idle_ttl_s > self.settings.max_idle_ttl_s:
            raise OutOfRange(f"idle_ttl_s {idle_ttl_s} exceeds the maximum {self.settings.max_idle_ttl_s} s")
        return float(idle_ttl_s)

    @staticmethod
    def check_state(spec: ModelSpec, state: dict[str, np.ndarray], *, complete: bool) -> None:
        """Validate client- or store-supplied state rows against the model's state specs."""
        by_name = {s.name: s for s in spec.states}
        unknown = sorted(set(state) - set(by_name))
        if unknown:
            raise InvalidArgument(
                f"model {spec.name!r} has no state {unknown}; its states are {sorted(by_name)}"
            )
        if complete and set(state) != set(by_name):
            raise InvalidArgument(
                f"state is missing {sorted(set(by_name) - set(state))}; model {spec.name!r} "
                f"needs {sorted(by_name)}"
            )
        for name, arr in state.items():
            st = by_name[name]
            if not isinstance(arr, np.ndarray) or arr.dtype != st.dtype or tuple(arr.shape) != st.shape:
                got = (
                    (arr.dtype.name, tuple(arr.shape)) if isinstance(arr, np.ndarray) else type(arr).__name__
                )
                raise InvalidArgument(
                    f"state {name!r} is {got}; expected dtype {st.dtype.name}, shape {st.shape} "
                    "(no batch axis)"
                )
            if st.dtype.kind in "fc" and not np.isfinite(arr).all():
                raise InvalidArgument(f"state {name!r} holds NaN or infinity; expected finite values")

    def _make_room(self, mv: ModelVersion) -> None:
        table, name, limit = self.table, mv.spec.name, mv.spec.config.max_sessions
        for _ in range(3):  # at most: one eviction for the server limit, one for the model limit
            if table.open_count < table.max_sessions and table.per_model.get(name, 0) < limit:
                return
            victim = table.check_capacity(name, limit) if self.settings.evict_on_capacity else None
            if victim is None:
                raise table.refuse(name, limit)
            self.end(victim, "capacity")
        raise table.refuse(name, limit)

    def open(
        self, mv: ModelVersion, ttl: float, protocol: str, session_id: str | None = None, steps: int = 1
    ) -> Session:
        """Open a local session on `mv` for the calling tenant (a slab row, a table entry, version pinned).

        The session is charged to the memory budget first (its state, cached outputs of `steps` timesteps,
        the fixed overhead): RESOURCE_EXHAUSTED if that does not fit, before anything is allocated.
        """
        self._make_room(mv)
        tenant = CALLER.get().tenant
        charge = SESSION_OVERHEAD_BYTES + mv.slab.row_bytes + steps * output_row_bytes(mv.spec)
        self.admission.open(tenant, charge)
        session_id = session_id or new_session_id(self.settings.session_id_prefix)
        s = Session(session_id, mv, mv.slab.alloc(), ttl, protocol, tenant)
        s.charge, s.charged_steps = charge, steps
        self.table.add(s)
        self.host.pin(mv)
        return s

    def lookup(self, session_id: str) -> Session | None:
        """Return the calling tenant's local session with this id, or None (another tenant's is absent)."""
        s = self._local(session_id)
        if s is not None and s.tenant != _caller().tenant:
            return None
        return s

    def admit_step(self, s: Session, steps: int) -> None:
        """Admit a chunk of `steps` timesteps before it is submitted, or refuse it (RESOURCE_EXHAUSTED).

        Checks the tenant's rate quota, and grows the memory charge for its cached outputs when the chunk is
        longer than any this session applied before.
        """
        if self.admission.rate_limited:
            self.admission.take_steps(s.tenant, steps)
        if steps > s.charged_steps:
            self.charge_outputs(s, steps)

    def charge_outputs(self, s: Session, steps: int) -> None:
        """Grow the session's charge to cover cached outputs of `steps` timesteps (or RESOURCE_EXHAUSTED)."""
        if steps > s.charged_steps:
            extra = (steps - s.charged_steps) * output_row_bytes(s.mv.spec)
            self.admission.grow(s.tenant, extra)
            s.charge += extra
            s.charged_steps = steps

    def end(self, s: Session, reason: str, *, delete: bool = True, notify: bool = True) -> None:
        """Forget a session locally (slot freed, tombstone left); nothing may be in flight.

        A stream holding the session is told the reason first (`notify`; not when the copy is only reloaded).
        """
        if s.session_id not in self.table.sessions:
            return
        if notify and s.session_id in self.holds:
            self.holds.ended(s.session_id, reason)
        self.table.remove(s, reason)
        self.admission.close(s.tenant, s.charge)
        s.charge = 0
        mv = s.mv
        if mv.slab is not None:
            mv.slab.free(s.slot)
        if reason != SPILLED:  # left for the shared store, which holds it: not an ending
            self.metrics.sessions_ended.labels(mv.spec.name, reason).inc()
        self.host.unpin(mv)
        if self.persist and delete and reason in FINAL_REASONS:
            # Fenced: a stale copy expiring here never deletes a session another replica has advanced.
            self.background.spawn(self.store.delete(s.session_id, s.gen, self.settings.replica_id))

    async def create(
        self,
        model: str,
        version: int | None,
        idle_ttl_s: float | None,
        initial_state: dict[str, np.ndarray] | None,
        protocol: str,
    ) -> Session:
        """Open a new session (see `Engine.create_session`)."""
        if self.draining:
            raise Unavailable("server is draining; open the session on another replica")
        mv = self.host.get(model, version)
        ttl = self.ttl(mv, idle_ttl_s)
        if initial_state:
            self.check_state(mv.spec, initial_state, complete=False)
        s = self.open(mv, ttl, protocol)
        if initial_state:
            full = mv.slab.read(s.slot)
            full.update(initial_state)
            mv.slab.write(s.slot, full)
        self.metrics.sessions_created.labels(model, protocol).inc()
        if self.persist:
            await self.claim_and_save(s)
        return s

    def expire(self) -> None:
        """End every session past its idle TTL or the maximum lifetime (nothing in flight)."""
        now = time.monotonic()
        holds = self.holds
        for s, reason in self.table.expired(now, self.settings.max_lifetime_s):
            if reason == "idle" and holds.keep_alive and s.session_id in holds:
                self.table.touch(s, now)  # an open stream is use: its idle TTL counts from the stream's end
            else:
                self.end(s, reason)
        if self.tiering.where:
            self.tiering.expire(now, holds.__contains__ if holds.keep_alive else None)

    async def sweep(self) -> None:
        """Expire sessions every `sweep_interval_s` (a task)."""
        while True:
            await asyncio.sleep(self.settings.sweep_interval_s)
            self.expire()

    # -- views ----------------------------------------------------------------------------------------------
    @staticmethod
    def cached(s: Session) -> StepResult | None:
        """Return the cached result of the session's last applied chunk, if any."""
        last = s.last_result
        if last is None or isinstance(last, StepResult):
            return last
        arrays, i = last
        names = [t.name for t in s.mv.spec.outputs]
        return StepResult(s.last_seq, {n: a[i] for n, a in zip(names, arrays, strict=True)}, False)

    def info(self, s: Session) -> SessionInfo:
        """Return the client's view of a session; times in wall-clock epoch seconds."""
        offset = self.wall_offset
        created = s.created_at + offset
        last_used = s.last_used + offset
        expires = min(last_used + s.idle_ttl_s, created + self.settings.max_lifetime_s)
        spec = s.mv.spec
        left = max(0.0, expires - time.time())
        return SessionInfo(
            s.session_id,
            spec.name,
            spec.version,
            s.last_seq,
            created,
            last_used,
            s.idle_ttl_s,
            expires,
            s.steps,
            "resident",
            left,
        )

    def record(self, s: Session) -> SessionRecord:
        """Return the store's copy of a session: state rows, seq, cached result."""
        last = self.cached(s)
        return SessionRecord(
            s.session_id,
            s.mv.spec.name,
            s.mv.spec.version,
            s.last_seq,
            s.mv.slab.read(s.slot),
            None if last is None else dict(last.outputs),
            s.idle_ttl_s,
            s.created_at + self.wall_offset,
            self.settings.replica_id,
            s.gen,
            s.steps,
            s.tenant,
            self._digest(s),
        )

    @staticmethod
    def _digest(s: Session) -> bytes | None:
        known = s.last_inputs
        if known is None or isinstance(known, bytes):
            return known
        return input_digest(s.mv.spec, known)

    # -- one operation at a time ----------------------------------------------------------------------------
    async def wait_idle(self, s: Session) -> None:
        """Wait until `s` has nothing in flight; NotFound if it ended meanwhile."""
        while (p := s.pending) is not None:
            w = asyncio.get_running_loop().create_future()
            if p.waiters is None:
                p.waiters = []
            p.waiters.append(w)
            await w
        if self.table.sessions.get(s.session_id) is not s:
            raise self.table.not_found(s.session_id)

    @contextlib.asynccontextmanager
    async def exclusive(self, session_id: str) -> AsyncIterator[Session]:
        """Hold the session for one operation: nothing else runs on it until the block ends."""
        s = await self.get(session_id)
        if self.lease_due(s):
            s = await self.renew(s)
        await self.wait_idle(s)
        op = PendingOp()
        s.pending = op
        try:
            yield s
        finally:
            if s.pending is op:
                s.pending = None
            op.wake()

    async def close(self, session_id: str) -> None:
        """End a session (after its in-flight step). Closing a closed session again is a no-op."""
        if session_id not in self.table.sessions and self.table.reason_of(session_id) == "closed":
            return
        if self.tiering.describe(session_id, self.wall_offset) is not None:  # spilled: no need to load it
            self.tiering.drop(session_id, "closed")
            return
        async with self.exclusive(session_id) as s:
            _log.debug("closing session %s", session_id)
            self.end(s, "closed", delete=False)
            if self.persist:
                await self.store.delete(session_id, s.gen, self.settings.replica_id)

