"""The model repository: `<root>/<name>/<version>/model.onnx` (+ optional `<root>/<name>/config.yaml`).

Reads each model's inputs, outputs and metadata through ONNX Runtime (no torch), validates the state contract
(docs/DESIGN.md section 1) and describes it as a `ModelSpec`. A model that breaks the contract is skipped with
a logged reason; it never takes the server down.

Versions: only the newest valid version of a model takes new sessions. When a newer one appears (`scan()`,
called on request or by the engine's watcher), the old one is *retired*: its open sessions stay pinned to it
and it unloads when the last of them ends (a refcount). A model removed from disk stops taking new sessions.
"""

from __future__ import annotations

import base64
import io
import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

from service.config import Settings
from service.errors import NotFound
from service.runtime import ORT_DTYPES, Runtime

if TYPE_CHECKING:
    from service.batching import Batcher
    from service.slab import StateSlab

_log = logging.getLogger(__name__)

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


def _dims(shape: list[Any]) -> list[int | str | None]:
    return [d if isinstance(d, int) else (d if isinstance(d, str) and d else None) for d in shape]


def _dtype(type_str: str, name: str) -> np.dtype:
    try:
        return ORT_DTYPES[type_str]
    except KeyError:
        raise ContractError(f"tensor {name!r} has unsupported type {type_str}") from None


def _initial_state(
    meta: dict[str, str], name: str, dtype: np.dtype, shape: tuple[int, ...]
) -> np.ndarray | None:
    blob = meta.get(INITIAL_STATE_KEY + name)
    if blob is None:
        return None
    try:
        array = np.load(io.BytesIO(base64.b64decode(blob)), allow_pickle=False)
    except Exception as exc:
        raise ContractError(f"metadata {INITIAL_STATE_KEY}{name} is not a base64 .npy file: {exc}") from None
    if tuple(array.shape) != shape:
        raise ContractError(
            f"initial state {name!r} has shape {array.shape}, expected {shape} (no batch axis)"
        )
    return np.ascontiguousarray(array.astype(dtype, copy=False))


_Table = dict[str, tuple[np.dtype, list[int | str | None]]]


def _check_batch_axes(ins: _Table, outs: _Table) -> None:
    for kind, table in (("input", ins), ("output", outs)):
        for tname, (_, dims) in table.items():
            if not dims:
                raise ContractError(f"{kind} {tname!r} is a scalar; axis 0 must be the batch axis")
            if isinstance(dims[0], int):
                raise ContractError(
                    f"{kind} {tname!r} has a static axis 0 ({dims[0]}); it must be the dynamic batch"
                )


def _states(ins: _Table, outs: _Table, meta: dict[str, str]) -> tuple[StateSpec, ...]:
    """Pair `state_in_<name>` with `state_out_<name>` and check dtypes and static shapes."""
    states = []
    for in_name, (dtype, dims) in ins.items():
        if not in_name.startswith(STATE_IN):
            continue
        key = in_name[len(STATE_IN) :]
        pair = outs.get(STATE_OUT + key)
        if pair is None:
            raise ContractError(f"state input {in_name!r} has no output {STATE_OUT + key!r}")
        if pair[0] != dtype:
            raise ContractError(f"state {key!r}: input dtype {dtype} differs from output dtype {pair[0]}")
        rest = dims[1:]
        if not all(isinstance(d, int) for d in rest):
            raise ContractError(
                f"state {key!r} has dynamic dims {dims}; state dims other than batch must be static"
            )
        out_rest = pair[1][1:]
        if all(isinstance(d, int) for d in out_rest) and list(out_rest) != list(rest):
            raise ContractError(f"state {key!r}: input shape {dims} differs from output shape {pair[1]}")
        shape = tuple(int(d) for d in rest)  # type: ignore[arg-type]
        states.append(StateSpec(key, dtype, shape, _initial_state(meta, key, dtype, shape)))
    for out_name in outs:
        if out_name.startswith(STATE_OUT) and STATE_IN + out_name[len(STATE_OUT) :] not in ins:
            raise ContractError(
                f"state output {out_name!r} has no input {STATE_IN + out_name[len(STATE_OUT) :]!r}"
            )
    return tuple(states)


def _vocabulary(meta: dict[str, str]) -> tuple[str, ...] | None:
    if "rnnserve.vocabulary" not in meta:
        return None
    try:
        vocab = json.loads(meta["rnnserve.vocabulary"])
    except json.JSONDecodeError as exc:
        raise ContractError(f"metadata rnnserve.vocabulary is not JSON: {exc}") from None
    if not isinstance(vocab, list) or not all(isinstance(t, str) for t in vocab):
        raise ContractError("metadata rnnserve.vocabulary must be a JSON list of strings")
    return tuple(vocab)


def describe(runtime: Runtime, name: str, version: int, config: ModelConfig) -> ModelSpec:
    """Read and validate one loaded model against the state contract; raises `ContractError`."""
    sess = runtime.session
    ins = {i.name: (_dtype(i.type, i.name), _dims(i.shape)) for i in sess.get_inputs()}
    outs = {o.name: (_dtype(o.type, o.name), _dims(o.shape)) for o in sess.get_outputs()}
    _check_batch_axes(ins, outs)
    meta = runtime.metadata
    states = _states(ins, outs, meta)
    data_in = [(n, d) for n, d in ins.items() if not n.startswith(STATE_IN)]
    data_out = [(n, d) for n, d in outs.items() if not n.startswith(STATE_OUT)]
    if not data_in or not data_out:
        raise ContractError("a model needs at least one data input and one data output")
    timed = [len(dims) > 1 and dims[1] == TIME_DIM for _, (_, dims) in data_in]
    if any(timed) and not all(timed):
        raise ContractError("either every data input has a time axis (axis 1 named 'time') or none has")
    time_axis = all(timed)

    def spec(n: str, dtype: np.dtype, dims: list[int | str | None]) -> TensorSpec:
        # An output has a time axis when its axis 1 is symbolic (ORT may name computed dims itself).
        timed_here = time_axis and len(dims) > 1 and not isinstance(dims[1], int)
        return TensorSpec(n, dtype, tuple(d if isinstance(d, int) else None for d in dims), timed_here)

    return ModelSpec(
        name=name,
        version=version,
        inputs=tuple(spec(n, *d) for n, d in data_in),
        outputs=tuple(spec(n, *d) for n, d in data_out),
        states=states,
        time_axis=time_axis,
        metadata=dict(meta),
        vocabulary=_vocabulary(meta),
        description=config.description or meta.get("rnnserve.description", ""),
        config=config,
        path=runtime.path,
    )


@dataclass(eq=False, slots=True)
class ModelVersion:
    """One loaded model version: spec, runtime, and what the engine attaches (slab, batcher); refcounted."""

    spec: ModelSpec
    runtime: Runtime
    sessions: int = 0
    retired: bool = False
    slab: StateSlab | None = None
    batcher: Batcher | None = None


@dataclass(frozen=True, slots=True)
class RepositoryChange:
    """What a scan changed: versions now loaded, versions retired (still pinned), versions to unload now."""

    loaded: tuple[ModelVersion, ...] = ()
    retired: tuple[ModelVersion, ...] = ()
    unload: tuple[ModelVersion, ...] = ()


@dataclass(frozen=True, slots=True)
class ScanPlan:
    """What `Repository.plan` found: versions listed on disk per model, and newly loaded newest versions."""

    listed: dict[str, tuple[int, ...]]
    candidates: dict[str, ModelVersion]


class Repository:
    """The loaded models of one repository directory, with version retirement and refcounted unloading."""

    def __init__(self, root: Path, settings: Settings) -> None:
        self.root = Path(root)
        self.settings = settings
        self.current: dict[str, ModelVersion] = {}  # name -> newest loaded version (takes new sessions)
        self.retired: list[ModelVersion] = []  # older versions still pinned by sessions
        self.problems: dict[Path, str] = {}  # model files skipped, with the reason
        self._skipped: dict[Path, float] = {}  # path -> mtime of a file that failed, so it is not retried

    def _on_disk(self) -> dict[str, list[tuple[int, Path]]]:
        found: dict[str, list[tuple[int, Path]]] = {}
        if not self.root.is_dir():
            _log.warning("model repository %s does not exist", self.root)
            return found
        for model_dir in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for vdir in model_dir.iterdir():
                if (
                    vdir.is_dir()
                    and vdir.name.isdigit()
                    and int(vdir.name) > 0
                    and (vdir / "model.onnx").is_file()
                ):
                    found.setdefault(model_dir.name, []).append((int(vdir.name), vdir / "model.onnx"))
        return found

    def _load(self, name: str, version: int, path: Path) -> ModelVersion | None:
        mtime = path.stat().st_mtime
        if self._skipped.get(path) == mtime:
            return None
        try:
            cfg_file = path.parent.parent / "config.yaml"
            overrides = yaml.safe_load(cfg_file.read_text()) if cfg_file.is_file() else None
            if overrides is not None and not isinstance(overrides, dict):
                raise ContractError("config.yaml must hold a mapping")
            config = ModelConfig.from_settings(self.settings, overrides)
            runtime = Runtime(path, self.settings.ort_intra_op_threads)
            spec = describe(runtime, name, version, config)
        except Exception as exc:  # a bad model is skipped with its reason; the server keeps running
            reason = str(exc) or type(exc).__name__
            _log.error("skipping model %s version %d (%s): %s", name, version, path, reason)
            self.problems[path] = reason
            self._skipped[path] = mtime
            return None
        self.problems.pop(path, None)
        self._skipped.pop(path, None)
        _log.info(
            "loaded model %s version %d (%d states, %d bytes per session)",
            name,
            version,
            len(spec.states),
            spec.state_bytes,
        )
        return ModelVersion(spec, runtime)

    def plan(self) -> ScanPlan:
        """Do the slow half of a scan (read the disk, load new versions into ONNX Runtime); change nothing.

        Safe to run in a worker thread while the event loop serves: it only reads `current`.
        """
        on_disk = self._on_disk()
        candidates: dict[str, ModelVersion] = {}
        for name, versions in on_disk.items():
            cur = self.current.get(name)
            for version, path in sorted(versions, reverse=True):  # newest valid version wins
                if cur is not None and cur.spec.version == version:
                    break
                mv = self._load(name, version, path)
                if mv is not None:
                    candidates[name] = mv
                    break
        listed = {name: tuple(sorted(v for v, _ in versions)) for name, versions in on_disk.items()}
        return ScanPlan(listed, candidates)

    def apply(self, plan: ScanPlan) -> RepositoryChange:
        """Do the quick half of a scan, on the loop: swap in new versions, retire replaced or removed ones."""
        loaded, retired = [], []
        for name, mv in plan.candidates.items():
            cur = self.current.get(name)
            if cur is not None:
                cur.retired = True
                retired.append(cur)
            self.current[name] = mv
            loaded.append(mv)
        for name, listed in plan.listed.items():
            cur = self.current.get(name)
            if cur is not None and cur.spec.versions != listed:
                cur.spec = replace(cur.spec, versions=listed)
        for name in list(self.current):
            if name not in plan.listed:
                mv = self.current.pop(name)
                mv.retired = True
                retired.append(mv)
                _log.info("model %s was removed from the repository; it takes no new sessions", name)
        self.retired.extend(retired)
        unload = tuple(mv for mv in retired if mv.sessions == 0)
        for mv in unload:
            self.retired.remove(mv)
        return RepositoryChange(tuple(loaded), tuple(retired), unload)

    def scan(self) -> RepositoryChange:
        """Compare the disk with what is loaded: load new newest versions, retire replaced or removed ones."""
        return self.apply(self.plan())

    def newest(self, name: str) -> ModelVersion:
        """Return the version of `name` that takes new sessions."""
        mv = self.current.get(name)
        if mv is None:
            raise NotFound(f"unknown model {name!r}; available: {sorted(self.current)}", reason="unknown")
        return mv

    def get(self, name: str, version: int | None = None) -> ModelVersion:
        """`name` at `version` (None or 0 = newest). Only the newest version takes new sessions."""
        mv = self.newest(name)
        if version and version != mv.spec.version:
            raise NotFound(
                f"model {name!r} version {version} is not served; the served version is {mv.spec.version}",
                reason="unknown",
            )
        return mv

    def acquire(self, mv: ModelVersion) -> None:
        """Pin `mv` for one more session."""
        mv.sessions += 1

    def release(self, mv: ModelVersion) -> bool:
        """Unpin `mv`; True when it is retired and unpinned, so the caller unloads it now."""
        mv.sessions -= 1
        if mv.retired and mv.sessions == 0 and mv in self.retired:
            self.retired.remove(mv)
            return True
        return False

    def loaded(self) -> list[ModelVersion]:
        """Every version in memory: current and retired-but-pinned."""
        return [*self.current.values(), *self.retired]
