"""The session store seam (docs/DESIGN.md section 4): the only place sessions persist beyond the local slab.

`InMemoryStore` is the default; `service.stores.redis.RedisStore` shares sessions between replicas.
"""

from __future__ import annotations

import abc
import time
from dataclasses import dataclass

import numpy as np

from service.errors import Aborted


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
    tenant: str = ""  # the owning tenant; a session resumes only for it


class SessionStore(abc.ABC):
    """Persistence interface; `persistent` False = the engine skips saves (nothing outlives the process)."""

    persistent: bool = True

    @abc.abstractmethod
    async def save(self, record: SessionRecord) -> None:
        """Write a session after an applied step (or every N steps)."""

    @abc.abstractmethod
    async def load(self, session_id: str) -> SessionRecord | None:
        """Read a session, or None."""

    @abc.abstractmethod
    async def delete(self, session_id: str) -> None:
        """Forget a session."""

    @abc.abstractmethod
    async def claim(self, session_id: str, owner: str, lease_s: float) -> bool:
        """Take or renew the ownership lease (compare-and-set); False if another live owner holds it."""

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

    async def save(self, record: SessionRecord) -> None:
        """Keep a deep copy if `record.owner` holds (or may retake) the lease, and renew it; else `Aborted`.

        The same compare-and-set as the Redis store: a replica that lost its lease never overwrites the owner.
        """
        now = time.monotonic()
        held = self._leases.get(record.session_id)
        if held is not None and held[0] != record.owner and held[1] > now:
            raise Aborted(
                f"session {record.session_id} is owned by replica {held[0]}; replica {record.owner} lost its "
                f"lease and did not apply seq {record.last_seq}: reconnect to resume the session"
            )
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
            record.tenant,
        )

    async def load(self, session_id: str) -> SessionRecord | None:
        """Return the stored record, or None."""
        return self._records.get(session_id)

    async def delete(self, session_id: str) -> None:
        """Forget a session and its lease."""
        self._records.pop(session_id, None)
        self._leases.pop(session_id, None)

    async def claim(self, session_id: str, owner: str, lease_s: float) -> bool:
        """Take the lease if it is free, expired or already ours."""
        now = time.monotonic()
        held = self._leases.get(session_id)
        if held is not None and held[0] != owner and held[1] > now:
            return False
        self._leases[session_id] = (owner, now + lease_s, lease_s)
        return True

    async def close(self) -> None:
        """Nothing to release."""
