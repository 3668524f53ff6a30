"""Stepping: apply one chunk to a session exactly once, in order, through its model version's batcher.

The hot path of the server. A step is validated once here (`InputValidator`), submitted to the batcher and
recorded on its session when the batch completes (`finish`, called by the batcher on the loop), not in the
awaiting coroutine, so a cancelled caller can never leave state and seq out of step with each other.

Exactly-once: a chunk carries `seq` = the session's last applied seq + 1; a repeat of the last seq is
answered from the session's cached result; anything else is FAILED_PRECONDITION. With a persistent store every
`store_flush_every` applied steps are saved before the caller is answered.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Any

import numpy as np

from service.config import Settings
from service.core import limits
from service.core.controls import StepControl
from service.core.models import ModelHost
from service.core.scheduler import GroupSlot, StepGroup, StepRequest
from service.core.sessions import SessionManager
from service.core.table import Session
from service.core.types import ModelSpec, StepCall, StepResult
from service.errors import FailedPrecondition, InvalidArgument, ServeError, Unavailable

_log = logging.getLogger(__name__)


class Stepper:
    """Steps of every session (see the module docstring)."""

    def __init__(
        self, settings: Settings, sessions: SessionManager, host: ModelHost, executor: Executor
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.host = host
        self.executor = executor
        self.active = 0  # steps inside the core now; a drain waits for them
        self._loop: asyncio.AbstractEventLoop | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Remember the serving loop (futures are created on it)."""
        self._loop = loop

    def submit(
        self,
        session_id: str,
        seq: int | None,
        inputs: dict[str, np.ndarray],
        *,
        last_only: bool = False,
        control: StepControl | None = None,
    ) -> asyncio.Future[StepResult]:
        """Start one step now and return the future of its result (the streaming front ends' entry).

        `seq` None means "the next step" (KServe sequences carry no seq). In the common case (a local, idle
        session, the expected seq) the chunk is validated and queued right here, with no coroutine or task;
        anything else (a resume, a lease renewal, a busy session, a retry) runs the full `step` as a task.
        Validation errors raise `ServeError` at once.
        """
        s = self.sessions.lookup(session_id)
        if (
            s is None
            or s.pending is not None
            or last_only
            or (seq is not None and seq != s.last_seq + 1)
            or self.sessions.lease_due(s)
        ):
            return asyncio.ensure_future(
                self.step(session_id, seq, inputs, last_only=last_only, control=control)
            )
        fut = self._loop.create_future()  # type: ignore[union-attr]
        return self._start(s, s.last_seq + 1 if seq is None else seq, inputs, fut, control)

    def _start(
        self,
        s: Session,
        seq: int,
        inputs: dict[str, np.ndarray],
        fut: Any,
        control: StepControl | None = None,
    ) -> Any:
        """Validate and queue one chunk of an idle session; `finish` completes `fut` (no await in here)."""
        mv = s.mv
        arrays, key, steps = mv.inputs.check(inputs)
        self.sessions.admit_step(s, steps)
        if mv.controls is not None:  # inputs the server fills (service.core.controls)
            arrays = mv.controls.extend(arrays, steps, seq == 1, control, s.session_id)
        req = StepRequest(s.slot, arrays, key, fut, s, seq, steps)
        mv.batcher.submit(req)
        s.pending = req
        self.sessions.table.touch(s, req.enqueued)
        self.active += 1
        return fut

    async def step(
        self,
        session_id: str,
        seq: int | None,
        inputs: dict[str, np.ndarray],
        *,
        last_only: bool = False,
        control: StepControl | None = None,
    ) -> StepResult:
        """Apply one chunk (seq = last applied + 1, or None: the next); a retry of the last seq is cached."""
        self.active += 1
        sessions = self.sessions
        try:
            s = sessions.lookup(session_id)
            if s is None:
                s = await sessions.get(session_id)
            if sessions.lease_due(s):
                s = await sessions.renew(s)  # a stale resident copy is reloaded here
                await sessions.wait_idle(s)  # also re-checks that the session is still open after the await
            elif s.pending is not None:
                await sessions.wait_idle(s)
            # From here to _start() nothing awaits: no other operation on this session can interleave.
            if seq is None:
                seq = s.last_seq + 1
            elif seq != s.last_seq + 1:
                return out_of_order(sessions, s, seq, last_only)
            result: StepResult = await self._start(s, seq, inputs, self._loop.create_future(), control)  # type: ignore[union-attr]
            if last_only and s.mv.spec.time_axis:
                return last_step_only(result, s.mv.spec)
            return result
        finally:
            self.active -= 1

    async def step_many(
        self, calls: Sequence[StepCall], *, last_only: bool = False
    ) -> list[StepResult | ServeError]:
        """Apply chunks of many sessions in one call; a failed call yields its `ServeError` in its place.

        Same semantics as `step` for each call, in order per session. One future for the whole call instead
        of one per chunk.
        """
        if not calls:
            return []
        self.active += 1
        group = StepGroup(len(calls), self._loop.create_future())  # type: ignore[union-attr]
        try:
            for i, call in enumerate(calls):
                self._submit_nowait(call, GroupSlot(group, i), last_only)
            results = await group.future
            for item in results:
                if not isinstance(item, StepResult | ServeError):
                    raise item  # a bug or a cancellation, not a client error: fail the call as `step` would
            return results
        finally:
            self.active -= 1

    def _submit_nowait(self, call: StepCall, slot: GroupSlot, last_only: bool) -> bool:
        """Submit a call now if the session is local and idle (True); else run the full `step` as a task."""
        sessions = self.sessions
        s = sessions.lookup(call.session_id)
        slow = s is None or s.pending is not None or call.seq != s.last_seq + 1 or last_only
        if slow or sessions.lease_due(s):  # type: ignore[arg-type]
            task = asyncio.ensure_future(
                self.step(call.session_id, call.seq, call.inputs, last_only=last_only)
            )
            task.add_done_callback(slot.from_task)
            return False
        assert s is not None
        try:
            self._start(s, call.seq, call.inputs, slot)
        except ServeError as exc:
            slot.set_exception(exc)
        return True

    def finish(
        self, req: StepRequest, outputs: dict[str, np.ndarray] | None, exc: BaseException | None
    ) -> None:
        """Batch completion: record the applied step on its session, then wake the caller (on the loop)."""
        s: Session | None = req.owner
        fut = req.future
        if s is None:  # a raw step (generation): no bookkeeping here
            if not fut.done():
                fut.set_exception(exc) if exc is not None else fut.set_result(outputs)
            return
        self.active -= 1
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
        if self.sessions.persist:
            s.unsaved += 1
            if s.unsaved >= self.settings.store_flush_every:
                self.sessions.background.spawn(self._save_then_release(s, req, result))
                return
        if s.pending is req:
            s.pending = None
        req.wake()
        if not fut.done():
            fut.set_result(result)

    async def _save_then_release(self, s: Session, req: StepRequest, result: StepResult) -> None:
        """Persist an applied step before answering, so a dying replica never loses an acknowledged step."""
        sessions = self.sessions
        outcome: BaseException | None = Unavailable(
            "the session store did not accept the step; retry the same seq"
        )
        try:
            await sessions.save(s)
            outcome = None
        except ServeError as exc:  # Aborted: another replica owns the session now; Unavailable: store down
            _log.error("saving session %s failed: %s", s.session_id, exc.message)
            outcome = exc
        except Exception as exc:  # noqa: BLE001 - any store failure means: not durable
            _log.error("saving session %s failed: %r", s.session_id, exc)
        finally:
            if s.pending is req:
                s.pending = None
            if outcome is not None:
                # Applied here but not durable (or the lease is gone): forget the local copy, so no reply the
                # store does not hold is ever given (not even as a cached retry). A retry resumes the session
                # from its last durable step, on this replica or the lease holder.
                sessions.end(s, "moved", delete=False)
            req.wake()
        if not req.future.done():
            if outcome is None:
                req.future.set_result(result)
            else:
                req.future.set_exception(outcome)

    async def infer_stateless(
        self,
        model: str,
        version: int | None,
        inputs: dict[str, np.ndarray],
        *,
        dtype_name: Callable[[np.dtype], str] | None = None,
    ) -> dict[str, np.ndarray]:
        """Run once from the initial state. Inputs/outputs carry the batch axis; no states returned."""
        if self.sessions.draining:
            raise Unavailable("server is draining; retry on another replica")
        mv = self.host.get(model, version)
        spec = mv.spec
        batch = mv.inputs.check_batch(inputs, spec.config.max_batch_size, dtype_name)
        feeds = {k: np.ascontiguousarray(a) for k, a in inputs.items()}
        for st in spec.states:
            row = st.initial if st.initial is not None else np.zeros(st.shape, st.dtype)
            feeds["state_in_" + st.name] = np.ascontiguousarray(np.broadcast_to(row, (batch, *st.shape)))
        first = feeds[spec.inputs[0].name] if spec.inputs else None
        steps = first.shape[1] if spec.time_axis and first is not None and first.ndim > 1 else 1
        limits.check_request_steps(self.settings, batch, steps, f"stateless request to {spec.name!r}")
        if mv.controls is not None:  # a stateless run is a whole sequence: start and end, correlation id 0
            feeds.update(mv.controls.batch(batch, steps, True, True, [0] * batch))
            outs = await asyncio.get_running_loop().run_in_executor(self.executor, mv.runtime.run, feeds)
            return {t.name: outs[t.name] for t in spec.outputs}
        return await limits.run_sliced(self.settings, self.executor, mv.runtime, spec, feeds)


def last_step_only(result: StepResult, spec: ModelSpec) -> StepResult:
    """Return the result with time-axis outputs cut to their last step `(1, ...)`."""
    timed = {t.name for t in spec.outputs if t.time_axis}
    outs = {k: (v[-1:] if k in timed else v) for k, v in result.outputs.items()}
    return StepResult(result.seq, outs, result.cached)


def out_of_order(sessions: SessionManager, s: Session, seq: int, last_only: bool) -> StepResult:
    """Answer a chunk whose seq is not last + 1: the cached result of a retried last seq, or the error."""
    last = s.last_seq
    r = sessions.cached(s) if seq == last else None
    if r is not None and r.seq == seq:
        cached = StepResult(r.seq, r.outputs, True)
        return last_step_only(cached, s.mv.spec) if last_only and s.mv.spec.time_axis else cached
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
