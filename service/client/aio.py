"""asyncio variant of `service.client`: the same sessions, retries and failover on `grpc.aio` channels.

    async with AsyncClient("localhost:8001") as client:
        async with await client.session("default") as s:
            out = await s.step(np.array([3, 1, 4]))
            async for out in s.stream(chunks):
                ...

Semantics are those of the blocking client (see its module docstring): every chunk carries seq = last applied
+ 1; after a transport error the same chunk is re-sent with the same seq on the next address; every call of a
session carries its affinity header (`service.client.AFFINITY_HEADER`), keyed the same way. A session the
server ends raises `SessionEnded` with its reason; a stream told "draining" or "moved" resumes by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping, Sequence
from typing import Any

import grpc
import numpy as np
from grpc import aio

from service import wire
from service.client.common import (
    ArrayLike,
    Inputs,
    Metadata,
    ModelInfo,
    Retrier,
    SessionInfo,
    affinity_metadata,
    channel_options,
    encode_inputs,
    ended_from_pb,
    ended_of,
    new_affinity_key,
    outputs_of,
    parse_addresses,
    should_retry,
)
from service.client.security import Credentials, open_aio_channel
from service.proto import rnnserve_pb2 as pb
from service.proto import rnnserve_pb2_grpc as pb_grpc


class AsyncClient:
    """An asyncio client over one or more server addresses (failover in list order)."""

    def __init__(
        self,
        addresses: str | Sequence[str] | None = None,
        *,
        timeout: float = 30.0,
        max_attempts: int = 6,
        backoff_s: float = 0.05,
        max_message_bytes: int = 64 * 1024 * 1024,
        credentials: Credentials | None = None,
        resume_timeout_s: float = 30.0,
    ) -> None:
        self.addresses = parse_addresses(addresses)
        self.resume_timeout_s = resume_timeout_s  # see `service.client.Client`
        # TLS and API key (service.client.security); default: RNNSERVE_API_KEY / RNNSERVE_TLS_* if set.
        self.credentials = credentials if credentials is not None else Credentials.from_env()
        self.timeout = timeout
        self.max_attempts = max(max_attempts, len(self.addresses) + 1)
        self.backoff_s = backoff_s
        self._options = channel_options(max_message_bytes)
        self._index = 0
        self.failovers = 0  # how many times a call was re-sent after a transport error (or moved address)
        self.resumed: dict[str, int] = {}  # streams told "draining" or "moved" and resumed, by reason
        self._models: dict[tuple[str, int], ModelInfo] = {}
        self._old: list[aio.Channel] = []
        self._connect()

    def _connect(self) -> None:
        self.address = self.addresses[self._index]
        self.channel = open_aio_channel(self.address, self._options, self.credentials)
        self.stub = pb_grpc.RecurrentServiceStub(self.channel)

    def failover(self, seen_channel: aio.Channel | None = None) -> None:
        """Move to the next address (unless another task already moved since `seen_channel`)."""
        if seen_channel is not None and seen_channel is not self.channel:
            return
        self._old.append(self.channel)  # closed in close(); closing now would cancel other tasks' calls
        self.failovers += 1
        self._index = (self._index + 1) % len(self.addresses)
        self._connect()

    def retry(self, err: grpc.RpcError, attempt: int, session_bound: bool) -> bool:
        """Whether `err` on attempt `attempt` may be retried (see `service.client.should_retry`)."""
        return should_retry(err, attempt, self.max_attempts, len(self.addresses), session_bound)

    async def call(
        self, method: str, request: Any, *, session_bound: bool = False, metadata: Metadata | None = None
    ) -> Any:
        """Call a unary method by name with retry and failover (`metadata` goes with every attempt)."""
        for attempt in range(self.max_attempts):
            channel = self.channel
            try:
                return await getattr(self.stub, method)(request, timeout=self.timeout, metadata=metadata)
            except grpc.RpcError as err:
                ended = ended_of(err, getattr(request, "session_id", ""))
                if ended is not None and not ended.resumable:
                    raise ended from err
                if not self.retry(err, attempt, session_bound):
                    raise
                self.failover(channel)
                await asyncio.sleep(self.backoff_s * min(attempt, 4))
        raise AssertionError("unreachable")

    async def close(self) -> None:
        """Close every channel this client opened."""
        for ch in [*self._old, self.channel]:
            await ch.close()
        self._old.clear()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def list_models(self) -> list[ModelInfo]:
        """Every served model (newest version of each)."""
        response = await self.call("ListModels", pb.ListModelsRequest())
        return [ModelInfo.from_pb(m) for m in response.models]

    async def get_model(self, name: str, version: int | None = None) -> ModelInfo:
        """One model version (cached per client)."""
        key = (name, version or 0)
        info = self._models.get(key)
        if info is None:
            request = pb.GetModelRequest(name=name, version=version or 0)
            info = ModelInfo.from_pb(await self.call("GetModel", request))
            self._models[key] = self._models[(name, info.version)] = info
        return info

    async def session(
        self,
        model: str,
        version: int | None = None,
        *,
        idle_ttl_s: float | None = None,
        initial_state: Mapping[str, ArrayLike] | None = None,
        affinity_key: str | None = None,
    ) -> AsyncSession:
        """Open a new session on `model` (`affinity_key`: see `service.client.Client.session`)."""
        metadata = affinity_metadata(affinity_key if affinity_key is not None else new_affinity_key())
        request = pb.CreateSessionRequest(
            model=model,
            version=version or 0,
            idle_ttl_s=idle_ttl_s or 0.0,
            initial_state=[wire.array_to_tensor(k, np.asarray(v)) for k, v in (initial_state or {}).items()],
        )
        info = SessionInfo.from_pb(await self.call("CreateSession", request, metadata=metadata))
        return AsyncSession(self, info, await self.get_model(info.model, info.version), metadata)

    async def attach(self, session_id: str, *, affinity_key: str | None = None) -> AsyncSession:
        """Return an `AsyncSession` for an existing session (routed by its id unless `affinity_key`)."""
        metadata = affinity_metadata(session_id if affinity_key is None else affinity_key)
        info = await self.describe_session(session_id, metadata=metadata)
        return AsyncSession(self, info, await self.get_model(info.model, info.version), metadata)

    async def describe_session(self, session_id: str, *, metadata: Metadata | None = None) -> SessionInfo:
        """Return a session's info (routed by `metadata`, by default the session id as affinity key)."""
        request = pb.SessionRequest(session_id=session_id)
        metadata = metadata if metadata is not None else affinity_metadata(session_id)
        response = await self.call("DescribeSession", request, session_bound=True, metadata=metadata)
        return SessionInfo.from_pb(response)

    async def generate(
        self,
        model: str = "default",
        prime: str | Sequence[int] = "",
        n: int = 100,
        temperature: float = 1.0,
        top_k: int = 0,
        seed: int = 0,
        *,
        version: int | None = None,
    ) -> AsyncIterator[str]:
        """Sample `n` tokens after a prime; yields text pieces (resumes after errors like the sync client)."""
        session = await self.session(model, version)
        request = pb.GenerateRequest(
            session_id=session.id, seq=1, n_tokens=n, temperature=temperature, top_k=top_k, seed=seed
        )
        if isinstance(prime, str):
            request.prime_text = prime
        else:
            request.prime_ids.extend(int(t) for t in prime)
        done = 0
        try:
            for attempt in range(self.max_attempts):
                channel = self.channel
                try:
                    i = 0
                    responses = self.stub.Generate(
                        request, timeout=self.timeout + n * 0.1, metadata=session.metadata
                    )
                    async for response in responses:
                        if i >= done:
                            done += 1
                            yield response.text
                        i += 1
                    return
                except grpc.RpcError as err:
                    if not self.retry(err, attempt, session_bound=True):
                        raise
                    self.failover(channel)
                    await asyncio.sleep(self.backoff_s * min(attempt, 4))
        finally:
            await session.close()


class AsyncSession:
    """One server-side session (asyncio); see `service.client.Session`."""

    def __init__(
        self, client: AsyncClient, info: SessionInfo, model: ModelInfo, metadata: Metadata | None = None
    ) -> None:
        self.client = client
        self.id = info.session_id
        self.metadata: Metadata = metadata if metadata is not None else affinity_metadata(info.session_id)
        self.affinity_key = self.metadata[0][1]
        self.info = info
        self.seq = info.last_seq
        self.model = model
        self._closed = False

    async def step(self, inputs: Inputs, *, last_only: bool = False) -> dict[str, np.ndarray]:
        """Apply one chunk."""
        request = pb.StepRequest(
            session_id=self.id,
            seq=self.seq + 1,
            inputs=encode_inputs(self.model, inputs),
            last_only=last_only,
        )
        response = await self.client.call("Step", request, session_bound=True, metadata=self.metadata)
        self.seq = response.seq
        return outputs_of(response.outputs)

    async def stream(
        self, chunks: Iterable[Inputs] | AsyncIterable[Inputs], *, last_only: bool = False
    ) -> AsyncIterator[dict[str, np.ndarray]]:
        """Send chunks over one lock-step bidi stream (re-attached after transport errors); yield outputs.

        Between chunks a read is already waiting, so a final message the server sends while the stream is idle
        (a drain, a move, an expiry) is seen before the next chunk is written: a write into a call the server
        has ended fails with an anonymous INTERNAL in grpc.aio.
        """
        call: Any = None
        ahead: asyncio.Future[Any] | None = None  # the read of the next message, started after each answer
        try:
            async for chunk in _aiter(chunks):
                request = pb.StreamRequest(
                    seq=self.seq + 1, inputs=encode_inputs(self.model, chunk), last_only=last_only
                )
                retrier = Retrier(self.client, self.id)
                while True:
                    channel = self.client.channel
                    try:
                        if call is None:
                            call = self.client.stub.Stream(metadata=self.metadata)
                            opening = pb.StreamOpen(session_id=self.id, keep=True, lifecycle_events=True)
                            await call.write(pb.StreamRequest(open=opening))
                            self.info = SessionInfo.from_pb(_answer(await call.read()).session)
                            ahead = None
                        if ahead is not None and ahead.done():
                            _answer(ahead.result())  # the server spoke unasked: its last word (raises)
                        try:
                            await call.write(request)
                        except grpc.RpcError:
                            if ahead is not None:  # the server ended the call: its last message says why
                                _answer(await ahead)
                            raise
                        response = _answer(await (ahead if ahead is not None else call.read()))
                        ahead = asyncio.ensure_future(call.read())
                        break
                    except grpc.RpcError as err:
                        if call is not None:
                            call.cancel()
                        _dropped(ahead)
                        call = ahead = None
                        wait = retrier.delay(err)  # raises SessionEnded, or the error, when it gives up
                        self.client.failover(channel)
                        await asyncio.sleep(wait)
                self.seq = response.seq
                yield outputs_of(response.outputs)
        finally:
            if call is not None:
                with contextlib.suppress(grpc.RpcError):
                    await call.done_writing()
                    if ahead is not None:
                        await ahead
                    while await call.read() is not aio.EOF:  # nothing more comes; drain to the end
                        pass
            _dropped(ahead)

    async def describe(self) -> SessionInfo:
        """Fetch the server's view of this session."""
        self.info = await self.client.describe_session(self.id, metadata=self.metadata)
        return self.info

    async def state(self) -> bytes:
        """Return the whole state as a versioned, integrity-checked blob."""
        request = pb.SessionRequest(session_id=self.id)
        return (await self.client.call("GetState", request, session_bound=True, metadata=self.metadata)).blob

    async def set_state(self, blob: bytes) -> SessionInfo:
        """Replace the state (and seq) from a blob taken with `state()`."""
        request = pb.SetStateRequest(session_id=self.id, blob=blob)
        info = SessionInfo.from_pb(
            await self.client.call("SetState", request, session_bound=True, metadata=self.metadata)
        )
        self.seq, self.info = info.last_seq, info
        return info

    async def fork(self, *, idle_ttl_s: float | None = None) -> AsyncSession:
        """Open a new session starting from a copy of this one's state."""
        request = pb.ForkRequest(session_id=self.id, idle_ttl_s=idle_ttl_s or 0.0)
        info = SessionInfo.from_pb(
            await self.client.call("Fork", request, session_bound=True, metadata=self.metadata)
        )
        return AsyncSession(self.client, info, self.model, self.metadata)  # stays with its parent

    async def reset(self) -> SessionInfo:
        """State back to the initial state, seq back to 0."""
        request = pb.SessionRequest(session_id=self.id)
        info = SessionInfo.from_pb(
            await self.client.call("Reset", request, session_bound=True, metadata=self.metadata)
        )
        self.seq, self.info = info.last_seq, info
        return info

    async def close(self) -> None:
        """End the session on the server (idempotent on this object)."""
        if self._closed:
            return
        self._closed = True
        try:
            await self.client.call(
                "Close", pb.SessionRequest(session_id=self.id), session_bound=True, metadata=self.metadata
            )
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.NOT_FOUND:
                raise

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def _aiter(chunks: Iterable[Inputs] | AsyncIterable[Inputs]) -> AsyncIterator[Inputs]:
    if isinstance(chunks, AsyncIterable):
        async for chunk in chunks:
            yield chunk
    else:
        for chunk in chunks:
            yield chunk


def _dropped(read: asyncio.Future[Any] | None) -> None:
    """Forget a read-ahead of a call that is gone (its outcome is retrieved, so nothing logs it)."""
    if read is not None:
        read.cancel()
        read.add_done_callback(lambda f: f.cancelled() or f.exception())


def _answer(response: Any) -> pb.StreamResponse:
    """Return a stream's answer; raise for a final `ended` message or an end without an answer."""
    if response is aio.EOF:
        raise _eof()
    if response.HasField("ended"):  # the server's last word: the request was not applied
        raise ended_from_pb(response.ended)
    return response  # type: ignore[no-any-return]


def _eof() -> grpc.RpcError:
    """Return UNAVAILABLE for a stream that ended unanswered, so the chunk is retried elsewhere."""
    return aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE, aio.Metadata(), aio.Metadata(), details="stream ended without an answer"
    )
