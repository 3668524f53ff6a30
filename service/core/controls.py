"""Control inputs: model inputs the server fills itself, as Triton's sequence batcher does.

A model's config.yaml may name some of its ONNX inputs as control inputs (docs/state-contract.md, "Control
inputs"); clients never send them. For every chunk of a session the server fills:

- ``CONTROL_SEQUENCE_START``: true on the first step of the sequence (seq 1: after create or reset; KServe:
  the request with ``sequence_start``), false otherwise;
- ``CONTROL_SEQUENCE_END``: true on the last step of the request that ends the sequence (KServe
  ``sequence_end``; a native session never sends it, it has no last chunk), false otherwise;
- ``CONTROL_SEQUENCE_READY``: true (every request the model sees holds real data);
- ``CONTROL_SEQUENCE_CORRID``: the correlation id: KServe's ``sequence_id``; for a native session a stable id
  derived from its session id (the session id itself for a string input).

"True" and "false" are the entry's `false_true` values (default 0 and 1) in the input's dtype. A control
input without a time axis holds one value per request (Triton's shape ``[1]``); with one (axis 1 named
``time``) it holds one value per step, START on step 0 only and END on the last step only, so one pass and
any chunking of a sequence see the same values.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from service.core.types import ControlSpec, ModelSpec
from service.errors import InvalidArgument

START, END, READY, CORRID = (
    "CONTROL_SEQUENCE_START",
    "CONTROL_SEQUENCE_END",
    "CONTROL_SEQUENCE_READY",
    "CONTROL_SEQUENCE_CORRID",
)


@dataclass(frozen=True, slots=True)
class StepControl:
    """What the front end knows of a step: it ends the sequence, and the sequence's correlation id."""

    end: bool = False
    corrid: int | str | None = None  # None: derived from the session id


def session_corrid(session_id: str, dtype: np.dtype) -> int | str:
    """Derive a native session's correlation id: the session id for strings, else a stable integer >= 0."""
    if dtype.kind in "OSU":
        return session_id
    bits = min(dtype.itemsize * 8 - (1 if dtype.kind == "i" else 0), 63)
    return int.from_bytes(hashlib.sha256(session_id.encode()).digest()[:8], "little") % (1 << bits)


class ControlFiller:
    """The control inputs of one model version, in the order the batcher feeds them after the data inputs."""

    __slots__ = ("specs", "names")

    def __init__(self, controls: tuple[ControlSpec, ...]) -> None:
        self.specs = controls
        self.names = tuple(c.name for c in controls)

    def _corrid(self, c: ControlSpec, corrid: int | str) -> object:
        if c.dtype.kind in "OSU":
            return str(corrid)
        try:
            value = int(corrid)
        except ValueError:
            raise InvalidArgument(
                f"control input {c.name!r} takes an integer correlation id ({c.dtype.name}); sequence id "
                f"{corrid!r} is not one"
            ) from None
        if not 0 <= value < 1 << 64:
            raise InvalidArgument(f"sequence id {value} is not a uint64 correlation id")
        # As Triton: a narrower integer input gets the low-order bits of the uint64 id.
        return np.array(value, np.uint64).astype(c.dtype)

    def row(self, c: ControlSpec, steps: int, start: bool, end: bool, corrid: int | str) -> np.ndarray:
        """One session's value of control `c` for a chunk of `steps` steps (no batch axis)."""
        length = steps if c.time_axis else 1
        shape = ((steps,) if c.time_axis else ()) + c.shape
        if c.kind == CORRID:
            return np.full(shape, self._corrid(c, corrid), dtype=c.dtype)
        false, true = (np.asarray(v).astype(c.dtype) for v in c.false_true)
        flags = np.zeros(length, bool)
        if c.kind == READY:
            flags[:] = True
        elif c.kind == START:
            flags[0] = start
        elif c.kind == END:
            flags[-1] = end
        values = np.where(flags, true, false).astype(c.dtype)
        if not c.time_axis:
            values = values[0]
        return np.ascontiguousarray(
            np.broadcast_to(values.reshape(values.shape + (1,) * len(c.shape)), shape)
        )

    def extend(
        self,
        arrays: tuple[np.ndarray, ...],
        steps: int,
        start: bool,
        control: StepControl | None,
        session_id: str,
    ) -> tuple[np.ndarray, ...]:
        """Append the control values of one session's chunk to its validated data arrays."""
        end = control.end if control is not None else False
        corrid = control.corrid if control is not None else None
        return arrays + tuple(
            self.row(c, steps, start, end, session_corrid(session_id, c.dtype) if corrid is None else corrid)
            for c in self.specs
        )

    def batch(
        self, batch: int, steps: int, start: bool, end: bool, corrids: list[int | str]
    ) -> dict[str, np.ndarray]:
        """Control feeds of a whole batch (stateless runs, the self-check): one correlation id per row."""
        return {
            c.name: np.stack([self.row(c, steps, start, end, corrids[i]) for i in range(batch)])
            for c in self.specs
        }


def control_filler(spec: ModelSpec) -> ControlFiller | None:
    """Return the filler of a model version's control inputs, or None when it has none (the usual case)."""
    return ControlFiller(spec.controls) if spec.controls else None


def control_feeds(spec: ModelSpec):  # type: ignore[no-untyped-def]
    """Return the self-check's control feeder (`selfcheck.ControlFeeds`), or None without controls."""
    filler = control_filler(spec)
    if filler is None:
        return None

    def feeds(batch: int, steps: int, start: bool) -> dict[str, np.ndarray]:
        return filler.batch(batch, steps, start, False, [1000 + i for i in range(batch)])

    return feeds
