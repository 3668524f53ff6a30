"""KServe sequences across workers: which worker serves a request, and a `ModelStreamInfer` split by owner.

A sequence belongs to the worker that received its START (`service.server.ownership`). A request with a
`sequence_id` is served where it landed when it starts the sequence, when this worker owns it, or when no
worker does (the answer is then "not active", or with the shared store this worker resumes the sequence and
owns it from then on); otherwise it goes to the owner.

`StreamSplitter` serves one `ModelStreamInfer` call: the requests this worker serves go to its own KServe
servicer as one stream, each request for another worker's sequence goes over one sub-stream per owner (Unix
socket), and the answers of both are written back to the client as they come (one lock for the writes).
Replies of one sequence keep their order, as Triton promises: when a sequence's requests change route within
the call (a START here for a sequence that was running elsewhere), its next request waits until the old route
has answered everything sent to it. Replies of different sequences may interleave, as in Triton.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from grpc import aio

from service.core.tenancy import tenant
from service.errors import InvalidArgument
from service.server.kserve_convert import parse_sequence
from service.server.ownership import OwnerTable

if TYPE_CHECKING:
    from service.server.routing import Router

_MAX_ROUTES = 65_536  # sequences whose route a stream remembers (for the ordering rule); oldest forgotten


def route_of(request: Any, owners: OwnerTable) -> tuple[int, int]:
    """Return (the worker that serves this KServe request, its sequence's fingerprint or 0 if none)."""
    me = owners.me
    try:
        ctl = parse_sequence(request.parameters)
    except InvalidArgument:
        return me, 0  # refused where it landed
    if ctl.sequence_id is None:
        return me, 0
    fp = owners.fingerprint(tenant(), request.model_name, ctl.sequence_id)
    if ctl.start:
        return me, fp
    owner = owners.owner(fp)
    return (me if owner is None else owner), fp


class _LocalContext:
    """The call's context as this worker's servicer sees it: its writes share the lock with the relays."""

    def __init__(self, splitter: StreamSplitter, context: Any) -> None:
        self._splitter = splitter
        self._context = context

    async def write(self, message: Any) -> None:
        await self._splitter.write(self._splitter.me, message)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


class StreamSplitter:
    """One ModelStreamInfer call at the worker it reached (module docstring)."""

    def __init__(self, router: Router, method: str, context: Any, deser: Callable[[bytes], Any]) -> None:
        self.router = router
        self.me = router.peers.index
        self._method = method
        self._context = context
        self._deser = deser
        self._lock = asyncio.Lock()
        self._subs: dict[int, Any] = {}  # owner -> sub-stream
        self._relays: list[asyncio.Task[None]] = []
        self._pending: dict[int, int] = {}  # route -> requests sent there, not yet answered
        self._answered: asyncio.Future[None] | None = None  # woken on every answer (the ordering rule)
        self._routes: OrderedDict[int, int] = OrderedDict()  # sequence fingerprint -> its last route
        self._failure: aio.AioRpcError | None = None
        self._failed = asyncio.Event()

    async def run(self, behavior: Callable[..., Any], requests: AsyncIterator[bytes]) -> None:
        """Serve the call: this worker's servicer on the local requests, sub-streams for the others."""
        local = asyncio.ensure_future(behavior(self._local(requests), _LocalContext(self, self._context)))
        failed = asyncio.ensure_future(self._failed.wait())
        try:
            await asyncio.wait({local, failed}, return_when=asyncio.FIRST_COMPLETED)
            if local.done():
                local.result()  # an abort of the local servicer ends the call as it is
                if self._relays:  # every owner answers all it was sent (or one fails)
                    owners: asyncio.Future[Any] = asyncio.ensure_future(asyncio.gather(*self._relays))
                    await asyncio.wait([owners, failed], return_when=asyncio.FIRST_COMPLETED)
                    owners.cancel()
            if self._failure is not None:
                await self.router.fail(self._context, self._failure)
        finally:
            for task in (local, failed, *self._relays):
                task.cancel()
            for sub in self._subs.values():
                sub.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await local

    async def write(self, route: int, message: Any) -> None:
        """Write one answer to the client (answers from here and from the owners never overlap)."""
        async with self._lock:
            await self._context.write(message)
        self._pending[route] -= 1
        waiter = self._answered
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _local(self, requests: AsyncIterator[bytes]) -> AsyncIterator[Any]:
        """Yield the requests served here, in order; send the others to their owners on the way."""
        owners = self.router.owners
        try:
            async for raw in requests:
                request = self._deser(raw)
                route, fp = route_of(request, owners)
                if fp:
                    last = self._routes.pop(fp, route)
                    self._routes[fp] = route
                    if len(self._routes) > _MAX_ROUTES:
                        self._routes.popitem(last=False)
                    while last != route and self._pending.get(last):
                        self._answered = asyncio.get_running_loop().create_future()
                        await self._answered  # the sequence's earlier requests are answered first
                self._pending[route] = self._pending.get(route, 0) + 1
                if route == self.me:
                    yield request
                else:
                    await self._send(route, raw)
            for sub in self._subs.values():
                await sub.done_writing()
        except aio.AioRpcError as exc:
            self._fail(exc)

    async def _send(self, k: int, raw: bytes) -> None:
        sub = self._subs.get(k)
        if sub is None:
            await self.router.ready(k)
            sub = self._subs[k] = self.router.channel(k).stream_stream(self._method)(
                metadata=self.router.forwarded_metadata(self._context), wait_for_ready=True
            )
            self._relays.append(asyncio.ensure_future(self._relay(k, sub)))
        self.router.count_forward(self._method)
        await sub.write(raw)

    async def _relay(self, k: int, sub: Any) -> None:
        try:
            async for answer in sub:
                await self.write(k, answer)
        except aio.AioRpcError as exc:
            self._fail(exc)

    def _fail(self, exc: aio.AioRpcError) -> None:
        if self._failure is None:
            self._failure = exc
        self._failed.set()
