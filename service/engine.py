"""The protocol-agnostic serving core that both APIs (native gRPC, KServe v2) call (DESIGN.md section 3).

It wires the repository (model versions), one `StateSlab` and one `Batcher` per loaded version, the session
table, the session store seam and the metrics. It knows nothing of gRPC or protobuf: it raises typed
`ServeError`s and the edges map them in one place.

Concurrency model: everything here runs on the event loop; ONNX Runtime and the slab gathers/scatters run in
one dedicated executor. A session has at most one operation in flight (`Session.pending`): a step, or an
exclusive operation such as get/set state, fork, reset, close or a whole generation. Others wait their turn.
Bookkeeping of an applied step (seq, cached result) happens when the batch completes, not in the awaiting
coroutine, so a cancelled caller can never leave state and seq out of step with each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from prometheus_client import CollectorRegistry

from service import snapshot
from service.batching import Batcher, GroupSlot, PendingOp, StepGroup, StepRequest
from service.config import Settings
from service.errors import (
    FailedPrecondition,
    InvalidArgument,
    OutOfRange,
    ServeError,
    Unavailable,
)
from service.generation import check_ids, encode_text, sample
from service.inputs import InputValidator
from service.metrics import Metrics
from service.repository import (
    ModelConfig,
    ModelSpec,
    ModelVersion,
    Repository,
    RepositoryChange,
    StateSpec,
    TensorSpec,
)
from service.sessions import Session, SessionTable
from service.slab import StateSlab
from service.store import InMemoryStore, SessionRecord, SessionStore

__all__ = [
    "Engine",
    "StepCall",
    "GeneratedToken",
    "ModelConfig",
    "ModelSpec",
    "SessionInfo",
    "StateSpec",
    "StepResult",
    "TensorSpec",
]

_log = logging.getLogger(__name__)
GENERATED = "generated_tokens"  # the cached output of a Generate chunk: the sampled token ids
# Reasons after which a session must never be resurrected from the shared store.
_FINAL_REASONS = frozenset({"closed", "idle", "lifetime", "capacity"})


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


class _Versioned(NamedTuple):
    """Per-model-version objects the engine keeps beside the repository entry."""

    inputs: InputValidator
    request_seconds: object
    active: object
    state_bytes: object


class Engine:
    """The serving core: sessions, batching, snapshots, generation and lifecycle for every loaded model."""

    def __init__(
        self,
        settings: Settings,
        *,
        registry: CollectorRegistry | None = None,
        store: SessionStore | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = Metrics(registry)
        self.metrics.max_sessions.set(settings.max_sessions)
        if store is None:
            store = self._default_store(settings)
        self.store = store
        self._persist = bool(store.persistent)
        self.repository = Repository(settings.model_repository, settings)
        self.sessions = SessionTable(settings.max_sessions, settings.max_tombstones, settings.tombstone_ttl_s)
        self.executor = ThreadPoolExecutor(settings.ort_executor_threads, thread_name_prefix="ort")
        self._hmac_key = settings.state_hmac_key.encode() if settings.state_hmac_key else None
        self._versioned: dict[ModelVersion, _Versioned] = {}
        self._resuming: dict[str, asyncio.Future] = {}
        self._background: set[asyncio.Task] = set()
        self._tasks: list[asyncio.Task] = []
        self._started = False
        self._stopped = False
        self._active_steps = 0
        self._wall_offset = time.time() - time.monotonic()  # monotonic -> wall clock, fixed once
        self.draining = False

    @staticmethod
    def _default_store(settings: Settings) -> SessionStore:
        if settings.store == "redis":
            from service.redis_store import RedisStore  # imported only when configured

            return RedisStore.from_settings(settings)
        return InMemoryStore()

    # == lifecycle ===========================================================================================
    async def start(self) -> None:
        """Load the repository, start a batcher per model version, the expiry sweeper and the watcher."""
        if self._started:
            return
        self._started = True
        self._loop = asyncio.get_running_loop()
        await self.store.ping()  # a wrong redis_url fails the start, not the first step
        self._apply(self.repository.scan())
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._sweeper(), name="session sweeper"))
        if self.settings.repository_poll_s > 0:
            self._tasks.append(loop.create_task(self._watcher(), name="repository watcher"))

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
        for s in list(self.sessions):
            if self._persist:  # hand the session over: release our lease so another replica may claim it now
                with contextlib.suppress(Exception):
                    await self.store.claim(s.session_id, self.settings.replica_id, 0.0)
            self._end(s, "shutdown", delete=False)
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        for mv in self.repository.loaded():
            await self._unload(mv)
        self.executor.shutdown(wait=True)
        await self.store.close()

    async def drain(self) -> None:
        """Refuse new sessions, let in-flight steps finish, and flush every session to the store."""
        self.draining = True
        # Steps already inside the engine finish. The edges stop new RPCs; the grace bounds a steady trickle.
        deadline = time.monotonic() + self.settings.drain_grace_s
        while self._active_steps and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        for s in list(self.sessions):
            remaining = deadline - time.monotonic()
            if s.pending is None or remaining <= 0:
                continue
            with contextlib.suppress(ServeError, TimeoutError):  # e.g. a long generation: the grace bounds it
                await asyncio.wait_for(self._wait_idle(s), remaining)
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        if self._persist:
            for s in list(self.sessions):
                if s.session_id in self.sessions.sessions:
                    with contextlib.suppress(Exception):
                        await self.store.save(self._record(s))
                        s.unsaved = 0

    def reload(self) -> RepositoryChange:
        """Rescan the repository now: new versions load, replaced ones retire (and unload when unpinned)."""
        change = self.repository.scan()
        self._apply(change)
        return change

    def _apply(self, change: RepositoryChange) -> None:
        for mv in change.loaded:
            self._load(mv)
        for mv in change.unload:
            self._spawn(self._unload(mv))
        self.metrics.model_versions.set(len(self.repository.loaded()))

    def _load(self, mv: ModelVersion) -> None:
        spec = mv.spec
        labels = (spec.name, str(spec.version))
        queue_h = self.metrics.queue_seconds.labels(*labels)
        compute_h = self.metrics.compute_seconds.labels(*labels)
        batch_h = self.metrics.batch_size.labels(*labels)
        steps_c = self.metrics.steps.labels(*labels)

        request_h = self.metrics.request_seconds.labels(*labels)

        def observe(n: int, steps: int, started: float, ended: float, batch: list[StepRequest]) -> None:
            # Once per batch: the per-request latencies go in bulk (see metrics.BulkHistogram). A request's
            # end-to-end time runs from its arrival (validated, queued) to its batch's results.
            batch_h.observe(n)
            compute_h.observe(ended - started)
            steps_c.inc(n * steps)
            if n == 1:
                waited = started - batch[0].enqueued
                queue_h.observe(waited)
                request_h.observe(ended - batch[0].enqueued)
            else:
                enqueued = np.fromiter((r.enqueued for r in batch), np.float64, n)
                queue_h.observe_many(started - enqueued)
                request_h.observe_many(ended - enqueued)

        mv.slab = StateSlab(spec.states)
        mv.batcher = Batcher(
            spec,
            mv.runtime,
            mv.slab,
            self.executor,
            max_batch_size=spec.config.max_batch_size,
            max_queue_delay_us=spec.config.max_queue_delay_us,
            inline_max_steps=self.settings.inline_max_steps,
            max_queue_size=self.settings.max_queue_size,
            finish=self._finish,
            observe=observe,
        )
        mv.batcher.start()
        self.metrics.version_loaded(
            *labels, spec.state_bytes, min(spec.config.max_sessions, self.settings.max_sessions)
        )
        self._versioned[mv] = _Versioned(
            InputValidator(spec),
            self.metrics.request_seconds.labels(*labels),
            self.metrics.active_sessions.labels(*labels),
            self.metrics.state_bytes.labels(*labels),
        )

    async def _unload(self, mv: ModelVersion) -> None:
        if mv.batcher is not None:
            await mv.batcher.stop()
        self._versioned.pop(mv, None)
        mv.slab = None
        mv.batcher = None
        self.metrics.version_unloaded(mv.spec.name, str(mv.spec.version))
        self.metrics.model_versions.set(len(self.repository.loaded()))
        _log.info("unloaded model %s version %d", mv.spec.name, mv.spec.version)

    def _spawn(self, coro) -> asyncio.Task:  # type: ignore[no-untyped-def]
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _sweeper(self) -> None:
        while True:
            await asyncio.sleep(self.settings.sweep_interval_s)
            now = time.monotonic()
            for s, reason in self.sessions.expired(now, self.settings.max_lifetime_s):
                self._end(s, reason)

    async def reload_async(self) -> RepositoryChange:
        """Rescan the repository with the slow part (disk, ONNX Runtime loads) off the event loop."""
        plan = await asyncio.get_running_loop().run_in_executor(None, self.repository.plan)
        change = self.repository.apply(plan)
        self._apply(change)
        return change

    async def _watcher(self) -> None:
        while True:
            await asyncio.sleep(self.settings.repository_poll_s)
            try:
                await self.reload_async()
            except Exception as exc:  # a watcher must outlive any one bad scan
                _log.error("repository scan failed: %r", exc, exc_info=exc)

    # == models ==============================================================================================
    def list_models(self) -> list[ModelSpec]:
        """List the served (newest) version of each model; `ModelSpec.versions` lists those on disk."""
        return [mv.spec for _, mv in sorted(self.repository.current.items())]

    def get_model(self, name: str, version: int | None = None) -> ModelSpec:
        """One model's spec; `version` None/0 = the served one; versions pinned by sessions count too."""
        if version:
            for mv in self.repository.loaded():
                if mv.spec.name == name and mv.spec.version == version:
                    return mv.spec
        return self.repository.get(name, version).spec

    # == sessions ============================================================================================
    def _ttl(self, mv: ModelVersion, idle_ttl_s: float | None) -> float:
        if idle_ttl_s is None or idle_ttl_s == 0:
            return mv.spec.config.idle_ttl_s
        if not np.isfinite(idle_ttl_s) or idle_ttl_s < 0:
            raise InvalidArgument(f"idle_ttl_s must be a positive number of seconds, got {idle_ttl_s}")
        if idle_ttl_s > self.settings.max_idle_ttl_s:
            raise OutOfRange(f"idle_ttl_s {idle_ttl_s} exceeds the maximum {self.settings.max_idle_ttl_s} s")
        return float(idle_ttl_s)

    def _check_state(self, spec: ModelSpec, state: dict[str, np.ndarray], *, complete: bool) -> None:
        by_name = {s.name: s for s in spec.states}
        unknown = sorted(set(state) - set(by_name))
        if unknown:
            raise InvalidArgument(
                f"model {spec.name!r} has no state {unknown}; its states are {sorted(by_name)}"
            )
        if complete and set(state) != set(by_name):
            raise InvalidArgument(
                f"state is missing {sorted(set(by_name) - set(state))}; model {spec.name!r} "
                f"needs {sorted(by_name)}"
            )
        for name, arr in state.items():
            st = by_name[name]
            if not isinstance(arr, np.ndarray) or arr.dtype != st.dtype or tuple(arr.shape) != st.shape:
                got = (
                    (arr.dtype.name, tuple(arr.shape)) if isinstance(arr, np.ndarray) else type(arr).__name__
                )
                raise InvalidArgument(
                    f"state {name!r} is {got}; expected dtype {st.dtype.name}, shape {st.shape} "
                    "(no batch axis)"
                )
            if st.dtype.kind in "fc" and not np.isfinite(arr).all():
                raise InvalidArgument(f"state {name!r} holds NaN or infinity; expected finite values")

    def _make_room(self, mv: ModelVersion) -> None:
        name, limit = mv.spec.name, mv.spec.config.max_sessions
        for _ in range(3):  # at most: one eviction for the server limit, one for the model limit
            if (
                len(self.sessions) < self.sessions.max_sessions
                and self.sessions.per_model.get(name, 0) < limit
            ):
                return
            victim = self.sessions.check_capacity(name, limit) if self.settings.evict_on_capacity else None
            if victim is None:
                raise self.sessions.refuse(name, limit)
            self._end(victim, "capacity")
        raise self.sessions.refuse(name, limit)

    def _open(self, mv: ModelVersion, ttl: float, protocol: str, session_id: str | None = None) -> Session:
        self._make_room(mv)
        assert mv.slab is not None  # loaded versions always have a slab
        s = Session(session_id or secrets.token_urlsafe(16), mv, mv.slab.alloc(), ttl, protocol)
        self.sessions.add(s)
        self.repository.acquire(mv)
        v = self._versioned[mv]
        v.active.inc()  # type: ignore[attr-defined]
        v.state_bytes.inc(mv.spec.state_bytes)  # type: ignore[attr-defined]
        return s

    def _end(self, s: Session, reason: str, *, delete: bool = True) -> None:
        """Forget a session locally (slot freed, tombstone left); nothing may be in flight."""
        if s.session_id not in self.sessions.sessions:
            return
        self.sessions.remove(s, reason)
        mv = s.mv
        if mv.slab is not None:
            mv.slab.free(s.slot)
        v = self._versioned.get(mv)
        if v is not None:
            v.active.dec()  # type: ignore[attr-defined]
            v.state_bytes.dec(mv.spec.state_bytes)  # type: ignore[attr-defined]
        self.metrics.sessions_ended.labels(mv.spec.name, reason).inc()
        if self.repository.release(mv):
            self._spawn(self._unload(mv))
        if self._persist and delete and reason in _FINAL_REASONS:
            self._spawn(self.store.delete(s.session_id))

    @staticmethod
    def _cached(s: Session) -> StepResult | None:
        """Return the cached result of the session's last applied chunk, if any."""
        last = s.last_result
        if last is None or isinstance(last, StepResult):
            return last
        arrays, i = last
        names = [t.name for t in s.mv.spec.outputs]
        return StepResult(s.last_seq, {n: a[i] for n, a in zip(names, arrays, strict=True)}, False)

    def _info(self, s: Session) -> SessionInfo:
        offset = self._wall_offset
        last_used = s.last_used + offset
        expires = min(last_used + s.idle_ttl_s, s.created_at + offset + self.settings.max_lifetime_s)
        return SessionInfo(
            s.session_id,
            s.mv.spec.name,
            s.mv.spec.version,
            s.last_seq,
            s.created_at + self._wall_offset,
            last_used,
            s.idle_ttl_s,
            expires,
            s.steps,
        )

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
        if self.draining:
            raise Unavailable("server is draining; open the session on another replica")
        mv = self.repository.get(model, version)
        ttl = self._ttl(mv, idle_ttl_s)
        if initial_state:
            self._check_state(mv.spec, initial_state, complete=False)
        s = self._open(mv, ttl, protocol)
        if initial_state:
            assert mv.slab is not None
            full = mv.slab.read(s.slot)
            full.update(initial_state)
            mv.slab.write(s.slot, full)
        self.metrics.sessions_created.labels(model, protocol).inc()
        if self._persist:
            await self._claim_and_save(s)
        return self._info(s)

    async def _claim_and_save(self, s: Session) -> None:
        if not await self.store.claim(s.session_id, self.settings.replica_id, self.settings.lease_s):
            self._end(s, "moved", delete=False)
            raise self.sessions.not_found(s.session_id)
        s.lease_until = time.monotonic() + self.settings.lease_s
        await self.store.save(self._record(s))
        s.unsaved = 0

    def _record(self, s: Session) -> SessionRecord:
        assert s.mv.slab is not None
        last = self._cached(s)
        return SessionRecord(
            s.session_id,
            s.mv.spec.name,
            s.mv.spec.version,
            s.last_seq,
            s.mv.slab.read(s.slot),
            None if last is None else dict(last.outputs),
            s.idle_ttl_s,
            s.created_at + self._wall_offset,
            self.settings.replica_id,
        )

    async def _session(self, session_id: str) -> Session:
        """Return the local session, or resume it from the shared store; NotFound otherwise."""
        s = self.sessions.sessions.get(session_id)
        if s is not None:
            return s
        if not self._persist or not isinstance(session_id, str) or not session_id:
            raise self.sessions.not_found(session_id)
        if self.sessions.reason_of(session_id) in _FINAL_REASONS:
            raise self.sessions.not_found(session_id)
        waiting = self._resuming.get(session_id)
        if waiting is not None:
            await asyncio.shield(waiting)
            return self.sessions.get(session_id)
        fut = asyncio.get_running_loop().create_future()
        self._resuming[session_id] = fut
        try:
            return await self._resume(session_id)
        finally:
            del self._resuming[session_id]
            fut.set_result(None)

    async def _claim_waiting(self, session_id: str) -> bool:
        """Claim the session's lease, waiting up to one lease for another holder's lease to lapse.

        A crashed owner's lease runs out by itself within `lease_s`: waiting here lets a failed-over client
        resume without seeing an error. A live owner renews its lease with every step, so the wait ends in a
        refusal (and an idle owner that stays idle for a whole lease hands the session over, which is safe:
        its next save is refused by the store's compare-and-set).
        """
        deadline = time.monotonic() + self.settings.lease_s
        poll = min(0.1, self.settings.lease_s / 10)
        while not await self.store.claim(session_id, self.settings.replica_id, self.settings.lease_s):
            if self.draining or time.monotonic() + poll > deadline:
                return False
            await asyncio.sleep(poll)
        return True

    async def _resume(self, session_id: str) -> Session:
        if self.draining:
            raise Unavailable("server is draining; resume the session on another replica")
        # Claim before load: once the lease is ours nobody else can save, so the next read is the latest.
        if not await self._claim_waiting(session_id):
            raise Unavailable(
                f"session {session_id} is owned by another live replica; retry there, or after its "
                f"lease ({self.settings.lease_s} s) runs out"
            )
        rec = await self.store.load(session_id)
        if rec is None:
            await self.store.claim(session_id, self.settings.replica_id, 0.0)  # give the lease back
            raise self.sessions.not_found(session_id)
        mv = next(
            (
                m
                for m in self.repository.loaded()
                if m.spec.name == rec.model and m.spec.version == rec.version
            ),
            None,
        )
        if mv is None:
            await self.store.claim(session_id, self.settings.replica_id, 0.0)
            raise FailedPrecondition(
                f"session {session_id} is pinned to model {rec.model!r} version {rec.version}, "
                "which this replica does not serve"
            )
        self._check_state(mv.spec, rec.state, complete=True)
        s = self._open(mv, rec.idle_ttl_s, "resumed", session_id)
        assert mv.slab is not None
        mv.slab.write(s.slot, rec.state)
        s.last_seq = rec.last_seq
        s.created_at = rec.created_at - self._wall_offset  # the lifetime counts from the first creation
        s.lease_until = time.monotonic() + self.settings.lease_s
        if rec.last_outputs is not None:
            s.last_result = StepResult(rec.last_seq, rec.last_outputs, False)
        _log.info("resumed session %s at seq %d from the shared store", session_id, rec.last_seq)
        return s

    async def _wait_idle(self, s: Session) -> None:
        """Wait until `s` has nothing in flight; NotFound if it ended meanwhile."""
        while (p := s.pending) is not None:
            w = asyncio.get_running_loop().create_future()
            if p.waiters is None:
                p.waiters = []
            p.waiters.append(w)
            await w
        if self.sessions.sessions.get(s.session_id) is not s:
            raise self.sessions.not_found(s.session_id)

    @contextlib.asynccontextmanager
    async def _exclusive(self, session_id: str) -> AsyncIterator[Session]:
        s = await self._session(session_id)
        await self._wait_idle(s)
        op = PendingOp()
        s.pending = op
        try:
            yield s
        finally:
            if s.pending is op:
                s.pending = None
            op.wake()

    # == steps ===============================================================================================
    async def step(
        self, session_id: str, seq: int, inputs: dict[str, np.ndarray], *, last_only: bool = False
    ) -> StepResult:
        """Apply one chunk (seq = last applied + 1); a retry of the last seq returns the cached result.

        `last_only` returns time-axis outputs as `(1, ...)`: the last step only.
        """
        self._active_steps += 1  # drain() waits for these
        try:
            s = self.sessions.sessions.get(session_id)
            if s is None:
                s = await self._session(session_id)
            if self._persist and time.monotonic() > s.lease_until - self.settings.lease_s / 3:
                await self._renew(s)
                await self._wait_idle(s)  # also re-checks that the session is still open after the await
            elif s.pending is not None:
                await self._wait_idle(s)
            # From here to submit() nothing awaits: no other operation on this session can interleave.
            if seq != s.last_seq + 1:
                return self._out_of_order(s, seq, last_only)
            mv = s.mv
            v = self._versioned[mv]
            arrays, key, steps = v.inputs.check(inputs)
            fut = self._loop.create_future()
            req = StepRequest(s.slot, arrays, key, fut, s, seq, steps)
            mv.batcher.submit(req)  # type: ignore[union-attr]
            s.pending = req
            self.sessions.touch(s, time.monotonic())
            result: StepResult = await fut
            if last_only and mv.spec.time_axis:
                return _last_only(result, mv.spec)
            return result
        finally:
            self._active_steps -= 1

    async def step_many(
        self, calls: Sequence[StepCall], *, last_only: bool = False
    ) -> list[StepResult | ServeError]:
        """Apply chunks of many sessions in one call (a multiplexed request, e.g. from a gateway).

        Same semantics as `step` for each call, in order per session; a failed call yields its `ServeError` in
        its place instead of raising, so one bad chunk never fails the others. One coroutine, one future for
        the whole call instead of one per chunk: the way past the per-message cost of the gRPC edge.
        """
        if not calls:
            return []
        self._active_steps += 1
        group = StepGroup(len(calls), self._loop.create_future())
        try:
            for i, call in enumerate(calls):
                self._submit_nowait(call, GroupSlot(group, i), last_only)
            results = await group.future
            for item in results:
                if not isinstance(item, StepResult | ServeError):
                    raise item  # a bug or a cancellation, not a client error: fail the call as `step` would
            return results
        finally:
            self._active_steps -= 1

    def _submit_nowait(self, call: StepCall, slot: GroupSlot, last_only: bool) -> bool:
        """Submit a call now if the session is local and idle (True); else run the full `step` as a task."""
        s = self.sessions.sessions.get(call.session_id)
        slow = s is None or s.pending is not None or call.seq != s.last_seq + 1 or last_only
        if not slow and self._persist:
            slow = time.monotonic() > s.lease_until - self.settings.lease_s / 3  # type: ignore[union-attr]
        if slow:
            task = asyncio.ensure_future(
                self.step(call.session_id, call.seq, call.inputs, last_only=last_only)
            )
            task.add_done_callback(slot.from_task)
            return False
        assert s is not None
        try:
            arrays, key, steps = self._versioned[s.mv].inputs.check(call.inputs)
            req = StepRequest(s.slot, arrays, key, slot, s, call.seq, steps)  # type: ignore[arg-type]
            s.mv.batcher.submit(req)  # type: ignore[union-attr]
        except ServeError as exc:
            slot.set_exception(exc)
            return True
        s.pending = req
        self.sessions.touch(s, time.monotonic())
        return True

    def _out_of_order(self, s: Session, seq: int, last_only: bool) -> StepResult:
        last = s.last_seq
        r = self._cached(s) if seq == last else None
        if r is not None and r.seq == seq:
            cached = StepResult(r.seq, r.outputs, True)
            return _last_only(cached, s.mv.spec) if last_only and s.mv.spec.time_axis else cached
        if not isinstance(seq, int) or seq < 1:
            raise InvalidArgument(
                f"seq must be a positive integer (the first chunk is seq 1); expected seq {last + 1}"
            )
        if seq <= last:
            raise FailedPrecondition(
                f"seq {seq} of session {s.session_id} was already applied and only the last "
                f"seq ({last}) can be retried; expected seq {last + 1}"
            )
        raise FailedPrecondition(
            f"seq {seq} skips ahead: session {s.session_id} last applied seq {last}; expected seq {last + 1}"
        )

    async def _renew(self, s: Session) -> None:
        if not await self.store.claim(s.session_id, self.settings.replica_id, self.settings.lease_s):
            self._end(s, "moved", delete=False)
            raise self.sessions.not_found(s.session_id)
        s.lease_until = time.monotonic() + self.settings.lease_s

    def _finish(
        self, req: StepRequest, outputs: dict[str, np.ndarray] | None, exc: BaseException | None
    ) -> None:
        """Batch completion: record the applied step on its session, then wake the caller (on the loop)."""
        s: Session | None = req.owner
        fut = req.future
        if s is None:  # a raw step (generation): no bookkeeping here
            if not fut.done():
                fut.set_exception(exc) if exc is not None else fut.set_result(outputs)
            return
        if exc is not None:
            if s.pending is req:
                s.pending = None
            req.wake()
            if not fut.done():
                fut.set_exception(exc)
            return
        result = StepResult(req.seq, outputs, False)  # type: ignore[arg-type]
        s.last_seq = req.seq
        s.last_result = req.row if req.row is not None else result
        s.steps += req.steps
        if self._persist:
            s.unsaved += 1
            if s.unsaved >= self.settings.store_flush_every:
                self._spawn(self._save_then_release(s, req, result))
                return
        if s.pending is req:
            s.pending = None
        req.wake()
        if not fut.done():
            fut.set_result(result)

    async def _save_then_release(self, s: Session, req: StepRequest, result: StepResult) -> None:
        """Persist an applied step before answering, so a dying replica never loses an acknowledged step."""
        outcome: BaseException | None = Unavailable(
            "the session store did not accept the step; retry the same seq"
        )
        try:
            await self.store.save(self._record(s))
            s.unsaved = 0
            outcome = None
        except ServeError as exc:  # Aborted: another replica owns the session now; Unavailable: store down
            _log.error("saving session %s failed: %s", s.session_id, exc.message)
            outcome = exc
        except Exception as exc:
            _log.error("saving session %s failed: %r", s.session_id, exc)
        finally:
            if s.pending is req:
                s.pending = None
            if outcome is not None:
                # The step is applied here but not durable (or the lease is gone): forget the local copy,
                # so no reply the store does not hold is ever given (not even as a cached retry). A retry
                # resumes the session from its last durable step, on this replica or the lease holder.
                self._end(s, "moved", delete=False)
            req.wake()
        if not req.future.done():
            if outcome is None:
                req.future.set_result(result)
            else:
                req.future.set_exception(outcome)

    async def infer_stateless(
        self, model: str, version: int | None, inputs: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """Run once from the initial state. Inputs/outputs carry the batch axis; no states returned."""
        if self.draining:
            raise Unavailable("server is draining; retry on another replica")
        mv = self.repository.get(model, version)
        spec = mv.spec
        checker = self._versioned[mv].inputs
        batch = None
        for name, arr in inputs.items():
            if isinstance(arr, np.ndarray) and arr.ndim >= 1:
                batch = arr.shape[0] if batch is None else batch
                if arr.shape[0] != batch:
                    raise InvalidArgument(
                        f"inputs disagree on the batch size ({batch} vs {arr.shape[0]} for "
                        f"{name!r}); axis 0 is the batch axis"
                    )
        if batch is None or batch < 1:
            raise InvalidArgument(
                f"stateless inference needs inputs with a batch axis: {checker.expected} "
                "with a leading batch dimension"
            )
        if batch > spec.config.max_batch_size:
            raise OutOfRange(f"batch of {batch} exceeds max_batch_size {spec.config.max_batch_size}")
        for i in range(batch):  # each row must be a valid per-session input (dtype, shape, finiteness)
            checker.check({k: a[i] for k, a in inputs.items()})
        feeds = {k: np.ascontiguousarray(a) for k, a in inputs.items()}
        for st in spec.states:
            row = st.initial if st.initial is not None else np.zeros(st.shape, st.dtype)
            feeds["state_in_" + st.name] = np.ascontiguousarray(np.broadcast_to(row, (batch, *st.shape)))
        outs = await asyncio.get_running_loop().run_in_executor(self.executor, mv.runtime.run, feeds)
        return {t.name: outs[t.name] for t in spec.outputs}

    # == state operations ====================================================================================
    async def get_state(self, session_id: str) -> bytes:
        """Return the session's whole state (seq and cached last result too) as an integrity-checked blob."""
        async with self._exclusive(session_id) as s:
            return snapshot.encode(self._record(s), self._hmac_key)

    async def set_state(self, session_id: str, blob: bytes) -> SessionInfo:
        """Replace the session's state, seq and cached result from a GetState blob (same model version)."""
        if not isinstance(blob, bytes | bytearray | memoryview):
            raise InvalidArgument("state must be bytes from GetState")
        rec = snapshot.decode(bytes(blob), self._hmac_key)
        async with self._exclusive(session_id) as s:
            spec = s.mv.spec
            if rec.model != spec.name or rec.version != spec.version:
                raise InvalidArgument(
                    f"state blob is for model {rec.model!r} version {rec.version}; session "
                    f"{session_id} runs model {spec.name!r} version {spec.version}"
                )
            self._check_state(spec, rec.state, complete=True)
            assert s.mv.slab is not None
            s.mv.slab.write(s.slot, rec.state)
            s.last_seq = rec.last_seq
            s.last_result = (
                None if rec.last_outputs is None else StepResult(rec.last_seq, rec.last_outputs, False)
            )
            self.sessions.touch(s, time.monotonic())
            if self._persist:
                await self.store.save(self._record(s))
            return self._info(s)

    async def fork(self, session_id: str, *, idle_ttl_s: float | None = None) -> SessionInfo:
        """Open a session on the same model version with a copy of this state; its first chunk is seq 1."""
        if self.draining:
            raise Unavailable("server is draining; fork on another replica")
        async with self._exclusive(session_id) as s:
            mv = s.mv
            ttl = self._ttl(mv, idle_ttl_s) if idle_ttl_s else s.idle_ttl_s
            child = self._open(mv, ttl, s.protocol)
            assert mv.slab is not None
            mv.slab.write(child.slot, mv.slab.read(s.slot))
            self.metrics.sessions_created.labels(mv.spec.name, s.protocol).inc()
        if self._persist:
            await self._claim_and_save(child)
        return self._info(child)

    async def reset(self, session_id: str) -> SessionInfo:
        """State back to the model's initial state; seq back to 0 (the next chunk is seq 1)."""
        async with self._exclusive(session_id) as s:
            assert s.mv.slab is not None
            s.mv.slab.reset(s.slot)
            s.last_seq = 0
            s.last_result = None
            self.sessions.touch(s, time.monotonic())
            if self._persist:
                await self.store.save(self._record(s))
            return self._info(s)

    async def close(self, session_id: str) -> None:
        """End a session (after its in-flight step). Closing a closed session again is a no-op."""
        if session_id not in self.sessions.sessions and self.sessions.reason_of(session_id) == "closed":
            return
        async with self._exclusive(session_id) as s:
            self._end(s, "closed", delete=False)
            if self._persist:
                await self.store.delete(session_id)

    def describe(self, session_id: str) -> SessionInfo:
        """Describe a local session."""
        return self._info(self.sessions.get(session_id))

    async def attach(self, session_id: str) -> SessionInfo:
        """Describe a session, resuming it from the shared store when this replica does not hold it."""
        return self._info(await self._session(session_id))

    # == generation ==========================================================================================
    async def generate(
        self,
        *,
        model: str | None = None,
        version: int | None = None,
        session_id: str | None = None,
        seq: int = 0,
        prime_ids: Sequence[int] | None = None,
        prime_text: str | None = None,
        n: int = 1,
        temperature: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
    ) -> AsyncIterator[GeneratedToken]:
        """Sample `n` tokens after a prime, streaming each as it is sampled (token models only).

        On an existing session the whole generation is ONE applied chunk (seq = last + 1); the state then
        holds the prime and every generated token, and a retry of that seq replays the cached tokens. With
        `model` it runs on a throwaway session. A failure or a cancelled stream rolls the state back. Wrap the
        iterator in `contextlib.aclosing` so a cancelled caller releases the session at once.
        """
        if (session_id is None) == (model is None):
            raise InvalidArgument("generate needs exactly one of a model (fresh session) or a session id")
        if not isinstance(n, int) or n < 1 or n > self.settings.max_chunk_steps:
            raise OutOfRange(f"n must be between 1 and {self.settings.max_chunk_steps} tokens, got {n}")
        if not np.isfinite(temperature) or temperature < 0:
            raise InvalidArgument(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        if top_k < 0:
            raise InvalidArgument(f"top_k must be >= 0 (0 = whole vocabulary), got {top_k}")
        if session_id is None:
            assert model is not None
            self._token_model(self.repository.get(model, version).spec)
            info = await self.create_session(model, version)
            session_id, seq, temporary = info.session_id, 1, True
        else:
            temporary = False
        try:
            async with self._exclusive(session_id) as s:
                spec = self._token_model(s.mv.spec)
                cached = self._cached(s) if seq == s.last_seq else None
                if cached is not None and GENERATED in cached.outputs:
                    for tid in cached.outputs[GENERATED].tolist():
                        yield GeneratedToken(int(tid), spec.vocabulary[tid])  # type: ignore[index]
                    return
                if seq != s.last_seq + 1:
                    self._out_of_order(s, seq, False)
                    raise FailedPrecondition(f"seq {seq} was not a generation; expected seq {s.last_seq + 1}")
                prime = self._prime(spec, prime_ids, prime_text)
                sampler = self._sample(s, spec, seq, prime, n, temperature, top_k, seed)
                # Closing this generator closes the sampler at once, so its rollback runs in time.
                async with contextlib.aclosing(sampler):
                    async for token in sampler:
                        yield token
        finally:
            if temporary:
                with contextlib.suppress(ServeError):
                    await self.close(session_id)

    @staticmethod
    def _token_model(spec: ModelSpec) -> ModelSpec:
        if (
            spec.vocabulary is None
            or len(spec.inputs) != 1
            or spec.inputs[0].dtype.kind not in "iu"
            or not spec.time_axis
            or not spec.outputs
            or spec.outputs[0].dtype.kind != "f"
        ):
            raise FailedPrecondition(
                f"model {spec.name!r} is not a token model (needs a vocabulary, one integer "
                "token input with a time axis and a logits output); generate works on those"
            )
        return spec

    def _prime(self, spec: ModelSpec, prime_ids: Sequence[int] | None, prime_text: str | None) -> list[int]:
        assert spec.vocabulary is not None
        if prime_ids is not None and prime_text is not None and len(prime_ids) and prime_text:
            raise InvalidArgument("give the prime as token ids or as text, not both")
        ids = list(prime_ids) if prime_ids is not None and len(prime_ids) else []
        if not ids and prime_text:
            ids = encode_text(prime_text, spec.vocabulary)
        if not ids:
            raise InvalidArgument("the prime needs at least one token (ids or text)")
        check_ids(ids, len(spec.vocabulary))
        if len(ids) > spec.config.max_chunk_steps:
            raise OutOfRange(
                f"prime of {len(ids)} tokens is longer than max_chunk_steps ({spec.config.max_chunk_steps})"
            )
        return ids

    async def _sample(
        self,
        s: Session,
        spec: ModelSpec,
        seq: int,
        prime: list[int],
        n: int,
        temperature: float,
        top_k: int,
        seed: int | None,
    ) -> AsyncGenerator[GeneratedToken, None]:
        mv = s.mv
        assert mv.slab is not None and mv.batcher is not None and spec.vocabulary is not None
        saved = mv.slab.read(s.slot)
        token_in, logits_name = spec.inputs[0], spec.outputs[0].name
        rng = np.random.default_rng(seed)
        tokens: list[int] = []
        fut: asyncio.Future | None = None
        done = False
        try:
            chunk = np.asarray(prime, dtype=token_in.dtype)
            for i in range(n + 1):
                fut = asyncio.get_running_loop().create_future()
                mv.batcher.submit(StepRequest(s.slot, (chunk,), chunk.shape, fut, None, 0, len(chunk)))
                outs = await asyncio.shield(fut)
                if i == n:  # the last sampled token is fed too, so the state has consumed everything
                    break
                tid = sample(outs[logits_name][-1], temperature, top_k, rng)
                tokens.append(tid)
                yield GeneratedToken(tid, spec.vocabulary[tid])
                chunk = np.asarray([tid], dtype=token_in.dtype)
            s.last_seq = seq
            s.last_result = StepResult(seq, {GENERATED: np.asarray(tokens, np.int64)}, False)
            s.steps += len(prime) + n
            self.sessions.touch(s, time.monotonic())
            done = True
            if self._persist:
                await self.store.save(self._record(s))
        finally:
            if not done:
                if fut is not None and not fut.done():  # let the in-flight step land before rolling back
                    with contextlib.suppress(BaseException):
                        await asyncio.wait([fut])
                if mv.slab is not None and self.sessions.sessions.get(s.session_id) is s:
                    mv.slab.write(s.slot, saved)


def _last_only(result: StepResult, spec: ModelSpec) -> StepResult:
    timed = {t.name for t in spec.outputs if t.time_axis}
    outs = {k: (v[-1:] if k in timed else v) for k, v in result.outputs.items()}
    return StepResult(result.seq, outs, result.cached)
