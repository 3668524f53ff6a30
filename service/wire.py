"""Native protobuf <-> numpy and engine dataclasses <-> protobuf, with validation at the edge.

Tensors travel as raw little-endian bytes with a dtype enum and a shape. Decoding never copies the payload
(`np.frombuffer` on the request's bytes, so the arrays are read-only views); every malformed tensor raises
`InvalidArgument` naming what was expected. Encoding builds messages with keyword arguments in one call,
which is the cheapest way to fill a protobuf message from Python.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, cast

import numpy as np

from service.errors import InvalidArgument
from service.proto import rnnserve_pb2 as pb

# DataType enum value <-> little-endian numpy dtype. The wire format is little-endian regardless of host.
_DTYPES: dict[int, np.dtype] = {
    pb.DATA_TYPE_BOOL: np.dtype("?"),
    pb.DATA_TYPE_UINT8: np.dtype("u1"),
    pb.DATA_TYPE_INT8: np.dtype("i1"),
    pb.DATA_TYPE_UINT16: np.dtype("<u2"),
    pb.DATA_TYPE_INT16: np.dtype("<i2"),
    pb.DATA_TYPE_UINT32: np.dtype("<u4"),
    pb.DATA_TYPE_INT32: np.dtype("<i4"),
    pb.DATA_TYPE_UINT64: np.dtype("<u8"),
    pb.DATA_TYPE_INT64: np.dtype("<i8"),
    pb.DATA_TYPE_FLOAT16: np.dtype("<f2"),
    pb.DATA_TYPE_FLOAT32: np.dtype("<f4"),
    pb.DATA_TYPE_FLOAT64: np.dtype("<f8"),
}
_ENUM_OF: dict[str, pb.DataType] = {
    dt.str.lstrip("<|=>"): cast(pb.DataType, code) for code, dt in _DTYPES.items()
}
_LITTLE = sys.byteorder == "little"
# Exact dtype objects whose bytes are already little-endian -> enum value (big-endian hosts: none qualify).
_CODE_OF_DTYPE: dict[np.dtype, pb.DataType] = (
    {dt: cast(pb.DataType, code) for code, dt in _DTYPES.items()} if _LITTLE else {}
)
_KNOWN = ", ".join(pb.DataType.Name(c) for c in _DTYPES)
# A shape claiming more elements than this is rejected before any multiplication could overflow a buffer.
_MAX_ELEMENTS = 1 << 40


def dtype_of(code: int) -> np.dtype:
    """Return the numpy dtype of a `DataType` enum value (`InvalidArgument` for UNSPECIFIED/unknown)."""
    dt = _DTYPES.get(code)
    if dt is None:
        raise InvalidArgument(f"unsupported dtype enum value {code}; expected one of {_KNOWN}")
    return dt


def enum_of(dtype: np.dtype | type) -> pb.DataType:
    """Return the `DataType` enum value of a numpy dtype (byte order ignored)."""
    dt = np.dtype(dtype)
    code = _ENUM_OF.get(dt.str.lstrip("<|=>"))
    if code is None:
        raise InvalidArgument(f"dtype {dt} has no wire type; supported: {_KNOWN}")
    return code


def tensor_to_array(t: pb.Tensor, what: str = "tensor") -> np.ndarray:
    """Decode one `Tensor` into a read-only numpy view of its bytes (no copy on little-endian hosts)."""
    # Hot path (every message): each field is read once, since protobuf field access builds a new object.
    dt = _DTYPES.get(t.dtype)
    if dt is None:
        raise InvalidArgument(
            f"{what} {t.name!r}: unsupported dtype enum value {t.dtype}; expected one of {_KNOWN}"
        )
    shape = tuple(t.shape)
    data = t.data
    n = 1
    for d in shape:
        n *= d
    if n * dt.itemsize != len(data) or n > _MAX_ELEMENTS or _odd(shape):
        _raise_bad_size(t.name, shape, dt, len(data), what)
    arr = np.frombuffer(data, dtype=dt).reshape(shape)
    if not _LITTLE:  # pragma: no cover - every supported deployment target is little-endian
        arr = arr.astype(dt.newbyteorder("="))
    return arr


def _odd(shape: tuple[int, ...]) -> bool:
    """Tell whether a dimension is negative or larger than any real tensor's (numpy's size math overflows)."""
    return bool(shape) and not 0 <= min(shape) <= max(shape) <= _MAX_ELEMENTS


def _raise_bad_size(name: str, shape: tuple[int, ...], dt: np.dtype, size: int, what: str) -> None:
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"{what} {name!r}: negative dimension in shape {list(shape)}")
    n = math.prod(shape)
    if n > _MAX_ELEMENTS or (shape and max(shape) > _MAX_ELEMENTS):
        raise InvalidArgument(f"{what} {name!r}: shape {list(shape)[:8]} is too large")
    raise InvalidArgument(
        f"{what} {name!r}: data has {size} bytes; expected prod({list(shape)}) * "
        f"{dt.itemsize} ({dt.name}) = {n * dt.itemsize}"
    )


def tensors_to_arrays(tensors: Iterable[pb.Tensor], what: str = "input") -> dict[str, np.ndarray]:
    """Decode repeated `Tensor`s into a name -> array dict; empty or duplicate names are rejected."""
    out: dict[str, np.ndarray] = {}
    for t in tensors:
        if not t.name:
            raise InvalidArgument(f"every {what} tensor needs a name")
        if t.name in out:
            raise InvalidArgument(f"{what} tensor {t.name!r} given twice")
        out[t.name] = tensor_to_array(t, what)
    return out


def array_to_tensor(name: str, arr: np.ndarray) -> pb.Tensor:
    """Encode an array as a `Tensor` (C order, little-endian)."""
    arr = np.asarray(arr)
    code = _CODE_OF_DTYPE.get(arr.dtype)  # native-order dtypes hit this dict directly (hot path)
    if code is None:
        code = _ENUM_OF.get(arr.dtype.str.lstrip("<|=>"))
        if code is None:
            raise InvalidArgument(f"{name!r}: dtype {arr.dtype} has no wire type; supported: {_KNOWN}")
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    return pb.Tensor(name=name, dtype=code, shape=arr.shape, data=arr.tobytes())


def arrays_to_tensors(arrays: Mapping[str, np.ndarray]) -> list[pb.Tensor]:
    """Encode a name -> array mapping (insertion order kept)."""
    return [array_to_tensor(name, arr) for name, arr in arrays.items()]


def _dims(shape: Sequence[int | None]) -> list[int]:
    return [-1 if d is None else int(d) for d in shape]


def _finite_or_zero(value: float) -> float:
    return value if math.isfinite(value) else 0.0


def model_to_pb(spec: Any, versions: Sequence[int] | None = None) -> pb.ModelInfo:
    """Describe an engine `ModelSpec` (plus the loaded `versions`) as a `ModelInfo`."""
    cfg = spec.config
    return pb.ModelInfo(
        name=spec.name,
        version=spec.version,
        versions=list(versions) if versions is not None else [spec.version],
        description=spec.description or "",
        inputs=[
            pb.TensorSpec(name=t.name, dtype=enum_of(t.dtype), shape=_dims(t.shape)) for t in spec.inputs
        ],
        outputs=[
            pb.TensorSpec(name=t.name, dtype=enum_of(t.dtype), shape=_dims(t.shape)) for t in spec.outputs
        ],
        states=[pb.StateSpec(name=s.name, dtype=enum_of(s.dtype), shape=list(s.shape)) for s in spec.states],
        time_axis=bool(spec.time_axis),
        vocabulary=list(spec.vocabulary or ()),
        metadata=dict(spec.metadata),
        config=pb.ModelConfig(
            max_batch_size=int(getattr(cfg, "max_batch_size", 0) or 0),
            max_queue_delay_us=int(getattr(cfg, "max_queue_delay_us", 0) or 0),
            max_sessions=int(getattr(cfg, "max_sessions", 0) or 0),
            idle_ttl_s=_finite_or_zero(float(getattr(cfg, "idle_ttl_s", 0.0) or 0.0)),
            max_chunk_steps=int(getattr(cfg, "max_chunk_steps", 0) or 0),
            allow_non_finite=bool(getattr(cfg, "allow_non_finite", False)),
        ),
    )


def session_to_pb(info: Any) -> pb.SessionInfo:
    """Encode an engine `SessionInfo` (its times are already Unix seconds: `SessionManager.info`)."""
    return pb.SessionInfo(
        session_id=info.session_id,
        model=info.model,
        version=info.version,
        last_seq=info.last_seq,
        created_at=info.created_at,
        last_used=info.last_used,
        idle_ttl_s=_finite_or_zero(info.idle_ttl_s),
        expires_at=_finite_or_zero(info.expires_at),
        steps=info.steps,
        tier=info.tier,
        time_left_s=_finite_or_zero(info.time_left_s),
    )


def optional_version(version: int) -> int | None:
    """Proto3 has no null: version 0 means "newest"; negative versions are rejected."""
    if version < 0:
        raise InvalidArgument(f"version must be a positive integer or 0 for the newest; got {version}")
    return version or None


def optional_ttl(ttl: float) -> float | None:
    """idle_ttl_s 0 means "the model's default"; negative or non-finite values are rejected."""
    if ttl < 0 or not math.isfinite(ttl):
        raise InvalidArgument(f"idle_ttl_s must be a finite number >= 0 (0 = model default); got {ttl}")
    return ttl or None


def require(value: str, field: str) -> str:
    """Reject an empty required string field with a message naming it."""
    if not value:
        raise InvalidArgument(f"{field} is required")
    return value
