"""The one place where errors become gRPC statuses, and where every RPC is counted and timed.

`ErrorMappingInterceptor` wraps every method handler of the server (native, KServe, health, reflection):
a `ServeError` raised by a handler ends the call with the error's own status code and message; any other
exception becomes INTERNAL with a generic message (details go to the log, via `status_of`). Each
finished
call is reported once to an observer (method, status code name, seconds) that feeds the Prometheus metrics.
Every reply, success or error, unary or streaming, carries the trailing metadata `x-rnnserve-replica: <replica
id>` (`REPLICA_HEADER`), so which replica served a call can be seen from outside, through any proxy. With a
`RequestLog`, every work call (not health or reflection) also gets its structured log line
(`service.server.request_log`).

The wrapping happens once per method (cached), so the per-call cost is one extra coroutine frame; streams are
wrapped as a whole, never per message.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable
from typing import Any

import grpc
from grpc import aio

from service.errors import ServeError, Unavailable
from service.server.request_log import RequestLog

_log = logging.getLogger(__name__)

# (full method name, status code name, seconds) -> None
CallObserver = Callable[[str, str, float], None]

DRAINING_MESSAGE = "server draining; reconnect"
# Trailing metadata key naming the replica that answered (settings.replica_id).
REPLICA_HEADER = "x-rnnserve-replica"
# Trailing metadata key naming why a session (or a stream) ended: a NOT_FOUND for a gone session carries it,
# and so does every stream the server ends (service.server.streams).
END_REASON_HEADER = "x-rnnserve-end-reason"
# Infrastructure services stay callable while draining (probes must see NOT_SERVING) and never count as work.
_INFRA_PREFIXES = ("/grpc.health.", "/grpc.reflection.")


def _code_name(context: Any, default: str) -> str:
    code = context.code() if hasattr(context, "code") else None
    if isinstance(code, grpc.StatusCode):
        return code.name
    return default


MAX_MESSAGE_CHARS = 1000  # a status message travels in a trailer; one echoing a huge input would not fit


def short(message: str) -> str:
    """Cut a client-bound message that echoes a huge input down to a size any client accepts."""
    if len(message) <= MAX_MESSAGE_CHARS:
        return message
    return message[: MAX_MESSAGE_CHARS - 40] + f"... ({len(message)} characters, cut)"


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """Map any exception to the (status code, client-safe message) pair the edge sends.

    Typed errors keep their own code (mapped by name) and message. Anything else is a bug: it becomes INTERNAL
    with a generic message, and the details (with traceback) go to the log, never to the client.
    """
    if isinstance(exc, ServeError):
        return grpc.StatusCode[exc.code.name], short(exc.message)
    _log.error("internal error: %r", exc, exc_info=exc)
    return grpc.StatusCode.INTERNAL, "internal server error (details are in the server log)"


async def _abort(context: Any, exc: BaseException) -> None:
    code, message = status_of(exc)
    reason = getattr(exc, "reason", "unknown")
    if reason != "unknown" and isinstance(exc, ServeError):
        kept = tuple((k, v) for k, v in (context.trailing_metadata() or ()) if k != END_REASON_HEADER)
        context.set_trailing_metadata((*kept, (END_REASON_HEADER, reason)))
    await context.abort(code, message)


class HandlerWrapper(aio.ServerInterceptor):
    """An interceptor that replaces a method's handler by a wrapped one, built once per method and cached.

    Subclasses give `_wrap(method, handler)`; the per-call cost is a dict lookup.
    """

    def __init__(self) -> None:
        self._cache: dict[str, tuple[Any, Any]] = {}

    def _wrap(self, method: str, handler: Any) -> Any:
        raise NotImplementedError

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        """Return the method's handler with its behaviour wrapped (cached per method)."""
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        cached = self._cache.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(method, handler)
        self._cache[method] = (handler, wrapped)
        return wrapped


class ErrorMappingInterceptor(HandlerWrapper):
    """Map exceptions to statuses and observe every call (see module docstring)."""

    def __init__(
        self,
        observe: CallObserver | None = None,
        *,
        replica_id: str | None = None,
        request_log: RequestLog | None = None,
    ) -> None:
        self._observe = observe
        self._request_log = request_log if request_log is not None and request_log.enabled else None
        self._trailer = ((REPLICA_HEADER, replica_id),) if replica_id else None
        super().__init__()
        # Draining: new work calls are refused with UNAVAILABLE; `in_flight` counts unary-request work calls
        # (streams of requests are tracked by their servicers) so shutdown can wait for exactly those.
        self.draining = False
        self.in_flight = 0

    def _wrap(self, method: str, handler: Any) -> Any:
        work = not method.startswith(_INFRA_PREFIXES)
        if handler.unary_unary is not None:
            return handler._replace(unary_unary=self._wrap_coroutine(method, handler.unary_unary, work, work))
        if handler.stream_unary is not None:
            return handler._replace(
                stream_unary=self._wrap_coroutine(method, handler.stream_unary, work, False, True)
            )
        if handler.unary_stream is not None:
            behavior = handler.unary_stream
            wrap = self._wrap_generator if inspect.isasyncgenfunction(behavior) else self._wrap_coroutine
            return handler._replace(unary_stream=wrap(method, behavior, work, work))
        behavior = handler.stream_stream
        wrap = self._wrap_generator if inspect.isasyncgenfunction(behavior) else self._wrap_coroutine
        return handler._replace(stream_stream=wrap(method, behavior, work, False, True))

    def _wrap_coroutine(
        self, method: str, behavior: Callable[..., Any], refuse: bool, count: bool, streaming: bool = False
    ) -> Callable[..., Any]:
        observe, trailer = self._observe, self._trailer
        log = None if method.startswith(_INFRA_PREFIXES) else self._request_log

        async def call(request: Any, context: Any) -> Any:
            start = time.perf_counter()
            code = "OK"
            entry = None
            if log is not None:
                entry, request = log.begin(method, request, streaming)
            if count:
                self.in_flight += 1
            if trailer is not None:  # set first: an abort below sends it too
                context.set_trailing_metadata(trailer)
            try:
                if refuse and self.draining:
                    raise Unavailable(DRAINING_MESSAGE)
                return await behavior(request, context)
            except aio.AbortError:
                code = _code_name(context, "UNKNOWN")
                raise
            except Exception as exc:  # noqa: BLE001 - the single mapping point
                code = _mapped_name(exc)
                await _abort(context, exc)
            except BaseException:
                code = "CANCELLED"
                raise
            finally:
                if count:
                    self.in_flight -= 1
                if observe is not None:
                    observe(method, code, time.perf_counter() - start)
                if entry is not None and log is not None:
                    log.end(entry, code)

        return call

    def _wrap_generator(  # noqa: C901 - one frame per call on purpose (no helper calls per message)
        self, method: str, behavior: Callable[..., Any], refuse: bool, count: bool, streaming: bool = False
    ) -> Callable[..., Any]:
        observe, trailer = self._observe, self._trailer
        log = None if method.startswith(_INFRA_PREFIXES) else self._request_log

        async def call(request: Any, context: Any) -> Any:
            start = time.perf_counter()
            code = "OK"
            entry = None
            if log is not None:
                entry, request = log.begin(method, request, streaming)
            if count:
                self.in_flight += 1
            if trailer is not None:  # set first: an abort below sends it too
                context.set_trailing_metadata(trailer)
            try:
                if refuse and self.draining:
                    raise Unavailable(DRAINING_MESSAGE)
                async for response in behavior(request, context):
                    yield response
            except aio.AbortError:
                code = _code_name(context, "UNKNOWN")
                raise
            except Exception as exc:  # noqa: BLE001 - the single mapping point
                code = _mapped_name(exc)
                await _abort(context, exc)
            except BaseException:
                code = "CANCELLED"
                raise
            finally:
                if count:
                    self.in_flight -= 1
                if observe is not None:
                    observe(method, code, time.perf_counter() - start)
                if entry is not None and log is not None:
                    log.end(entry, code)

        return call


def _mapped_name(exc: BaseException) -> str:
    # status_of logs unknown exceptions; only typed errors are looked up here to avoid logging twice.
    return exc.code.name if isinstance(exc, ServeError) else "INTERNAL"
