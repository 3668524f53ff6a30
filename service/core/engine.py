"""`Engine`: the protocol-agnostic core both APIs (native gRPC, KServe v2) call, assembled from its parts.

The parts, each with one job (docs/DESIGN.md, "Layers"):

- `models.ModelHost`: loaded model versions with their slab, batcher and input validator; repository watching;
- `sessions.SessionManager`: session table, lifecycle (open, end, expire), leases, resume from the store;
- `stepping.Stepper`: the hot path, one chunk applied exactly once through the batcher;
- `state_ops.StateOps`: state blobs, fork, reset;
- `generation.Generator`: token sampling as one applied chunk.

The engine wires them together, owns the start/drain/stop order and the ONNX Runtime executor, and offers the
one API the front ends call. It knows nothing of gRPC or protobuf: it raises typed `ServeError`s.

Concurrency model: everything here runs on the event loop; ONNX Runtime runs in one dedicated executor.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from prometheus_client import CollectorRegistry

from service.config import Settings
from service.core import limits
from service.core.controls import StepControl
from service.core.generation import Generator
from service.core.models import ModelHost
from service.core.registry import Refusal, RepositoryChange
from service.core.sessions import SessionManager
from service.core.state_ops import StateOps
from service.core.stepping import Stepper
from service.core.table import SessionTable
from service.core.tasks import Background
from service.core.types import (
    GeneratedToken,
    ModelConfig,
    ModelSpec,
    SessionInfo,
    StateSpec,
    StepCall,
    StepResult,
    TensorSpec,
)
from service.errors import ServeError
from service.metrics import Metrics
from service.stores.base import InMemoryStore, SessionStore

__all__ = [
    "Engine",
    "GeneratedToken",
    "ModelConfig",
    "ModelSpec",
    "SessionInfo",
    "StateSpec",
    "StepCall",
    "StepResult",
    "TensorSpec",
]


class Engine:
    """The serving core: wires the parts and offers their API (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        *,
        registry: CollectorRegistry | None = None,
        store: SessionStore | None = None,
    ) -> None:
        self.settings = settings
        limits.tune_allocator()
        self.metrics = Metrics(registry)
        self.metrics.max_sessions.set(settings.max_sessions)
        self.store = store if store is not None else self._default_store(settings)
        self.executor = ThreadPoolExecutor(settings.ort_executor_threads, thread_name_prefix="ort")
        self.background = Background()
        # The batcher calls the stepper's `finish`; the stepper needs the host: bind through a closure.
        self.models = ModelHost(
            settings, self.metrics, self.executor, lambda *a: self.stepper.finish(*a), self.background.spawn
        )
        self.session_manager = SessionManager(
            settings, self.metrics, self.store, self.models, self.background
        )
        self.stepper = Stepper(settings, self.session_manager, self.models, self.executor)
        # Long stateless requests run their slices on a thread of their own: other clients' batches never
        # queue behind a slice (on a shared core the OS interleaves them instead).
        self.burst_executor = ThreadPoolExecutor(1, thread_name_prefix="ort-burst")
        self.stepper.burst_executor = self.burst_executor
        # Client-facing blobs are always signed: with the configured key, or one made for this process.
        blob_key = settings.state_hmac_key.encode() if settings.state_hmac_key else secrets.token_bytes(32)
        self.state = StateOps(self.session_manager, blob_key, allow_unsigned=settings.allow_unsigned_state)
        self.generator = Generator(settings, self.session_manager)
        self._tasks: list[asyncio.Task[None]] = []
        self._started = False
        self._stopped = False

    @staticmethod
    def _default_store(settings: Settings) -> SessionStore:
        if settings.store == "redis":
            from service.stores.redis import RedisStore  # imported only when configured

            return RedisStore.from_settings(settings)
        return InMemoryStore()

    @property
    def repository(self):  # type: ignore[no-untyped-def]  # the host's Repository
        """The model repository (versions on disk, loaded and retired)."""
        return self.models.repository

    @property
    def sessions(self) -> SessionTable:
        """The local session table."""
        return self.session_manager.table

    @property
    def draining(self) -> bool:
        """True once a drain has begun: new sessions and resumes are refused."""
        return self.session_manager.draining

    # == lifecycle ==========================================================================================
    async def start(self) -> None:
        """Load the repository, start a batcher per model version, the expiry sweeper and the watcher."""
        if self._started:
            return
        self._started = True
        loop = asyncio.get_running_loop()
        self.stepper.bind(loop)
        await self.store.ping()  # a wrong redis_url fails the start, not the first step
        self.models.scan()
        self._tasks.append(loop.create_task(self.session_manager.sweep(), name="session sweeper"))
        self._tasks.append(loop.create_task(self.session_manager.tiering.run(), name="session spiller"))
        if self.settings.repository_poll_s > 0:
            self._tasks.append(loop.create_task(self.models.watch(), name="repository watcher"))

    async def drain(self) -> None:
        """Refuse new sessions, let in-flight steps finish, and flush every session to the store."""
        sessions = self.session_manager
        sessions.draining = True
        # Steps already inside the engine finish. The edges stop new RPCs; the grace bounds a steady trickle.
        deadline = time.monotonic() + self.settings.drain_grace_s
        while self.stepper.active and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        for s in list(sessions.table):
            remaining = deadline - time.monotonic()
            if s.pending is None or remaining <= 0:
                continue
            with contextlib.suppress(ServeError, TimeoutError):  # e.g. a long generation: the grace bounds it
                await asyncio.wait_for(sessions.wait_idle(s), remaining)
        await self.background.wait()
        await sessions.flush()

    async def stop(self) -> None:
        """Drain, end every session (reason: shutdown), stop batchers and the executor, close the store."""
        if self._stopped or not self._started:
            self._stopped = True
            return
        self._stopped = True
        await self.drain()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.session_manager.hand_over_all()
        await self.background.wait()
        await self.models.unload_all()
        self.executor.shutdown(wait=True)
        self.burst_executor.shutdown(wait=True)
        await self.store.close()

    def reload(self) -> RepositoryChange:
        """Rescan the repository now: new versions load, replaced ones retire (and unload when unpinned).

        Versions refused before are tried again, changed or not (a polling scan retries only changed files).
        """
        return self.models.scan(retry=True)

    async def reload_async(self) -> RepositoryChange:
        """Rescan the repository with the slow part (disk, ONNX Runtime loads) off the event loop."""
        return await self.models.scan_async(retry=True)

    # == models =============================================================================================
    def list_models(self) -> list[ModelSpec]:
        """List the served (newest) version of each model; `ModelSpec.versions` lists those on disk."""
        return self.models.list_models()

    def served_versions(self) -> list[ModelSpec]:
        """Every version the models' version policies serve (newest first per model)."""
        return self.models.served_versions()

    def refusals(self) -> list[Refusal]:
        """Model versions on disk that are not served (load or self-check failed), with the reason."""
        return self.models.repository.refusals()

    def get_model(self, name: str, version: int | None = None) -> ModelSpec:
        """One model's spec; `version` None/0 = the served one; versions pinned by sessions count too."""
        return self.models.get_model(name, version)

    # == sessions ===========================================================================================
    async def create_session(
        self,
        model: str,
        version: int | None = None,
        *,
        idle_ttl_s: float | None = None,
        initial_state: dict[str, np.ndarray] | None = None,
        protocol: str = "native",
    ) -> SessionInfo:
        """Open a session on `model` (newest version unless `version`); state from `initial_state`.

        `initial_state` may name a subset of the states; the others start from the model's initial state.
        """
        s = await self.session_manager.create(model, version, idle_ttl_s, initial_state, protocol)
        return self.session_manager.info(s)

    async def close(self, session_id: str) -> None:
        """End a session (after its in-flight step). Closing a closed session again is a no-op."""
        await self.session_manager.close(session_id)

    def describe(self, session_id: str) -> SessionInfo:
        """Describe a local session, resident or spilled (a spilled one stays on disk)."""
        sessions = self.session_manager
        if session_id not in sessions.table.sessions:
            info = sessions.tiering.describe(session_id, sessions.wall_offset)
            if info is not None:
                return info
        return sessions.info(sessions.table.get(session_id))

    async def describe_session(self, session_id: str) -> SessionInfo:
        """Describe a session: its tier and time left; resumed from the shared store if held elsewhere."""
        sessions = self.session_manager
        if session_id not in sessions.table.sessions:
            info = sessions.tiering.describe(session_id, sessions.wall_offset)
            if info is not None:
                return info
        return await self.attach(session_id)

    async def attach(self, session_id: str) -> SessionInfo:
        """Describe a session, resuming it from the shared store when this replica does not hold it."""
        return self.session_manager.info(await self.session_manager.get(session_id))

    # == steps ==============================================================================================
    async def step(
        self,
        session_id: str,
        seq: int | None,
        inputs: dict[str, np.ndarray],
        *,
        last_only: bool = False,
        control: StepControl | None = None,
    ) -> StepResult:
        """Apply one chunk (seq = last applied + 1, None = the next); a retry of the last seq is cached.

        `last_only` returns time-axis outputs as `(1, ...)`: the last step only. `control` carries what fills
        a model's control inputs (sequence end, correlation id; `service.core.controls`).
        """
        return await self.stepper.step(session_id, seq, inputs, last_only=last_only, control=control)

    def submit(
        self,
        session_id: str,
        seq: int | None,
        inputs: dict[str, np.ndarray],
        *,
        last_only: bool = False,
        control: StepControl | None = None,
    ) -> asyncio.Future[StepResult]:
        """Start one step now; return the future of its result (`seq` None = the next step).

        The streaming front ends' entry: no coroutine per message in the common case (see `Stepper.submit`).
        """
        return self.stepper.submit(session_id, seq, inputs, last_only=last_only, control=control)

    async def step_many(
        self, calls: Sequence[StepCall], *, last_only: bool = False
    ) -> list[StepResult | ServeError]:
        """Apply chunks of many sessions in one call; a failed call yields its `ServeError` in its place."""
        return await self.stepper.step_many(calls, last_only=last_only)

    async def infer_stateless(
        self,
        model: str,
        version: int | None,
        inputs: dict[str, np.ndarray],
        *,
        dtype_name: Callable[[np.dtype], str] | None = None,
    ) -> dict[str, np.ndarray]:
        """Run once from the initial state. Inputs/outputs carry the batch axis; no states returned.

        `dtype_name` renders dtypes in error messages in the caller's wire vocabulary.
        """
        return await self.stepper.infer_stateless(model, version, inputs, dtype_name=dtype_name)

    # == state ==============================================================================================
    async def get_state(self, session_id: str) -> bytes:
        """Snapshot a session's whole state as an integrity-checked blob."""
        return await self.state.get_state(session_id)

    async def set_state(self, session_id: str, blob: bytes) -> SessionInfo:
        """Replace a session's state, seq and cached result from a GetState blob."""
        return await self.state.set_state(session_id, blob)

    async def fork(self, session_id: str, *, idle_ttl_s: float | None = None) -> SessionInfo:
        """Open a new session from a copy of this one's state."""
        return await self.state.fork(session_id, idle_ttl_s=idle_ttl_s)

    async def reset(self, session_id: str) -> SessionInfo:
        """Put a session back to its initial state and seq 0."""
        return await self.state.reset(session_id)

    # == generation =========================================================================================
    def generate(self, **kwargs) -> AsyncIterator[GeneratedToken]:  # type: ignore[no-untyped-def]
        """Sample tokens after a prime (see `Generator.generate` for the arguments)."""
        return self.generator.generate(**kwargs)
