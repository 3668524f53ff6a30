"""Structured request log: one line per unary call and one per stream at its end, JSON or logfmt.

Each line has: ``method`` (e.g. ``rnnserve.v1.RecurrentService/Step``), ``model``, ``version``, ``session``
(the first 8 characters of the session id or KServe sequence id: enough to follow one session, not to resume
it), ``status`` (the gRPC code name), ``ms`` (wall time of the call) and ``steps`` (time steps the
call's requests carried, summed over a stream's messages; one per chunk for a model without a time axis) and,
for streams, ``messages``.

Settings (`service.config.Settings`): ``request_log`` (``json`` | ``logfmt`` | ``off``) and
``request_log_sample`` (the fraction of successful calls logged; a call that ends in an error is always
logged). Health checks and reflection are not logged. The lines go to the ``rnnserve.requests`` logger at
INFO. `RequestLog.begin` reads what it can off the request (unary) or off the first message (streams, whose
request iterator it wraps only when the call is logged); a handler may add what only it knows through `note`
(the native Stream names the session it opened). The native `Stream` counts its own messages (`current` and
`count`, methods in `COUNTED_BY_HANDLER`): a wrapping async generator would stay alive, with its frames, for
as long as the stream is open, and tens of thousands of open streams make that many more objects for every
full garbage collection to walk.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

_log = logging.getLogger("rnnserve.requests")
SESSION_PREFIX = 8
# Streaming methods whose handlers count their messages themselves (`count`): their requests are not wrapped.
COUNTED_BY_HANDLER = frozenset({"/rnnserve.v1.RecurrentService/Stream"})
_current: ContextVar[CallEntry | None] = ContextVar("rnnserve_call", default=None)


@dataclass(slots=True)
class CallEntry:
    """What one logged call has collected so far."""

    method: str
    started: float
    sampled: bool
    model: str = ""
    version: int | str = ""
    session: str = ""  # the full id; the line shows its first SESSION_PREFIX characters
    chunks: int = 0  # messages that carried inputs
    lead: int = 0  # sum over them of axis 0 of the first input (native: T for sequence models)
    second: int = 0  # sum of axis 1 (KServe and StepMany: T for sequence models)
    messages: int = -1  # -1: a unary request (no message count in the line)
    request: Any = None  # an unsampled unary request, read only if the call ends in an error


def note(*, model: str | None = None, version: int | None = None, session: str | None = None) -> None:
    """Add what only the handler knows to the current call's line (a no-op when the call is not logged)."""
    entry = _current.get()
    if entry is None:
        return
    if model:
        entry.model = model
    if version:
        entry.version = version
    if session:
        entry.session = session


def current() -> CallEntry | None:
    """Return the current call's entry if its messages are counted (a logged, sampled stream), else None."""
    entry = _current.get()
    return entry if entry is not None and entry.messages >= 0 else None


def count(entry: CallEntry, msg: Any) -> None:
    """Count one request message of a stream whose handler counts its own (`COUNTED_BY_HANDLER`)."""
    if entry.messages == 0:
        _read(entry, msg)
    entry.messages += 1
    _count_steps(entry, msg)


def _count_steps(entry: CallEntry, msg: Any) -> None:
    """Add a request's first input's axes 0 and 1; which one is time is decided at the end (`_steps`)."""
    inputs = getattr(msg, "inputs", None)
    if not inputs:
        return
    shape = inputs[0].shape
    entry.chunks += 1
    entry.lead += int(shape[0]) if len(shape) > 0 else 1
    entry.second += int(shape[1]) if len(shape) > 1 else 1


# (model name, session id) -> (model, version, has a time axis), or None when neither is known.
Lookup = Callable[[str, str], "tuple[str, int, bool] | None"]


def _read(entry: CallEntry, msg: Any) -> None:
    """Fill model, version and session from a request message, whichever of them it names."""
    opened = getattr(msg, "open", None)
    if opened is not None and msg.HasField("open"):
        msg = opened
    model = getattr(msg, "model_name", "") or getattr(msg, "model", "")
    if isinstance(model, str) and model:
        entry.model = model
    elif not entry.model and isinstance(getattr(msg, "name", None), str):
        entry.model = msg.name
    version = getattr(msg, "model_version", "") or getattr(msg, "version", 0)
    if version:
        entry.version = version
    session = getattr(msg, "session_id", "")
    if not session:
        params = getattr(msg, "parameters", None)
        if params is not None and "sequence_id" in params:
            p = params["sequence_id"]
            session = str(p.int64_param or p.uint64_param or p.string_param)
    if session and isinstance(session, str):
        entry.session = session


class RequestLog:
    """Decides which calls are logged and writes their lines (see module docstring)."""

    def __init__(self, fmt: str = "json", sample: float = 1.0, lookup: Lookup | None = None) -> None:
        if fmt not in ("json", "logfmt", "off"):
            raise ValueError(f"request_log must be json, logfmt or off, got {fmt!r}")
        self.fmt, self.sample, self.lookup = fmt, sample, lookup
        self.enabled = fmt != "off"

    def begin(self, method: str, request: Any, streaming_request: bool) -> tuple[CallEntry | None, Any]:
        """Start a call's entry; returns it and the request to pass on (a stream's, wrapped to count).

        No entry (None) while the request logger would drop the line anyway (its level is above INFO): then
        the call pays nothing, and a stream's messages are not wrapped.
        """
        if not _log.isEnabledFor(logging.INFO):
            return None, request
        sampled = self.sample >= 1.0 or random.random() < self.sample
        entry = CallEntry(method.lstrip("/"), time.perf_counter(), sampled)
        _current.set(entry)
        if not sampled:
            entry.request = None if streaming_request else request
            return entry, request
        if streaming_request:
            entry.messages = 0
            if method in COUNTED_BY_HANDLER:
                return entry, request
            return entry, self._count(entry, request)
        _read(entry, request)
        _count_steps(entry, request)
        return entry, request

    @staticmethod
    async def _count(entry: CallEntry, requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
        async for msg in requests:
            count(entry, msg)
            yield msg

    def _steps(self, entry: CallEntry) -> int:
        """Time steps the call carried: the time axis summed, or one per chunk for models without one."""
        found = self.lookup(entry.model, entry.session) if self.lookup is not None else None
        if found is not None:
            entry.model, entry.version, timed = found
        else:
            timed = True
        if not timed:
            return entry.chunks
        # The native Step and Stream send tensors without the batch axis; KServe and StepMany with it.
        native_row = entry.method.endswith(("RecurrentService/Step", "RecurrentService/Stream"))
        return entry.lead if native_row else entry.second

    def end(self, entry: CallEntry, status: str) -> None:
        """Write the call's line (sampled, or ended in an error)."""
        if not entry.sampled:
            if status == "OK":
                return
            if entry.request is not None:
                _read(entry, entry.request)
                _count_steps(entry, entry.request)
        fields: dict[str, Any] = {
            "method": entry.method,
            "model": entry.model,
            "version": entry.version,
            "session": entry.session[:SESSION_PREFIX],
            "status": status,
            "ms": round((time.perf_counter() - entry.started) * 1000, 3),
            "steps": self._steps(entry) if entry.chunks else 0,
        }
        if entry.messages >= 0:
            fields["messages"] = entry.messages
        _log.info(self.format(fields))

    def format(self, fields: dict[str, Any]) -> str:
        """One line: a JSON object, or logfmt ``key=value`` pairs (values with spaces quoted)."""
        if self.fmt == "json":
            return json.dumps(fields, separators=(",", ":"))
        parts = []
        for key, value in fields.items():
            text = str(value)
            if not text or any(c in text for c in ' ="'):
                text = json.dumps(text)
            parts.append(f"{key}={text}")
        return " ".join(parts)
