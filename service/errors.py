"""Typed errors of the serving core.

One root (`ServeError`); every subclass names its status in the class attribute `code`, a `Code` whose member
names are the gRPC status names. The core knows nothing of gRPC: the edge maps a `Code` to
`grpc.StatusCode` in exactly one place (`service.server.interceptors.status_of`). The client package imports
this module too.
"""

from __future__ import annotations

import enum


class Code(enum.Enum):
    """Status of a failed request; member names equal gRPC's `StatusCode` names (the edge maps by name)."""

    INVALID_ARGUMENT = 3
    NOT_FOUND = 5
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    INTERNAL = 13
    UNAVAILABLE = 14
    UNAUTHENTICATED = 16


class ServeError(Exception):
    """Root of every error the core raises on purpose; `message` is safe to send to the client."""

    code: Code = Code.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(ServeError):
    """The request itself is malformed (names, dtypes, shapes, values, blobs)."""

    code = Code.INVALID_ARGUMENT


class NotFound(ServeError):
    """Unknown or gone model, version or session. `reason` says why a session is gone.

    Reasons used for sessions: ``unknown``, ``idle``, ``lifetime``, ``capacity``, ``shutdown``, ``closed``,
    ``moved`` (another replica owns it now), ``unloaded``.
    """

    code = Code.NOT_FOUND

    def __init__(self, message: str, reason: str = "unknown") -> None:
        super().__init__(message)
        self.reason = reason


class FailedPrecondition(ServeError):
    """The request is well formed but the target is in the wrong state (e.g. a seq that is not last + 1)."""

    code = Code.FAILED_PRECONDITION


class OutOfRange(ServeError):
    """A value lies outside what the server accepts (e.g. a chunk longer than max_chunk_steps)."""

    code = Code.OUT_OF_RANGE


class ResourceExhausted(ServeError):
    """A capacity limit (sessions, queue) is reached."""

    code = Code.RESOURCE_EXHAUSTED


class Unavailable(ServeError):
    """The server is draining or stopped; the client should retry elsewhere (or later)."""

    code = Code.UNAVAILABLE



class Aborted(ServeError):
    """A concurrency conflict (e.g. another replica took the session's lease); retrying may succeed."""

    code = Code.ABORTED


class Unauthenticated(ServeError):
    """The call carries no valid credential (missing, malformed or unknown API key)."""

    code = Code.UNAUTHENTICATED


class PermissionDenied(ServeError):
    """The caller is known but its role may not do this (e.g. an admin RPC without the admin role)."""

    code = Code.PERMISSION_DENIED
