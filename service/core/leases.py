"""The shared store side of the session lifecycle: write-through saves, leases, resume, hand-over.

`StoreLeases` is the part of `sessions.SessionManager` that talks to the session store seam (`stores.base`):
with a persistent store a replica claims a session's lease before it loads or saves it, renews the lease as
it steps, and gives it back at shutdown. A session this replica does not hold is resumed from the store on
first use (`get`), after waiting at most one lease for a crashed owner's lease to lapse. Every write is fenced
by the version the resident copy was read at (`Session.gen`); a replica that renews a lapsed lease and finds
the store at another version drops its resident copy and reloads (docs/DESIGN.md, "Fenced ownership").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING

import numpy as np

from service.config import Settings
from service.core.table import Session, SessionTable
from service.core.tenancy import CALLER
from service.core.types import ModelSpec, StepResult
from service.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from service.metrics import Metrics
from service.stores.base import SessionRecord, SessionStore, StoreRefused, StoreUnavailable

if TYPE_CHECKING:
    from service.core.models import ModelHost
    from service.core.registry import ModelVersion
    from service.core.tiering import Tiering

_log = logging.getLogger("service.core.sessions")

# Reasons after which a session must never be resurrected from the shared store.
FINAL_REASONS = frozenset({"closed", "idle", "lifetime", "capacity"})


class StoreLeases:
    """Saves, leases and resume: the store side of `SessionManager`, which sets the attributes below."""

    settings: Settings
    metrics: Metrics
    store: SessionStore
    persist: bool
    host: ModelHost
    table: SessionTable
    tiering: Tiering
    wall_offset: float
    draining: bool
    _resuming: dict[str, asyncio.Future[None]]
    _store_log: dict[str, tuple[float, int]]

    # Provided by SessionManager (declared here for the type checker).
    def record(self, s: Session) -> SessionRecord:
        """Return the store record of `s` (`SessionManager.record`)."""
        raise NotImplementedError

    def end(self, s: Session, reason: str, *, delete: bool = True, notify: bool = True) -> None:
        """End a local session (`SessionManager.end`)."""
        raise NotImplementedError

    async def wait_idle(self, s: Session) -> None:
        """Wait until nothing is in flight on `s` (`SessionManager.wait_idle`)."""
        raise NotImplementedError

    def open(
        self, mv: ModelVersion, ttl: float, protocol: str, session_id: str | None = None, steps: int = 1
    ) -> Session:
        """Open a local session (`SessionManager.open`)."""
        raise NotImplementedError

    @staticmethod
    def check_state(spec: ModelSpec, state: dict[str, np.ndarray], *, complete: bool) -> None:
        """Validate a state dict against the model (`SessionManager.check_state`)."""
        raise NotImplementedError

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

        A lost lease ends the local copy (NOT_FOUND reason moved, also while an operation of the copy is in
        flight). A store at another version than the copy (another replica advanced, reset or closed the
        session while this one's lease had lapsed) means the copy is stale: it is dropped and the session
        reloaded from the store.
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
            # Moved even while the copy is still busy (it cannot be ended yet, so it leaves no tombstone):
            # "unknown session id" would tell the client its session is gone for good.
            raise self.table.moved(s.session_id)
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
            self.end(s, "moved", delete=False, notify=False)  # reloaded below: nothing ends for a holder
        return await self.get(s.session_id)

    def lease_due(self, s: Session) -> bool:
        """Tell whether the session's lease should be renewed before its next step."""
        return self.persist and time.monotonic() > s.lease_until - self.settings.lease_s / 3

    async def current(self, session_id: str) -> Session:
        """Return the session as the store knows it: `get`, then a lease renewal when it is due.

        What answers from a resident copy without stepping it (a describe, an attach) goes through here: a
        copy whose lease lapsed may be behind the store (another replica advanced the session meanwhile), so
        it is revalidated first, reloaded when stale, or refused (moved) when another replica holds the lease.
        """
        s = await self.get(session_id)
        if self.lease_due(s):
            s = await self.renew(s)
        return s

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
            # Resumed: the copy is local now. Failed (owned elsewhere, store down): this call tries itself and
            # gets its own answer, never "unknown session id" for a session that exists.
            return await self.get(session_id)
        fut = asyncio.get_running_loop().create_future()
        self._resuming[session_id] = fut
        try:
            return await self._resume(session_id)
        finally:
            del self._resuming[session_id]
            fut.set_result(None)

    async def _claim_waiting(self, session_id: str) -> float | None:
        """Claim the session's lease, waiting up to one lease for another holder's lease to lapse.

        Returns when the successful claim was sent (monotonic; the lease runs from no earlier than that), or
        None if the lease stayed another replica's. A crashed owner's lease runs out by itself within
        `lease_s`: waiting here lets a failed-over client resume without seeing an error. A live owner renews
        its lease with every step, so the wait ends in a refusal (and an idle owner that stays idle for a
        whole lease hands the session over, which is safe: its next save is refused by the store's
        compare-and-set).
        """
        deadline = time.monotonic() + self.settings.lease_s
        poll = min(0.1, self.settings.lease_s / 10)
        while True:
            asked = time.monotonic()
            if await self.store.claim(session_id, self.settings.replica_id, self.settings.lease_s):
                return asked
            if self.draining or time.monotonic() + poll > deadline:
                return None
            await asyncio.sleep(poll)

    async def _resume(self, session_id: str) -> Session:
        if self.draining:
            raise Unavailable("server is draining; resume the session on another replica")
        # Claim before load: once the lease is ours nobody else can save, so the next read is the latest.
        try:
            asked = await self._claim_waiting(session_id)
        except StoreUnavailable as exc:
            self.store_failed(exc, "resume")
            raise
        if asked is None:
            raise Unavailable(
                f"session {session_id} is owned by another live replica; retry there, or after its "
                f"lease ({self.settings.lease_s} s) runs out"
            )
        # The lease counts from when the claim was sent, not from when its answer was read: a replica paused
        # (or its loop busy) in between must not believe in more lease than the store gave, or it would answer
        # from its copy after another replica took the session over and advanced it.
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
        s.lease_until = asked + self.settings.lease_s  # the claim, sent before the load
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


def cached_steps(spec: ModelSpec, outputs: dict[str, np.ndarray] | None) -> int:
    """Return how many timesteps a cached result holds (at least 1: what a session is charged for at open)."""
    steps = 1
    for t in spec.outputs:
        arr = (outputs or {}).get(t.name)
        if t.time_axis and arr is not None and arr.ndim:
            steps = max(steps, int(arr.shape[0]))
    return steps
