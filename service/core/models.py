"""The model host: the loaded model versions and what each needs to serve (slab, batcher, input validator).

It owns the `Repository` (what is on disk, versions, pinning) and attaches to every loaded version its
`StateSlab`, its `Batcher` and its `InputValidator`; it unloads a version once it is retired and its last
session ends. The repository watcher (polling) lives here too.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from concurrent.futures import Executor
from typing import Any, NamedTuple

import numpy as np

from service.config import Settings
from service.core.controls import control_filler
from service.core.inputs import InputValidator
from service.core.policy import BatchPolicy
from service.core.registry import ModelVersion, Repository, RepositoryChange
from service.core.scheduler import Batcher, Finish, StepRequest
from service.core.slab import StateSlab
from service.core.types import ModelSpec
from service.metrics import Metrics

_log = logging.getLogger(__name__)

Spawn = Callable[[Coroutine[Any, Any, Any]], Any]


class Gauges(NamedTuple):
    """Per-version metric children that sessions move (bound once at load, not per call)."""

    active: Any
    state_bytes: Any


class ModelHost:
    """Loaded model versions, each with its slab, batcher and validator (see the module docstring)."""

    def __init__(
        self, settings: Settings, metrics: Metrics, executor: Executor, finish: Finish, spawn: Spawn
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.executor = executor
        self.repository = Repository(settings.model_repository, settings)
        self._finish = finish
        self._spawn = spawn

    # -- loading --------------------------------------------------------------------------------------------
    def apply(self, change: RepositoryChange) -> None:
        """Attach serving parts to newly loaded versions and unload versions nothing pins any more."""
        for mv in change.loaded:
            self._attach(mv)
        for mv in change.unload:
            self._spawn(self.unload(mv))
        self.metrics.model_versions.set(len(self.repository.loaded()))

    def scan(self, retry: bool = False) -> RepositoryChange:
        """Rescan the repository now, on the calling thread (start-up, tests); `retry`: refused ones too."""
        change = self.repository.scan(retry)
        self.apply(change)
        return change

    async def scan_async(self, retry: bool = False) -> RepositoryChange:
        """Rescan with the slow part (disk, ONNX Runtime loads) off the event loop."""
        plan = await asyncio.get_running_loop().run_in_executor(None, self.repository.plan, retry)
        change = self.repository.apply(plan)
        self.apply(change)
        return change

    async def watch(self) -> None:
        """Poll the repository every `repository_poll_s` seconds (a task; outlives any one bad scan)."""
        while True:
            await asyncio.sleep(self.settings.repository_poll_s)
            try:
                await self.scan_async()
            except Exception as exc:  # noqa: BLE001 - logged; the next poll tries again
                _log.error("repository scan failed: %r", exc, exc_info=exc)

    def _attach(self, mv: ModelVersion) -> None:
        spec = mv.spec
        mv.slab = StateSlab(spec.states)
        mv.inputs = InputValidator(spec, self.settings.max_cached_response_bytes)
        mv.controls = control_filler(spec)
        mv.batcher = Batcher(
            spec,
            mv.runtime,
            mv.slab,
            self.executor,
            max_batch_size=spec.config.max_batch_size,
            max_queue_delay_us=spec.config.max_queue_delay_us,
            policy=BatchPolicy(
                target_rows=self.settings.batch_target_rows,
                max_delay_s=self.settings.batch_hold_us / 1e6,
                inline_max_s=self.settings.inline_max_us / 1e6,
                idle_inline_max_s=self.settings.inline_idle_max_us / 1e6,
            ),
            max_queue_size=self.settings.max_queue_size,
            finish=self._finish,
            observe=self._observer(spec),
        )
        mv.batcher.start()
        labels = (spec.name, str(spec.version))
        self.metrics.version_loaded(
            *labels, spec.state_bytes, min(spec.config.max_sessions, self.settings.max_sessions)
        )
        mv.gauges = Gauges(
            self.metrics.active_sessions.labels(*labels), self.metrics.state_bytes.labels(*labels)
        )

    def _observer(self, spec: ModelSpec) -> Callable[[int, int, float, float, list[StepRequest]], None]:
        labels = (spec.name, str(spec.version))
        queue_h = self.metrics.queue_seconds.labels(*labels)
        compute_h = self.metrics.compute_seconds.labels(*labels)
        batch_h = self.metrics.batch_size.labels(*labels)
        steps_c = self.metrics.steps.labels(*labels)
        request_h = self.metrics.request_seconds.labels(*labels)

        def observe(n: int, steps: int, started: float, ended: float, batch: list[StepRequest]) -> None:
            # Once per batch: the per-request latencies go in bulk (metrics.BulkHistogram). A request's time
            # runs from its arrival (validated, queued) to its batch's results.
            batch_h.observe(n)
            compute_h.observe(ended - started)
            steps_c.inc(n * steps)
            if n == 1:
                queue_h.observe(started - batch[0].enqueued)
                request_h.observe(ended - batch[0].enqueued)
            else:
                enqueued = np.fromiter((r.enqueued for r in batch), np.float64, n)
                queue_h.observe_many(started - enqueued)
                request_h.observe_many(ended - enqueued)

        return observe

    async def unload(self, mv: ModelVersion) -> None:
        """Stop a version's batcher and drop its serving parts (its sessions are gone)."""
        if mv.batcher is not None:
            await mv.batcher.stop()
        mv.slab = mv.batcher = mv.inputs = mv.gauges = mv.controls = None
        self.metrics.version_unloaded(mv.spec.name, str(mv.spec.version))
        self.metrics.model_versions.set(len(self.repository.loaded()))
        _log.info("unloaded model %s version %d", mv.spec.name, mv.spec.version)

    async def unload_all(self) -> None:
        """Unload every version (server stop)."""
        for mv in self.repository.loaded():
            await self.unload(mv)

    # -- lookups --------------------------------------------------------------------------------------------
    def get(self, name: str, version: int | None = None) -> ModelVersion:
        """Return the version that takes new sessions (`version` None/0 = newest); NotFound otherwise."""
        return self.repository.get(name, version)

    def find(self, name: str, version: int) -> ModelVersion | None:
        """Any loaded version, current or retired-but-pinned (a resumed session's version)."""
        for mv in self.repository.loaded():
            if mv.spec.name == name and mv.spec.version == version:
                return mv
        return None

    def list_models(self) -> list[ModelSpec]:
        """List the served (newest) version of each model; `ModelSpec.versions` lists those on disk."""
        return [mv.spec for _, mv in sorted(self.repository.current.items())]

    def served_versions(self) -> list[ModelSpec]:
        """Every version the models' version policies serve, per model newest first."""
        return [
            mv.spec
            for _, versions in sorted(self.repository.served.items())
            for _, mv in sorted(versions.items(), reverse=True)
        ]

    def get_model(self, name: str, version: int | None = None) -> ModelSpec:
        """One model's spec; `version` None/0 = the served one; versions pinned by sessions count too."""
        if version:
            mv = self.find(name, version)
            if mv is not None:
                return mv.spec
        return self.repository.get(name, version).spec

    # -- pinning --------------------------------------------------------------------------------------------
    def pin(self, mv: ModelVersion) -> None:
        """Count a session opened on `mv` (pins the version)."""
        self.repository.acquire(mv)
        mv.gauges.active.inc()
        mv.gauges.state_bytes.inc(mv.spec.state_bytes)

    def unpin(self, mv: ModelVersion) -> None:
        """Count a session on `mv` that ended; unload `mv` if it was retired and this was its last."""
        if mv.gauges is not None:
            mv.gauges.active.dec()
            mv.gauges.state_bytes.dec(mv.spec.state_bytes)
        if self.repository.release(mv):
            self._spawn(self.unload(mv))
