"""Typed errors of the serving core.

One root (`ServeError`); every subclass names the gRPC status it maps to in the class attribute `code`, so the
edge has exactly one mapping place (`status_of`). `grpc` is imported for the `StatusCode` enum only: the core
never touches channels, servicers or protobuf.
"""

from __future__ import annotations

import logging

import grpc

_log = logging.getLogger(__name__)


class ServeError(Exception):
    """Root of every error the core raises on purpose; `message` is safe to send to the client."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(ServeError):
    """The request itself is malformed (names, dtypes, shapes, values, blobs)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServeError):
    """Unknown or gone model, version or session. `reason` says why a session is gone.

    Reasons used for sessions: ``unknown``, ``idle``, ``lifetime``, ``capacity``, ``shutdown``, ``closed``,
    ``moved`` (another replica owns it now), ``unloaded``.
    """

    code = grpc.StatusCode.NOT_FOUND

    def __init__(self, message: str, reason: str = "unknown") -> None:
        super().__init__(message)
        self.reason = reason


class FailedPrecondition(ServeError):
    """The request is well formed but the target is in the wrong state (e.g. a seq that is not last + 1)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class OutOfRange(ServeError):
    """A value lies outside what the server accepts (e.g. a chunk longer than max_chunk_steps)."""

    code = grpc.StatusCode.OUT_OF_RANGE


class ResourceExhausted(ServeError):
    """A capacity limit (sessions, queue) is reached."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(ServeError):
    """The server is draining or stopped; the client should retry elsewhere (or later)."""

    code = grpc.StatusCode.UNAVAILABLE


class AlreadyExists(ServeError):
    """Something with that identity exists already."""

    code = grpc.StatusCode.ALREADY_EXISTS


class Aborted(ServeError):
    """A concurrency conflict (e.g. another replica took the session's lease); retrying may succeed."""

    code = grpc.StatusCode.ABORTED


class DeadlineExceeded(ServeError):
    """The work did not finish within its deadline."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """Map any exception to the (status code, client-safe message) pair the edge sends.

    Typed errors keep their own code and message. Anything else is a bug: it becomes INTERNAL with a generic
    message, and the details (with traceback) go to the log, never to the client.
    """
    if isinstance(exc, ServeError):
        return exc.code, exc.message
    _log.error("internal error: %r", exc, exc_info=exc)
    return grpc.StatusCode.INTERNAL, "internal server error (details are in the server log)"
