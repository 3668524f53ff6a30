"""Triton's sequence extension over the Engine: `(model, sequence_id)` -> engine session, in arrival order.

`sequence_start` opens (or restarts) an engine session, `sequence_end` closes it after that step, and the
requests of one sequence apply one at a time in arrival order. Every step is sent to the engine as "the next
step" of the session (seq None): the session's own FIFO orders them, so nothing here counts steps and a
cancelled request can never desynchronise a sequence.

Fast path (`submit`): a plain step of a live sequence (no start or end flag, nobody holding the sequence's
lock, no shared store) goes straight to `Engine.submit`, with no task or lock. Starts, ends and restarts take
the slow path, one FIFO lock per sequence. Sequence ids are per tenant: another tenant's sequence with the
same id is invisible (its requests see "not active", exactly as for an unused id) and untouched. Used by the
KServe servicer (`service/server/kserve.py`);
protocol-free apart
from the typed errors it raises.

With a shared store the map from a sequence to its session lives in the store too (`map_sequence`), so any
replica continues a sequence another one started (failover, lost affinity), and a replica checks the map on
every request: a sequence restarted elsewhere is never stepped on its old session here. Each step applies at
the session's next seq as the store holds it (the session is revalidated like any other), never a locally
counted one.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.core import limits
from service.core.controls import StepControl
from service.core.engine import Engine
from service.core.tenancy import CALLER, Principal, tenant
from service.errors import Aborted, InvalidArgument, NotFound, ServeError, Unavailable
from service.server.kserve_convert import SequenceControl

SequenceKey = tuple[str, int | str]
_Key = tuple[str, str, int | str]  # (tenant, model, sequence_id): sequence ids are per tenant
ENDED = "ended by sequence_end"


@dataclass(slots=True, eq=False)
class _Sequence:
    """One live Triton sequence: the engine session behind it and the model version it runs on."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    session_id: str | None = None
    version: int = 0
    retired: bool = False  # ended or expired; a waiter that finds this looks the key up again
    control: StepControl | None = None  # fills a model's control inputs (correlation id; not the end)
    last: asyncio.Future[Any] | None = None  # the latest fast-path step; later steps wait until it is done


@dataclass(frozen=True, slots=True)
class SequenceOutcome:
    """Outputs of one sequence step `(T, ...)` without the batch axis, and the model version that ran it."""

    outputs: dict[str, np.ndarray]
    version: int


def _consume_result(task: asyncio.Task[Any]) -> None:
    """Retrieve a shielded task's outcome so an abandoned one never logs 'exception was never retrieved'."""
    if not task.cancelled():
        task.exception()


def _task_result(task: asyncio.Future[Any]) -> SequenceOutcome:
    return task.result()  # type: ignore[no-any-return]


def _describe_id(sequence_id: int | str) -> str:
    return repr(sequence_id) if isinstance(sequence_id, str) else str(sequence_id)


def start_required(key: _Key, why: str) -> InvalidArgument:
    """Triton's answer to a request of a sequence that is not active, word for word, then why it is not.

    Triton core, sequence_batch_scheduler.cc: "inference request for sequence <id> to model '<name>' must
    specify the START flag on the first request of the sequence" (INVALID_ARG).
    """
    _, model, sequence_id = key
    return InvalidArgument(
        f"inference request for sequence {sequence_id} to model '{model}' must specify the START flag on the "
        f"first request of the sequence ({why}; send sequence_start=true to start it again)"
    )


def store_key(key: _Key) -> str:
    """Return the sequence's key in the shared store (per tenant; int and string ids kept apart)."""
    owner, model, sequence_id = key
    kind = "s" if isinstance(sequence_id, str) else "i"
    return f"{len(owner)}:{owner}:{model}:{kind}:{sequence_id}"


class SequenceTable:
    """Map (model, sequence_id) to an engine session; apply the requests of one sequence in arrival order."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._live: dict[_Key, _Sequence] = {}
        self._slow: dict[_Key, int] = {}  # requests per sequence on the slow path, not yet done
        # Why recently gone sequences went (ended, idle, ...), so a late request hears the reason; bounded.
        self._gone: OrderedDict[_Key, str] = OrderedDict()
        self._max_gone = engine.settings.max_tombstones
        # Sequences whose session the engine expired are forgotten at most this often (on a start request).
        self._sweep_every_s = engine.settings.sweep_interval_s
        self._last_sweep = time.monotonic()
        self._shared = engine.session_manager.persist

    def __len__(self) -> int:
        return len(self._live)

    def live_version(self, model: str, sequence_id: int | str) -> int | None:
        """Model version a live sequence runs on (it stays pinned there when a newer version loads)."""
        entry = self._live.get((tenant(), model, sequence_id))
        return None if entry is None or entry.session_id is None else entry.version

    def submit(
        self, model: str, version: int | None, ctl: SequenceControl, inputs: dict[str, np.ndarray]
    ) -> tuple[asyncio.Future[Any], Callable[[asyncio.Future[Any]], Any]]:
        """Start one request of a sequence now; return its future and the function that reads its outcome.

        The fast path queues a plain step directly in the engine; everything else runs `step` as a task.
        """
        key: _Key = (tenant(), model, ctl.sequence_id)  # type: ignore[assignment]
        # With a shared store every request checks the store's map first (the slow path): another replica may
        # have restarted or taken over the sequence.
        slow = ctl.start or ctl.end or self._shared or key in self._slow
        entry = None if slow else self._live.get(key)
        if (
            entry is not None
            and entry.session_id is not None
            and not entry.lock.locked()
            and (entry.last is None or entry.last.done())
            and (version is None or version == entry.version)
        ):
            # Only onto an idle sequence: the engine defers a step that finds its session busy (a task), and
            # a later fast step could then overtake it (KServe steps carry no seq to catch that).
            fut = entry.last = self._engine.submit(entry.session_id, None, inputs, control=entry.control)
            return fut, lambda f: self._outcome(key, entry, f)
        # A request of this sequence on the slow path has not reached the engine yet: later ones of the same
        # sequence follow it there (the sequence lock is FIFO), never overtake it on the fast path.
        self._slow[key] = self._slow.get(key, 0) + 1
        task = asyncio.ensure_future(self.step(model, version, ctl, inputs))
        task.add_done_callback(lambda _t: self._slow_done(key))
        return task, _task_result

    def _slow_done(self, key: _Key) -> None:
        left = self._slow[key] - 1
        if left:
            self._slow[key] = left
        else:
            del self._slow[key]

    def _outcome(self, key: _Key, entry: _Sequence, fut: asyncio.Future[Any]) -> SequenceOutcome:
        try:
            result = fut.result()
        except NotFound as exc:
            raise self._ended(key, entry, exc) from exc
        return SequenceOutcome(result.outputs, entry.version)

    def _ended(self, key: _Key, entry: _Sequence, exc: NotFound) -> ServeError:
        """Retire a sequence whose session is gone; the error says why and how to start again.

        As Triton's sequence batcher answers a request of a sequence it released (idle past
        max_sequence_idle_microseconds, or never started): INVALID_ARGUMENT, "must specify the START flag".
        A session another replica now owns stays NOT_FOUND (reason moved): the client retries elsewhere.
        """
        self._retire(key, entry, exc.reason)
        _, model, sequence_id = key
        if exc.reason == "moved":
            return NotFound(
                f"sequence {_describe_id(sequence_id)} of model {model!r} has ended ({exc.reason}): "
                f"{exc.message}; start it again with sequence_start=true",
                reason=exc.reason,
            )
        return start_required(key, f"it ended ({exc.reason}): {exc.message}")

    async def step(
        self, model: str, version: int | None, ctl: SequenceControl, inputs: dict[str, np.ndarray]
    ) -> SequenceOutcome:
        """Apply one request of a sequence: start/restart, step, end. Inputs have no batch axis.

        The work runs in its own task, shielded from the caller's cancellation: once a step has been handed to
        the engine it completes and the session advances with it, even if the client hung up meanwhile.
        Otherwise the next request would reuse that seq and get the engine's cached (stale) answer.
        """
        if ctl.sequence_id is None:
            raise InvalidArgument("a sequence step needs a sequence_id")
        if isinstance(ctl.sequence_id, str):
            limits.check_id(self._engine.settings, ctl.sequence_id, "sequence_id")
        key: _Key = (tenant(), model, ctl.sequence_id)
        if ctl.start:
            self._sweep()
        task = asyncio.create_task(self._ordered_step(key, version, ctl, inputs))
        task.add_done_callback(_consume_result)
        return await asyncio.shield(task)

    async def _ordered_step(
        self, key: _Key, version: int | None, ctl: SequenceControl, inputs: dict[str, np.ndarray]
    ) -> SequenceOutcome:
        # No await before the lock: tasks start in creation order, reach it in arrival order, and
        # asyncio.Lock is FIFO.
        while True:
            entry = self._live.get(key)
            if entry is None:
                if not ctl.start and not self._shared:
                    raise self._not_active(key)
                self._gone.pop(key, None)
                entry = self._live[key] = _Sequence()
            async with entry.lock:
                if entry.retired:
                    continue
                return await self._locked_step(key, entry, version, ctl, inputs)

    async def _locked_step(
        self,
        key: _Key,
        entry: _Sequence,
        version: int | None,
        ctl: SequenceControl,
        inputs: dict[str, np.ndarray],
    ) -> SequenceOutcome:
        _, model, sequence_id = key
        if entry.last is not None and not entry.last.done():
            await asyncio.wait([entry.last])  # the fast-path step before this one lands first
        if ctl.start:
            await self._start(key, entry, version)
        else:
            if self._shared:
                await self._follow_store(key, entry)
            if version is not None and version != entry.version:
                raise InvalidArgument(
                    f"sequence {_describe_id(sequence_id)} of model {model!r} runs on version "
                    f"{entry.version}, not {version}; leave model_version empty or restart the sequence"
                )
        session_id = entry.session_id
        if session_id is None:  # unreachable: a start opens the session, a follower found it
            raise self._not_active(key)
        try:
            control = StepControl(True, sequence_id) if ctl.end else entry.control
            result = await self._engine.step(session_id, None, inputs, control=control)
        except NotFound as exc:
            if self._shared and exc.reason == "moved":
                raise Unavailable(
                    f"sequence {_describe_id(sequence_id)} of model {model!r} is being served by another "
                    "replica right now; retry"
                ) from exc
            raise self._ended(key, entry, exc) from exc
        except ServeError:
            if ctl.start:  # a start whose first request is refused does not start the sequence
                self._retire(key, entry, None)
                await self._close_quietly(session_id)
                await self._unmap(key, session_id)
            raise
        if ctl.end:
            self._retire(key, entry, ENDED)
            await self._close_quietly(session_id)
            await self._unmap(key, session_id)
        return SequenceOutcome(result.outputs, entry.version)

    async def _start(self, key: _Key, entry: _Sequence, version: int | None) -> None:
        """Open the sequence's session (closing a previous one held here) and publish it in the store."""
        _, model, sequence_id = key
        previous = {entry.session_id}
        mapped = None
        if self._shared:
            mapped = await self._engine.store.sequence_session(store_key(key))
            previous.add(mapped)
        for old in previous - {None}:
            here = old in self._engine.sessions.sessions or old in self._engine.session_manager.tiering.where
            if here:  # one held elsewhere just expires there
                await self._close_quietly(old)  # type: ignore[arg-type]
        entry.session_id = None
        try:
            info = await self._engine.create_session(model, version, protocol="kserve")
            ttl = self._engine.settings.max_lifetime_s
            if self._shared and not await self._engine.store.map_sequence(
                store_key(key), info.session_id, ttl, mapped
            ):
                # Another start of this sequence won meanwhile (this one was delayed): that one stands.
                await self._close_quietly(info.session_id)
                raise Aborted(
                    f"sequence {_describe_id(sequence_id)} of model {model!r} was restarted by another "
                    "request meanwhile; this start did not apply"
                )
        except BaseException:
            self._retire(key, entry, None)  # never started: later requests hear "not active"
            raise
        entry.session_id, entry.version = info.session_id, info.version
        entry.control = StepControl(False, sequence_id)

    async def _follow_store(self, key: _Key, entry: _Sequence) -> None:
        """Point the entry at the session the store maps the sequence to (started or moved elsewhere)."""
        session_id = await self._engine.store.sequence_session(store_key(key))
        if session_id is None:
            self._retire(key, entry, self._gone.get(key))
            raise self._not_active(key)
        if session_id != entry.session_id:
            try:
                info = await self._engine.attach(session_id)
            except NotFound as exc:
                self._retire(key, entry, exc.reason)
                raise self._not_active(key) from exc
            entry.session_id, entry.version = session_id, info.version

    async def _unmap(self, key: _Key, session_id: str) -> None:
        if self._shared:
            await self._engine.store.unmap_sequence(store_key(key), session_id)

    def _retire(self, key: _Key, entry: _Sequence, reason: str | None) -> None:
        entry.retired = True
        if self._live.get(key) is entry:
            del self._live[key]
            self._gone.pop(key, None)
            if reason is not None:
                self._gone[key] = reason
                while len(self._gone) > self._max_gone:
                    self._gone.popitem(last=False)

    def _not_active(self, key: _Key) -> Exception:
        _, model, sequence_id = key
        reason = self._gone.get(key)
        name = f"sequence {_describe_id(sequence_id)} of model {model!r}"
        if reason == "moved":
            return NotFound(
                f"{name} has ended ({reason}); start it again with sequence_start=true", reason=reason
            )
        why = {None: "it is not active", ENDED: "it was ended by sequence_end"}.get(
            reason, f"it ended ({reason})"
        )
        return start_required(key, why)

    async def _close_quietly(self, session_id: str) -> None:
        try:
            await self._engine.close(session_id)
        except NotFound:
            pass  # already expired or evicted: nothing left to release

    def _sweep(self) -> None:
        """Forget sequences whose engine session expired (clients that never sent sequence_end)."""
        now = time.monotonic()
        if now - self._last_sweep < self._sweep_every_s:
            return
        self._last_sweep = now
        for key, entry in list(self._live.items()):
            if entry.session_id is None or entry.lock.locked():
                continue
            as_owner = CALLER.set(Principal(key[0]))  # the sequence's session is its tenant's
            try:
                self._engine.describe(entry.session_id)
            except NotFound as exc:
                self._retire(key, entry, exc.reason)
            finally:
                CALLER.reset(as_owner)

    async def close_all(self) -> None:
        """End every live sequence (server shutdown).

        With a shared store they are only forgotten here: the engine hands their sessions over and another
        replica continues them.
        """
        for key, entry in list(self._live.items()):
            self._retire(key, entry, "shutdown")
            if entry.session_id is not None and not self._shared:
                as_owner = CALLER.set(Principal(key[0]))
                try:
                    await self._close_quietly(entry.session_id)
                finally:
                    CALLER.reset(as_owner)
