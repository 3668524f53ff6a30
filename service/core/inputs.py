"""Validation of a client's data tensors against a model version's spec (dtype, shape, chunk length, values).

Runs once per step on the event loop, so the checks are precomputed per model version and the common case
(one data input with a time axis) is straight-line code. Every failure is a typed error that says what was
expected; nothing here touches any session state.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import numpy as np

from service.core.types import ModelSpec, TensorSpec
from service.errors import InvalidArgument, OutOfRange


class InputValidator:
    """Precomputed checks of one model version's data inputs (the per-step hot path)."""

    __slots__ = (
        "specs",
        "names",
        "expected",
        "timed",
        "finite",
        "max_chunk",
        "label",
        "token_range",
        "rest",
        "controls",
        "why",
        "max_steps",
    )

    def __init__(self, spec: ModelSpec, max_response_bytes: int | None = None) -> None:
        self.specs = spec.inputs
        self.names = frozenset(t.name for t in spec.inputs)
        self.expected = ", ".join(f"{t.name} ({t.dtype.name}, shape {_shape_text(t)})" for t in spec.inputs)
        self.timed = spec.time_axis
        self.finite = tuple((not spec.config.allow_non_finite) and t.dtype.kind in "fc" for t in spec.inputs)
        self.max_chunk = self.max_steps = spec.config.max_chunk_steps  # max_steps: stateless rows (no cache)
        self.why = f"max_chunk_steps ({self.max_chunk})"
        self.label = f"model {spec.name!r} v{spec.version}"
        self.controls = frozenset(c.name for c in spec.controls)  # filled by the server, never sent
        # A session keeps its last response for an idempotent retry: bound it by bounding the chunk length
        # (the response of a T-step chunk is T times the per-step output bytes), at no cost per step.
        per_step = sum(
            _item_bytes(t) for t in spec.outputs if t.time_axis
        ) if spec.time_axis else 0
        if max_response_bytes and per_step:
            by_bytes = max(1, max_response_bytes // per_step)
            if by_bytes < self.max_chunk:
                self.max_chunk = by_bytes
                self.why = (
                    f"max_cached_response_bytes ({max_response_bytes}: the response of one step is "
                    f"{per_step} bytes, so at most {by_bytes} steps)"
                )
        # Token ids index an embedding: ONNX Gather would wrap negative ids and fail the whole batch on large
        # ones, so integer inputs of vocabulary models are range-checked here.
        vocab = len(spec.vocabulary) if spec.vocabulary is not None else 0
        self.token_range = tuple(vocab if t.dtype.kind in "iu" else 0 for t in spec.inputs)
        # Fast shape check for the usual case: a time axis and static other dims (None = take the slow path).
        self.rest = tuple(
            t.shape[2:] if self.timed and all(d is not None for d in t.shape[2:]) else None
            for t in spec.inputs
        )

    def check(self, inputs: dict[str, np.ndarray]) -> tuple[tuple[np.ndarray, ...], object, int]:
        """Return validated arrays in spec order, the batching key (their shapes) and the timestep count."""
        if len(self.specs) == 1 and len(inputs) == 1:
            # The common case (one data input, e.g. tokens): straight-line checks, same rules as below.
            t = self.specs[0]
            a = inputs.get(t.name)
            rest = self.rest[0]
            if type(a) is np.ndarray and a.dtype == t.dtype and rest is not None:
                shape = a.shape
                if len(shape) == len(rest) + 1 and shape[1:] == rest and 0 < shape[0] <= self.max_chunk:
                    if self.finite[0] and not np.isfinite(a).all():
                        self._check_all(inputs)  # raises with the full message
                    if self.token_range[0]:
                        self._check_ids(t, a, self.token_range[0])
                    return (a,), shape, shape[0]
        return self._check_all(inputs)

    def _check_all(
        self, inputs: dict[str, np.ndarray], stateless: bool = False
    ) -> tuple[tuple[np.ndarray, ...], object, int]:
        max_chunk = self.max_steps if stateless else self.max_chunk
        if len(inputs) != len(self.specs) or not self.names.issuperset(inputs):
            self._names_error(inputs)
        arrays = []
        steps = 1
        for i, t in enumerate(self.specs):
            a = inputs[t.name]
            if not isinstance(a, np.ndarray):
                raise InvalidArgument(f"input {t.name!r} must be a numpy array")
            if a.dtype != t.dtype:
                raise InvalidArgument(
                    f"{self.label}: input {t.name!r} has dtype {a.dtype.name}; expected {t.dtype.name}"
                )
            rest = self.rest[i]
            shape = a.shape
            if (
                rest is None
                or shape[1:] != rest
                or len(shape) == len(rest)
                or not 0 < shape[0] <= max_chunk
            ):
                self._check_shape(t, a, stateless)
            if self.timed:
                if i == 0:
                    steps = a.shape[0]
                elif a.shape[0] != steps:
                    raise InvalidArgument(
                        f"{self.label}: inputs have different chunk lengths ({steps} and "
                        f"{a.shape[0]} steps); every input needs the same T"
                    )
            if self.finite[i] and not np.isfinite(a).all():
                raise InvalidArgument(
                    f"{self.label}: input {t.name!r} holds NaN or infinity; this model "
                    "expects finite values (allow_non_finite is off)"
                )
            if self.token_range[i]:
                self._check_ids(t, a, self.token_range[i])
            arrays.append(a)
        key = arrays[0].shape if len(arrays) == 1 else tuple(a.shape for a in arrays)
        return tuple(arrays), key, steps

    def check_batch(
        self,
        inputs: dict[str, np.ndarray],
        max_batch_size: int,
        dtype_name: Callable[[np.dtype], str] | None = None,
    ) -> int:
        """Validate inputs that carry a leading batch axis (stateless runs); returns the batch size.

        Names, dtypes and shapes are checked against the full shapes (batch first); then every row gets the
        per-session checks of `check`. `dtype_name`, if given, renders dtypes in the caller's wire vocabulary.
        """
        by_name = {t.name: t for t in self.specs}
        unknown = sorted(set(inputs) - set(by_name))
        if self.controls.intersection(unknown):
            self._names_error(inputs)
        if unknown:
            hint = (
                " (state is implicit and never an input)"
                if any(n.startswith("state_in_") for n in unknown)
                else ""
            )
            raise InvalidArgument(
                f"{self.label} has no input {unknown[0]!r}{hint}; inputs: {sorted(by_name)}"
            )
        missing = sorted(set(by_name) - set(inputs))
        if missing:
            raise InvalidArgument(f"{self.label} needs input {missing[0]!r}; inputs: {sorted(by_name)}")
        batches = set()
        for name, a in inputs.items():
            t = by_name[name]
            if a.dtype != t.dtype:
                word, want, got = (
                    ("dtype", t.dtype.name, a.dtype.name)
                    if dtype_name is None
                    else ("datatype", dtype_name(t.dtype), dtype_name(a.dtype))
                )
                raise InvalidArgument(f"input {name!r} of {self.label} has {word} {want}, got {got}")
            shape_text = "[" + ", ".join("-1" if d is None else str(d) for d in t.shape) + "]"
            if a.ndim != len(t.shape) or any(
                d is not None and d != n for d, n in zip(t.shape, a.shape, strict=False)
            ):
                raise InvalidArgument(
                    f"input {name!r} of {self.label} has shape {shape_text} (batch first), "
                    f"got {list(a.shape)}"
                )
            batches.add(a.shape[0])
        if len(batches) != 1:
            raise InvalidArgument(f"inputs disagree on the batch dimension (axis 0): {sorted(batches)}")
        batch = int(batches.pop())
        if batch < 1:
            raise InvalidArgument("the batch dimension (axis 0) must be at least 1")
        if batch > max_batch_size:
            raise InvalidArgument(f"batch {batch} exceeds max_batch_size {max_batch_size} of {self.label}")
        for i in range(batch):  # each row must be a valid per-session input (chunk length, finiteness, ids)
            self._check_all({k: a[i] for k, a in inputs.items()}, stateless=True)
        return batch

    def _check_ids(self, t: TensorSpec, a: np.ndarray, vocab: int) -> None:
        if a.size == 1:  # one-step messages: a Python comparison beats two array reductions
            x = a.item()
            if 0 <= x < vocab:
                return
        elif a.min() >= 0 and a.max() < vocab:
            return
        bad = (a < 0) | (a >= vocab)
        if bad.any():
            raise InvalidArgument(
                f"{self.label}: input {t.name!r} has token ids {a[bad][:10].tolist()} outside the "
                f"vocabulary; expected 0 <= id < {vocab}"
            )

    def _check_shape(self, t: TensorSpec, a: np.ndarray, stateless: bool = False) -> None:
        want = t.shape[1:]
        if a.ndim != len(want) or any(w is not None and w != d for w, d in zip(want, a.shape, strict=True)):
            raise InvalidArgument(
                f"{self.label}: input {t.name!r} has shape {tuple(a.shape)}; expected "
                f"{_shape_text(t)} (per session, no batch axis)"
            )
        if 0 in a.shape:
            raise InvalidArgument(
                f"{self.label}: input {t.name!r} is empty (shape {tuple(a.shape)}); a chunk "
                "needs at least one step"
            )
        if stateless:
            max_chunk, why = self.max_steps, f"max_chunk_steps ({self.max_steps})"
        else:
            max_chunk, why = self.max_chunk, self.why
        if self.timed and a.shape[0] > max_chunk:
            raise OutOfRange(
                f"{self.label}: chunk of {a.shape[0]} steps is longer than the limit {why}; "
                "split it into smaller chunks"
            )

    def _names_error(self, inputs: dict[str, np.ndarray]) -> None:
        controls = sorted(self.controls.intersection(inputs))
        if controls:
            raise InvalidArgument(
                f"{self.label}: {controls} are control inputs, which the server fills (sequence start, end, "
                f"ready, correlation id); send only the data inputs: {self.expected}"
            )
        state = [n for n in inputs if n.startswith("state_in_")]
        if state:
            raise InvalidArgument(
                f"{self.label}: {state} are state inputs, which the server holds; send only "
                f"the data inputs: {self.expected}"
            )
        missing = sorted(self.names - set(inputs))
        extra = sorted(set(inputs) - self.names)
        raise InvalidArgument(
            f"{self.label}: wrong inputs (missing {missing}, unexpected {extra}); expected {self.expected}"
        )


def input_digest(spec: ModelSpec, arrays: Sequence[np.ndarray | None]) -> bytes:
    """Return a short digest of a chunk's inputs in spec order (names, dtypes, shapes, bytes)."""
    h = hashlib.blake2b(digest_size=16)
    for t, a in zip(spec.inputs, arrays, strict=True):
        if a is None:
            h.update(b"missing:" + t.name.encode())
            continue
        h.update(f"{t.name}:{a.dtype.str}:{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.digest()


def _item_bytes(t: TensorSpec) -> int:
    """Bytes of one timestep of a time-axis output (dynamic dims counted as 1)."""
    n = 1
    for d in t.shape[2:]:
        n *= d if d else 1
    return n * t.dtype.itemsize


def _shape_text(t: TensorSpec) -> str:
    dims = [
        "T" if (i == 0 and t.time_axis) else ("?" if d is None else str(d)) for i, d in enumerate(t.shape[1:])
    ]
    return "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"
