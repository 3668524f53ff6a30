"""What the blocking and the asyncio client share.

Addresses and channel options, the model and session views, input encoding, the retry rule, the routing
(affinity) header, and the helper that ends a lock-step bidi call.
"""

from __future__ import annotations

import hashlib
import os
import queue
import secrets
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from service import wire
from service.proto import rnnserve_pb2 as pb

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
    tier: str = ""  # "resident" or "spilled" (idle, on the server's disk); "" from older servers
    time_left_s: float = 0.0  # seconds until the session expires if left idle

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
            s.tier,
            s.time_left_s,
        )


DEFAULT_PORT = 8001  # the server's default gRPC port (Triton's too)


def default_address() -> str:
    """Return the address(es) to use when none is given: $RNNSERVE_ADDRESS, else localhost:8001."""
    return os.environ.get("RNNSERVE_ADDRESS", f"localhost:{DEFAULT_PORT}")


def with_default_port(address: str) -> str:
    """Add the server's default port to an address without one (gRPC itself would dial 443).

    ``localhost`` -> ``localhost:8001``, ``[::1]`` -> ``[::1]:8001``, ``dns:///svc`` -> ``dns:///svc:8001``;
    an address with a port, a ``unix:`` socket or a bare IPv6 literal is kept as it is.
    """
    if address.startswith("unix"):
        return address
    head, sep, host = address.rpartition("/")
    if not sep and ":" in address and address.split(":", 1)[0] in ("dns", "ipv4", "ipv6"):
        head, host = address.split(":", 1)
        head, sep = head + ":", ""
    if host.startswith("["):
        has_port = "]:" in host
    else:
        has_port = host.count(":") == 1  # two or more: a bare IPv6 literal, left alone
        if host.count(":") > 1:
            return address
    return address if has_port or not host else f"{head}{sep}{host}:{DEFAULT_PORT}"


def parse_addresses(addresses: str | Sequence[str] | None) -> list[str]:
    """`"h1:p1,h2:p2"`, a list, or None ($RNNSERVE_ADDRESS, else localhost:8001) -> the failover list.

    An address without a port gets the server's default port, 8001.
    """
    if addresses is None:
        addresses = default_address()
    if isinstance(addresses, str):
        addresses = [a.strip() for a in addresses.split(",") if a.strip()]
    if not addresses:
        raise ValueError("at least one server address is required")
    return [with_default_port(a) for a in addresses]


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
        arr = np.asarray(value)
        if spec is not None and arr.dtype != spec.dtype:
            # Widening or a same-kind cast (int32 -> int64, float64 -> float32) is what the caller meant; a
            # float given for integer token ids, or text for numbers, is a mistake to report, not to truncate.
            if not np.can_cast(arr.dtype, spec.dtype, casting="same_kind"):
                raise TypeError(
                    f"input {name!r} of model {model.name!r} takes {spec.dtype.name} values; got "
                    f"{arr.dtype.name} (convert them yourself if that is meant, e.g. np.rint(x).astype(...))"
                )
            arr = arr.astype(spec.dtype)
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


_END = object()  # half-closes the request iterator of a lock-step call


class LockStepCall:
    """A bidi call driven one message at a time: the blocking client's attached `Stream` and `StreamMany`.

    Lock-step (one message in flight) is what makes resuming exact: after a break, the only message whose fate
    is unknown is the one in flight, and re-sending it with its seqs is answered from the server's cache if it
    was applied. Subclasses open the call in `_open` through `_start`.
    """

    def __init__(self) -> None:
        self._call: Any = None
        self._requests: queue.SimpleQueue[Any] | None = None

    def _open(self) -> None:
        raise NotImplementedError

    def _start(self, method: Any, metadata: Any, first: Any = None) -> None:
        """Open the bidi call `method` with a request queue (`first`, if given, is its first message)."""
        requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        if first is not None:
            requests.put(first)

        def feed() -> Iterator[Any]:
            while (item := requests.get()) is not _END:
                yield item

        self._requests = requests
        self._call = method(feed(), metadata=metadata)

    def _exchange(self, client: Any, request: Any, *, session_bound: bool) -> Any:
        """Send one message and return its answer; after a retryable error, fail over and re-send it."""
        for attempt in range(client.max_attempts):
            channel = client._channel
            try:
                if self._call is None:
                    self._open()
                assert self._requests is not None
                self._requests.put(request)
                return next(self._call)
            except grpc.RpcError as err:
                self._end()
                if not client._should_retry(err, attempt, session_bound=session_bound):
                    raise
                client.failover(channel)
                time.sleep(client._backoff_s * min(attempt, 4))
        raise AssertionError("unreachable")

    def _end(self) -> None:
        """Half-close the call and drain it to its final status (a broken call changes nothing)."""
        if self._requests is not None:
            self._requests.put(_END)
        if self._call is not None:
            try:
                for _ in self._call:
                    pass
            except grpc.RpcError:
                pass
        self._call = None
        self._requests = None
