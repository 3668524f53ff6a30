"""The local session table: `Session` objects, idle/lifetime expiry, capacity, and tombstones.

A `Session` is small (`__slots__`) because one exists per idle session too. Expiry is exact and cheap:
sessions are kept in one recency-ordered dict per idle TTL value, so a sweep reads each bucket from its least
recently used end and stops at the first live session. A gone session leaves a tombstone (bounded in number
and time) so it answers NOT_FOUND with its reason (idle, lifetime, capacity, shutdown, closed), never a silent
restart.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from service.core.tenancy import CALLER
from service.errors import NotFound, ResourceExhausted

if TYPE_CHECKING:  # annotations only: both modules sit below this one
    from service.core.registry import ModelVersion
    from service.core.types import StepResult

REASON_TEXT = {
    "idle": "expired after its idle TTL",
    "lifetime": "reached the maximum session lifetime",
    "capacity": "was evicted to make room (server at capacity)",
    "shutdown": "was ended by a server shutdown",
    "closed": "was closed",
    "moved": "is now owned by another replica",
    "unloaded": "lost its model version",
}
# Leaving the resident table for the spill tier (or, with a shared store, for the store) is not an ending.
SPILLED = "spilled"


class PendingOp:
    """Marks a session busy (a step in flight or an exclusive operation); waiters exist only on contention."""

    __slots__ = ("waiters",)

    def __init__(self) -> None:
        self.waiters: list[asyncio.Future] | None = None

    def wake(self) -> None:
        """Wake everyone waiting for this operation to end."""
        if self.waiters:
            for w in self.waiters:
                if not w.done():
                    w.set_result(None)
            self.waiters = None


class Session:
    """One open session. `pending` is the in-flight step (or exclusive operation) future: one at a time."""

    __slots__ = (
        "session_id",
        "mv",
        "slot",
        "last_seq",
        "last_result",
        "created_at",
        "last_used",
        "idle_ttl_s",
        "pending",
        "steps",
        "protocol",
        "lease_until",
        "unsaved",
        "tenant",
        "charge",
        "charged_steps",
        "gen",
        "last_inputs",
    )

    def __init__(
        self,
        session_id: str,
        mv: ModelVersion,
        slot: int,
        idle_ttl_s: float,
        protocol: str,
        tenant: str = "",
    ) -> None:
        self.session_id = session_id
        self.mv = mv
        self.slot = slot
        self.last_seq = 0
        # The cached result of the last applied chunk (exactly-once retries): a StepResult, or a compact
        # (batch output arrays, row) handle from the batcher that `Engine._cached` turns into one on a retry.
        self.last_result: StepResult | tuple[tuple[np.ndarray, ...], int] | None = None
        now = time.monotonic()
        self.created_at = now
        self.last_used = now
        self.idle_ttl_s = idle_ttl_s
        self.pending: PendingOp | None = None
        self.steps = 0
        self.protocol = protocol
        self.lease_until = 0.0
        self.unsaved = 0
        self.tenant = tenant  # the owner: other tenants are told the id does not exist
        self.charge = 0  # bytes charged to the memory budget (core.admission)
        self.charged_steps = 0  # longest chunk whose cached outputs the charge covers
        self.gen = 0  # the store's version this copy was read at or last written as (the fencing token)
        # The last applied chunk's inputs (arrays in spec order), or their digest once resumed; None: unknown.
        self.last_inputs: tuple[np.ndarray, ...] | bytes | None = None


class SessionTable:
    """Open sessions by id, with per-model counts, recency buckets per TTL, and tombstones."""

    def __init__(self, max_sessions: int, max_tombstones: int, tombstone_ttl_s: float) -> None:
        self.max_sessions = max_sessions
        self.sessions: dict[str, Session] = {}  # insertion order = creation order (lifetime sweep)
        self.per_model: dict[str, int] = {}
        self._buckets: dict[float, dict[str, Session]] = {}  # idle TTL -> sessions, least recently used first
        self._tombstones: OrderedDict[str, tuple[str, float, str]] = OrderedDict()  # reason, until, tenant
        self._max_tombstones = max_tombstones
        self._tombstone_ttl_s = tombstone_ttl_s
        self.spilled = 0  # open sessions in the local spill tier: not in `sessions`, counted in `per_model`

    def __len__(self) -> int:
        return len(self.sessions)

    @property
    def open_count(self) -> int:
        """Open sessions, resident and spilled (what max_sessions bounds)."""
        return len(self.sessions) + self.spilled

    def detach(self, s: Session) -> None:
        """Take a session out of the resident table into the spill tier (still open, still counted)."""
        del self.sessions[s.session_id]
        self._buckets[s.idle_ttl_s].pop(s.session_id, None)
        self.spilled += 1

    def attach(self, s: Session) -> None:
        """Put a session back from the spill tier (at the recent end of its bucket: a resume is a use)."""
        self.sessions[s.session_id] = s
        self._buckets.setdefault(s.idle_ttl_s, {})[s.session_id] = s
        self.spilled -= 1

    def drop_spilled(self, session_id: str, model: str, tenant: str, reason: str) -> None:
        """End a session that sits in the spill tier: uncount it and leave its tombstone."""
        self.spilled -= 1
        self.per_model[model] -= 1
        self._tombstone(session_id, reason, tenant)

    def compact(self) -> None:
        """Rebuild the dicts after a mass departure (a CPython dict never shrinks as entries go)."""
        for d in (self.sessions, *self._buckets.values()):
            live = dict(d)  # same order: creation order, least recently used first
            d.clear()
            d.update(live)

    def idle(self, cutoff: float) -> Iterator[Session]:
        """Resident sessions last used before `cutoff` with nothing in flight, least recently used first.

        Per TTL bucket; the table must not change while the iterator is in use (collect, then act).
        """
        for bucket in self._buckets.values():
            for s in bucket.values():
                if s.last_used >= cutoff:
                    break
                if s.pending is None:
                    yield s

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self.sessions.values()))

    def add(self, s: Session) -> None:
        """Register a new session (capacity is checked by the caller through `check_capacity`)."""
        self.sessions[s.session_id] = s
        name = s.mv.spec.name
        self.per_model[name] = self.per_model.get(name, 0) + 1
        self._buckets.setdefault(s.idle_ttl_s, {})[s.session_id] = s
        self._tombstones.pop(s.session_id, None)

    def get(self, session_id: str) -> Session:
        """Return the calling tenant's open session, or raise NotFound naming why it is gone."""
        s = self.sessions.get(session_id)
        if s is not None and s.tenant == CALLER.get().tenant:
            return s
        raise self.not_found(session_id)

    def not_found(self, session_id: str) -> NotFound:
        """Build the NotFound for an id not open here (with the tombstone's reason if any).

        Another tenant's tombstone is not shown: to them the id never existed (no existence oracle).
        """
        tomb = self._tombstones.get(session_id)
        if tomb is not None and tomb[1] > time.monotonic() and tomb[2] == CALLER.get().tenant:
            reason = tomb[0]
            return NotFound(
                f"session {session_id} {REASON_TEXT.get(reason, reason)} (reason: {reason}); "
                "open a new session",
                reason=reason,
            )
        return NotFound(
            f"unknown session id {session_id!r}; expected an id returned by CreateSession", reason="unknown"
        )

    def reason_of(self, session_id: str) -> str | None:
        """Return the tombstone reason of a gone session of the calling tenant, if remembered."""
        tomb = self._tombstones.get(session_id)
        if tomb is None or tomb[1] <= time.monotonic() or tomb[2] != CALLER.get().tenant:
            return None
        return tomb[0]

    def touch(self, s: Session, now: float) -> None:
        """Mark use: move to the recent end of its TTL bucket."""
        s.last_used = now
        bucket = self._buckets[s.idle_ttl_s]
        del bucket[s.session_id]
        bucket[s.session_id] = s

    def remove(self, s: Session, reason: str) -> None:
        """Drop a session and leave a tombstone with `reason`."""
        if self.sessions.pop(s.session_id, None) is None:
            return
        name = s.mv.spec.name
        self.per_model[name] -= 1
        self._buckets[s.idle_ttl_s].pop(s.session_id, None)
        if reason != SPILLED:
            self._tombstone(s.session_id, reason, s.tenant)

    def _tombstone(self, session_id: str, reason: str, tenant: str) -> None:
        if self._max_tombstones > 0:
            self._tombstones[session_id] = (reason, time.monotonic() + self._tombstone_ttl_s, tenant)
            while len(self._tombstones) > self._max_tombstones:
                self._tombstones.popitem(last=False)

    def check_capacity(self, model: str, model_limit: int) -> Session | None:
        """None if there is room for one more session of `model`; else the LRU idle victim to evict (or None).

        Raises ResourceExhausted only through `refuse`, so the caller decides between evicting and refusing.
        """
        if self.open_count < self.max_sessions and self.per_model.get(model, 0) < model_limit:
            return None
        per_model_full = self.per_model.get(model, 0) >= model_limit
        victim = None
        for bucket in self._buckets.values():
            for s in bucket.values():  # least recently used first
                if s.pending is None and (not per_model_full or s.mv.spec.name == model):
                    if victim is None or s.last_used < victim.last_used:
                        victim = s
                    break
        return victim

    def refuse(self, model: str, model_limit: int) -> ResourceExhausted:
        """Build the error for a full server or model."""
        if self.open_count >= self.max_sessions:
            return ResourceExhausted(
                f"server at capacity: {self.open_count} of max_sessions "
                f"{self.max_sessions} open; close sessions or retry later"
            )
        return ResourceExhausted(
            f"model {model!r} at capacity: {model_limit} sessions open (max_sessions "
            "for this model); close sessions or retry later"
        )

    def expired(self, now: float, max_lifetime_s: float) -> list[tuple[Session, str]]:
        """Sessions past their idle TTL or the maximum lifetime (not those with a step in flight)."""
        out: list[tuple[Session, str]] = []
        for ttl, bucket in self._buckets.items():
            for s in bucket.values():
                if now - s.last_used < ttl:
                    break
                if s.pending is None:
                    out.append((s, "idle"))
        seen = {s.session_id for s, _ in out}
        for s in self.sessions.values():
            if now - s.created_at < max_lifetime_s:
                break
            if s.pending is None and s.session_id not in seen:
                out.append((s, "lifetime"))
        now_t = time.monotonic()
        while self._tombstones:
            first = next(iter(self._tombstones.values()))
            if first[1] > now_t:
                break
            self._tombstones.popitem(last=False)
        return out
