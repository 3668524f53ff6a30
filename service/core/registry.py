"""The model repository: `<root>/<name>/<version>/model.onnx` (+ optional `<root>/<name>/config.yaml`).

Reads each model's inputs, outputs and metadata through ONNX Runtime (no torch), validates the state contract
(docs/DESIGN.md section 1), describes it as a `ModelSpec` and runs the self-check (`service.core.selfcheck`:
one pass vs random chunks, batch 1 vs 3) unless its config.yaml says `self_check: false`. A model that breaks
the contract or fails its self-check is not served; the reason (one line) is logged and kept (`refusals()`);
it never takes the server down and the other models keep serving.

Versions: each model's `version_policy` (config.yaml, as Triton's: `{latest: N}`, default 1; `all`;
`{specific: [...]}`) picks the versions served, among the valid ones. A request without a version goes to the
newest served one. When a scan (`scan()`, called on request or by the engine's watcher) drops a version from
the served set, it is *retired*: its open sessions stay pinned to it and it unloads when the last of them
ends (a refcount). A model removed from disk stops taking new sessions.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from service.config import Settings
from service.core.contract import describe
from service.core.controls import control_feeds
from service.core.runtime import Runtime
from service.core.selfcheck import probe_of_spec, self_check
from service.core.types import ContractError, ModelConfig, ModelSpec, VersionPolicy
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
    controls: Any = None  # ControlFiller, for models with control inputs


@dataclass(frozen=True, slots=True)
class RepositoryChange:
    """What a scan changed: versions now loaded, versions retired (still pinned), versions to unload now."""

    loaded: tuple[ModelVersion, ...] = ()
    retired: tuple[ModelVersion, ...] = ()
    unload: tuple[ModelVersion, ...] = ()


@dataclass(frozen=True, slots=True)
class ScanPlan:
    """What `Repository.plan` found: versions listed on disk, and the versions to serve, per model."""

    listed: dict[str, tuple[int, ...]]
    serve: dict[str, dict[int, ModelVersion]]


@dataclass(frozen=True, slots=True)
class Refusal:
    """A model version on disk that is not served, and why (one line)."""

    name: str
    version: int
    reason: str


class Repository:
    """The loaded models of one repository directory, with version retirement and refcounted unloading."""

    def __init__(self, root: Path, settings: Settings) -> None:
        self.root = Path(root)
        self.settings = settings
        self.current: dict[str, ModelVersion] = {}  # name -> newest served version (new sessions by default)
        self.served: dict[str, dict[int, ModelVersion]] = {}  # name -> every version its policy serves
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

    def _config(self, model_dir: Path) -> ModelConfig:
        """Read the model's serving settings: server defaults, then `<model>/config.yaml` (ContractError)."""
        cfg_file = model_dir / "config.yaml"
        try:
            overrides = yaml.safe_load(cfg_file.read_text()) if cfg_file.is_file() else None
        except yaml.YAMLError as exc:
            raise ContractError(f"config.yaml is not valid YAML: {exc}") from None
        if overrides is not None and not isinstance(overrides, dict):
            raise ContractError("config.yaml must hold a mapping")
        return ModelConfig.from_settings(self.settings, overrides)

    def _refuse(self, name: str, version: int, path: Path, mtime: float, reason: str) -> None:
        _log.error("model %s version %d not served (%s): %s", name, version, path, reason)
        self.problems[path] = reason
        self._skipped[path] = mtime

    def _load(
        self, name: str, version: int, path: Path, config: ModelConfig | Exception
    ) -> ModelVersion | None:
        mtime = path.stat().st_mtime
        if self._skipped.get(path) == mtime:
            return None
        try:
            if isinstance(config, Exception):
                raise config
            runtime = Runtime(path, self.settings.ort_intra_op_threads)
            spec = describe(runtime, name, version, config)
        except Exception as exc:  # a bad model is skipped with its reason; the server keeps running
            self._refuse(name, version, path, mtime, str(exc) or type(exc).__name__)
            return None
        check = "off (self_check: false)"
        if config.self_check:
            verdict = self_check(
                runtime.session, probe_of_spec(spec, control_feeds(spec)), tol=config.self_check_tolerance
            )
            if not verdict.ok:
                self._refuse(name, version, path, mtime, f"self-check failed: {verdict.reason}")
                return None
            check = verdict.reason
        self.problems.pop(path, None)
        self._skipped.pop(path, None)
        _log.info(
            "loaded model %s version %d (%d states, %d bytes per session); self-check: %s",
            name,
            version,
            len(spec.states),
            spec.state_bytes,
            check,
        )
        return ModelVersion(spec, runtime)

    def plan(self) -> ScanPlan:
        """Do the slow half of a scan (read the disk, load new versions into ONNX Runtime); change nothing.

        Per model, the version policy picks the versions to serve among the valid ones, newest first; a
        version already served is kept as it is (not reloaded). Safe to run in a worker thread while the event
        loop serves: it only reads `served`.
        """
        on_disk = self._on_disk()
        serve: dict[str, dict[int, ModelVersion]] = {}
        for name, versions in on_disk.items():
            served = self.served.get(name, {})
            try:
                config: ModelConfig | Exception = self._config(self.root / name)
            except Exception as exc:  # noqa: BLE001 - every version of the model is refused with it
                config = exc
            policy = config.version_policy if isinstance(config, ModelConfig) else VersionPolicy()
            chosen: dict[int, ModelVersion] = {}
            for version, path in sorted(versions, reverse=True):
                if policy.kind == "latest" and len(chosen) == policy.num_versions:
                    break
                if policy.kind == "specific" and version not in policy.versions:
                    continue
                mv = served.get(version) or self._load(name, version, path, config)
                if mv is not None:
                    chosen[version] = mv
            if chosen:
                serve[name] = chosen
        present = {path for versions in on_disk.values() for _, path in versions}
        for path in [p for p in self.problems if p not in present]:  # files gone from disk: forget why
            self.problems.pop(path, None)
            self._skipped.pop(path, None)
        listed = {name: tuple(sorted(v for v, _ in versions)) for name, versions in on_disk.items()}
        return ScanPlan(listed, serve)

    def apply(self, plan: ScanPlan) -> RepositoryChange:
        """Do the quick half of a scan, on the loop: swap in new versions, retire dropped or removed ones."""
        loaded, retired = [], []
        for name in sorted(set(self.served) | set(plan.serve)):
            old, new = self.served.get(name, {}), plan.serve.get(name, {})
            for version, mv in sorted(new.items()):
                if version not in old:
                    loaded.append(mv)
            for version, mv in old.items():
                if version not in new:
                    mv.retired = True
                    retired.append(mv)
            if new:
                self.served[name] = new
                self.current[name] = new[max(new)]
            else:
                self.served.pop(name, None)
                self.current.pop(name, None)
                why = "was removed from the repository" if name not in plan.listed else "has no valid version"
                _log.info("model %s %s; it takes no new sessions", name, why)
        for name, listed in plan.listed.items():
            for mv in self.served.get(name, {}).values():
                if mv.spec.versions != listed:
                    mv.spec = replace(mv.spec, versions=listed)
        self.retired.extend(retired)
        unload = tuple(mv for mv in retired if mv.sessions == 0)
        for mv in unload:
            self.retired.remove(mv)
        return RepositoryChange(tuple(loaded), tuple(retired), unload)

    def scan(self) -> RepositoryChange:
        """Compare the disk with what is loaded: load the versions the policy serves, retire the others."""
        return self.apply(self.plan())

    def refusals(self, name: str | None = None) -> list[Refusal]:
        """Versions on disk that are not served because they failed to load or their self-check, with why."""
        found = []
        for path, reason in list(self.problems.items()):  # a copy: a scan in a worker thread may write it
            model, version = path.parent.parent.name, path.parent.name
            if (name is None or model == name) and version.isdigit():
                found.append(Refusal(model, int(version), reason))
        return sorted(found, key=lambda r: (r.name, r.version))

    def _why_not(self, name: str, version: int | None = None) -> str:
        refused = [r for r in self.refusals(name) if version is None or r.version == version]
        if not refused:
            return ""
        r = refused[-1]
        return f"; version {r.version} was refused at load: {r.reason}"

    def newest(self, name: str) -> ModelVersion:
        """Return the version of `name` that takes new sessions."""
        mv = self.current.get(name)
        if mv is None:
            raise NotFound(
                f"unknown model {name!r}; available: {sorted(self.current)}{self._why_not(name)}",
                reason="unknown",
            )
        return mv

    def get(self, name: str, version: int | None = None) -> ModelVersion:
        """`name` at `version` (None or 0 = the newest served), among the versions its policy serves."""
        mv = self.newest(name)
        if not version or version == mv.spec.version:
            return mv
        other = self.served[name].get(version)
        if other is None:
            raise NotFound(
                f"model {name!r} version {version} is not served; served versions: "
                f"{sorted(self.served[name])} "
                f"(version_policy {mv.spec.config.version_policy.describe()}){self._why_not(name, version)}",
                reason="unknown",
            )
        return other

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
        """Every version in memory: served and retired-but-pinned."""
        return [mv for versions in self.served.values() for mv in versions.values()] + self.retired
