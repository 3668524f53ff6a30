"""Client processes that hold many open bidi streams (100 per connection) and step them on command.

A `StreamClients` spreads streams over `workers` spawned processes, so the clients' Python is not what limits
the server. Each process keeps its streams open across commands: `open(n)` adds n streams (each opens its
session and applies one step, so its state row is really written), `run(rate, active, seconds)` paces steps
(open loop per stream, latency counted from the scheduled send time, so a stall is charged to every step it
delays) or, with rate 0, runs the first `active` streams closed loop; `close()` ends every stream. Targets:
the native `Stream` (`service`) or the bare grpc.aio echo (`echo`, tests/bench/echo.py).
"""

from __future__ import annotations

import asyncio
import gc
import multiprocessing as mp
import os
import time
import traceback
from dataclasses import dataclass
from typing import Any

import numpy as np
import psutil

STREAMS_PER_CONNECTION = 100


@dataclass(frozen=True, slots=True)
class Target:
    """What the streams talk to (picklable)."""

    kind: str  # "service" or "echo"
    address: str
    model: str = ""
    input_name: str = "tokens"
    input_dtype: str = "int64"
    input_tail: tuple[int, ...] = ()
    echo_request_bytes: int = 0


@dataclass(slots=True)
class RunResult:
    """One process's round trips of a run: when each ended (monotonic) and how long it took."""

    ends: np.ndarray
    latencies_s: np.ndarray
    cpu_s: float
    errors: int
    first_error: str


class _Stream:
    """One open bidi stream and its session."""

    def __init__(self, target: Target, channel: Any) -> None:
        self.target = target
        self.seq = 0
        self.call: Any = None
        if target.kind == "echo":
            from tests.bench.echo import METHOD

            self._method = channel.stream_stream(METHOD)
            self.payload: Any = b"\x01" * target.echo_request_bytes
        else:
            from service import wire
            from service.proto import rnnserve_pb2 as pb
            from service.proto import rnnserve_pb2_grpc as pb_grpc

            self._method = pb_grpc.RecurrentServiceStub(channel).Stream
            x = np.zeros((1, *target.input_tail), np.dtype(target.input_dtype))
            tensor = pb.Tensor(
                name=target.input_name, dtype=wire.enum_of(x.dtype), shape=list(x.shape), data=x.tobytes()
            )
            self.payload = pb.StreamRequest(inputs=[tensor])
            self._open = pb.StreamRequest(open=pb.StreamOpen(model=target.model))

    async def open(self) -> None:
        self.call = self._method()  # started here: a hundred calls start at a time, not every one at once
        if self.target.kind != "echo":
            await self.call.write(self._open)
            resp = await self.call.read()
            if not resp.session.session_id:
                raise RuntimeError(f"Stream open answered without a session: {resp}"[:300])
        await self.step()

    async def step(self) -> None:
        self.seq += 1
        if self.target.kind != "echo":
            self.payload.seq = self.seq
        await self.call.write(self.payload)
        resp = await self.call.read()
        if self.target.kind != "echo" and getattr(resp, "seq", None) != self.seq:
            raise RuntimeError(f"expected the answer to seq {self.seq}, got {resp!r}"[:300])

    async def close(self) -> None:
        await self.call.done_writing()
        await self.call.read()  # the end of the stream (the server closes the session first)


async def _paced(s: _Stream, interval: float, phase: float, t1: float, ends: list, lat: list) -> None:
    due = time.monotonic() + phase
    while due < t1:
        now = time.monotonic()
        if due > now:
            await asyncio.sleep(due - now)
        await s.step()
        end = time.monotonic()
        ends.append(end)
        lat.append(end - due)
        due += interval


async def _closed(s: _Stream, t1: float, ends: list, lat: list) -> None:
    while (start := time.monotonic()) < t1:
        await s.step()
        end = time.monotonic()
        ends.append(end)
        lat.append(end - start)


async def _serve(target: Target, conn: Any) -> None:
    import grpc

    channels: list[Any] = []
    streams: list[_Stream] = []
    proc = psutil.Process()
    while True:
        cmd, *args = await asyncio.to_thread(conn.recv)
        try:
            if cmd == "open":
                (n,) = args
                new = []
                for _ in range(n):
                    if len(streams) % STREAMS_PER_CONNECTION == 0:
                        channels.append(
                            grpc.aio.insecure_channel(
                                target.address, options=[("grpc.use_local_subchannel_pool", 1)]
                            )
                        )
                    streams.append(_Stream(target, channels[-1]))
                    new.append(streams[-1])
                for i in range(0, len(new), 100):  # a hundred opens in flight at a time
                    await asyncio.gather(*(s.open() for s in new[i : i + 100]))
                # The client's own collector must not charge its pauses to the server: what the open streams
                # keep is frozen, and runs collect nothing (see "run").
                gc.collect()
                gc.freeze()
                conn.send(("ok", len(streams)))
            elif cmd == "run":
                rate, active, start, seconds = args
                chosen = streams[:active]
                t1 = start + seconds
                ends: list[float] = []
                lat: list[float] = []
                gc.disable()  # a paced run measures the server: no client collection pauses inside it
                await asyncio.sleep(max(0.0, start - time.monotonic()))
                c0 = sum(proc.cpu_times()[:2])
                if rate > 0:
                    interval = len(chosen) / rate
                    phases = np.random.default_rng(os.getpid()).uniform(0, interval, len(chosen))
                    jobs = [
                        _paced(s, interval, float(p), t1, ends, lat)
                        for s, p in zip(chosen, phases, strict=True)
                    ]
                else:
                    jobs = [_closed(s, t1, ends, lat) for s in chosen]
                results = await asyncio.gather(*jobs, return_exceptions=True)
                bad = [r for r in results if isinstance(r, BaseException)]
                first = "".join(traceback.format_exception_only(bad[0])).strip() if bad else ""
                cpu = sum(proc.cpu_times()[:2]) - c0
                gc.enable()
                conn.send(("ok", RunResult(np.asarray(ends), np.asarray(lat), cpu, len(bad), first)))
            elif cmd == "close":
                await asyncio.gather(*(s.close() for s in streams), return_exceptions=True)
                for ch in channels:
                    await ch.close()
                streams, channels = [], []
                conn.send(("ok", 0))
            elif cmd == "exit":
                conn.send(("ok", 0))
                return
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which fails the run loudly
            conn.send(("error", "".join(traceback.format_exception(exc))[-2000:]))


def _entry(target: Target, conn: Any) -> None:
    asyncio.run(_serve(target, conn))


class StreamClients:
    """`workers` client processes holding streams to one target (see the module docstring)."""

    def __init__(self, target: Target, workers: int = 2) -> None:
        ctx = mp.get_context("spawn")
        self.pipes = []
        self.procs = []
        for _ in range(workers):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_entry, args=(target, child), daemon=True)
            proc.start()
            self.pipes.append(parent)
            self.procs.append(proc)
        self.open_streams = 0

    def _all(self, *cmd: Any, per_worker: list[tuple[Any, ...]] | None = None, timeout: float = 900) -> list:
        for i, pipe in enumerate(self.pipes):
            pipe.send((*cmd, *(per_worker[i] if per_worker else ())))
        out = []
        for pipe in self.pipes:
            if not pipe.poll(timeout):
                raise RuntimeError(f"client process did not answer {cmd[0]!r} within {timeout:g} s")
            status, value = pipe.recv()
            if status != "ok":
                raise RuntimeError(f"client process failed on {cmd[0]!r}:\n{value}")
            out.append(value)
        return out

    def open(self, total: int) -> None:
        """Open streams until `total` are open (each with its session and one applied step)."""
        add = total - self.open_streams
        if add <= 0:
            return
        w = len(self.pipes)
        self._all("open", per_worker=[(add // w + (1 if i < add % w else 0),) for i in range(w)])
        self.open_streams = total

    def run(self, rate: float, active: int, seconds: float, lead_s: float = 0.5) -> list[RunResult]:
        """Step `active` streams (spread over the processes) at `rate` steps/s in all (0: closed loop)."""
        w = len(self.pipes)
        start = time.monotonic() + lead_s
        shares = [active // w + (1 if i < active % w else 0) for i in range(w)]
        return self._all(
            "run",
            per_worker=[
                (rate * shares[i] / active if rate else 0.0, shares[i], start, seconds) for i in range(w)
            ],
            timeout=seconds + 600,
        )

    def close(self) -> None:
        """End every open stream (the service closes each stream's session)."""
        self._all("close")
        self.open_streams = 0

    def stop(self) -> None:
        """Stop the client processes."""
        try:
            self._all("exit", timeout=30)
        except (RuntimeError, OSError, EOFError):
            pass
        for proc in self.procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
