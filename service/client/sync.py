"""Python client of the rnnserve native API: sessions as objects, streaming as an iterator, failover.

    from service.client import Client
    with Client("localhost:8001") as client:
        with client.session("default") as s:
            out = s.step(np.array([3, 1, 4]))           # {"logits": (3, V) array}
            for out in s.stream(chunks):                   # one bidi stream, one answer per chunk
                ...
        for piece in client.generate("default", prime="X:1", n=400, temperature=0.8, seed=7):
            print(piece, end="")

Exactly-once makes retrying safe: every chunk carries seq = last applied + 1, and the server answers a repeat
of its last seq from a cache without applying it again. So after a transport error (UNAVAILABLE, a drained or
dead server, a deadline) the client re-sends the same chunk with the same seq, reconnecting to the next
address of its list first; a NOT_FOUND from a replica that does not hold the session is also tried on the
other addresses (with a shared session store, any replica can resume it from the seq it holds).

When the server ends a session, or the stream carrying it, it says why (`SessionEnded.reason`): a final
reason (idle, lifetime, capacity, closed, unloaded) raises `SessionEnded`; a resumable one (draining: the
server shuts down; moved: another replica owns the session now) makes a stream reconnect and re-attach by
itself, for up to `resume_timeout_s`, and go on from the seq it holds: no chunk lost or applied twice.

Affinity: every call that belongs to one session (CreateSession, Step, Stream, Generate, GetState,
SetState, Fork, Reset, Close, DescribeSession) carries the gRPC metadata `x-rnnserve-affinity: <key>`
(`AFFINITY_HEADER`), so a consistent-hash proxy (deploy/components/envoy: Envoy's RING_HASH on that header)
sends all of them to one replica. The key is a random token the `Session` draws before CreateSession (the
server picks the session id, so the id cannot be the key of its own creation); a session opened with
`attach(session_id)` uses its id. A fork keeps its parent's key (it is created where the parent's state is).
The server ignores the header.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import grpc
import numpy as np

from service import wire
from service.client.common import (
    AFFINITY_HEADER,
    RETRYABLE,
    ArrayLike,
    Inputs,
    LockStepCall,
    Metadata,
    ModelInfo,
    SessionEnded,
    SessionInfo,
    TensorInfo,
    affinity_metadata,
    channel_options,
    default_address,
    encode_inputs,
    ended_from_pb,
    ended_of,
    new_affinity_key,
    outputs_of,
    parse_addresses,
    should_retry,
)
from service.client.multiplex import Multiplexer, RowError
from service.client.security import Credentials, open_channel
from service.proto import rnnserve_pb2 as pb
from service.proto import rnnserve_pb2_grpc as pb_grpc

__all__ = [
    "AFFINITY_HEADER",
    "RETRYABLE",
    "ArrayLike",
    "Client",
    "Multiplexer",
    "RowError",
    "Inputs",
    "Metadata",
    "ModelInfo",
    "Session",
    "SessionEnded",
    "SessionInfo",
    "TensorInfo",
    "affinity_metadata",
    "channel_options",
    "default_address",
    "encode_inputs",
    "new_affinity_key",
    "outputs_of",
    "parse_addresses",
    "should_retry",
]


class Client:
    """A synchronous client over one or more server addresses (failover in list order).

    `addresses`: "host:port", "h1:p1,h2:p2" or a list (default: $RNNSERVE_ADDRESS, else localhost:8001).
    `timeout`: seconds per call. `max_attempts`: tries of one request across transport errors and failovers.
    `resume_timeout_s`: how long a stream told "draining" or "moved" keeps reconnecting to resume its session.
    """

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
        self.resume_timeout_s = resume_timeout_s
        # TLS and API key (service.client.security); default: RNNSERVE_API_KEY / RNNSERVE_TLS_* if set.
        self.credentials = credentials if credentials is not None else Credentials.from_env()
        self.timeout = timeout
        self.max_attempts = max(max_attempts, len(self.addresses) + 1)
        self._backoff_s = self.backoff_s = backoff_s
        self._options = channel_options(max_message_bytes)
        self._lock = threading.Lock()
        self._index = 0
        self.failovers = 0  # how many times a call was re-sent after a transport error (or moved address)
        self.resumed: dict[str, int] = {}  # streams told "draining" or "moved" and resumed, by reason
        self._models: dict[tuple[str, int], ModelInfo] = {}
        self._connect()

    # ---- connection and retry -----------------------------------------------------------------------------

    def _connect(self) -> None:
        self.address = self.addresses[self._index]
        self._channel = open_channel(self.address, self._options, self.credentials)
        self.stub = pb_grpc.RecurrentServiceStub(self._channel)

    def failover(self, seen_channel: grpc.Channel | None = None) -> None:
        """Move to the next address (unless another thread already moved since `seen_channel`)."""
        with self._lock:
            if seen_channel is not None and seen_channel is not self._channel:
                return
            self._channel.close()
            self.failovers += 1
            self._index = (self._index + 1) % len(self.addresses)
            self._connect()

    def _should_retry(self, err: grpc.RpcError, attempt: int, session_bound: bool) -> bool:
        return should_retry(err, attempt, self.max_attempts, len(self.addresses), session_bound)

    def call(
        self, method: str, request: Any, *, session_bound: bool = False, metadata: Metadata | None = None
    ) -> Any:
        """Call a unary method by name with retry and failover (requests are idempotent or seq-guarded).

        `metadata`: sent with every attempt (a session's affinity header, see the module docstring).
        """
        for attempt in range(self.max_attempts):
            channel = self._channel
            try:
                return getattr(self.stub, method)(request, timeout=self.timeout, metadata=metadata)
            except grpc.RpcError as err:
                ended = ended_of(err, getattr(request, "session_id", ""))
                if ended is not None and not ended.resumable:
                    raise ended from err
                if not self._should_retry(err, attempt, session_bound):
                    raise
                self.failover(channel)
                time.sleep(self._backoff_s * min(attempt, 4))
        raise AssertionError("unreachable")

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- models -------------------------------------------------------------------------------------------

    def list_models(self) -> list[ModelInfo]:
        """Every served model (newest version of each)."""
        return [ModelInfo.from_pb(m) for m in self.call("ListModels", pb.ListModelsRequest()).models]

    def get_model(self, name: str, version: int | None = None) -> ModelInfo:
        """One model version (cached per client)."""
        key = (name, version or 0)
        info = self._models.get(key)
        if info is None:
            info = ModelInfo.from_pb(
                self.call("GetModel", pb.GetModelRequest(name=name, version=version or 0))
            )
            self._models[key] = self._models[(name, info.version)] = info
        return info

    def multiplexer(self, *, affinity_key: str | None = None) -> Multiplexer:
        """Return a `Multiplexer`: many sessions stepped by one StreamMany message per call.

        `affinity_key`: sent as the affinity header of the StreamMany (give it the key the sessions were
        opened with, `session(..., affinity_key=...)`, so that a consistent-hash proxy keeps them together).
        """
        return Multiplexer(self, affinity_key=affinity_key)

    def reload(self) -> list[ModelInfo]:
        """Ask the server to rescan its model repository now."""
        return [
            ModelInfo.from_pb(m) for m in self.call("ReloadRepository", pb.ReloadRepositoryRequest()).models
        ]

    # ---- sessions -----------------------------------------------------------------------------------------

    def session(
        self,
        model: str,
        version: int | None = None,
        *,
        idle_ttl_s: float | None = None,
        initial_state: Mapping[str, ArrayLike] | None = None,
        affinity_key: str | None = None,
    ) -> Session:
        """Open a new session on `model` (newest version unless given).

        `affinity_key`: the routing key of every call of this session (default: a fresh random one); sessions
        that share a key are kept on one replica by a consistent-hash proxy.
        """
        metadata = affinity_metadata(affinity_key if affinity_key is not None else new_affinity_key())
        request = pb.CreateSessionRequest(
            model=model,
            version=version or 0,
            idle_ttl_s=idle_ttl_s or 0.0,
            initial_state=[wire.array_to_tensor(k, np.asarray(v)) for k, v in (initial_state or {}).items()],
        )
        info = SessionInfo.from_pb(self.call("CreateSession", request, metadata=metadata))
        return Session(self, info, metadata)

    def attach(self, session_id: str, *, affinity_key: str | None = None) -> Session:
        """Return a `Session` for an existing session (resuming from the seq the server holds).

        Its calls are routed by `affinity_key`, by default the session id (the key it was created with is not
        known here; the replica that the id hashes to resumes the session from the shared store).
        """
        metadata = affinity_metadata(session_id if affinity_key is None else affinity_key)
        return Session(self, self.describe_session(session_id, metadata=metadata), metadata)

    def describe_session(self, session_id: str, *, metadata: Metadata | None = None) -> SessionInfo:
        """Return a session's info (routed by `metadata`, by default the session id as affinity key)."""
        if metadata is None:
            metadata = affinity_metadata(session_id)
        return SessionInfo.from_pb(
            self.call(
                "DescribeSession",
                pb.SessionRequest(session_id=session_id),
                session_bound=True,
                metadata=metadata,
            )
        )

    def generate(
        self,
        model: str = "default",
        prime: str | Sequence[int] = "",
        n: int = 100,
        temperature: float = 1.0,
        top_k: int = 0,
        seed: int = 0,
        *,
        version: int | None = None,
    ) -> Iterator[str]:
        """Sample `n` tokens from a token model after a prime (text or token ids); yields text pieces.

        The generation runs on a session of its own, as one chunk with seq 1. After a transport error it is
        re-requested with the same seq (on the next address): the server replays a finished generation from
        its cache, or re-runs a rolled-back one with the same seed, so the pieces already yielded are skipped
        and the text goes on exactly where it broke.
        """
        session = self.session(model, version)
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
                channel = self._channel
                try:
                    responses = self.stub.Generate(
                        request, timeout=self.timeout + n * 0.1, metadata=session.metadata
                    )
                    for i, response in enumerate(responses):
                        if i >= done:
                            done += 1
                            yield response.text
                    return
                except grpc.RpcError as err:
                    if not self._should_retry(err, attempt, session_bound=True):
                        raise
                    self.failover(channel)
                    time.sleep(self._backoff_s * min(attempt, 4))
        finally:
            session.close()


class Session:
    """One server-side session: `.step(x)`, `.stream(chunks)`, state, fork, reset, close. A context manager.

    `seq` is the last applied seq as this object knows it; every call sends `seq + 1` and retries with the
    same seq after transport errors (see the module docstring). `metadata` (the affinity header) goes with
    every call of the session; `affinity_key` is its value.
    """

    def __init__(self, client: Client, info: SessionInfo, metadata: Metadata | None = None) -> None:
        self.client = client
        self.id = info.session_id
        self.metadata: Metadata = metadata if metadata is not None else affinity_metadata(info.session_id)
        self.affinity_key = self.metadata[0][1]
        self.info = info
        self.seq = info.last_seq
        self.model = client.get_model(info.model, info.version)
        self._closed = False

    # ---- inputs -------------------------------------------------------------------------------------------

    def _tensors(self, inputs: Inputs) -> list[pb.Tensor]:
        return encode_inputs(self.model, inputs)

    # ---- stepping -----------------------------------------------------------------------------------------

    def step(self, inputs: Inputs, *, last_only: bool = False) -> dict[str, np.ndarray]:
        """Apply one chunk (`(T, ...)` per input, or `(...)`-shaped for models without a time axis)."""
        request = pb.StepRequest(
            session_id=self.id, seq=self.seq + 1, inputs=self._tensors(inputs), last_only=last_only
        )
        response = self.client.call("Step", request, session_bound=True, metadata=self.metadata)
        self.seq = response.seq
        return outputs_of(response.outputs)

    def stream(self, chunks: Iterable[Inputs], *, last_only: bool = False) -> Iterator[dict[str, np.ndarray]]:
        """Send chunks over one bidi stream, yielding each chunk's outputs in order.

        The session outlives the stream (`keep`), so a broken stream is re-attached (on the next address if
        the
        server went away) and the unanswered chunk is re-sent with its seq: exactly once, in order.
        """
        stream = _AttachedStream(self)
        try:
            for chunk in chunks:
                tensors = self._tensors(chunk)
                yield stream.send(pb.StreamRequest(seq=self.seq + 1, inputs=tensors, last_only=last_only))
        finally:
            stream.end()

    # ---- state --------------------------------------------------------------------------------------------

    def describe(self) -> SessionInfo:
        """Fetch the server's view of this session."""
        self.info = self.client.describe_session(self.id, metadata=self.metadata)
        return self.info

    def state(self) -> bytes:
        """Return the whole state as a versioned, integrity-checked blob."""
        return self.client.call(
            "GetState", pb.SessionRequest(session_id=self.id), session_bound=True, metadata=self.metadata
        ).blob

    def set_state(self, blob: bytes) -> SessionInfo:
        """Replace the state (and seq) from a blob taken with `state()`."""
        info = SessionInfo.from_pb(
            self.client.call(
                "SetState",
                pb.SetStateRequest(session_id=self.id, blob=blob),
                session_bound=True,
                metadata=self.metadata,
            )
        )
        self.seq, self.info = info.last_seq, info
        return info

    def fork(self, *, idle_ttl_s: float | None = None) -> Session:
        """Open a new session starting from a copy of this one's state (routed by this one's key)."""
        info = self.client.call(
            "Fork",
            pb.ForkRequest(session_id=self.id, idle_ttl_s=idle_ttl_s or 0.0),
            session_bound=True,
            metadata=self.metadata,
        )
        # The fork is created on the parent's replica: keeping the parent's key keeps it there.
        return Session(self.client, SessionInfo.from_pb(info), self.metadata)

    def reset(self) -> SessionInfo:
        """State back to the initial state, seq back to 0."""
        info = SessionInfo.from_pb(
            self.client.call(
                "Reset", pb.SessionRequest(session_id=self.id), session_bound=True, metadata=self.metadata
            )
        )
        self.seq, self.info = info.last_seq, info
        return info

    def close(self) -> None:
        """End the session on the server (idempotent on this object)."""
        if self._closed:
            return
        self._closed = True
        try:
            self.client.call(
                "Close", pb.SessionRequest(session_id=self.id), session_bound=True, metadata=self.metadata
            )
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.NOT_FOUND:
                raise

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _AttachedStream(LockStepCall):
    """A lock-step bidi Stream attached to a session with keep=True; re-attaches after transport errors."""

    def __init__(self, session: Session) -> None:
        super().__init__()
        self._session = session

    def _open(self) -> None:
        session = self._session
        opening = pb.StreamOpen(session_id=session.id, keep=True, lifecycle_events=True)
        self._start(session.client.stub.Stream, session.metadata, pb.StreamRequest(open=opening))
        first = next(self._call)
        if first.HasField("ended"):
            raise ended_from_pb(first.ended)
        session.info = SessionInfo.from_pb(first.session)

    def send(self, request: pb.StreamRequest) -> dict[str, np.ndarray]:
        session = self._session
        response = self._exchange(session.client, request, session_bound=True, session_id=session.id)
        self._session.seq = response.seq
        return outputs_of(response.outputs)

    def end(self) -> None:
        """End the stream (the session stays open)."""
        self._end()
