"""Sessions held by open streams: told why they end, kept alive while the stream is open.

A front end that keeps a stream open on a session (the native `Stream`) registers a hold with a callback.
`SessionManager.end` calls it with the reason (idle, lifetime, capacity, closed, moved, unloaded, shutdown)
before anything else can reach the session, so the stream can tell its client why it ends. With
`stream_holds_sessions` (the default) a held session does not expire for idleness: the open stream is proof
that its client is there (and gRPC keepalive proves that the connection is; a connection that dies ends the
stream and with it the hold). With a shared store, `keep_held` also keeps the session's lease and its stored
record fresh while it is held, so no other replica takes it over and its record does not expire in Redis;
if the lease is lost anyway (this replica was paused past it and another one took the session), the holder
is told "moved".
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from service.core.table import PendingOp
from service.errors import ServeError
from service.stores.base import StoreUnavailable

if TYPE_CHECKING:  # annotations only: sessions imports this module
    from service.core.sessions import SessionManager

_log = logging.getLogger(__name__)

OnEnd = Callable[[str], None]


class Holds:
    """The holders of each held session (usually one stream), and when its record was last refreshed."""

    def __init__(self, keep_alive: bool) -> None:
        self.keep_alive = keep_alive
        self._by_id: dict[str, list[OnEnd]] = {}
        self._saved: dict[str, float] = {}

    def __contains__(self, session_id: object) -> bool:
        return session_id in self._by_id

    def __len__(self) -> int:
        return len(self._by_id)

    def add(self, session_id: str, on_end: OnEnd) -> None:
        """Hold a session: `on_end(reason)` is called once if it ends while held."""
        holders = self._by_id.get(session_id)
        if holders is None:
            self._by_id[session_id] = [on_end]
            self._saved[session_id] = -1e18  # refreshed on the keeper's next pass
        else:
            holders.append(on_end)

    def remove(self, session_id: str, on_end: OnEnd) -> bool:
        """Drop one hold; True if the session is no longer held by anyone."""
        holders = self._by_id.get(session_id)
        if holders is None:
            return True
        if on_end in holders:
            holders.remove(on_end)
        if holders:
            return False
        del self._by_id[session_id]
        self._saved.pop(session_id, None)
        return True

    def ended(self, session_id: str, reason: str) -> None:
        """Tell every holder that the session ended, and forget it."""
        holders = self._by_id.pop(session_id, None)
        self._saved.pop(session_id, None)
        for on_end in holders or ():
            try:
                on_end(reason)
            except Exception:  # noqa: BLE001 - one broken holder must not stop the others or the caller
                _log.exception("holder of session %s failed on end (%s)", session_id, reason)

    def ids(self) -> list[str]:
        """Return the held session ids (a copy)."""
        return list(self._by_id)

    def save_due(self, session_id: str, now: float, every_s: float) -> bool:
        """Tell whether the held session's stored record should be refreshed (and note that it is)."""
        if now - self._saved.get(session_id, now) < every_s:
            return False
        self._saved[session_id] = now
        return True


async def keep_held(manager: SessionManager) -> None:
    """Keep the leases and stored records of held sessions fresh (a task; shared store only).

    Runs every third of a lease. A held session with nothing in flight has its lease renewed when due and its
    record re-saved every half idle TTL (the record expires idle TTL + lease after its last write). The work
    takes the session like any operation (`Session.pending`), so a step never races it.
    """
    settings = manager.settings
    interval = min(settings.lease_s / 3, settings.sweep_interval_s * 5)
    while True:
        await asyncio.sleep(interval)
        for session_id in manager.holds.ids():
            s = manager.table.sessions.get(session_id)
            if s is None or s.pending is not None:
                continue  # gone, or a step in flight renews and saves it anyway
            save = manager.holds.save_due(session_id, time.monotonic(), s.idle_ttl_s / 2)
            if not save and not manager.lease_due(s):
                continue
            op = PendingOp()
            s.pending = op
            try:
                await _refresh(manager, s, save)
            except StoreUnavailable as exc:
                manager.store_failed(exc, "keeping a held session")
            except ServeError as exc:
                _log.info("held session %s: %s", session_id, exc.message)
            finally:
                if s.pending is op:
                    s.pending = None
                op.wake()


async def _refresh(manager: SessionManager, s, save: bool) -> None:  # type: ignore[no-untyped-def]
    settings = manager.settings
    asked = time.monotonic()
    gen = await manager.store.acquire(s.session_id, settings.replica_id, settings.lease_s)
    if gen is None or gen != s.gen:
        # Another replica holds the lease, or advanced the session while this one's lease had lapsed: this
        # copy is no longer the session. The holder is told "moved" and re-attaches wherever it is served.
        _log.info("held session %s moved (store version %s, this copy %d)", s.session_id, gen, s.gen)
        manager.end(s, "moved", delete=False)
        return
    s.lease_until = asked + settings.lease_s
    if save:
        await manager.save(s)
