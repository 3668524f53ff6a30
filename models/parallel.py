"""Training runs in parallel processes: Ctrl-C stops every one of them, and each shows its per-step progress.

`run_parallel(fn, calls, jobs)` runs ``fn(*args)`` for every ``args`` in ``calls`` in ``jobs`` worker
processes (one thread each) and yields the results as they complete. The workers ignore SIGINT and die with
their parent (``PR_SET_PDEATHSIG``); the parent turns Ctrl-C (SIGINT) and SIGTERM into a stop that kills every
worker before it re-raises, so ``make train``/``make models``/``make experiment`` end at once, leaving no
training process behind. Inside a worker, `bar(...)` (used where a run would call ``tqdm``) sends its progress
to the parent, which draws one tqdm bar per running job under an overall bar; in the parent it is plain tqdm.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing as mp
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from tqdm import tqdm

_QUEUE: Any = None  # set in a worker: where its progress goes
_SEND_EVERY_S = 0.2
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (a no-op elsewhere)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _init_worker(queue: Any) -> None:
    global _QUEUE
    _QUEUE = queue
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides what Ctrl-C does, and kills us
    _die_with_parent()


class _RemoteBar:
    """A tqdm stand-in inside a worker: iterates, and sends (desc, n, total, postfix) to the parent."""

    def __init__(self, iterable: Iterable[Any], desc: str, total: int | None) -> None:
        self.iterable, self.desc = iterable, desc
        self.total = total if total is not None else len(iterable)  # type: ignore[arg-type]
        self.n, self.postfix, self._sent = 0, "", 0.0

    def _send(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._sent >= _SEND_EVERY_S:
            self._sent = now
            _QUEUE.put((os.getpid(), self.desc, self.n, self.total, self.postfix))

    def __iter__(self) -> Iterator[Any]:
        for item in self.iterable:
            yield item
            self.n += 1
            self._send(self.n == self.total)

    def set_postfix(self, **values: Any) -> None:
        """Attach ``key=value`` pairs to the bar, as tqdm does."""
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def set_postfix_str(self, text: str) -> None:
        """Attach a text to the bar, as tqdm does."""
        self.postfix = text

    def close(self) -> None:
        """Send the last state."""
        self._send(force=True)


def bar(iterable: Iterable[Any], desc: str, total: int | None = None, **kwargs: Any) -> Any:
    """Return ``tqdm(iterable, desc=...)``; inside a `run_parallel` worker, a bar drawn by the parent."""
    if _QUEUE is None:
        return tqdm(iterable, desc=desc, total=total, dynamic_ncols=True, **kwargs)
    return _RemoteBar(iterable, desc, total)


def _call(job: tuple[Callable[..., Any], tuple[Any, ...]]) -> Any:
    fn, args = job
    return fn(*args)


def _draw(queue: Any, stop: threading.Event, position0: int) -> None:
    """Parent side: one bar per worker run, keyed by (pid, desc); a finished run's bar is closed."""
    bars: dict[tuple[int, str], tqdm] = {}
    while not stop.is_set() or not queue.empty():
        try:
            pid, desc, n, total, postfix = queue.get(timeout=0.1)
        except Exception:  # noqa: BLE001 - queue.Empty, or the queue closed at the end
            continue
        b = bars.get((pid, desc))
        if b is None:
            b = bars[(pid, desc)] = tqdm(
                total=total, desc=desc, position=position0 + len(bars) + 1, leave=False, dynamic_ncols=True
            )
        b.update(n - b.n)
        if postfix:
            b.set_postfix_str(postfix, refresh=False)
        b.refresh()
        if n >= total:
            b.close()
    for b in bars.values():
        b.close()


def _raise_on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_parallel(
    fn: Callable[..., Any], calls: list[tuple[Any, ...]], jobs: int, desc: str = "runs"
) -> Iterator[Any]:
    """Run ``fn(*args)`` for each ``args`` in ``jobs`` processes; yield results as they complete.

    Ctrl-C or SIGTERM in the parent kills every worker, then raises KeyboardInterrupt.
    """
    queue = mp.get_context().Queue()
    stop = threading.Event()
    drawer = threading.Thread(target=_draw, args=(queue, stop, 0), daemon=True)
    overall = tqdm(total=len(calls), desc=desc, position=0, dynamic_ncols=True)
    old_term = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    pool = mp.get_context().Pool(min(jobs, len(calls)) or 1, _init_worker, (queue,))
    drawer.start()
    try:
        for result in pool.imap_unordered(_call, [(fn, args) for args in calls]):
            overall.update()
            yield result
        pool.close()
        pool.join()
    finally:
        pool.terminate()  # a no-op after a clean end; on Ctrl-C, SIGTERM to every worker
        pool.join()
        signal.signal(signal.SIGTERM, old_term)
        stop.set()
        drawer.join(timeout=2)
        overall.close()
