"""Per-step latency against stream position, and stateless recompute of the whole history for comparison.

Streamed: one session on a ``Stream``, one step per message, sequentially; the latency of the steps at
positions ``p .. p + window - 1`` is recorded for every ``p`` asked for, over several sessions, and the median
taken. Stateless: each request carries the whole history of ``p`` steps on a fresh ``Stream`` (open + one
chunk, last step's output only, session closed with the stream), which is what a server without held state
must do.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import grpc
import numpy as np

from service.proto import rnnserve_pb2 as pb
from service.proto import rnnserve_pb2_grpc as pb_grpc
from tests.bench.loadgen import LoadSpec
from tests.bench.service_drivers import chunk_tensor


@dataclass(frozen=True, slots=True)
class PositionPoint:
    """Median latencies at one stream position."""

    position: int
    stream_ms: float  # one step at this position, state held by the server
    stream_p99_ms: float
    stateless_ms: float  # the whole history of `position` steps re-sent and re-run
    samples: int


async def measure_positions(
    address: str,
    spec: LoadSpec,
    positions: tuple[int, ...],
    *,
    sessions: int,
    window: int,
    stateless_repeats: int,
) -> list[PositionPoint]:
    """Latency at each of ``positions`` (streamed vs stateless) against the server at ``address``."""
    last = max(positions) + window
    lat = {p: [] for p in positions}  # type: dict[int, list[float]]
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.RecurrentServiceStub(channel)
        one = pb.StreamRequest(inputs=[chunk_tensor(spec)])
        for _ in range(sessions):
            call = stub.Stream()
            await call.write(pb.StreamRequest(open=pb.StreamOpen(model=spec.model)))
            await call.read()
            for seq in range(1, last + 1):
                one.seq = seq
                t0 = time.perf_counter()
                await call.write(one)
                resp = await call.read()
                dt = time.perf_counter() - t0
                if resp.seq != seq:
                    raise RuntimeError(f"expected the answer to seq {seq}, got {resp}")
                for p in positions:
                    if p <= seq < p + window:
                        lat[p].append(dt)
            await call.done_writing()
            await call.read()  # end of stream
        stateless: dict[int, float] = {}
        for p in positions:
            history = LoadSpec(**{**_fields(spec), "steps_per_message": p})
            req = pb.StreamRequest(
                open=pb.StreamOpen(model=spec.model), seq=1, inputs=[chunk_tensor(history)], last_only=True
            )
            times = []
            for _ in range(stateless_repeats + 1):  # the first one warms ORT's shape-specific caches
                t0 = time.perf_counter()
                call = stub.Stream()
                await call.write(req)
                resp = await call.read()
                await call.done_writing()
                await call.read()
                times.append(time.perf_counter() - t0)
                if resp.seq != 1:
                    raise RuntimeError(f"stateless request at history {p} failed: {resp}")
            stateless[p] = float(np.median(times[1:]))
    return [
        PositionPoint(
            p,
            float(np.median(lat[p]) * 1e3),
            float(np.percentile(lat[p], 99) * 1e3),
            stateless[p] * 1e3,
            len(lat[p]),
        )
        for p in positions
    ]


def _fields(spec: LoadSpec) -> dict[str, object]:
    return {f: getattr(spec, f) for f in spec.__dataclass_fields__}
