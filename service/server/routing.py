"""Worker routing: with several worker processes behind one port, every call reaches the session's owner.

Native sessions are owned by id: worker k creates session ids that start with `w<k>.`; an id without such a
prefix (e.g. one created by another pod) belongs to worker `crc32(id) % workers`. A KServe sequence belongs to
the worker that received its START (or resumed it from the shared store), as the shared owner table says
(`service.server.ownership`, `service.server.kserve_routing`). Every worker listens on the shared TCP port and
on its own Unix socket (`<run dir>/w<k>.sock`). A call that lands on a worker that does not own its session
is forwarded, as the raw request bytes, to the owner's Unix socket (one `grpc.aio` channel per peer) and the
owner's answer, status and trailing metadata (`x-rnnserve-replica`) go back unchanged. A forwarded call
carries `x-rnnserve-forwarded`, so the owner serves it locally and never forwards again.

Routed: the native unary session calls (Step, GetState, SetState, Fork, Reset, Close, DescribeSession),
Generate on an existing session, Stream attaching to an existing session (the whole stream is piped),
StreamMany (rows split by owner, answers merged in order), KServe ModelInfer with a `sequence_id`, and
ModelStreamInfer (requests of sequences owned here served here, the others sent to their owners).
ReloadRepository runs on every worker. Everything else (CreateSession, a new Stream, stateless KServe,
metadata, health) is served where it lands. A single worker process (`workers = 1`) installs none of this.
"""

from __future__ import annotations

import asyncio
import contextlib
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc import aio

from service import wire
from service.proto import rnnserve_pb2 as pb
from service.server.interceptors import HandlerWrapper
from service.server.kserve_routing import StreamSplitter, route_of
from service.server.ownership import OwnerTable

FORWARDED_HEADER = "x-rnnserve-forwarded"
NATIVE = "/" + pb.DESCRIPTOR.services_by_name["RecurrentService"].full_name + "/"
KSERVE = "/inference.GRPCInferenceService/"
_SESSION_UNARY = {
    "Step": pb.StepRequest,
    "GetState": pb.SessionRequest,
    "SetState": pb.SetStateRequest,
    "Fork": pb.ForkRequest,
    "Reset": pb.SessionRequest,
    "Close": pb.SessionRequest,
    "DescribeSession": pb.SessionRequest,
}
# A peer that is restarting is back within a second or two: retry its socket often (gRPC's default backoff
# grows to two minutes, during which every forwarded call would fail at once).
_PEER_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
    ("grpc.max_receive_message_length", -1),
    ("grpc.max_send_message_length", -1),
)
# How long a call waits for the owner's socket (a restarting worker) before it fails with UNAVAILABLE.
PEER_WAIT_S = 5.0
# Client metadata that belongs to the connection, not the call: never copied onto a forwarded call.
_HOP_HEADERS = ("user-agent", "content-type", "te", "grpc-", ":")


def worker_prefix(index: int) -> str:
    """Prefix of the session ids worker `index` creates."""
    return f"w{index}."


def owner_of(session_id: str, workers: int) -> int:
    """Return the worker that owns `session_id`: its `w<k>.` prefix, else a stable hash of the id."""
    if session_id[:1] == "w":
        head, dot, _ = session_id.partition(".")
        if dot and head[1:].isdigit() and int(head[1:]) < workers:
            return int(head[1:])
    return zlib.crc32(session_id.encode("utf-8", "replace")) % workers


@dataclass(frozen=True, slots=True)
class Peers:
    """Where the workers of this server are: `workers` processes, Unix sockets under `run_dir`."""

    index: int
    workers: int
    run_dir: Path

    def socket(self, k: int) -> Path:
        """Worker k's Unix socket."""
        return self.run_dir / f"w{k}.sock"


def _serialize(message: Any) -> bytes:
    return message if type(message) is bytes else message.SerializeToString()


class Router(HandlerWrapper):
    """Outermost interceptor of a worker: serve owned calls here, forward the others (module docstring)."""

    def __init__(self, peers: Peers, owners: OwnerTable) -> None:
        super().__init__()
        self.peers = peers
        self.owners = owners
        self._channels: dict[int, aio.Channel] = {}
        self.forwarded: Any = None  # Metrics.forwarded (rnnserve_forwarded_total{method}), set by app.start

    def count_forward(self, method: str) -> None:
        """Count one call or stream request passed to another worker."""
        if self.forwarded is not None:
            self.forwarded.labels(method.rpartition("/")[2]).inc()

    def channel(self, k: int) -> aio.Channel:
        """Return the channel to worker k's Unix socket (made once)."""
        ch = self._channels.get(k)
        if ch is None:
            ch = self._channels[k] = aio.insecure_channel(
                f"unix:{self.peers.socket(k)}", options=_PEER_OPTIONS
            )
        return ch

    async def ready(self, k: int) -> None:
        # Calls then go out with wait_for_ready: a connection that drops between this check and the call
        # (the channel reports a connect failure of its last attempt) is retried instead of failing the call.
        """Wait (up to PEER_WAIT_S) until worker k's socket is connected (a replaced worker is back soon)."""
        ch = self.channel(k)
        if ch.get_state(try_to_connect=True) is grpc.ChannelConnectivity.READY:
            return
        try:
            await asyncio.wait_for(ch.channel_ready(), timeout=PEER_WAIT_S)
        except TimeoutError:
            raise aio.AioRpcError(
                grpc.StatusCode.UNAVAILABLE,
                aio.Metadata(),
                aio.Metadata(),
                details=f"worker {k}, which owns this session, is not serving (restarting?); retry",
            ) from None

    async def close(self) -> None:
        """Close the peer channels."""
        for ch in self._channels.values():
            await ch.close()

    # -- which calls are routed, and how ---------------------------------------------------------------------

    def _wrap(self, method: str, handler: Any) -> Any:
        name = method.rpartition("/")[2]
        if method.startswith(NATIVE):
            if name in _SESSION_UNARY:
                return self._unary(method, handler, lambda r: self._session_owner(r.session_id))
            if name == "Generate":
                return self._unary(method, handler, lambda r: self._session_owner(r.session_id), stream=True)
            if name == "Stream":
                return self._stream(method, handler)
            if name == "StreamMany":
                return self._stream_many(method, handler)
            if name == "ReloadRepository":
                return self._everywhere(method, handler)
        elif method.startswith(KSERVE):
            if name == "ModelInfer":
                return self._unary(method, handler, self._sequence_owner)
            if name == "ModelStreamInfer":
                return self._kserve_stream(method, handler)
        return handler

    def _session_owner(self, session_id: str) -> int:
        return owner_of(session_id, self.peers.workers) if session_id else self.peers.index

    def _sequence_owner(self, request: Any) -> int:
        return route_of(request, self.owners)[0]

    # -- forwarding helpers ----------------------------------------------------------------------------------

    @staticmethod
    def _is_forwarded(context: Any) -> bool:
        return any(k == FORWARDED_HEADER for k, _ in context.invocation_metadata() or ())

    @staticmethod
    def forwarded_metadata(context: Any) -> tuple[tuple[str, Any], ...]:
        """Return the caller's metadata for a forwarded call (hop headers dropped, the forward marked)."""
        kept = tuple(
            (k, v) for k, v in (context.invocation_metadata() or ()) if not k.startswith(_HOP_HEADERS)
        )
        return (*kept, (FORWARDED_HEADER, "1"))

    @staticmethod
    async def fail(context: Any, exc: aio.AioRpcError) -> None:
        """End the call with a forwarded call's failure (status, message, trailers)."""
        trailing = exc.trailing_metadata()
        if trailing:
            context.set_trailing_metadata(tuple(trailing))
        details = exc.details() or ""
        if exc.code() == grpc.StatusCode.UNAVAILABLE and FORWARDED_HEADER not in details:
            details = f"{details} (forwarded to worker that owns the session; retry)"
        await context.abort(exc.code(), details)

    # -- unary request (unary or streamed answer) ------------------------------------------------------------

    def _unary(self, method: str, handler: Any, owner: Callable[[Any], int], *, stream: bool = False) -> Any:
        deser = handler.request_deserializer
        behavior = handler.unary_stream if stream else handler.unary_unary
        me = self.peers.index
        callers: dict[int, Any] = {}  # peer -> multi-callable for this method (made once)

        def caller(k: int) -> Any:
            made = callers.get(k)
            if made is None:
                ch = self.channel(k)
                made = callers[k] = ch.unary_stream(method) if stream else ch.unary_unary(method)
            return made

        async def call(raw: bytes, context: Any) -> Any:
            request = deser(raw)
            k = me if self._is_forwarded(context) else owner(request)
            if k == me:
                return await behavior(request, context)
            self.count_forward(method)
            try:
                await self.ready(k)
                rpc = caller(k)(
                    raw,
                    metadata=self.forwarded_metadata(context),
                    timeout=context.time_remaining(),
                    wait_for_ready=True,
                )
                if stream:
                    async for answer in rpc:
                        await context.write(answer)
                    answer = None
                else:
                    answer = await rpc
                context.set_trailing_metadata(tuple(await rpc.trailing_metadata() or ()))
                return answer
            except aio.AioRpcError as exc:
                await self.fail(context, exc)

        if stream:
            return grpc.unary_stream_rpc_method_handler(call, None, _serialize)
        return grpc.unary_unary_rpc_method_handler(call, None, _serialize)

    def _everywhere(self, method: str, handler: Any) -> Any:
        deser, behavior = handler.request_deserializer, handler.unary_unary

        async def call(raw: bytes, context: Any) -> Any:
            if not self._is_forwarded(context):
                for k in range(self.peers.workers):
                    if k != self.peers.index:
                        with contextlib.suppress(aio.AioRpcError):  # a restarting worker loads at start-up
                            await self.channel(k).unary_unary(method)(
                                raw,
                                metadata=self.forwarded_metadata(context),
                                timeout=context.time_remaining(),
                            )
            return await behavior(deser(raw), context)

        return grpc.unary_unary_rpc_method_handler(call, None, _serialize)

    # -- native Stream: the opening message decides ----------------------------------------------------------

    def _stream(self, method: str, handler: Any) -> Any:
        deser, behavior = handler.request_deserializer, handler.stream_stream
        me = self.peers.index

        async def call(requests: AsyncIterator[bytes], context: Any) -> Any:
            it = requests.__aiter__()
            try:
                first = await it.__anext__()
            except StopAsyncIteration:
                return await behavior(_empty(), context)
            opening = deser(first)
            k = me
            if not self._is_forwarded(context) and opening.HasField("open") and opening.open.session_id:
                k = owner_of(opening.open.session_id, self.peers.workers)
            if k == me:

                async def local() -> AsyncIterator[Any]:
                    yield opening
                    async for raw in it:
                        yield deser(raw)

                return await behavior(local(), context)
            self.count_forward(method)
            await self._pipe(method, k, context, first, it)

        return grpc.stream_stream_rpc_method_handler(call, None, _serialize)

    async def _pipe(
        self, method: str, k: int, context: Any, first: bytes, rest: AsyncIterator[bytes]
    ) -> None:
        rpc = self.channel(k).stream_stream(method)(
            metadata=self.forwarded_metadata(context), timeout=context.time_remaining(), wait_for_ready=True
        )

        async def pump() -> None:
            await rpc.write(first)
            async for raw in rest:
                await rpc.write(raw)
            await rpc.done_writing()

        task = asyncio.ensure_future(pump())
        try:
            async for answer in rpc:
                await context.write(answer)
            context.set_trailing_metadata(tuple(await rpc.trailing_metadata() or ()))
        except aio.AioRpcError as exc:
            await self.fail(context, exc)
        finally:
            task.cancel()
            rpc.cancel()

    # -- StreamMany: rows split by owner ---------------------------------------------------------------------

    def _stream_many(self, method: str, handler: Any) -> Any:
        deser, behavior = handler.request_deserializer, handler.stream_stream

        async def call(requests: AsyncIterator[bytes], context: Any) -> Any:
            if self._is_forwarded(context):
                return await behavior(_parsed(deser, requests), context)
            subs: dict[int, Any] = {}
            try:
                async for raw in requests:
                    request = deser(raw)
                    owners = [owner_of(s, self.peers.workers) for s in request.session_ids] or [
                        self.peers.index
                    ]
                    parts = _split(request, owners)
                    for k, part in parts.items():
                        if k not in subs:
                            await self.ready(k)
                            subs[k] = self.channel(k).stream_stream(method)(
                                metadata=self.forwarded_metadata(context), wait_for_ready=True
                            )
                        await subs[k].write(raw if len(parts) == 1 else part[1].SerializeToString())
                    answers = {k: pb.StepManyResponse.FromString(await subs[k].read()) for k in parts}
                    await context.write(_merge(request, parts, answers))
            except aio.AioRpcError as exc:
                await self.fail(context, exc)
            finally:
                for sub in subs.values():
                    sub.cancel()

        return grpc.stream_stream_rpc_method_handler(call, None, _serialize)

    # -- KServe stream: sequences owned here served here, the others' requests sent to their owners -------

    def _kserve_stream(self, method: str, handler: Any) -> Any:
        deser, behavior = handler.request_deserializer, handler.stream_stream

        async def call(requests: AsyncIterator[bytes], context: Any) -> Any:
            if self._is_forwarded(context):
                return await behavior(_parsed(deser, requests), context)
            await StreamSplitter(self, method, context, deser).run(behavior, requests)

        return grpc.stream_stream_rpc_method_handler(call, None, _serialize)


async def _parsed(deser: Callable[[bytes], Any], requests: AsyncIterator[bytes]) -> AsyncIterator[Any]:
    async for raw in requests:
        yield deser(raw)


async def _empty() -> AsyncIterator[Any]:
    return
    yield  # pragma: no cover - makes this an async generator


def _split(request: Any, owners: list[int]) -> dict[int, tuple[list[int], Any]]:
    """Rows of a StepMany request grouped by owner: {owner: (row indices, sub-request)}."""
    groups: dict[int, list[int]] = {}
    for i, k in enumerate(owners):
        groups.setdefault(k, []).append(i)
    if len(groups) == 1:
        ((k, rows),) = groups.items()
        return {k: (rows, request)}
    arrays = [(t.name, wire.tensor_to_array(t)) for t in request.inputs]
    parts = {}
    for k, rows in groups.items():
        sub = pb.StepManyRequest(
            tag=request.tag,
            session_ids=[request.session_ids[i] for i in rows],
            seqs=[request.seqs[i] for i in rows] if len(request.seqs) == len(owners) else list(request.seqs),
            inputs=[wire.array_to_tensor(name, arr[rows]) for name, arr in arrays],
            last_only=request.last_only,
        )
        parts[k] = (rows, sub)
    return parts


def _merge(request: Any, parts: dict[int, tuple[list[int], Any]], answers: dict[int, Any]) -> Any:
    """One StepMany answer from the owners' answers, rows back in the request's order."""
    if len(parts) == 1:
        return next(iter(answers.values()))
    n = len(request.session_ids)
    merged = pb.StepManyResponse(tag=request.tag)
    cached, codes, messages = [False] * n, [0] * n, [""] * n
    outputs: dict[str, np.ndarray] = {}
    for k, (rows, _sub) in parts.items():
        answer = answers[k]
        for j, i in enumerate(rows):
            if j < len(answer.cached):
                cached[i] = answer.cached[j]
            if j < len(answer.codes):
                codes[i] = answer.codes[j]
            if j < len(answer.messages):
                messages[i] = answer.messages[j]
        for t in answer.outputs:
            arr = wire.tensor_to_array(t)
            if t.name not in outputs:
                outputs[t.name] = np.zeros((n, *arr.shape[1:]), dtype=arr.dtype)
            if arr.shape[0] == len(rows):
                outputs[t.name][rows] = arr
    merged.outputs.extend(wire.array_to_tensor(name, arr) for name, arr in outputs.items())
    merged.cached.extend(cached)
    merged.codes.extend(codes)
    merged.messages.extend(messages)
    return merged
