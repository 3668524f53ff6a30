"""The session store seam (docs/DESIGN.md section 4): the only place sessions persist beyond the local slab.

`InMemoryStore` is the default; `service.stores.redis.RedisStore` shares sessions between replicas.
"""

from __future__ import annotations

import abc
import time
from dataclasses import dataclass

import numpy as np

from service.errors import Aborted


class Stale(Aborted):
    """A write based on an older version of the session than the store holds (docs/DESIGN.md, fencing)."""


def stale(session_id: str, have: int, stored: int, seq: int) -> Stale:
    """Build the refusal of a write whose base version `have` is not the stored version `stored`."""
    return Stale(
        f"session {session_id} changed in the store (version {stored}, this replica holds {have}); "
        f"seq {seq} was not applied: retry it, the session is reloaded from the store"
    )


@dataclass(slots=True)
class SessionRecord:
    """Everything needed to resume a session on any replica; serialisable via `service.stores.snapshot`."""

    session_id: str
    model: str
    version: int
    last_seq: int
    state: dict[str, np.ndarray]
    last_outputs: dict[str, np.ndarray] | None
    idle_ttl_s: float
    created_at: float
    owner: str | None
    # The store's version of this record, the fencing token: 0 = never written; every successful save makes it
    # gen + 1. A writer passes the gen it read (or last wrote) and the store refuses the write if it moved on.
    gen: int = 0
    steps: int = 0  # timesteps applied since the session was created (survives failover)
    tenant: str = ""  # the owning tenant; a session resumes only for it


class SessionStore(abc.ABC):
    """Persistence interface; `persistent` False = the engine skips saves (nothing outlives the process)."""

    persistent: bool = True

    @abc.abstractmethod
    async def save(self, record: SessionRecord) -> int:
        """Write a session if the stored version is still `record.gen` and no other replica holds the lease.

        Returns the new version (`record.gen + 1`) and renews the lease; raises `Stale` when the stored
        version moved on, `Aborted` when another replica holds the lease.
        """

    @abc.abstractmethod
    async def load(self, session_id: str) -> SessionRecord | None:
        """Read a session, or None."""

    @abc.abstractmethod
    async def delete(self, session_id: str, gen: int | None = None, owner: str = "") -> bool:
        """Forget a session; True if it was deleted.

        Unconditionally (`gen` None), or only if it is still at version `gen` and the lease is free or
        `owner`'s.
        """

    @abc.abstractmethod
    async def claim(self, session_id: str, owner: str, lease_s: float) -> bool:
        """Take or renew the ownership lease (compare-and-set); False if another live owner holds it."""

    @abc.abstractmethod
    async def acquire(self, session_id: str, owner: str, lease_s: float) -> int | None:
        """`claim`, and return the stored version (0: no record) in the same atomic step; None if refused."""

    @abc.abstractmethod
    async def map_sequence(
        self, key: str, session_id: str, ttl_s: float, expected: str | None = None
    ) -> bool:
        """Point a KServe sequence key at its session, if it still points at `expected` (None: nothing).

        Shared, so another replica can continue the sequence; False if another start moved it meanwhile.
        """

    @abc.abstractmethod
    async def sequence_session(self, key: str) -> str | None:
        """Return the session a KServe sequence key points at, or None."""

    @abc.abstractmethod
    async def unmap_sequence(self, key: str, session_id: str) -> None:
        """Remove a sequence key if it still points at `session_id` (a restart elsewhere may move it)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections."""

    async def ping(self) -> None:  # noqa: B027 (optional hook, deliberately not abstract)
        """Raise `Unavailable` if the store is unreachable (checked at start-up; default: no check)."""


class InMemoryStore(SessionStore):
    """The default store: records live in this process only.

    With `persistent=False` (the server default) the engine skips it entirely: the local slab already is the
    only copy, so saving would only cost time. Tests pass `persistent=True` and share one instance between two
    engines to exercise the resume path exactly as a shared Redis store would.
    """

    def __init__(self, persistent: bool = False) -> None:
        self.persistent = persistent
        self._records: dict[str, SessionRecord] = {}
        self._leases: dict[str, tuple[str, float, float]] = {}  # id -> (owner, expiry, lease length)
        self._sequences: dict[str, str] = {}

    def _live_holder(self, session_id: str, now: float) -> str | None:
        held = self._leases.get(session_id)
        return held[0] if held is not None and held[1] > now else None

    async def save(self, record: SessionRecord) -> int:
        """Keep a deep copy if the stored version is `record.gen` and the lease is free or `record.owner`'s.

        The same compare-and-set as the Redis store: a replica that lost its lease, or whose copy is older
        than the store's, never overwrites the session.
        """
        now = time.monotonic()
        holder = self._live_holder(record.session_id, now)
        if holder is not None and holder != record.owner:
            raise Aborted(
                f"session {record.session_id} is owned by replica {holder}; replica {record.owner} lost its "
                f"lease and did not apply seq {record.last_seq}: retry to resume the session"
            )
        cur = self._records.get(record.session_id)
        stored = cur.gen if cur is not None else 0
        if stored != record.gen:
            raise stale(record.session_id, record.gen, stored, record.last_seq)
        held = self._leases.get(record.session_id)
        if held is not None and record.owner is not None:
            self._leases[record.session_id] = (record.owner, now + held[2], held[2])
        self._records[record.session_id] = SessionRecord(
            record.session_id,
            record.model,
            record.version,
            record.last_seq,
            {k: v.copy() for k, v in record.state.items()},
            None if record.last_outputs is None else {k: v.copy() for k, v in record.last_outputs.items()},
            record.idle_ttl_s,
            record.created_at,
            record.owner,
            record.gen + 1,
            record.steps,
            record.tenant,
        )
        return record.gen + 1

    async def load(self, session_id: str) -> SessionRecord | None:
        """Return the stored record, or None."""
        return self._records.get(session_id)

    async def delete(self, session_id: str, gen: int | None = None, owner: str = "") -> bool:
        """Forget a session and its lease (fenced by `gen` and the lease unless `gen` is None)."""
        if gen is not None:
            cur = self._records.get(session_id)
            holder = self._live_holder(session_id, time.monotonic())
            if cur is None or cur.gen != gen or (holder is not None and holder != owner):
                return False
        self._records.pop(session_id, None)
        self._leases.pop(session_id, None)
        return True

    async def claim(self, session_id: str, owner: str, lease_s: float) -> bool:
        """Take the lease if it is free, expired or already ours."""
        return await self.acquire(session_id, owner, lease_s) is not None

    async def acquire(self, session_id: str, owner: str, lease_s: float) -> int | None:
        """Take the lease if it is free, expired or already ours; return the stored version."""
        now = time.monotonic()
        holder = self._live_holder(session_id, now)
        if holder is not None and holder != owner:
            return None
        if lease_s <= 0:
            self._leases.pop(session_id, None)
        else:
            self._leases[session_id] = (owner, now + lease_s, lease_s)
        cur = self._records.get(session_id)
        return cur.gen if cur is not None else 0

    async def map_sequence(
        self, key: str, session_id: str, ttl_s: float, expected: str | None = None
    ) -> bool:
        """Point `key` at `session_id` if it points at `expected`."""
        if self._sequences.get(key) != expected:
            return False
        self._sequences[key] = session_id
        return True

    async def sequence_session(self, key: str) -> str | None:
        """Return the session `key` points at."""
        return self._sequences.get(key)

    async def unmap_sequence(self, key: str, session_id: str) -> None:
        """Remove `key` if it points at `session_id`."""
        if self._sequences.get(key) == session_id:
            del self._sequences[key]

    async def close(self) -> None:
        """Nothing to release."""
