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

Affinity: every call that belongs to one session (CreateSession, Step, Stream, Generate, GetState,
SetState, Fork, Reset, Close, DescribeSession) carries the gRPC metadata `x-rnnserve-affinity: <key>`
(`AFFINITY_HEADER`), so a consistent-hash proxy (deploy/components/envoy: Envoy's RING_HASH on that header)
sends all of them to one replica. The key is a random token the `Session` draws before CreateSession (the
server picks the session id, so the id cannot be the key of its own creation); a session opened with
`attach(session_id)` uses its id. A fork keeps its parent's key (it is created where the parent's state is).
The server ignores the header.
"""

from __future__ import annotations

import hashlib
import os
import queue
import secrets
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from service import wire
from service.client.security import Credentials, open_channel
from service.proto import rnnserve_pb2 as pb
from service.proto import rnnserve_pb2_grpc as pb_grpc

# Errors after which the same request may be re-sent (the server's seq check makes a re-send exactly-once).
# ABORTED: the replica lost the session's lease to another one (shared store); the step went unanswered there.
RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.ABORTED,
    }
)

ArrayLike = Any
Inputs = ArrayLike | Mapping[str, ArrayLike]

# The gRPC metadata key a consistent-hash proxy hashes on (deploy/components/envoy/envoy.yaml names it too;
# tests/deploy/test_manifests.py checks that they are equal). Lower case: gRPC metadata keys are.
AFFINITY_HEADER = "x-rnnserve-affinity"
Metadata = tuple[tuple[str, str], ...]


def new_affinity_key() -> str:
    """Return a fresh random affinity key (96 bits, URL-safe base64: a valid metadata value)."""
    return secrets.token_urlsafe(12)


def affinity_metadata(key: str) -> Metadata:
    """Return the metadata that routes a call by `key` (built once per session, reused for every call).

    A key that is not printable ASCII (metadata values must be) is replaced by its SHA-256, so attaching to a
    malformed session id still reaches the server, which answers it with a typed status.
    """
    if not key.isascii() or not key.isprintable() or not key:
        key = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
    return ((AFFINITY_HEADER, key),)


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """A data tensor (shape incl. batch axis; None = dynamic) or a state tensor (shape without batch axis)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...]


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """A served model version, as GetModel describes it."""

    name: str
    version: int
    versions: tuple[int, ...]
    description: str
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    states: tuple[TensorInfo, ...]
    time_axis: bool
    vocabulary: tuple[str, ...]
    metadata: dict[str, str]

    @classmethod
    def from_pb(cls, m: pb.ModelInfo) -> ModelInfo:
        """Decode a `ModelInfo` message."""

        def specs(items: Iterable[Any]) -> tuple[TensorInfo, ...]:
            return tuple(
                TensorInfo(t.name, wire.dtype_of(t.dtype), tuple(None if d < 0 else d for d in t.shape))
                for t in items
            )

        return cls(
            name=m.name,
            version=m.version,
            versions=tuple(m.versions),
            description=m.description,
            inputs=specs(m.inputs),
            outputs=specs(m.outputs),
            states=specs(m.states),
            time_axis=m.time_axis,
            vocabulary=tuple(m.vocabulary),
            metadata=dict(m.metadata),
        )


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """A session as the server describes it (times are Unix seconds)."""

    session_id: str
    model: str
    version: int
    last_seq: int
    created_at: float
    last_used: float
    idle_ttl_s: float
    expires_at: float
    steps: int

    @classmethod
    def from_pb(cls, s: pb.SessionInfo) -> SessionInfo:
        """Decode a `SessionInfo` message."""
        return cls(
            s.session_id,
            s.model,
            s.version,
            s.last_seq,
            s.created_at,
            s.last_used,
            s.idle_ttl_s,
            s.expires_at,
            s.steps,
        )


def default_address() -> str:
    """Return the address(es) to use when none is given: $RNNSERVE_ADDRESS, else localhost:8001."""
    return os.environ.get("RNNSERVE_ADDRESS", "localhost:8001")


def parse_addresses(addresses: str | Sequence[str] | None) -> list[str]:
    """`"h1:p1,h2:p2"`, a list, or None ($RNNSERVE_ADDRESS, else localhost:8001) -> the failover list."""
    if addresses is None:
        addresses = default_address()
    if isinstance(addresses, str):
        addresses = [a.strip() for a in addresses.split(",") if a.strip()]
    if not addresses:
        raise ValueError("at least one server address is required")
    return list(addresses)


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """GRPC channel options both clients use."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]


def encode_inputs(model: ModelInfo, inputs: Inputs) -> list[pb.Tensor]:
    """Encode one chunk: an array for a single-input model, else a dict by input name (cast to its dtype)."""
    specs = {t.name: t for t in model.inputs}
    if not isinstance(inputs, Mapping):
        if len(specs) != 1:
            raise ValueError(f"model {model.name!r} has inputs {list(specs)}: pass a dict by name")
        inputs = {next(iter(specs)): inputs}
    tensors = []
    for name, value in inputs.items():
        spec = specs.get(name)
        arr = np.asarray(value, dtype=spec.dtype if spec is not None else None)
        tensors.append(wire.array_to_tensor(name, arr))
    return tensors


def should_retry(
    err: grpc.RpcError, attempt: int, max_attempts: int, n_addresses: int, session_bound: bool
) -> bool:
    """Whether a failed call may be re-sent as is (on the next address) after attempt number `attempt`."""
    if attempt + 1 >= max_attempts:
        return False
    code = err.code()
    if code in RETRYABLE:
        return True
    # A replica that does not know the session may simply not be its owner: try the others once each.
    return session_bound and code == grpc.StatusCode.NOT_FOUND and attempt + 1 < n_addresses


def outputs_of(tensors: Iterable[pb.Tensor]) -> dict[str, np.ndarray]:
    """Decode output tensors by name."""
    return {t.name: wire.tensor_to_array(t, "output") for t in tensors}


class Client:
    """A synchronous client over one or more server addresses (failover in list order).

    `addresses`: "host:port", "h1:p1,h2:p2" or a list (default: $RNNSERVE_ADDRESS, else localhost:8001).
    `timeout`: seconds per call. `max_attempts`: tries of one request across transport errors and failovers.
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
    ) -> None:
        self.addresses = parse_addresses(addresses)
        # TLS and API key (service.client.security); default: RNNSERVE_API_KEY / RNNSERVE_TLS_* if set.
        self.credentials = credentials if credentials is not None else Credentials.from_env()
        self.timeout = timeout
        self.max_attempts = max(max_attempts, len(self.addresses) + 1)
        self._backoff_s = backoff_s
        self._options = channel_options(max_message_bytes)
        self._lock = threading.Lock()
        self._index = 0
        self.failovers = 0  # how many times a call was re-sent after a transport error (or moved address)
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
            initial_state=[
                wire.array_to_tensor(k, np.asarray(v)) for k, v in (initial_state or {}).items()
            ],
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


_END = object()


def _end_call(requests: queue.SimpleQueue[Any] | None, call: Any) -> None:
    """Half-close a lock-step bidi call and drain it to its final status (a broken call changes nothing)."""
    if requests is not None:
        requests.put(_END)
    if call is not None:
        try:
            for _ in call:
                pass
        except grpc.RpcError:
            pass


class _AttachedStream:
    """A lock-step bidi Stream attached to a session with keep=True; re-attaches after transport errors.

    Lock-step (one chunk in flight) is what makes resuming exact: after a break, the only chunk whose fate is
    unknown is the one in flight, and re-sending it with its seq is answered from the cache if it was applied.
    """

    def __init__(self, session: Session) -> None:
        self._session = session
        self._call: Any = None
        self._requests: queue.SimpleQueue[Any] | None = None

    def _open(self) -> None:
        requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        requests.put(pb.StreamRequest(open=pb.StreamOpen(session_id=self._session.id, keep=True)))

        def feed() -> Iterator[pb.StreamRequest]:
            while (item := requests.get()) is not _END:
                yield item

        self._requests = requests
        self._call = self._session.client.stub.Stream(feed(), metadata=self._session.metadata)
        first = next(self._call)
        self._session.info = SessionInfo.from_pb(first.session)

    def send(self, request: pb.StreamRequest) -> dict[str, np.ndarray]:
        client = self._session.client
        for attempt in range(client.max_attempts):
            channel = client._channel
            try:
                if self._call is None:
                    self._open()
                assert self._requests is not None
                self._requests.put(request)
                response = next(self._call)
                self._session.seq = response.seq
                return outputs_of(response.outputs)
            except grpc.RpcError as err:
                self.end()
                if not client._should_retry(err, attempt, session_bound=True):
                    raise
                client.failover(channel)
                time.sleep(client._backoff_s * min(attempt, 4))
        raise AssertionError("unreachable")

    def end(self) -> None:
        _end_call(self._requests, self._call)
        self._call = None
        self._requests = None


@dataclass(frozen=True, slots=True)
class RowError:
    """A session's chunk that a multiplexed step refused (the other sessions of the message went on)."""

    session_id: str
    code: grpc.StatusCode
    message: str


class Multiplexer:
    """Step many sessions (of one model version) with one `StreamMany` message per call, in lock-step.

    For a gateway forwarding many devices: one message carries every session's chunk and one answer carries
    every session's outputs, which is far cheaper per step than one message per session. After a transport
    error the same message (same seqs) is re-sent on the next address; rows that were applied are answered
    from the cache, so every chunk applies exactly once.
    """

    _CODES = {c.value[0]: c for c in grpc.StatusCode}

    def __init__(self, client: Client, *, affinity_key: str | None = None) -> None:
        self._client = client
        self._metadata = affinity_metadata(affinity_key) if affinity_key is not None else None
        self._call: Any = None
        self._requests: queue.SimpleQueue[Any] | None = None
        self._tag = 0

    def _open(self) -> None:
        requests: queue.SimpleQueue[Any] = queue.SimpleQueue()

        def feed() -> Iterator[pb.StepManyRequest]:
            while (item := requests.get()) is not _END:
                yield item

        self._requests = requests
        self._call = self._client.stub.StreamMany(feed(), metadata=self._metadata)

    def step(
        self, chunks: Sequence[tuple[Session, Inputs]], *, last_only: bool = False
    ) -> list[dict[str, np.ndarray] | RowError]:
        """Apply one chunk per session (equal shapes); returns each session's outputs or its `RowError`."""
        if not chunks:
            return []
        sessions = [s for s, _ in chunks]
        encoded = [encode_inputs(s.model, x) for s, x in chunks]
        names = [t.name for t in encoded[0]]
        stacked = {
            name: np.stack([wire.tensor_to_array(row[j]) for row in encoded])
            for j, name in enumerate(names)
        }
        self._tag += 1
        request = pb.StepManyRequest(
            tag=self._tag,
            session_ids=[s.id for s in sessions],
            seqs=[s.seq + 1 for s in sessions],
            inputs=wire.arrays_to_tensors(stacked),
            last_only=last_only,
        )
        response = self._send(request)
        outputs = {t.name: wire.tensor_to_array(t, "output") for t in response.outputs}
        results: list[dict[str, np.ndarray] | RowError] = []
        for i, s in enumerate(sessions):
            if response.codes[i]:
                code = self._CODES.get(response.codes[i], grpc.StatusCode.UNKNOWN)
                results.append(RowError(s.id, code, response.messages[i]))
            else:
                s.seq = request.seqs[i]
                results.append({name: arr[i] for name, arr in outputs.items()})
        return results

    def _send(self, request: pb.StepManyRequest) -> pb.StepManyResponse:
        client = self._client
        for attempt in range(client.max_attempts):
            channel = client._channel
            try:
                if self._call is None:
                    self._open()
                assert self._requests is not None
                self._requests.put(request)
                return next(self._call)
            except grpc.RpcError as err:
                self.close()
                if not client._should_retry(err, attempt, session_bound=False):
                    raise
                client.failover(channel)
                time.sleep(client._backoff_s * min(attempt, 4))
        raise AssertionError("unreachable")

    def close(self) -> None:
        """End the stream (the sessions stay open)."""
        _end_call(self._requests, self._call)
        self._call = None
        self._requests = None

    def __enter__(self) -> Multiplexer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
