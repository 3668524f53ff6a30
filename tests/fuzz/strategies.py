"""Hypothesis strategies for requests of both APIs: any message of a descriptor, steered towards deep paths.

`messages(descriptor, overrides)` builds any protobuf message field by field (scalars over their whole range
plus edge values, nested messages, repeated and map fields). Field names in `overrides` get strategies that
mix valid values (real model names, live session ids, well-formed tensors, real state blobs) with invalid
ones, so a good share of the cases gets past the first validation and exercises the core.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from google.protobuf import descriptor as d
from google.protobuf import message_factory
from hypothesis import strategies as st

FD = d.FieldDescriptor
I32 = (-(2**31), 2**31 - 1)
I64 = (-(2**63), 2**63 - 1)

edge_ints = st.sampled_from([0, 1, -1, 2, 3, 255, 4096, 4097, 2**31 - 1, 2**32, 2**62, 2**63 - 1])
floats = st.one_of(
    st.sampled_from([0.0, 1.0, -1.0, 0.5, 1e-9, 1e300, float("nan"), float("inf"), float("-inf")]),
    st.floats(allow_nan=True, allow_infinity=True),
)
texts = st.one_of(st.text(max_size=24), st.sampled_from(["", " ", "\x00", "é", "a" * 300]))


def _int_range(lo: int, hi: int) -> st.SearchStrategy[int]:
    return st.one_of(
        st.integers(max(lo, -3), min(hi, 8)), edge_ints.filter(lambda v: lo <= v <= hi), st.integers(lo, hi)
    )


def scalar(field: FD) -> st.SearchStrategy[Any]:
    """Any value of a scalar field's type."""
    t = field.type
    if t == FD.TYPE_BOOL:
        return st.booleans()
    if t == FD.TYPE_STRING:
        return texts
    if t == FD.TYPE_BYTES:
        return st.binary(max_size=64)
    if t in (FD.TYPE_FLOAT, FD.TYPE_DOUBLE):
        return floats
    if t == FD.TYPE_ENUM:
        return st.one_of(st.sampled_from([v.number for v in field.enum_type.values]), st.integers(-2, 40))
    if t in (FD.TYPE_UINT32, FD.TYPE_FIXED32):
        return _int_range(0, 2**32 - 1)
    if t in (FD.TYPE_UINT64, FD.TYPE_FIXED64):
        return _int_range(0, 2**64 - 1)
    if t in (FD.TYPE_INT32, FD.TYPE_SINT32, FD.TYPE_SFIXED32):
        return _int_range(*I32)
    return _int_range(*I64)


Overrides = dict[str, Callable[[FD], st.SearchStrategy[Any]]]


def messages(
    desc: d.Descriptor, overrides: Overrides | None = None, depth: int = 0
) -> st.SearchStrategy[Any]:
    """Any message of type `desc` (fields optional, nesting up to depth 3)."""
    overrides = overrides or {}
    cls = message_factory.GetMessageClass(desc)
    parts: dict[str, st.SearchStrategy[Any]] = {}
    for f in desc.fields:
        special = overrides[f.name](f) if f.name in overrides else None
        if special is not None:  # an override may decline a field (None): the generic strategy applies
            parts[f.name] = special
            continue
        if f.type == FD.TYPE_MESSAGE:
            if depth >= 3:
                continue
            if f.message_type.GetOptions().map_entry:
                key_f, val_f = f.message_type.fields_by_name["key"], f.message_type.fields_by_name["value"]
                val = (
                    messages(val_f.message_type, overrides, depth + 1)
                    if val_f.type == FD.TYPE_MESSAGE
                    else scalar(val_f)
                )
                parts[f.name] = st.dictionaries(scalar(key_f), val, max_size=3)
                continue
            inner = messages(f.message_type, overrides, depth + 1)
        else:
            inner = scalar(f)
        parts[f.name] = st.lists(inner, max_size=3) if f.is_repeated else inner
    return st.fixed_dictionaries({}, optional=parts).map(lambda kw: build(cls, kw))


def build(cls: Any, values: dict[str, Any]) -> Any:
    """Assemble a message from drawn field values."""
    msg = cls()
    for name, value in values.items():
        f = cls.DESCRIPTOR.fields_by_name[name]
        target = getattr(msg, name) if f.type == FD.TYPE_MESSAGE or f.is_repeated else None
        if f.type == FD.TYPE_MESSAGE and f.message_type.GetOptions().map_entry:
            for k, v in value.items():
                if f.message_type.fields_by_name["value"].type == FD.TYPE_MESSAGE:
                    target[k].CopyFrom(v)
                else:
                    target[k] = v
        elif f.is_repeated:
            target.extend(value)
        elif f.type == FD.TYPE_MESSAGE:
            target.CopyFrom(value)
        else:
            setattr(msg, name, value)
    return msg


def arrays(dtype_choices: list[str]) -> st.SearchStrategy[np.ndarray]:
    """Small arrays, mostly well-formed token/feature chunks, with out-of-range and odd values mixed in."""

    @st.composite
    def draw(draw_: Any) -> np.ndarray:
        dtype = np.dtype(draw_(st.sampled_from(dtype_choices)))
        shape = tuple(draw_(st.lists(st.integers(0, 6), min_size=0, max_size=3)))
        n = int(np.prod(shape)) if shape else 1
        if dtype.kind in "iu":
            vals = draw_(
                st.lists(
                    st.one_of(st.integers(0, 45), st.integers(-(2**31), 2**31 - 1)), min_size=n, max_size=n
                )
            )
            info = np.iinfo(dtype)
            vals = [min(max(v, info.min), info.max) for v in vals]
        elif dtype.kind == "b":
            vals = draw_(st.lists(st.booleans(), min_size=n, max_size=n))
        else:
            vals = draw_(st.lists(floats, min_size=n, max_size=n))
        with np.errstate(all="ignore"):
            return np.array(vals, dtype=dtype).reshape(shape)

    return draw()
