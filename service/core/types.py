"""Plain value types of the core: model and tensor specs, session views and step results.

The bottom layer of `service.core`: every other part imports these, and this module imports nothing of the
core, so the arrows between the parts all point down (docs/DESIGN.md, "Layers").
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from service.config import Settings

STATE_IN = "state_in_"
STATE_OUT = "state_out_"
TIME_DIM = "time"
INITIAL_STATE_KEY = "rnnserve.initial_state."


class ContractError(ValueError):
    """A model file breaks the state contract; the message says what and where."""


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """A data tensor: full shape including the batch axis (None = dynamic); `time_axis` if axis 1 is time."""

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...]
    time_axis: bool = False

    @property
    def item_shape(self) -> tuple[int | None, ...]:
        """The per-session shape (no batch axis) as the API sees it."""
        return self.shape[1:]


@dataclass(frozen=True, slots=True)
class StateSpec:
    """A state tensor pair `state_in_<name>` / `state_out_<name>`; shape without the batch axis (static)."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    initial: np.ndarray | None = field(default=None, compare=False, repr=False)

    @property
    def row_bytes(self) -> int:
        """Bytes of one session's copy of this state."""
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Serving settings of one model: server defaults overridden by `<root>/<name>/config.yaml`."""

    max_batch_size: int
    max_queue_delay_us: int
    max_sessions: int
    idle_ttl_s: float
    max_chunk_steps: int
    allow_non_finite: bool = False
    description: str = ""

    @classmethod
    def from_settings(cls, settings: Settings, overrides: dict[str, Any] | None = None) -> ModelConfig:
        """Defaults from the server settings, then the model's own `config.yaml` values."""
        base = cls(
            max_batch_size=settings.max_batch_size,
            max_queue_delay_us=settings.max_queue_delay_us,
            max_sessions=settings.max_sessions_per_model,
            idle_ttl_s=settings.idle_ttl_s,
            max_chunk_steps=settings.max_chunk_steps,
        )
        if not overrides:
            return base
        known = {
            "max_batch_size",
            "max_queue_delay_ms",
            "max_sessions",
            "idle_ttl_s",
            "max_chunk_steps",
            "allow_non_finite",
            "description",
        }
        unknown = set(overrides) - known
        if unknown:
            raise ContractError(
                f"config.yaml: unknown keys {sorted(unknown)}; expected some of {sorted(known)}"
            )
        values: dict[str, Any] = {}
        for key in ("max_batch_size", "max_sessions", "max_chunk_steps"):
            if key in overrides:
                values[key] = _positive_int(overrides[key], key)
        if "max_queue_delay_ms" in overrides:
            values["max_queue_delay_us"] = int(float(overrides["max_queue_delay_ms"]) * 1000)
        if "idle_ttl_s" in overrides:
            values["idle_ttl_s"] = min(float(overrides["idle_ttl_s"]), settings.max_idle_ttl_s)
        if "allow_non_finite" in overrides:
            values["allow_non_finite"] = bool(overrides["allow_non_finite"])
        if "description" in overrides:
            values["description"] = str(overrides["description"])
        return replace(base, **values)


def _positive_int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ContractError(f"config.yaml: {key} must be a positive integer, got {value!r}")
    return value


@dataclass(frozen=True)
class ModelSpec:
    """Everything a client needs to know about one model version (data tensors and states separately)."""

    name: str
    version: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    states: tuple[StateSpec, ...]
    time_axis: bool
    metadata: dict[str, str]
    vocabulary: tuple[str, ...] | None
    description: str
    config: ModelConfig
    versions: tuple[int, ...] = ()
    path: Path | None = None

    @property
    def state_bytes(self) -> int:
        """Bytes of one session's whole state."""
        return sum(s.row_bytes for s in self.states)


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """A session as clients see it. Times are wall-clock epoch seconds; expires_at is the idle expiry."""

    session_id: str
    model: str
    version: int
    last_seq: int
    created_at: float
    last_used: float
    idle_ttl_s: float
    expires_at: float
    steps: int


@dataclass(frozen=True, slots=True)
class StepResult:
    """Outputs of one applied chunk, per session: arrays `(T, ...)` without the batch axis."""

    seq: int
    outputs: dict[str, np.ndarray]
    cached: bool


class StepCall(NamedTuple):
    """One session's chunk inside a multiplexed `Engine.step_many` call."""

    session_id: str
    seq: int
    inputs: dict[str, np.ndarray]


class GeneratedToken(NamedTuple):
    """One sampled token of `Engine.generate`."""

    token_id: int
    text: str
