"""The model repository: `<root>/<name>/<version>/model.onnx` (+ optional `<root>/<name>/config.yaml`).

Reads each model's inputs, outputs and metadata through ONNX Runtime (no torch), validates the state contract
(docs/DESIGN.md section 1) and describes it as a `ModelSpec`. A model that breaks the contract is skipped with
a logged reason; it never takes the server down.

Versions: only the newest valid version of a model takes new sessions. When a newer one appears (`scan()`,
called on request or by the engine's watcher), the old one is *retired*: its open sessions stay pinned to it
and it unloads when the last of them ends (a refcount). A model removed from disk stops taking new sessions.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from service.config import Settings
from service.core.contract import describe
from service.core.runtime import Runtime
from service.core.types import ContractError, ModelConfig, ModelSpec
from service.errors import NotFound

_log = logging.getLogger(__name__)


@dataclass(eq=False, slots=True)
class ModelVersion:
    """One loaded model version: spec, runtime, and what the model host attaches; refcounted by sessions.

    `slab`, `batcher`, `inputs` and `gauges` belong to the layers above (`service.core.models` sets them at
    load and clears them at unload); they live here so a session reaches its batcher in one attribute hop.
    """

    spec: ModelSpec
    runtime: Runtime
    sessions: int = 0
    retired: bool = False
    slab: Any = None  # StateSlab
    batcher: Any = None  # Batcher
    inputs: Any = None  # InputValidator
    gauges: Any = None  # per-version metric children


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
                    and vdir.name.isascii()
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
