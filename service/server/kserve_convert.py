"""Open Inference Protocol (KServe v2) tensors and request parameters <-> numpy.

Pure functions, no I/O: the KServe servicer (`service/server/kserve.py`) calls them at the edge. Messages are
the generated classes of the maintained `tritonclient` package (`tritonclient.grpc.service_pb2`), never
a copy.

Wire rules followed (KServe v2 gRPC and Triton):
- An input's data travels either in its typed `contents` field or, for every input at once, in
  `raw_input_contents` (little-endian, row-major), never both; FP16 has no typed field, so it is raw only.
- Responses use `raw_output_contents` for every output, as Triton does (the tritonclient decodes numeric
  outputs only from there). A client that sets the `binary_data` parameter to false on every requested output
  (or the request parameter `binary_data_output` to false) gets typed `contents` instead, when every output
  dtype has a typed field; the spec forbids mixing the two in one response.
- Shapes on the wire include the batch axis.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from tritonclient.grpc import model_config_pb2, service_pb2

from service.errors import InvalidArgument


@dataclass(frozen=True, slots=True)
class WireType:
    """One KServe datatype: its numpy dtype, its typed-contents field and its model-config enum."""

    name: str  # KServe datatype string, e.g. "FP32"
    dtype: np.dtype
    contents_field: str | None  # field of InferTensorContents; None: raw only (FP16)
    config_type: int  # model_config_pb2.DataType value (TYPE_FP32 ...)


def _wt(name: str, dtype: str, field: str | None, config: str) -> WireType:
    return WireType(name, np.dtype(dtype), field, model_config_pb2.DataType.Value(config))


# Every numeric KServe datatype numpy can hold. BYTES (strings) and BF16 (no numpy dtype) are refused: no
# model following the state contract takes them.
WIRE_TYPES: tuple[WireType, ...] = (
    _wt("BOOL", "?", "bool_contents", "TYPE_BOOL"),
    _wt("UINT8", "<u1", "uint_contents", "TYPE_UINT8"),
    _wt("UINT16", "<u2", "uint_contents", "TYPE_UINT16"),
    _wt("UINT32", "<u4", "uint_contents", "TYPE_UINT32"),
    _wt("UINT64", "<u8", "uint64_contents", "TYPE_UINT64"),
    _wt("INT8", "<i1", "int_contents", "TYPE_INT8"),
    _wt("INT16", "<i2", "int_contents", "TYPE_INT16"),
    _wt("INT32", "<i4", "int_contents", "TYPE_INT32"),
    _wt("INT64", "<i8", "int64_contents", "TYPE_INT64"),
    _wt("FP16", "<f2", None, "TYPE_FP16"),
    _wt("FP32", "<f4", "fp32_contents", "TYPE_FP32"),
    _wt("FP64", "<f8", "fp64_contents", "TYPE_FP64"),
)
_BY_NAME = {w.name: w for w in WIRE_TYPES}
_LITTLE = sys.byteorder == "little"  # wire data is little-endian: a view of it is already native here
_BY_DTYPE = {w.dtype.newbyteorder("="): w for w in WIRE_TYPES}
SUPPORTED = ", ".join(w.name for w in WIRE_TYPES)


def wire_type_of(dtype: np.dtype) -> WireType:
    """Return the KServe datatype of a numpy dtype (a model's tensor dtype); InvalidArgument if none."""
    found = _BY_DTYPE.get(dtype)  # a native-order numpy dtype (every output): no new dtype built
    if found is not None:
        return found
    found = _BY_DTYPE.get(np.dtype(dtype).newbyteorder("="))
    if found is None:
        raise InvalidArgument(f"dtype {np.dtype(dtype)} has no KServe datatype here (supported: {SUPPORTED})")
    return found


def wire_type_named(name: str) -> WireType:
    """Return the WireType of a KServe datatype string; InvalidArgument naming the supported ones if none."""
    found = _BY_NAME.get(name)
    if found is None:
        raise InvalidArgument(f"datatype {name!r} is not supported; expected one of {SUPPORTED}")
    return found


# ------------------------------------------------------------------------------------------ parameters


@dataclass(frozen=True, slots=True)
class SequenceControl:
    """Triton's sequence extension parameters of one request. `sequence_id` None: not part of a sequence."""

    sequence_id: int | str | None
    start: bool
    end: bool


def _bool_param(params: Mapping[str, service_pb2.InferParameter], key: str) -> bool:
    if key not in params:
        return False
    param = params[key]
    if param.WhichOneof("parameter_choice") != "bool_param":
        raise InvalidArgument(f"parameter {key!r} must be a bool_param")
    return bool(param.bool_param)


def parse_sequence(params: Mapping[str, service_pb2.InferParameter]) -> SequenceControl:
    """Read `sequence_id` (int64, uint64 or string; 0 or "" mean none, as in Triton) and start/end flags."""
    sequence_id: int | str | None = None
    if "sequence_id" in params:
        param = params["sequence_id"]
        choice = param.WhichOneof("parameter_choice")
        if choice == "int64_param":
            if param.int64_param < 0:
                raise InvalidArgument(f"sequence_id must be a non-negative integer, got {param.int64_param}")
            sequence_id = param.int64_param or None
        elif choice == "uint64_param":
            sequence_id = param.uint64_param or None
        elif choice == "string_param":
            sequence_id = param.string_param or None
        else:
            raise InvalidArgument(
                "parameter 'sequence_id' must be an int64_param, uint64_param or string_param"
            )
    start = _bool_param(params, "sequence_start")
    end = _bool_param(params, "sequence_end")
    if sequence_id is None and (start or end):
        raise InvalidArgument("sequence_start/sequence_end need a non-zero 'sequence_id' parameter")
    return SequenceControl(sequence_id, start, end)


def wants_typed_outputs(request: service_pb2.ModelInferRequest) -> bool:
    """Tell whether the client explicitly asked for typed (non-binary) outputs and nothing asks for binary."""
    asked: list[bool] = []
    if "binary_data_output" in request.parameters:
        asked.append(_bool_param(request.parameters, "binary_data_output"))
    for out in request.outputs:
        if "binary_data" in out.parameters:
            asked.append(_bool_param(out.parameters, "binary_data"))
    return bool(asked) and not any(asked)


# ---------------------------------------------------------------------------------------------- inputs


MAX_DIM = 1 << 31  # no real tensor dimension comes near; larger ones only overflow numpy's size arithmetic


def _element_count(name: str, shape: Sequence[int]) -> int:
    if shape and 0 <= min(shape) and max(shape) <= MAX_DIM:  # the usual case: one pass over the dims each
        return math.prod(shape)
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"input {name!r}: shape {list(shape)} has a negative dimension")
    if any(d > MAX_DIM for d in shape):
        raise InvalidArgument(
            f"input {name!r}: shape {list(shape)[:8]} has a dimension above {MAX_DIM}; expected a real shape"
        )
    return math.prod(shape)


def _from_raw(name: str, wire: WireType, shape: list[int], raw: bytes) -> np.ndarray:
    expected = _element_count(name, shape) * wire.dtype.itemsize
    if len(raw) != expected:
        raise InvalidArgument(
            f"input {name!r}: raw_input_contents holds {len(raw)} bytes; shape {shape} of {wire.name} "
            f"needs {expected}"
        )
    arr = np.frombuffer(raw, dtype=wire.dtype).reshape(shape)
    return arr if _LITTLE else arr.astype(wire.dtype.newbyteorder("="))


def _from_contents(
    name: str, wire: WireType, shape: list[int], contents: service_pb2.InferTensorContents
) -> np.ndarray:
    count = _element_count(name, shape)
    if wire.contents_field is None:
        raise InvalidArgument(
            f"input {name!r}: {wire.name} has no typed contents field; send raw_input_contents"
        )
    for field, values in contents.ListFields():
        if field.name != wire.contents_field and len(values):
            raise InvalidArgument(
                f"input {name!r} is {wire.name}: its data belongs in contents.{wire.contents_field}, "
                f"not contents.{field.name}"
            )
    values = getattr(contents, wire.contents_field)
    if len(values) != count:
        raise InvalidArgument(
            f"input {name!r}: contents.{wire.contents_field} holds {len(values)} values; "
            f"shape {shape} needs {count}"
        )
    wide = np.asarray(values, dtype=np.float64 if wire.dtype.kind == "f" else None)
    if wire.dtype.kind in "iu" and wide.size:
        info = np.iinfo(wire.dtype)
        if wide.min() < info.min or wide.max() > info.max:
            raise InvalidArgument(
                f"input {name!r}: a value lies outside the {wire.name} range [{info.min}, {info.max}]"
            )
    return wide.astype(wire.dtype.newbyteorder("=")).reshape(shape)


def decode_inputs(request: service_pb2.ModelInferRequest) -> dict[str, np.ndarray]:
    """Decode every input tensor of a ModelInferRequest: arrays with the wire shape (batch axis first)."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgument(
            f"raw_input_contents has {len(raw)} entries but the request has {len(request.inputs)} inputs; "
            "send one entry per input, in input order"
        )
    arrays: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(request.inputs):
        name = tensor.name
        if name in arrays:
            raise InvalidArgument(f"input {name!r} appears twice in the request")
        if "shared_memory_region" in tensor.parameters:
            raise InvalidArgument(
                f"input {name!r}: shared-memory tensors are not supported; send the data inline"
            )
        wire = wire_type_named(tensor.datatype)
        shape = list(tensor.shape)
        if raw:
            if tensor.HasField("contents") and tensor.contents.ByteSize():
                raise InvalidArgument(f"input {name!r} has both contents and raw_input_contents; use one")
            arrays[name] = _from_raw(name, wire, shape, raw[index])
        else:
            arrays[name] = _from_contents(name, wire, shape, tensor.contents)
    return arrays


# --------------------------------------------------------------------------------------------- outputs


def encode_outputs(
    response: service_pb2.ModelInferResponse, outputs: Iterable[tuple[str, np.ndarray]], *, typed: bool
) -> None:
    """Append the outputs (name, array with batch axis) to `response`: raw bytes, or typed contents.

    Typed contents are used only when every output dtype has a typed field (the spec forbids mixing).
    """
    items = [(name, a, wire_type_of(a.dtype)) for name, a in ((n, np.asarray(x)) for n, x in outputs)]
    typed = typed and all(wire.contents_field is not None for _, _, wire in items)
    for name, array, wire in items:
        tensor = response.outputs.add(name=name, datatype=wire.name, shape=list(array.shape))
        if typed and wire.contents_field is not None:
            getattr(tensor.contents, wire.contents_field).extend(array.ravel().tolist())
        else:
            response.raw_output_contents.append(np.ascontiguousarray(array, dtype=wire.dtype).tobytes())
