"""Sessions and their lifecycle: open, end, expire, resume from the shared store, and one operation at a time.

`SessionManager` owns the session table (`table.SessionTable`), the session store seam (`stores.base`) and the
leases a replica holds on the sessions it serves. A session has at most one operation in flight
(`Session.pending`): a step, or an exclusive operation (get/set state, fork, reset, close, a generation);
others wait their turn (`wait_idle`, `exclusive`).

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
from service.core.inputs import input_digest
from service.core.models import ModelHost
from service.core.registry import ModelVersion
from service.core.spill import output_row_bytes
from service.core.table import SPILLED, PendingOp, Session, SessionTable
from service.core.tasks import Background
from service.core.tenancy import CALLER
from service.core.tiering import Tiering
from service.core.types import ModelSpec, SessionInfo, StepResult
from service.errors import FailedPrecondition, InvalidArgument, NotFound, OutOfRange, Unavailable
from service.metrics import Metrics
from service.stores.base import SessionRecord, SessionStore, StoreRefused, StoreUnavailable

_log = logging.getLogger(__name__)
_caller = CALLER.get

# Reasons after which a session must never be resurrected from the shared store.
FINAL_REASONS = frozenset({"closed", "idle", "lifetime", "capacity"})


def new_session_id(prefix: str = "") -> str:
    """Return an unguessable session id (128 random bits) that never starts with "-".

    URL-safe base64 may begin with "-", and then a command line (argparse, grpcurl) reads the id as an
    option: `rnnserve session -Xy...` fails. Redrawing costs 1/64 of the ids one more draw.
    """
    while (token := secrets.token_urlsafe(16))[0] == "-":
        pass
    return prefix + token


class SessionManager:
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

    def end(self, s: Session, reason: str, *, delete: bool = True) -> None:
        """Forget a session locally (slot freed, tombstone left); nothing may be in flight."""
        if s.session_id not in self.table.sessions:
            return
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
        for s, reason in self.table.expired(now, self.settings.max_lifetime_s):
            self.end(s, reason)
        if self.tiering.where:
            self.tiering.expire(now)

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

    # -- the shared store -----------------------------------------------------------------------------------
    async def save(self, s: Session) -> None:
        """Write the session through to the store, fenced by the version its copy holds."""
        try:
            s.gen = await self.store.save(self.record(s))
        except StoreUnavailable as exc:
            self.store_failed(exc, "save")
            raise
        s.unsaved = 0

    async def save_step(self, s: Session) -> None:
        """Save after an applied step.

        With `store_refused` = serve-held, a store that refuses writes leaves the step answered and the
        session held here, unsaved (the next step's save catches up).
        """
        try:
            await self.save(s)
        except StoreRefused:
            if self.settings.store_refused != "serve-held":
                raise
            self.metrics.undurable_steps.inc()

    def store_failed(self, exc: StoreUnavailable, what: str) -> None:
        """Count a store failure; log it at most once per `store_log_interval_s` per kind."""
        kind = exc.kind
        self.metrics.store_errors.labels(kind).inc()
        now = time.monotonic()
        last, since = self._store_log.get(kind, (-1e18, 0))
        if now - last < self.settings.store_log_interval_s:
            self._store_log[kind] = (last, since + 1)
            return
        more = f" ({since} more failures of this kind since the last report)" if since else ""
        _log.error("session store %s during %s: %s%s", kind, what, exc.message, more)
        self._store_log[kind] = (now, 0)

    async def claim_and_save(self, s: Session) -> None:
        """Take the lease of a session opened here and write its first record."""
        # The lease runs from before the request: never believe in more lease than Redis gave.
        asked = time.monotonic()
        try:
            if not await self.store.claim(s.session_id, self.settings.replica_id, self.settings.lease_s):
                self.end(s, "moved", delete=False)
                raise self.table.not_found(s.session_id)
            s.lease_until = asked + self.settings.lease_s
            await self.save(s)
        except StoreUnavailable as exc:
            self.store_failed(exc, "create")
            self.end(s, "moved", delete=False)  # never written: nobody can resume it, nothing to keep here
            raise

    async def renew(self, s: Session) -> Session:
        """Extend this replica's lease and revalidate the resident copy; returns the session to use.

        A lost lease ends the local copy (NOT_FOUND reason moved). A store at another version than the copy
        (another replica advanced, reset or closed the session while this one's lease had lapsed) means the
        copy is stale: it is dropped and the session reloaded from the store.
        """
        asked = time.monotonic()
        try:
            gen = await self.store.acquire(s.session_id, self.settings.replica_id, self.settings.lease_s)
        except StoreRefused as exc:
            self.store_failed(exc, "lease renewal")
            # Nobody can write while the store refuses writes, so no other replica can take the session over:
            # serve-held keeps serving the resident copy (the lease is renewed once writes are taken again).
            if self.settings.store_refused == "serve-held" and self.table.sessions.get(s.session_id) is s:
                return s
            raise
        except StoreUnavailable as exc:
            self.store_failed(exc, "lease renewal")
            raise
        if gen is None:
            if self.table.sessions.get(s.session_id) is s and s.pending is None:
                self.end(s, "moved", delete=False)
            raise self.table.not_found(s.session_id)
        s.lease_until = asked + self.settings.lease_s
        if gen == s.gen:
            return s
        _log.info(
            "session %s: resident copy at version %d, store at %d; reloading", s.session_id, s.gen, gen
        )
        self.metrics.stale_reloads.inc()
        with contextlib.suppress(NotFound):
            await self.wait_idle(s)
        if self.table.sessions.get(s.session_id) is s:
            self.end(s, "moved", delete=False)
        return await self.get(s.session_id)

    def lease_due(self, s: Session) -> bool:
        """Tell whether the session's lease should be renewed before its next step."""
        return self.persist and time.monotonic() > s.lease_until - self.settings.lease_s / 3

    async def get(self, session_id: str) -> Session:
        """Return the local session, or resume it from the shared store; NotFound otherwise."""
        s = self.table.sessions.get(session_id)
        if s is not None:
            if s.tenant != CALLER.get().tenant:  # exactly as for an id that never existed
                raise self.table.not_found(session_id)
            return s
        if self.tiering.where and (s := self.tiering.resume(session_id)) is not None:
            return s
        if isinstance(session_id, str) and len(session_id) > self.settings.max_id_length:
            raise InvalidArgument(
                f"session id is {len(session_id)} characters long; expected at most max_id_length "
                f"({self.settings.max_id_length}), as returned by CreateSession"
            )
        if not self.persist or not isinstance(session_id, str) or not session_id:
            raise self.table.not_found(session_id)
        if self.table.reason_of(session_id) in FINAL_REASONS:
            raise self.table.not_found(session_id)
        waiting = self._resuming.get(session_id)
        if waiting is not None:
            await asyncio.shield(waiting)
            return self.table.get(session_id)
        fut = asyncio.get_running_loop().create_future()
        self._resuming[session_id] = fut
        try:
            return await self._resume(session_id)
        finally:
            del self._resuming[session_id]
            fut.set_result(None)

    async def _claim_waiting(self, session_id: str) -> bool:
        """Claim the session's lease, waiting up to one lease for another holder's lease to lapse.

        A crashed owner's lease runs out by itself within `lease_s`: waiting here lets a failed-over client
        resume without seeing an error. A live owner renews its lease with every step, so the wait ends in a
        refusal (and an idle owner that stays idle for a whole lease hands the session over, which is safe:
        its next save is refused by the store's compare-and-set).
        """
        deadline = time.monotonic() + self.settings.lease_s
        poll = min(0.1, self.settings.lease_s / 10)
        while not await self.store.claim(session_id, self.settings.replica_id, self.settings.lease_s):
            if self.draining or time.monotonic() + poll > deadline:
                return False
            await asyncio.sleep(poll)
        return True

    async def _resume(self, session_id: str) -> Session:
        if self.draining:
            raise Unavailable("server is draining; resume the session on another replica")
        # Claim before load: once the lease is ours nobody else can save, so the next read is the latest.
        try:
            claimed = await self._claim_waiting(session_id)
        except StoreUnavailable as exc:
            self.store_failed(exc, "resume")
            raise
        if not claimed:
            raise Unavailable(
                f"session {session_id} is owned by another live replica; retry there, or after its "
                f"lease ({self.settings.lease_s} s) runs out"
            )
        asked = time.monotonic()
        rec = await self.store.load(session_id)
        if rec is None or rec.tenant != CALLER.get().tenant:  # another tenant's: as if it did not exist
            _log.info("session %s: no record of this tenant in the shared store", session_id)
            await self.store.claim(session_id, self.settings.replica_id, 0.0)  # give the lease back
            raise self.table.not_found(session_id)
        mv = self.host.find(rec.model, rec.version)
        if mv is None:
            await self.store.claim(session_id, self.settings.replica_id, 0.0)
            raise FailedPrecondition(
                f"session {session_id} is pinned to model {rec.model!r} version {rec.version}, "
                "which this replica does not serve"
            )
        self.check_state(mv.spec, rec.state, complete=True)
        s = self.open(mv, rec.idle_ttl_s, "resumed", session_id, cached_steps(mv.spec, rec.last_outputs))
        mv.slab.write(s.slot, rec.state)
        s.last_seq = rec.last_seq
        s.gen = rec.gen
        s.steps = rec.steps
        s.last_inputs = rec.last_digest
        s.created_at = rec.created_at - self.wall_offset  # the lifetime counts from the first creation
        s.lease_until = asked + self.settings.lease_s  # claimed (or renewed) before the load
        if rec.last_outputs is not None:
            s.last_result = StepResult(rec.last_seq, rec.last_outputs, False)
        _log.info("resumed session %s at seq %d from the shared store", session_id, rec.last_seq)
        return s

    async def flush(self) -> None:
        """Write every session to the store (drain)."""
        if not self.persist:
            return
        for s in list(self.table):
            if s.session_id in self.table.sessions:
                with contextlib.suppress(Exception):
                    await self.save(s)

    async def hand_over_all(self) -> None:
        """End every local session (reason shutdown), giving leases back so another replica may claim now."""
        for s in list(self.table):
            if self.persist:
                with contextlib.suppress(Exception):
                    await self.store.claim(s.session_id, self.settings.replica_id, 0.0)
            self.end(s, "shutdown", delete=False)
        self.tiering.drop_all("shutdown")

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


def cached_steps(spec: ModelSpec, outputs: dict[str, np.ndarray] | None) -> int:
    """Return how many timesteps a cached result holds (at least 1: what a session is charged for at open)."""
    steps = 1
    for t in spec.outputs:
        arr = (outputs or {}).get(t.name)
        if t.time_axis and arr is not None and arr.ndim:
            steps = max(steps, int(arr.shape[0]))
    return steps
