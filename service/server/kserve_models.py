"""KServe v2 / Triton descriptions of a model (metadata, configuration) and per-version statistics.

What Triton would report for the same model (an ONNX model with implicit state under the sequence batcher),
built from the core's `ModelSpec`; used by the KServe servicer (`service/server/kserve.py`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb

from service import __version__
from service.core.types import ModelSpec, VersionPolicy
from service.errors import InvalidArgument
from service.server.kserve_convert import wire_type_of

PLATFORM = "onnxruntime_onnx"
INT32_MAX = 2**31 - 1  # int32 fields of ModelConfig


# ------------------------------------------------------------------------------------------ statistics


@dataclass(slots=True)
class Duration:
    """A count of requests and their total nanoseconds (one phase of Triton's statistics)."""

    count: int = 0
    ns: int = 0

    def add(self, ns: int) -> None:
        """Count one request that took `ns` nanoseconds."""
        self.count += 1
        self.ns += ns


@dataclass(slots=True)
class ModelStats:
    """Per model version counters for ModelStatistics (perf_analyzer reads them, keyed on `queue.count`).

    Phases of a successful request: compute_input = decode and validate, compute_infer = the engine (its
    batcher queue wait included: the engine's own split is in the Prometheus metrics), compute_output =
    encode.
    `queue` counts every request with zero time for the same reason.
    """

    inference_count: int = 0  # batch items
    execution_count: int = 0  # requests run
    last_inference_ms: int = 0
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)

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
    _version_policy(config, cfg.version_policy)
    for t in spec.inputs:
        config.input.add(name=t.name, data_type=wire_type_of(t.dtype).config_type, dims=_dims(t.shape[1:]))
    for t in spec.outputs:
        config.output.add(name=t.name, data_type=wire_type_of(t.dtype).config_type, dims=_dims(t.shape[1:]))
    if spec.states or spec.controls:
        seq = config.sequence_batching
        _control_inputs(seq, spec)
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


def _control_inputs(seq: mc.ModelSequenceBatching, spec: ModelSpec) -> None:
    """Report the inputs the server fills (config.yaml `control_inputs`) as Triton's `control_input`."""
    for c in spec.controls:
        control = seq.control_input.add(name=c.name).control.add(kind=c.kind)
        if c.kind == "CONTROL_SEQUENCE_CORRID":
            string = c.dtype.kind == "O"
            control.data_type = mc.TYPE_STRING if string else wire_type_of(c.dtype).config_type
        elif c.dtype.kind == "f":
            control.fp32_false_true.extend(float(v) for v in c.false_true)
        elif c.dtype.kind == "b":
            control.bool_false_true.extend(bool(v) for v in c.false_true)
        else:
            control.int32_false_true.extend(int(v) for v in c.false_true)


def _version_policy(config: mc.ModelConfig, policy: VersionPolicy) -> None:
    """Report the model's version policy (config.yaml `version_policy`) as Triton spells it."""
    if policy.kind == "all":
        config.version_policy.all.SetInParent()
    elif policy.kind == "specific":
        config.version_policy.specific.versions.extend(policy.versions)
    else:
        config.version_policy.latest.num_versions = policy.num_versions


def package_version() -> str:
    """Return the rnnserve version (ServerMetadata): `service.__version__`, the one place it is written."""
    return __version__


def version_arg(text: str) -> int | None:
    """Parse a KServe model_version string: empty = None (newest), else a positive integer."""
    if not text:
        return None
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise InvalidArgument(f"model_version must be empty or a positive integer, got {text[:40]!r}")
    return int(text)
