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
import importlib.metadata
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from service.core import limits
from service.core.engine import Engine, ModelSpec
from service.errors import InvalidArgument, NotFound
from service.server.interceptors import status_of
from service.server.kserve_convert import (
    SequenceControl,
    decode_inputs,
    encode_outputs,
    parse_sequence,
    wants_typed_outputs,
    wire_type_of,
)
from service.server.kserve_sequences import SequenceKey, SequenceTable

SERVER_NAME = "rnnserve"
PLATFORM = "onnxruntime_onnx"
# Extension names exactly as Triton spells them in ServerMetadata; only the ones this server implements.
EXTENSIONS = ("sequence", "model_configuration", "binary_tensor_data", "parameters", "statistics")
# Requests one ModelStreamInfer stream may have in flight before the server stops reading it (backpressure).
DEFAULT_STREAM_MAX_INFLIGHT = 256

INT32_MAX = 2**31 - 1  # int32 fields of ModelConfig


# ------------------------------------------------------------------------------------------ statistics


@dataclass(slots=True)
class _Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int) -> None:
        self.count += 1
        self.ns += ns


@dataclass(slots=True)
class _ModelStats:
    """Per model version counters for ModelStatistics (perf_analyzer reads them, keyed on `queue.count`).

    Phases of a successful request: compute_input = decode and validate, compute_infer = the engine (its
    batcher queue wait included: the engine's own split is in the Prometheus metrics), compute_output =
    encode.
    `queue` counts every request with zero time for the same reason.
    """

    inference_count: int = 0  # batch items
    execution_count: int = 0  # requests run
    last_inference_ms: int = 0
    success: _Duration = field(default_factory=_Duration)
    fail: _Duration = field(default_factory=_Duration)
    queue: _Duration = field(default_factory=_Duration)
    compute_input: _Duration = field(default_factory=_Duration)
    compute_infer: _Duration = field(default_factory=_Duration)
    compute_output: _Duration = field(default_factory=_Duration)

    def record(self, marks: tuple[int, int, int, int], batch: int) -> None:
        """Count one successful request from its phase boundaries (monotonic ns) and batch size."""
        start, decoded, inferred, encoded = marks
        self.success.add(encoded - start)
        self.queue.add(0)
        self.compute_input.add(decoded - start)
        self.compute_infer.add(inferred - decoded)
        self.compute_output.add(encoded - inferred)
        self.inference_count += batch
        self.execution_count += 1
        self.last_inference_ms = int(time.time() * 1000)


# ---------------------------------------------------------------------------------- model descriptions


def _dims(shape: tuple[int | None, ...]) -> list[int]:
    return [-1 if d is None else int(d) for d in shape]


def model_metadata(spec: ModelSpec) -> pb.ModelMetadataResponse:
    """Describe data tensors only (state is implicit, as in Triton); shapes with the batch axis as -1."""
    response = pb.ModelMetadataResponse(
        name=spec.name, versions=[str(v) for v in (spec.versions or (spec.version,))], platform=PLATFORM
    )
    for source, target in ((spec.inputs, response.inputs), (spec.outputs, response.outputs)):
        for t in source:
            target.add(name=t.name, datatype=wire_type_of(t.dtype).name, shape=[-1, *_dims(t.shape[1:])])
    return response


def model_config(spec: ModelSpec) -> mc.ModelConfig:
    """Build the Triton ModelConfig that Triton's ONNX backend with implicit state would report."""
    cfg = spec.config
    config = mc.ModelConfig(
        name=spec.name,
        platform=PLATFORM,
        backend="onnxruntime",
        max_batch_size=min(cfg.max_batch_size, INT32_MAX),
    )
    config.version_policy.latest.num_versions = 1  # only the newest version takes new sequences
    for t in spec.inputs:
        config.input.add(name=t.name, data_type=wire_type_of(t.dtype).config_type, dims=_dims(t.shape[1:]))
    for t in spec.outputs:
        config.output.add(name=t.name, data_type=wire_type_of(t.dtype).config_type, dims=_dims(t.shape[1:]))
    if spec.states:
        seq = config.sequence_batching
        seq.max_sequence_idle_microseconds = int(cfg.idle_ttl_s * 1_000_000)
        # Steps of different sequences are batched together, the oldest first: Triton's "oldest" strategy.
        seq.oldest.max_candidate_sequences = min(cfg.max_sessions, INT32_MAX)
        seq.oldest.max_queue_delay_microseconds = cfg.max_queue_delay_us
        seq.oldest.preserve_ordering = True
        for s in spec.states:
            wire = wire_type_of(s.dtype)
            state = seq.state.add(
                input_name=f"state_in_{s.name}",
                output_name=f"state_out_{s.name}",
                data_type=wire.config_type,
                dims=list(s.shape),
            )
            if s.initial is None:
                state.initial_state.add(
                    name="zeros", data_type=wire.config_type, dims=list(s.shape), zero_data=True
                )
    else:
        config.dynamic_batching.max_queue_delay_microseconds = cfg.max_queue_delay_us
    for key, value in spec.metadata.items():
        if key.startswith("rnnserve.") and not key.startswith("rnnserve.initial_state."):
            config.parameters[key].string_value = value
    return config


def _package_version() -> str:
    try:
        return importlib.metadata.version("rnnserve")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout without `pip install -e .`
        return "0+unknown"


def _version_arg(text: str) -> int | None:
    if not text:
        return None
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise InvalidArgument(f"model_version must be empty or a positive integer, got {text[:40]!r}")
    return int(text)


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
    ) -> None:
        self._engine = engine
        self._version = version or _package_version()
        self._ready = ready
        self._stream_max_inflight = stream_max_inflight
        self.sequences = SequenceTable(engine)
        self._stats: dict[tuple[str, int], _ModelStats] = {}

    # ---- health and metadata

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:  # noqa: N802
        """Answer live: the process serves RPCs."""
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:  # noqa: N802
        """Ready unless the server is draining or has no model loaded."""
        return pb.ServerReadyResponse(ready=bool(self._ready() and self._engine.list_models()))

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:  # noqa: N802
        """Ready if that model (version) is loaded; unknown models are simply not ready, as in Triton."""
        version = _version_arg(request.version)
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
        return model_metadata(self._engine.get_model(request.name, _version_arg(request.version)))

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Any) -> pb.ModelConfigResponse:  # noqa: N802
        """Triton model configuration (max_batch_size, inputs/outputs without batch, sequence_batching)."""
        spec = self._engine.get_model(request.name, _version_arg(request.version))
        return pb.ModelConfigResponse(config=model_config(spec))

    async def RepositoryIndex(  # noqa: N802
        self, request: pb.RepositoryIndexRequest, context: Any
    ) -> pb.RepositoryIndexResponse:
        """Every served model with its newest version, READY."""
        if request.repository_name:
            raise InvalidArgument("this server has one model repository; leave repository_name empty")
        response = pb.RepositoryIndexResponse()
        for spec in sorted(self._engine.list_models(), key=lambda s: s.name):
            response.models.add(name=spec.name, version=str(spec.version), state="READY")
        return response

    async def ModelStatistics(  # noqa: N802
        self, request: pb.ModelStatisticsRequest, context: Any
    ) -> pb.ModelStatisticsResponse:
        """Request counts and durations of KServe inferences per model version (empty name: every model)."""
        version = _version_arg(request.version)
        if request.name:
            specs = [self._engine.get_model(request.name, version)]
        else:
            specs = self._engine.list_models()
        response = pb.ModelStatisticsResponse()
        for spec in sorted(specs, key=lambda s: s.name):
            st = self._stats.get((spec.name, spec.version), _ModelStats())
            entry = response.model_stats.add(
                name=spec.name,
                version=str(spec.version),
                last_inference=st.last_inference_ms,
                inference_count=st.inference_count,
                execution_count=st.execution_count,
            )
            for phase in ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output"):
                duration: _Duration = getattr(st, phase)
                target = getattr(entry.inference_stats, phase)
                target.count, target.ns = duration.count, duration.ns
        return response

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
        return await self.infer(request)

    async def ModelStreamInfer(  # noqa: N802
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: Any
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Answer each request of a bidirectional stream with one response (matched by `id`).

        Errors go in `error_message` and the stream stays open. Requests run concurrently (so interleaved
        sequences batch together) while the per-sequence lock keeps each sequence in arrival order.
        """
        out: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        inflight = asyncio.Semaphore(self._stream_max_inflight)
        running: set[asyncio.Task[None]] = set()
        order = _ReplyOrder()
        buffered = limits.ByteBudget(self._engine.settings.max_stream_buffer_bytes)

        async def answer(request: pb.ModelInferRequest, turn: _Turn) -> None:
            try:
                reply = await self._stream_reply(request)
                await turn.wait()  # replies of one sequence leave in request order
                await buffered.take(reply.ByteSize())  # a slow reader holds requests back, not memory
                out.put_nowait(reply)
            finally:
                turn.done()

        async def read() -> None:
            try:
                async for request in request_iterator:
                    await inflight.acquire()
                    task = asyncio.create_task(answer(request, order.turn(request)))
                    running.add(task)
                    task.add_done_callback(running.discard)
                if running:
                    await asyncio.gather(*running)
            finally:
                out.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (reply := await out.get()) is not None:
                size = reply.ByteSize()
                yield reply
                # Released only once written: requests running plus replies unread stay bounded.
                await buffered.give(size)
                inflight.release()
            await reader  # surfaces a broken request stream
        finally:
            reader.cancel()
            for task in list(running):
                task.cancel()

    async def _stream_reply(self, request: pb.ModelInferRequest) -> pb.ModelStreamInferResponse:
        try:
            response = await self.infer(request)
        except Exception as exc:  # noqa: BLE001 - every failure becomes this request's error_message
            _, message = status_of(exc)
            reply = pb.ModelStreamInferResponse(error_message=message)
            reply.infer_response.id = request.id
            reply.infer_response.model_name = request.model_name
            reply.infer_response.model_version = request.model_version
            return reply
        if _final_response_wanted(request):
            # Not decoupled: the one response is also the final one, flagged as Triton flags it.
            response.parameters["triton_final_response"].bool_param = True
        return pb.ModelStreamInferResponse(infer_response=response)

    async def infer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        """Run one ModelInferRequest; raises typed errors (shared by the unary and the streaming method)."""
        started = time.monotonic_ns()
        ctl = parse_sequence(request.parameters)
        version = _version_arg(request.model_version)
        if version is None and ctl.sequence_id is not None and not ctl.start:
            # A live sequence is validated against (and counted for) the version it is pinned to.
            version = self.sequences.live_version(request.model_name, ctl.sequence_id)
        spec = self._engine.get_model(request.model_name, version)
        stats = self._stats.setdefault((spec.name, spec.version), _ModelStats())
        try:
            names = _requested_outputs(spec, request)
            arrays = decode_inputs(request)
            batch = _batch_of(arrays)
            decoded = time.monotonic_ns()
            outputs, version = await self._run(spec, request, ctl, arrays, batch)
            inferred = time.monotonic_ns()
            response = pb.ModelInferResponse(model_name=spec.name, model_version=str(version), id=request.id)
            encode_outputs(response, [(n, outputs[n]) for n in names], typed=wants_typed_outputs(request))
        except Exception:
            stats.fail.add(time.monotonic_ns() - started)
            raise
        stats.record((started, decoded, inferred, time.monotonic_ns()), batch or 0)
        return response

    async def _run(
        self,
        spec: ModelSpec,
        request: pb.ModelInferRequest,
        ctl: SequenceControl,
        arrays: dict[str, np.ndarray],
        batch: int | None,
    ) -> tuple[dict[str, np.ndarray], int]:
        """Run the model: a sequence step or a stateless run; outputs with the batch axis, and the version."""
        version = spec.version
        if ctl.sequence_id is not None and spec.states and arrays:
            if batch != 1:
                raise InvalidArgument(
                    "a request with a sequence_id carries one sequence: batch dimension must be 1, "
                    f"got {batch} (send several sequences as separate requests, or drop sequence_id for a "
                    "stateless batch)"
                )
            outcome = await self.sequences.step(
                spec.name, _version_arg(request.model_version), ctl, {k: v[0] for k, v in arrays.items()}
            )
            outputs = {k: v[np.newaxis] for k, v in outcome.outputs.items()}
            version = outcome.version
        else:
            # No sequence (or a model without state, whose sequence flags Triton also ignores): one run
            # from the initial state.
            outputs = await self._engine.infer_stateless(
                spec.name, spec.version, arrays, dtype_name=_wire_name
            )
        return outputs, version


@dataclass(slots=True, eq=False)
class _Turn:
    """A stream reply's place in its sequence: wait for the previous reply, then let the next one go."""

    previous: asyncio.Future[None] | None
    mine: asyncio.Future[None] | None
    release: Callable[[], None]

    async def wait(self) -> None:
        if self.previous is not None:
            await self.previous

    def done(self) -> None:
        if self.mine is not None and not self.mine.done():
            self.mine.set_result(None)
        self.release()


class _ReplyOrder:
    """Per stream: a chain of futures per sequence, so its replies are written in request order."""

    def __init__(self) -> None:
        self._last: dict[SequenceKey, asyncio.Future[None]] = {}

    def turn(self, request: pb.ModelInferRequest) -> _Turn:
        try:
            sequence_id = parse_sequence(request.parameters).sequence_id
        except InvalidArgument:
            sequence_id = None  # the request fails on its own; it has no place in a sequence
        if sequence_id is None:
            return _Turn(None, None, lambda: None)
        key: SequenceKey = (request.model_name, sequence_id)
        previous = self._last.get(key)
        mine = self._last[key] = asyncio.get_running_loop().create_future()

        def release() -> None:
            if self._last.get(key) is mine:
                del self._last[key]

        return _Turn(previous, mine, release)


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
) -> KServeServicer:
    """Register `inference.GRPCInferenceService` on `server` (the native API's port); returns the servicer."""
    servicer = KServeServicer(engine, version=version, ready=ready, stream_max_inflight=stream_max_inflight)
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    return servicer
