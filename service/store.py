"""The session store seam (docs/DESIGN.md section 4): the only place sessions persist beyond the local slab.

SKELETON: interface final; InMemoryStore body lands next.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import numpy as np


@dataclass(slots=True)
class SessionRecord:
    """Everything needed to resume a session on any replica; serialisable via `service.snapshot`."""

    session_id: str
    model: str
    version: int
    last_seq: int
    state: dict[str, np.ndarray]
    last_outputs: dict[str, np.ndarray] | None
    idle_ttl_s: float
    created_at: float
    owner: str | None


class SessionStore(abc.ABC):
    """Persistence interface. `persistent` False means the engine skips saves (nothing outlives the process)."""

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
