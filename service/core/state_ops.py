"""Operations on a whole session's state: snapshot (get/set as a blob), fork and reset.

Each runs exclusively on its session (no step interleaves) and, with a persistent store, writes the new state
through before it answers.
"""

from __future__ import annotations

import time

from service.core.sessions import SessionManager, cached_steps
from service.core.table import Session
from service.core.types import SessionInfo, StepResult
from service.errors import InvalidArgument, Unavailable
from service.stores import snapshot


class StateOps:
    """Get/set state blobs, fork and reset (see the module docstring)."""

    def __init__(self, sessions: SessionManager, hmac_key: bytes | None) -> None:
        self.sessions = sessions
        self._hmac_key = hmac_key

    async def _write_through(self, s: Session) -> None:
        self.sessions.table.touch(s, time.monotonic())
        if self.sessions.persist:
            await self.sessions.save(s)

    async def get_state(self, session_id: str) -> bytes:
        """Return the session's whole state (seq and cached last result too) as an integrity-checked blob."""
        async with self.sessions.exclusive(session_id) as s:
            return snapshot.encode(self.sessions.record(s), self._hmac_key)

    async def set_state(self, session_id: str, blob: bytes) -> SessionInfo:
        """Replace the session's state, seq and cached result from a GetState blob (same model version)."""
        if not isinstance(blob, bytes | bytearray | memoryview):
            raise InvalidArgument("state must be bytes from GetState")
        rec = snapshot.decode(bytes(blob), self._hmac_key)
        async with self.sessions.exclusive(session_id) as s:
            if rec.tenant != s.tenant:  # covered by the blob's checksum (unforgeable with state_hmac_key)
                raise InvalidArgument(
                    "state blob was exported by another tenant; a blob can only be imported by the tenant "
                    "that exported it"
                )
            spec = s.mv.spec
            if rec.model != spec.name or rec.version != spec.version:
                raise InvalidArgument(
                    f"state blob is for model {rec.model!r} version {rec.version}; session "
                    f"{session_id} runs model {spec.name!r} version {spec.version}"
                )
            self.sessions.check_state(spec, rec.state, complete=True)
            self.sessions.charge_outputs(s, cached_steps(spec, rec.last_outputs))  # before anything changes
            s.mv.slab.write(s.slot, rec.state)
            s.last_seq = rec.last_seq
            s.last_result = (
                None if rec.last_outputs is None else StepResult(rec.last_seq, rec.last_outputs, False)
            )
            await self._write_through(s)
            return self.sessions.info(s)

    async def fork(self, session_id: str, *, idle_ttl_s: float | None = None) -> SessionInfo:
        """Open a session on the same model version with a copy of this state; its first chunk is seq 1."""
        sessions = self.sessions
        if sessions.draining:
            raise Unavailable("server is draining; fork on another replica")
        async with sessions.exclusive(session_id) as s:
            mv = s.mv
            ttl = sessions.ttl(mv, idle_ttl_s) if idle_ttl_s else s.idle_ttl_s
            child = sessions.open(mv, ttl, s.protocol)
            mv.slab.write(child.slot, mv.slab.read(s.slot))
            sessions.metrics.sessions_created.labels(mv.spec.name, s.protocol).inc()
        if sessions.persist:
            await sessions.claim_and_save(child)
        return sessions.info(child)

    async def reset(self, session_id: str) -> SessionInfo:
        """State back to the model's initial state; seq back to 0 (the next chunk is seq 1)."""
        async with self.sessions.exclusive(session_id) as s:
            s.mv.slab.reset(s.slot)
            s.last_seq = 0
            s.last_result = None
            await self._write_through(s)
            return self.sessions.info(s)
