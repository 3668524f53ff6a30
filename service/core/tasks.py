"""Background tasks the core starts and must wait for at shutdown (unloads, store deletes, saves)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


class Background:
    """A set of fire-and-forget tasks that `wait()` can still join (a task drops out when it ends)."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run `coro` as a task on the running loop."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def wait(self) -> None:
        """Wait for every task running now (their errors are theirs: logged where they happen)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
