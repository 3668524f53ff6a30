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
SELF_CHECK_TOLERANCE = 1e-4  # default; ONNX Runtime's kernels may block a batch of 3 differently from 1


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
class VersionPolicy:
    """Which versions of a model are served, as Triton's `version_policy`: newest N, all, or specific ones.

    Versions that fail to load (or their self-check) do not count: `latest` serves the N newest valid ones.
    """

    kind: str = "latest"  # "latest" | "all" | "specific"
    num_versions: int = 1
    versions: tuple[int, ...] = ()

    def select(self, valid: list[int]) -> list[int]:
        """Return the versions to serve, newest first, from the valid versions on disk."""
        newest_first = sorted(valid, reverse=True)
        if self.kind == "all":
            return newest_first
        if self.kind == "specific":
            return [v for v in newest_first if v in self.versions]
        return newest_first[: self.num_versions]

    def describe(self) -> str:
        """One line for logs and errors: 'latest 1', 'all', 'specific [1, 3]'."""
        if self.kind == "latest":
            return f"latest {self.num_versions}"
        return "all" if self.kind == "all" else f"specific {list(self.versions)}"

    @classmethod
    def parse(cls, raw: Any) -> VersionPolicy:
        """Read config.yaml's `version_policy`: `all`, `{latest: N}` or `{specific: [v, ...]}`.

        Triton's nested spelling works too: `{latest: {num_versions: N}}`, `{specific: {versions: [...]}}`.
        """
        expected = (
            "version_policy must be 'all', {latest: N} or {specific: [v, ...]} (Triton's "
            "{latest: {num_versions: N}} and {specific: {versions: [...]}} also work)"
        )
        if raw == "all" or (isinstance(raw, dict) and list(raw) == ["all"]):
            return cls("all")
        if not isinstance(raw, dict) or len(raw) != 1:
            raise ContractError(f"config.yaml: {expected}; got {raw!r}")
        ((kind, value),) = raw.items()
        if kind == "latest":
            n = value.get("num_versions") if isinstance(value, dict) else value
            return cls("latest", num_versions=_positive_int(n, "version_policy.latest"))
        if kind == "specific":
            versions = value.get("versions") if isinstance(value, dict) else value
            if not isinstance(versions, list) or not versions:
                raise ContractError(
                    f"config.yaml: version_policy.specific needs a list of versions; {expected}"
                )
            return cls(
                "specific",
                versions=tuple(sorted({_positive_int(v, "version_policy.specific") for v in versions})),
            )
        raise ContractError(f"config.yaml: {expected}; got {raw!r}")


# Triton's sequence batcher control kinds (model_config.proto `ModelSequenceBatching.Control.Kind`).
CONTROL_KINDS = (
    "CONTROL_SEQUENCE_START",
    "CONTROL_SEQUENCE_END",
    "CONTROL_SEQUENCE_READY",
    "CONTROL_SEQUENCE_CORRID",
)


@dataclass(frozen=True, slots=True)
class ControlInput:
    """A model input the server fills itself, as Triton's sequence batcher does (config.yaml).

    `kind` is one of `CONTROL_KINDS`; START, END and READY take `false_true` (the values for false and true);
    CORRID carries the sequence's correlation id (an integer or string input).
    """

    name: str
    kind: str
    false_true: tuple[Any, Any] = (0, 1)

    @classmethod
    def parse(cls, raw: Any) -> ControlInput:
        """Read one `control_inputs` entry: `{name: START, kind: CONTROL_SEQUENCE_START}` (+ `false_true`)."""
        expected = "each control_inputs entry needs name and kind (start, end, ready or corrid)"
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str) or "kind" not in raw:
            raise ContractError(f"config.yaml: {expected}; got {raw!r}")
        unknown = set(raw) - {"name", "kind", "false_true"}
        if unknown:
            raise ContractError(f"config.yaml: control input {raw['name']!r}: unknown keys {sorted(unknown)}")
        kind = str(raw["kind"]).upper()
        kind = kind if kind.startswith("CONTROL_SEQUENCE_") else f"CONTROL_SEQUENCE_{kind}"
        if kind not in CONTROL_KINDS:
            raise ContractError(
                f"config.yaml: control input {raw['name']!r} has kind {raw['kind']!r}; expected one of "
                f"{list(CONTROL_KINDS)}"
            )
        pair = raw.get("false_true", [0, 1])
        if not isinstance(pair, list | tuple) or len(pair) != 2:
            raise ContractError(f"config.yaml: control input {raw['name']!r}: false_true must be two values")
        if kind == "CONTROL_SEQUENCE_CORRID" and "false_true" in raw:
            raise ContractError(f"config.yaml: control input {raw['name']!r}: CORRID takes no false_true")
        return cls(raw["name"], kind, (pair[0], pair[1]))


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
    self_check: bool = True
    self_check_tolerance: float = SELF_CHECK_TOLERANCE
    version_policy: VersionPolicy = VersionPolicy()
    control_inputs: tuple[ControlInput, ...] = ()
    spill_after_s: float = 0.0  # idle seconds before a session spills to disk (0 = never)

    @classmethod
    def from_settings(cls, settings: Settings, overrides: dict[str, Any] | None = None) -> ModelConfig:
        """Defaults from the server settings, then the model's own `config.yaml` values."""
        base = cls(
            max_batch_size=settings.max_batch_size,
            max_queue_delay_us=settings.max_queue_delay_us,
            max_sessions=settings.max_sessions_per_model,
            idle_ttl_s=settings.idle_ttl_s,
            max_chunk_steps=settings.max_chunk_steps,
            spill_after_s=settings.spill_after_s,
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
            "self_check",
            "self_check_tolerance",
            "version_policy",
            "control_inputs",
            "spill_after_s",
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
        if "spill_after_s" in overrides:
            spill = overrides["spill_after_s"]
            if isinstance(spill, bool) or not isinstance(spill, int | float) or not spill >= 0:
                raise ContractError(
                    f"config.yaml: spill_after_s must be a number of seconds >= 0 (0 = never), got {spill!r}"
                )
            values["spill_after_s"] = float(spill)
        if "allow_non_finite" in overrides:
            values["allow_non_finite"] = bool(overrides["allow_non_finite"])
        if "description" in overrides:
            values["description"] = str(overrides["description"])
        values.update(_load_time_overrides(overrides))
        return replace(base, **values)


def _load_time_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    """Read the config.yaml keys used at load: self-check, version policy, control inputs."""
    values: dict[str, Any] = {}
    if "self_check" in overrides:
        if not isinstance(overrides["self_check"], bool):
            raise ContractError(
                f"config.yaml: self_check must be true or false, got {overrides['self_check']!r}"
            )
        values["self_check"] = overrides["self_check"]
    if "self_check_tolerance" in overrides:
        tol = overrides["self_check_tolerance"]
        if isinstance(tol, bool) or not isinstance(tol, int | float) or not tol > 0:
            raise ContractError(f"config.yaml: self_check_tolerance must be a positive number, got {tol!r}")
        values["self_check_tolerance"] = float(tol)
    if "version_policy" in overrides:
        values["version_policy"] = VersionPolicy.parse(overrides["version_policy"])
    if "control_inputs" in overrides:
        raw = overrides["control_inputs"]
        if not isinstance(raw, list):
            raise ContractError("config.yaml: control_inputs must be a list of {name, kind} entries")
        controls = tuple(ControlInput.parse(c) for c in raw)
        names = [c.name for c in controls]
        if len(set(names)) != len(names):
            raise ContractError(f"config.yaml: control_inputs name an input twice: {names}")
        values["control_inputs"] = controls
    return values


def _positive_int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ContractError(f"config.yaml: {key} must be a positive integer, got {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class ControlSpec:
    """A control input as read off the model: its config entry, dtype and per-session shape (no batch axis).

    `time_axis`: the input has the time axis (axis 1), so the value is given per step of a chunk.
    """

    name: str
    kind: str
    dtype: np.dtype
    shape: tuple[int, ...]
    time_axis: bool
    false_true: tuple[Any, Any] = (0, 1)


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
    controls: tuple[ControlSpec, ...] = ()  # inputs the server fills (not among `inputs`)

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
    tier: str = "resident"  # "resident" (in the slab) or "spilled" (in the spill tier on local disk)
    time_left_s: float = 0.0  # seconds until the session expires if left idle


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
