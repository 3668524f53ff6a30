"""Open Inference Protocol (KServe v2 gRPC `inference.GRPCInferenceService`) with Triton's sequence extension.

A thin edge over the same `Engine` the native API uses (one session store, one batcher, one set of metrics;
the sessions it opens carry `protocol="kserve"`), so unmodified Triton clients (`tritonclient.grpc`,
perf_analyzer) drive our stateful models. Stubs come from the maintained `tritonclient` package.

Sequences (Triton's sequence extension): a request carrying the parameter `sequence_id` (int or string)
belongs to that sequence of the model. `sequence_start=true` opens an engine session (restarting it if the
sequence is live); `sequence_end=true` closes it after that request's step. The state is implicit: it lives in
the server and never appears in metadata or on the wire, as with Triton's implicit state management. Requests
of one sequence apply in arrival order (one FIFO lock per sequence). A request without a sequence id runs once
from the initial state (`Engine.infer_stateless`), so a batch > 1 is allowed there and nowhere else.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from service.core.engine import Engine, ModelSpec
from service.errors import InvalidArgument, NotFound, Unavailable
from service.server import kserve_triton
from service.server.interceptors import status_of
from service.server.kserve_convert import (
    SequenceControl,
    decode_inputs,
    encode_outputs,
    parse_sequence,
    wants_typed_outputs,
    wire_type_of,
)
from service.server.kserve_models import (
    ModelStats,
    model_config,
    package_version,
    version_arg,
)
from service.server.kserve_sequences import SequenceKey, SequenceOutcome, SequenceTable
from service.server.ownership import OwnerTable
from service.server.streams import StreamRegistry, tell_kserve_end

SERVER_NAME = "rnnserve"
# Extension names exactly as Triton spells them in ServerMetadata; only the ones this server implements.
EXTENSIONS = ("sequence", "model_configuration", "binary_tensor_data", "parameters", "statistics")
# Requests one ModelStreamInfer stream may have in flight before the server stops reading it (backpressure).
DEFAULT_STREAM_MAX_INFLIGHT = 256


# -------------------------------------------------------------------------------------------- servicer


def _unimplemented(what: str) -> Callable[..., Any]:
    async def method(self: KServeServicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"rnnserve does not offer {what}")

    return method


class KServeServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    """`inference.GRPCInferenceService` over the shared Engine."""

    def __init__(
        self,
        engine: Engine,
        *,
        version: str | None = None,
        ready: Callable[[], bool] = lambda: True,
        stream_max_inflight: int = DEFAULT_STREAM_MAX_INFLIGHT,
        streams: StreamRegistry | None = None,
        owners: OwnerTable | None = None,
    ) -> None:
        self._engine = engine
        self._streams = streams if streams is not None else StreamRegistry(engine.settings, engine.metrics)
        self._version = version or package_version()
        self._ready = ready
        self._stream_max_inflight = stream_max_inflight
        self.sequences = SequenceTable(engine, owners)
        self._stats: dict[tuple[str, int], ModelStats] = {}

    # ---- health and metadata

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:  # noqa: N802
        """Answer live: the process serves RPCs."""
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:  # noqa: N802
        """Ready unless the server is draining or has no model loaded."""
        return pb.ServerReadyResponse(ready=bool(self._ready() and self._engine.list_models()))

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:  # noqa: N802
        """Ready if that model (version) is loaded; unknown models are simply not ready, as in Triton."""
        version = version_arg(request.version)
        try:
            self._engine.get_model(request.name, version)
        except NotFound:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=bool(self._ready()))

    async def ServerMetadata(  # noqa: N802
        self, request: pb.ServerMetadataRequest, context: Any
    ) -> pb.ServerMetadataResponse:
        """Name, version and the extensions implemented (Triton's names)."""
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=self._version, extensions=list(EXTENSIONS))

    async def ModelMetadata(  # noqa: N802
        self, request: pb.ModelMetadataRequest, context: Any
    ) -> pb.ModelMetadataResponse:
        """Describe a model's data inputs and outputs (state hidden)."""
        return kserve_triton.metadata(self._engine, request.name, version_arg(request.version))

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Any) -> pb.ModelConfigResponse:  # noqa: N802
        """Triton model configuration (max_batch_size, inputs/outputs without batch, sequence_batching)."""
        spec = kserve_triton.get_model(self._engine, request.name, version_arg(request.version))
        return pb.ModelConfigResponse(config=model_config(spec))

    async def RepositoryIndex(  # noqa: N802
        self, request: pb.RepositoryIndexRequest, context: Any
    ) -> pb.RepositoryIndexResponse:
        """Every served model version, READY (as Triton: one entry per version), and refused ones."""
        if request.repository_name:
            raise InvalidArgument("this server has one model repository; leave repository_name empty")
        response = pb.RepositoryIndexResponse()
        for spec in sorted(self._engine.served_versions(), key=lambda s: (s.name, s.version)):
            response.models.add(name=spec.name, version=str(spec.version), state="READY")
        for r in self._engine.refusals():  # as Triton lists a model that failed to load
            response.models.add(name=r.name, version=str(r.version), state="UNAVAILABLE", reason=r.reason)
        return response

    async def ModelStatistics(  # noqa: N802
        self, request: pb.ModelStatisticsRequest, context: Any
    ) -> pb.ModelStatisticsResponse:
        """Request counts and durations of KServe inferences per model version (empty name: every model)."""
        return kserve_triton.statistics(self._engine, self._stats, request.name, version_arg(request.version))

    # ---- not offered: an explicit UNIMPLEMENTED with a reason (the generated base class would raise)

    RepositoryModelLoad = _unimplemented("model load/unload (the repository directory is watched)")
    RepositoryModelUnload = _unimplemented("model load/unload (the repository directory is watched)")
    SystemSharedMemoryStatus = _unimplemented("system shared memory (send tensors inline)")
    SystemSharedMemoryRegister = _unimplemented("system shared memory (send tensors inline)")
    SystemSharedMemoryUnregister = _unimplemented("system shared memory (send tensors inline)")
    CudaSharedMemoryStatus = _unimplemented("CUDA shared memory (send tensors inline)")
    CudaSharedMemoryRegister = _unimplemented("CUDA shared memory (send tensors inline)")
    CudaSharedMemoryUnregister = _unimplemented("CUDA shared memory (send tensors inline)")
    TraceSetting = _unimplemented("trace settings (use the Prometheus metrics)")
    LogSettings = _unimplemented("log settings (set --log-level at start)")

    # ---- inference

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:  # noqa: N802
        """One inference request: a sequence step (with sequence_id) or a stateless run."""
        call = self._begin(request)
        try:
            await call.future
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - read (and counted) by finish, which raises it again
            pass
        return call.finish()

    async def ModelStreamInfer(  # noqa: N802, C901 - the writer loop stays in one frame on purpose (hot path)
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: Any
    ) -> None:
        """Answer each request of a bidirectional stream with one response (matched by `id`).

        Errors go in `error_message` and the stream stays open. Each request is started as it is read (no task
        per request): interleaved sequences batch together, and the engine's per-session FIFO keeps each
        sequence in arrival order, so replies are written as their steps complete. At most
        `stream_max_inflight` requests run or wait to be written; the reader pauses beyond that.
        """
        rec = self._streams.enter(context, "ModelStreamInfer")
        replies: collections.deque[pb.ModelStreamInferResponse] = collections.deque()
        state = _StreamState(asyncio.get_running_loop().create_future())
        limit = self._stream_max_inflight
        max_bytes = self._engine.settings.max_stream_buffer_bytes

        def ready(reply: pb.ModelStreamInferResponse) -> None:
            replies.append(reply)
            state.buffered += _reply_bytes(reply)
            wake = state.wake
            if not wake.done():
                wake.set_result(None)

        async def read() -> None:
            try:
                async for request in request_iterator:
                    state.inflight += 1
                    self._stream_start(request, ready, state)
                    # A slow reader holds requests back, not memory: count and bytes of unwritten replies.
                    while state.full(limit, max_bytes):
                        state.room = asyncio.get_running_loop().create_future()
                        await state.room
            finally:
                state.reading = False
                ready(_NO_REPLY)

        reader = rec.task = asyncio.create_task(read())
        outcome = "cancelled"  # unless the requests end (or the server ends the stream, rec.ended)
        try:
            while True:
                while not replies:
                    state.wake = asyncio.get_running_loop().create_future()
                    await state.wake
                reply = replies.popleft()
                if reply is _NO_REPLY:
                    if not state.reading and state.inflight == 0 and not replies:
                        break
                    continue
                await context.write(reply)
                # Released only once written: requests running plus replies unwritten stay bounded.
                state.inflight -= 1
                state.buffered -= reply.ByteSize()
                room = state.room
                if room is not None and not room.done():
                    state.room = None
                    room.set_result(None)
                if not state.reading and state.inflight == 0:
                    break
            if rec.ended is not None:  # a drain stopped the reader: answered what it read, now say why
                await tell_kserve_end(context, rec.ended)
            await reader  # surfaces a broken request stream
            outcome = "client"
        finally:
            reader.cancel()
            self._streams.leave(rec, outcome)

    def _stream_start(
        self,
        request: pb.ModelInferRequest,
        ready: Callable[[pb.ModelStreamInferResponse], None],
        state: _StreamState,
    ) -> None:
        """Start one stream request; `ready` gets its reply when done, after earlier ones of its sequence."""
        try:
            ctl: SequenceControl | None = parse_sequence(request.parameters)
        except InvalidArgument:
            ctl = None  # the request fails on its own (in _begin); it has no place in a sequence
        key = None if ctl is None or ctl.sequence_id is None else (request.model_name, ctl.sequence_id)
        slot = None
        if key is not None:  # replies of one sequence leave in request order, whatever order they finish in
            slot = _Slot()
            state.order.setdefault(key, collections.deque()).append(slot)

        def emit(reply: pb.ModelStreamInferResponse) -> None:
            if slot is None:
                ready(reply)
                return
            slot.reply = reply
            queue = state.order[key]  # type: ignore[index]
            while queue and queue[0].reply is not None:
                ready(queue.popleft().reply)  # type: ignore[arg-type]
            if not queue:
                del state.order[key]  # type: ignore[arg-type]

        try:
            call = self._begin(request, ctl)
        except Exception as exc:  # noqa: BLE001 - becomes this request's error_message
            emit(_error_reply(request, exc))
            return

        def done(_fut: asyncio.Future[Any]) -> None:
            if call.future.cancelled():  # only at shutdown: the reply still counts against the stream
                emit(_error_reply(request, Unavailable("the request was cancelled: server stopping")))
                return
            try:
                response = call.finish()
            except Exception as exc:  # noqa: BLE001 - becomes this request's error_message
                emit(_error_reply(request, exc))
                return
            if _final_response_wanted(request):
                # Not decoupled: the one response is also the final one, flagged as Triton flags it.
                response.parameters["triton_final_response"].bool_param = True
            emit(pb.ModelStreamInferResponse(infer_response=response))

        call.future.add_done_callback(done)

    def _begin(self, request: pb.ModelInferRequest, ctl: SequenceControl | None = None) -> _Call:
        """Decode a request and start it in the core: a sequence step or a stateless run (no await)."""
        started = time.monotonic_ns()
        if ctl is None:
            ctl = parse_sequence(request.parameters)
        version = version_arg(request.model_version)
        if version is None and ctl.sequence_id is not None and not ctl.start:
            # A live sequence is validated against (and counted for) the version it is pinned to.
            version = self.sequences.live_version(request.model_name, ctl.sequence_id)
        spec = kserve_triton.get_model(self._engine, request.model_name, version)
        stats = self._stats.get((spec.name, spec.version))
        if stats is None:
            stats = self._stats[(spec.name, spec.version)] = ModelStats()
        try:
            names = _requested_outputs(spec, request)
            arrays = decode_inputs(request)
            batch = _batch_of(arrays)
            if ctl.sequence_id is not None and (spec.states or spec.controls) and arrays:
                if batch != 1 or any(a.ndim == 0 or a.shape[0] != 1 for a in arrays.values()):
                    raise InvalidArgument(
                        "a request with a sequence_id carries one sequence: batch dimension must be 1 for "
                        f"every input, got shapes {[list(a.shape) for a in arrays.values()]} (send several "
                        "sequences as separate requests, or drop sequence_id for a stateless batch)"
                    )
                row = {k: v[0] for k, v in arrays.items()}
                future, read = self.sequences.submit(spec.name, version_arg(request.model_version), ctl, row)
            else:
                # No sequence (or a model without state, whose sequence flags Triton also ignores): one run
                # from the initial state.
                future = asyncio.ensure_future(
                    self._engine.infer_stateless(spec.name, spec.version, arrays, dtype_name=_wire_name)
                )
                read = _stateless_result(spec.version)
        except Exception:
            stats.fail.add(time.monotonic_ns() - started)
            raise
        return _Call(
            self, request, spec, stats, names, batch or 0, started, time.monotonic_ns(), future, read
        )


_NO_REPLY = pb.ModelStreamInferResponse()  # a marker in the reply queue: the reader ended


@dataclass(slots=True, eq=False)
class _StreamState:
    """One ModelStreamInfer stream: requests in flight, the writer's wake-up, the reader's back-pressure."""

    wake: asyncio.Future[None]
    inflight: int = 0
    buffered: int = 0  # bytes of replies ready but not yet written (max_stream_buffer_bytes)
    reading: bool = True
    room: asyncio.Future[None] | None = None
    order: dict[SequenceKey, collections.deque[_Slot]] = field(default_factory=dict)

    def full(self, limit: int, max_bytes: int) -> bool:
        """Tell whether the reader must wait: too many requests or reply bytes not yet written."""
        return self.inflight >= limit or self.buffered > max_bytes


def _reply_bytes(reply: pb.ModelStreamInferResponse) -> int:
    return 0 if reply is _NO_REPLY else reply.ByteSize()


@dataclass(slots=True, eq=False)
class _Slot:
    """A stream request's place among the requests of its sequence; `reply` is set when it is done."""

    reply: pb.ModelStreamInferResponse | None = None


@dataclass(slots=True, eq=False)
class _Call:
    """One started request: its future in the core and what `finish` needs to encode the response."""

    servicer: KServeServicer
    request: pb.ModelInferRequest
    spec: ModelSpec
    stats: ModelStats
    names: list[str]
    batch: int
    started: int
    decoded: int
    future: asyncio.Future[Any]
    read: Callable[[asyncio.Future[Any]], Any]

    def finish(self) -> pb.ModelInferResponse:
        """Encode the outcome (or raise its typed error), counting it in the model's statistics."""
        spec = self.spec
        try:
            outcome = self.read(self.future)
            inferred = time.monotonic_ns()
            if isinstance(outcome, SequenceOutcome):
                outputs = {k: v[np.newaxis] for k, v in outcome.outputs.items()}
                version = outcome.version
            else:
                outputs, version = outcome
            response = pb.ModelInferResponse(
                model_name=spec.name, model_version=str(version), id=self.request.id
            )
            encode_outputs(
                response, [(n, outputs[n]) for n in self.names], typed=wants_typed_outputs(self.request)
            )
        except Exception:
            self.stats.fail.add(time.monotonic_ns() - self.started)
            raise
        self.stats.record((self.started, self.decoded, inferred, time.monotonic_ns()), self.batch)
        return response


def _stateless_result(version: int) -> Callable[[asyncio.Future[Any]], tuple[dict[str, np.ndarray], int]]:
    def read(fut: asyncio.Future[Any]) -> tuple[dict[str, np.ndarray], int]:
        return fut.result(), version

    return read


def _error_reply(request: pb.ModelInferRequest, exc: BaseException) -> pb.ModelStreamInferResponse:
    _, message = status_of(exc)
    reply = pb.ModelStreamInferResponse(error_message=message)
    reply.infer_response.id = request.id
    reply.infer_response.model_name = request.model_name
    reply.infer_response.model_version = request.model_version
    return reply


def _final_response_wanted(request: pb.ModelInferRequest) -> bool:
    param = request.parameters.get("triton_enable_empty_final_response")
    return param is not None and param.WhichOneof("parameter_choice") == "bool_param" and param.bool_param


def _requested_outputs(spec: ModelSpec, request: pb.ModelInferRequest) -> list[str]:
    """Names of the outputs to return: those requested (in request order), else every data output."""
    known = [t.name for t in spec.outputs]
    if not request.outputs:
        return known
    names: list[str] = []
    for out in request.outputs:
        if out.name not in known:
            hint = " (state is implicit and never an output)" if out.name.startswith("state_out_") else ""
            raise InvalidArgument(f"model {spec.name!r} has no output {out.name!r}{hint}; outputs: {known}")
        if out.name in names:
            raise InvalidArgument(f"output {out.name!r} is requested twice")
        if "classification" in out.parameters:
            raise InvalidArgument("the classification extension is not supported; request the raw output")
        if "shared_memory_region" in out.parameters:
            raise InvalidArgument(f"output {out.name!r}: shared-memory outputs are not supported")
        names.append(out.name)
    return names


def _batch_of(arrays: dict[str, np.ndarray]) -> int | None:
    """Axis 0 of the first input, if any (the core validates the inputs; this only routes the request)."""
    for a in arrays.values():
        return int(a.shape[0]) if a.ndim else 0
    return None


def _wire_name(dtype: np.dtype) -> str:
    return wire_type_of(dtype).name


def add_to_server(
    server: grpc.aio.Server,
    engine: Engine,
    *,
    ready: Callable[[], bool] = lambda: True,
    version: str | None = None,
    stream_max_inflight: int = DEFAULT_STREAM_MAX_INFLIGHT,
    streams: StreamRegistry | None = None,
    owners: OwnerTable | None = None,
) -> KServeServicer:
    """Register `inference.GRPCInferenceService` on `server` (the native API's port); returns the servicer.

    `owners`: this process is one worker of several (the table of which worker owns which sequence).
    """
    servicer = KServeServicer(
        engine,
        version=version,
        ready=ready,
        stream_max_inflight=stream_max_inflight,
        streams=streams,
        owners=owners,
    )
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    return servicer
