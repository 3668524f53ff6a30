"""Cross-session batching: one `Batcher` per model version.

The batcher owns a bounded queue, the requests' futures and one task. Greedy: while one ONNX Runtime run is in
flight the next batch accumulates (plus an optional `max_queue_delay_us`). Requests are grouped by the tuple
of their data shapes, so chunks of different length never pad and each group is exact. A batch is a gather of
the sessions' state rows from the slab, one ORT run in the engine's executor, a scatter of the new state rows
back, and a split of the outputs; all of that runs off the event loop. Per-session order is the engine's job
(one in-flight step per session); the batcher never sees one slot twice in a batch.

When the task dies, every waiting future gets the error and later submits are refused.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Any

import numpy as np

from service.core.policy import BatchPolicy
from service.core.runtime import Runtime
from service.core.slab import StateSlab
from service.core.table import PendingOp
from service.core.types import STATE_IN, STATE_OUT, ModelSpec
from service.errors import InvalidArgument, ResourceExhausted, ServeError, Unavailable

_log = logging.getLogger(__name__)


class StepRequest(PendingOp):
    """One session's chunk waiting for (or in) a batch. `owner` and `seq` are the engine's bookkeeping."""

    __slots__ = ("slot", "inputs", "key", "future", "enqueued", "owner", "seq", "steps", "taken", "row")

    def __init__(
        self,
        slot: int,
        inputs: tuple[np.ndarray, ...],
        key: Any,
        future: asyncio.Future,
        owner: Any = None,
        seq: int = 0,
        steps: int = 1,
    ) -> None:
        self.waiters = None
        self.slot = slot
        self.inputs = inputs
        self.key = key
        self.future = future
        self.enqueued = time.monotonic()
        self.owner = owner
        self.seq = seq
        self.steps = steps
        self.taken = False
        # (the batch's output arrays in spec order, this request's index): a compact handle that sessions keep
        # as their cached result instead of a dict of views per session.
        self.row: tuple[tuple[np.ndarray, ...], int] | None = None


class StepGroup:
    """Results of one multiplexed call (`Engine.step_many`); its future resolves when the last call ends."""

    __slots__ = ("results", "left", "future")

    def __init__(self, n: int, future: asyncio.Future) -> None:
        self.results: list = [None] * n
        self.left = n
        self.future = future

    def put(self, index: int, value: object) -> None:
        """Store one call's result (or error); resolve the group's future after the last."""
        self.results[index] = value
        self.left -= 1
        if self.left == 0 and not self.future.done():
            self.future.set_result(self.results)


class GroupSlot:
    """The future-like handle of one call in a group, resolved by the batcher (no asyncio future per call)."""

    __slots__ = ("group", "index", "_done")

    def __init__(self, group: StepGroup, index: int) -> None:
        self.group = group
        self.index = index
        self._done = False

    def done(self) -> bool:
        """As `asyncio.Future.done`."""
        return self._done

    def cancelled(self) -> bool:
        """Tell whether the caller of the whole group gave up."""
        return self.group.future.cancelled()

    def set_result(self, value: object) -> None:
        """As `asyncio.Future.set_result` (a second call is ignored)."""
        if not self._done:
            self._done = True
            self.group.put(self.index, value)

    def set_exception(self, exc: BaseException) -> None:
        """Record the error in this call's place."""
        self.set_result(exc)

    def from_task(self, task: asyncio.Task) -> None:
        """Done-callback for a call that went the slow way (a full `Engine.step` task)."""
        self.set_result(
            task.exception() or task.result() if not task.cancelled() else asyncio.CancelledError()
        )


def merge(requests: Sequence[StepRequest], n_inputs: int) -> list[np.ndarray]:
    """Stack each data input of equally shaped requests into one `(B, ...)` array (pure)."""
    if len(requests) == 1:
        return [a[np.newaxis] for a in requests[0].inputs]
    return [np.stack([r.inputs[i] for r in requests]) for i in range(n_inputs)]


def split(outputs: Sequence[np.ndarray], names: Sequence[str], n: int) -> list[dict[str, np.ndarray]]:
    """Per-request dicts of `(...)` views into the batch outputs (pure)."""
    if len(names) == 1:
        name, out = names[0], outputs[0]
        return [{name: out[i]} for i in range(n)]
    pairs = tuple(zip(names, outputs, strict=True))
    return [{name: out[i] for name, out in pairs} for i in range(n)]


Finish = Callable[[StepRequest, "dict[str, np.ndarray] | None", "BaseException | None"], None]


def _default_finish(
    req: StepRequest, outputs: dict[str, np.ndarray] | None, exc: BaseException | None
) -> None:
    if req.future.done():
        return
    if exc is not None:
        req.future.set_exception(exc)
    else:
        req.future.set_result(outputs)


class Batcher:
    """Batches the steps of one model version; see the module docstring."""

    def __init__(
        self,
        spec: ModelSpec,
        runtime: Runtime,
        slab: StateSlab,
        executor: Executor,
        *,
        max_batch_size: int,
        max_queue_delay_us: int = 0,
        max_queue_size: int = 65536,
        finish: Finish = _default_finish,
        observe: Callable[[int, int, float, float, list[StepRequest]], None] | None = None,
        policy: BatchPolicy | None = None,
    ) -> None:
        self.spec = spec
        self.policy = policy if policy is not None else BatchPolicy()
        self.runtime = runtime
        self.slab = slab
        self.executor = executor
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_us / 1e6
        self.max_queue_size = max_queue_size
        self._finish = finish
        self._observe = observe
        self._queue: deque[StepRequest] = deque()
        self._wake: asyncio.Future | None = None
        self._task: asyncio.Task | None = None
        self._inflight: list[StepRequest] = []
        self._error: BaseException | None = None
        # Control inputs (service.core.controls) follow the data inputs in every request's arrays.
        self._input_names = tuple(t.name for t in spec.inputs) + tuple(c.name for c in spec.controls)
        self._output_names = tuple(t.name for t in spec.outputs)
        self._state_feeds = tuple((s.name, STATE_IN + s.name, STATE_OUT + s.name) for s in spec.states)
        self.label = f"{spec.name} v{spec.version}"

    # -- lifecycle -----------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the batching task on the running loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"batcher {self.label}")
            self._task.add_done_callback(self._on_task_done)

    async def stop(self) -> None:
        """Stop the task; queued requests fail with UNAVAILABLE (idempotent)."""
        task, self._task = self._task, None
        if self._error is None:
            self._error = Unavailable(f"model {self.label} is shutting down; retry on another replica")
        if task is not None and not task.done():
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):  # the task's own failure is already propagated
                pass
        self._fail_all(self._error)

    def _on_task_done(self, task: asyncio.Task) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            _log.error("batcher %s failed: %r", self.label, exc, exc_info=exc)
            self._error = Unavailable(f"model {self.label} is unavailable: its batcher failed ({exc!r})")
            self._fail_all(self._error)

    def _fail_all(self, exc: BaseException) -> None:
        doomed = [*self._inflight, *self._queue]
        self._inflight = []
        self._queue.clear()
        for req in doomed:
            self._finish(req, None, exc)

    @property
    def queued(self) -> int:
        """Requests waiting (not yet in a batch)."""
        return len(self._queue)

    @property
    def busy(self) -> bool:
        """True while a batch runs or requests wait."""
        return bool(self._inflight or self._queue)

    # -- hot path ------------------------------------------------------------------------------------------
    def submit(self, req: StepRequest) -> None:
        """Queue a request; its future resolves with the per-session outputs (or the error)."""
        if self._error is not None:
            raise self._error
        if len(self._queue) >= self.max_queue_size:
            raise ResourceExhausted(
                f"model {self.label}: {len(self._queue)} steps queued (max_queue_size); retry"
            )
        self._queue.append(req)
        wake = self._wake
        if wake is not None:
            self._wake = None
            wake.set_result(None)

    def _take(self) -> list[StepRequest]:
        q = self._queue
        limit = self.max_batch_size
        batch: list[StepRequest] = []
        key = None
        skipped: list[StepRequest] = []
        while q and len(batch) < limit:
            req = q.popleft()
            if req.future.cancelled():  # the caller gave up before its step ran: drop it, state untouched
                self._finish(req, None, asyncio.CancelledError())
                continue
            if key is None:
                key = req.key
            elif req.key != key:
                skipped.append(req)
                continue
            req.taken = True
            batch.append(req)
        if skipped:
            q.extendleft(reversed(skipped))
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._wake = loop.create_future()
                await self._wake
            await self._hold()
            batch = self._take()
            if not batch:
                continue
            self._inflight = batch
            started = time.monotonic()
            try:
                results = await self._run(loop, batch)
            except Exception as exc:  # a failure fails this batch only; state rows were not written
                if not isinstance(exc, ServeError):
                    _log.error("batch of %s failed: %r", self.label, exc, exc_info=exc)
                self._inflight = []
                for req in batch:
                    self._finish(req, None, exc)
                continue
            if self._observe is not None:
                self._observe(len(batch), batch[0].steps, started, time.monotonic(), batch)
            self._inflight = []
            finish = self._finish
            for req, out in zip(batch, results, strict=True):
                if isinstance(out, BaseException):
                    finish(req, None, out)
                else:
                    finish(req, out, None)

    async def _hold(self) -> None:
        """Let a small batch wait for more steps: a fixed model delay, or the policy's learnt hold."""
        if self.max_queue_delay_s:
            if len(self._queue) < self.max_batch_size:
                await asyncio.sleep(self.max_queue_delay_s)
        elif hold := self.policy.hold_for(len(self._queue)):
            before = len(self._queue)
            await asyncio.sleep(hold)
            self.policy.held(len(self._queue) - before)

    async def _run(
        self, loop: asyncio.AbstractEventLoop, batch: list[StepRequest]
    ) -> list[dict[str, np.ndarray] | BaseException]:
        if self.policy.inline(len(batch) * batch[0].steps, idle=not self._queue):
            # Cheap batches (light load) run on the loop: the executor round trip would cost about as much
            # CPU as the run itself and add its latency to every step (see `policy`).
            return self._compute_isolated(batch)
        # One loop future per batch, resolved by the executor thread with one call_soon_threadsafe: leaner
        # than run_in_executor, which chains a concurrent future to an asyncio one both ways.
        done: asyncio.Future[list[dict[str, np.ndarray] | BaseException]] = loop.create_future()
        self.executor.submit(self._compute_off_loop, loop, done, batch)
        return await done

    def _compute_off_loop(
        self, loop: asyncio.AbstractEventLoop, done: asyncio.Future[Any], batch: list[StepRequest]
    ) -> None:
        """Executor side of `_run`: compute, then hand the outcome to the loop."""
        try:
            outcome: Any = self._compute_isolated(batch)
            failed = False
        except BaseException as exc:  # noqa: BLE001 - delivered to the batcher task, which fails the batch
            outcome, failed = exc, True
        loop.call_soon_threadsafe(_deliver, done, outcome, failed)

    def _compute_isolated(self, batch: list[StepRequest]) -> list[dict[str, np.ndarray] | BaseException]:
        """Run the batch; if ORT rejects it, rerun each request alone so one bad input fails only itself.

        A failed run writes no state rows, so every rerun starts from the same state the batch would have.
        """
        try:
            return self._compute(batch)  # type: ignore[return-value]
        except Exception as exc:
            if len(batch) == 1:
                return [_model_error(exc, self.label)]
        out: list[dict[str, np.ndarray] | BaseException] = []
        for req in batch:
            try:
                out.append(self._compute([req])[0])
            except Exception as exc:
                out.append(_model_error(exc, self.label))
        return out

    def _compute(self, batch: list[StepRequest]) -> list[dict[str, np.ndarray]]:
        """Gather -> run -> scatter -> split (runs in the executor thread)."""
        n = len(batch)
        slots = np.fromiter((r.slot for r in batch), np.int64, n)
        rows = self.slab.gather(slots)
        feeds = {feed: rows[name] for name, feed, _ in self._state_feeds}
        for name, arr in zip(self._input_names, merge(batch, len(self._input_names)), strict=True):
            feeds[name] = arr
        cpu = time.thread_time()
        outs = self.runtime.run(feeds)
        self.policy.ran(n * batch[0].steps, time.thread_time() - cpu)
        self.slab.scatter(slots, {name: outs[out] for name, _, out in self._state_feeds})
        arrays = tuple(outs[name] for name in self._output_names)
        for i, req in enumerate(batch):
            req.row = (arrays, i)
        return split(arrays, self._output_names, n)


def _deliver(done: asyncio.Future[Any], outcome: Any, failed: bool) -> None:
    if done.done():  # the batcher was stopped meanwhile
        return
    if failed:
        done.set_exception(outcome)
    else:
        done.set_result(outcome)


def _model_error(exc: Exception, label: str) -> BaseException:
    """ONNX Runtime's verdict on one request's inputs: INVALID_ARGUMENT-class errors are the client's."""
    if type(exc).__name__ == "InvalidArgument" and "onnxruntime" in type(exc).__module__:
        return InvalidArgument(f"model {label} rejected the input: {str(exc)[:300]}")
    return exc
