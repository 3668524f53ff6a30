"""The open streams of this server: limits at opening, and the end of a stream told to its client.

Every long-lived call (native `Stream` and `StreamMany`, KServe `ModelStreamInfer`) registers here when it
opens. Opening is refused with RESOURCE_EXHAUSTED, naming the limit and its setting, past
`max_open_streams` in all or `max_streams_per_connection` on one client connection (counted in
`rnnserve_stream_refusals_total{limit}`).

When the server ends a stream (a drain, or the stream's session ended: idle, lifetime, capacity, moved,
closed, unloaded), `end` records the reason and interrupts the stream if it is waiting for its client; a
stream busy with a step finishes it and answers it first. The stream then tells its client why, in two ways:

- the trailing metadata `x-rnnserve-end-reason: <reason>` (`END_REASON_HEADER`), on every such end, next to
  the status (UNAVAILABLE "server draining; reconnect" for a drain, NOT_FOUND naming the reason otherwise);
- a final message with the reason (`StreamEnd` in the native API, for clients that asked for it with
  `lifecycle_events`; an error response with the parameter `rnnserve_end_reason` on a KServe stream).

"draining" and "moved" are resumable: the session lives on, and a client reconnects (to another replica, or to
this address once it is back) and attaches to it with the seq it holds.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any

from tritonclient.grpc import service_pb2 as kserve_pb

from service.config import Settings
from service.core.table import REASON_TEXT
from service.errors import NotFound, ResourceExhausted, ServeError, Unavailable
from service.metrics import Metrics
from service.server.interceptors import DRAINING_MESSAGE, END_REASON_HEADER
from service.server.routing import FORWARDED_HEADER

# Reasons after which the session lives on and the client may attach to it again.
RESUMABLE = frozenset({"draining", "moved"})
# Reasons a stream is told (the proto's EndReason without its prefix, lower case).
REASONS = ("idle", "lifetime", "capacity", "draining", "moved", "closed", "unloaded", "shutdown")


@dataclass(eq=False, slots=True)
class OpenStream:
    """One open stream: what to interrupt, whether it is busy with a step, and why the server ends it."""

    task: asyncio.Task[Any] | None
    method: str
    peer: str
    busy: bool = False
    ended: str | None = None  # the server's reason for ending this stream, once decided

    # No attribute may refer back to the record (a stored bound method would): an open stream's objects get
    # frozen by the collector (`loopwatch`), and a frozen reference cycle is never freed once the stream ends.
    # The core holds `rec.end` (a bound method made per call, equal to the next one made) while it is open.

    def end(self, reason: str) -> None:
        """End this stream for `reason`: at once if it waits for its client, else after its current step.

        Also how the core tells a stream that its held session ended (`Engine.hold`).
        """
        if self.ended is not None:  # told once: a second end must not interrupt the telling of the first
            return
        self.ended = reason
        if not self.busy and self.task is not None and not self.task.done():
            self.task.cancel()


def end_error(reason: str, session_id: str = "") -> ServeError:
    """Return the status a stream ends with when the server ends it for `reason`."""
    if reason in ("draining", "shutdown"):
        return Unavailable(DRAINING_MESSAGE)
    what = f"session {session_id}" if session_id else "the session"
    if reason == "moved":
        return NotFound(
            f"{what} {REASON_TEXT['moved']} (reason: moved); reconnect and attach to it with its id", reason
        )
    text = REASON_TEXT.get(reason, reason)
    return NotFound(f"{what} {text} (reason: {reason}); open a new session", reason)


def add_end_trailer(context: Any, reason: str) -> None:
    """Add `x-rnnserve-end-reason: <reason>` to the call's trailing metadata (kept with what is set)."""
    kept = tuple((k, v) for k, v in (context.trailing_metadata() or ()) if k != END_REASON_HEADER)
    context.set_trailing_metadata((*kept, (END_REASON_HEADER, reason)))


@dataclass(slots=True)
class StreamRegistry:
    """The open streams of this server (see the module docstring)."""

    settings: Settings | None = None
    metrics: Metrics | None = None
    draining: bool = False
    _open: set[OpenStream] = field(default_factory=set)
    _per_peer: dict[str, int] = field(default_factory=dict)

    def enter(self, context: Any = None, method: str = "Stream") -> OpenStream:
        """Register the current task's stream, or refuse it (draining, or a stream limit reached)."""
        if self.draining:
            raise Unavailable(DRAINING_MESSAGE)
        peer = ""
        if context is not None and not _forwarded(context):  # the worker that forwarded it counted it
            peer = context.peer() or ""
        settings = self.settings
        if settings is not None:
            if len(self._open) >= settings.max_open_streams:
                self._refused("max_open_streams")
                raise ResourceExhausted(
                    f"server at its open-stream limit: {len(self._open)} streams open (max_open_streams "
                    f"{settings.max_open_streams}); close streams, retry later or use another replica"
                )
            if peer and self._per_peer.get(peer, 0) >= settings.max_streams_per_connection:
                self._refused("max_streams_per_connection")
                raise ResourceExhausted(
                    f"this connection has {self._per_peer[peer]} streams open (max_streams_per_connection "
                    f"{settings.max_streams_per_connection}); open another connection (channel) for more"
                )
        rec = OpenStream(asyncio.current_task(), method, peer)
        self._open.add(rec)
        if peer:
            self._per_peer[peer] = self._per_peer.get(peer, 0) + 1
        if self.metrics is not None:
            self.metrics.open_streams.labels(method).inc()
        return rec

    def _refused(self, limit: str) -> None:
        if self.metrics is not None:
            self.metrics.stream_refusals.labels(limit).inc()

    def leave(self, rec: OpenStream, outcome: str) -> None:
        """Forget a stream that ended; `outcome` is its end for the metrics (client, cancelled, error)."""
        if rec not in self._open:
            return
        self._open.discard(rec)
        if rec.peer:
            left = self._per_peer[rec.peer] - 1
            if left:
                self._per_peer[rec.peer] = left
            else:
                del self._per_peer[rec.peer]
        if self.metrics is not None:
            self.metrics.open_streams.labels(rec.method).dec()
            self.metrics.streams_ended.labels(rec.method, rec.ended or outcome).inc()

    def drain(self) -> int:
        """Refuse new streams, end idle ones now (busy ones after their step); returns how many are open."""
        self.draining = True
        for rec in list(self._open):
            rec.end("draining")
        return len(self._open)

    @property
    def open_count(self) -> int:
        """How many streams are open."""
        return len(self._open)


def _forwarded(context: Any) -> bool:
    return any(k == FORWARDED_HEADER for k, _ in context.invocation_metadata() or ())


async def tell_kserve_end(context: Any, reason: str) -> None:
    """End a KServe stream for `reason`: an error response naming it, the reason trailer, then the status.

    tritonclient hands the error response to the stream's callback like any other (docs/triton.md, "Errors").
    """
    add_end_trailer(context, reason)
    error = end_error(reason)
    with contextlib.suppress(Exception):  # the client may be gone already: the status is what is left
        await context.write(_end_reply(reason, error.message))
    raise error


def _end_reply(reason: str, message: str) -> kserve_pb.ModelStreamInferResponse:
    """Build the last response of a stream the server ends: an error, which Triton clients pass on."""
    reply = kserve_pb.ModelStreamInferResponse(error_message=f"{message} ({END_REASON_HEADER}: {reason})")
    reply.infer_response.parameters["rnnserve_end_reason"].string_param = reason
    return reply
