"""Drivers for the rnnserve native API: one ``Stream`` per session, or ``StreamMany`` carrying many sessions.

Requests are built once per stream and only their ``seq`` changes between round trips, so the client spends
its CPU on gRPC, not on building messages (the client is the bottleneck on 2 cores otherwise). Answers are
checked: the right seq, one output row per session, no per-session error codes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from service import wire
from service.proto import rnnserve_pb2 as pb
from service.proto import rnnserve_pb2_grpc as pb_grpc
from tests.bench.drivers import Driver

if TYPE_CHECKING:
    import grpc

    from tests.bench.loadgen import LoadSpec


def chunk_tensor(spec: LoadSpec, rows: int = 0, seed: int = 0) -> pb.Tensor:
    """The model's data input for one chunk: ``(T, *tail)``, or ``(rows, T, *tail)`` when rows > 0.

    Float inputs are standard normal; integer inputs (token ids) are zeros, a valid id for any vocabulary.
    """
    shape = (spec.steps_per_message, *spec.input_tail)
    if rows:
        shape = (rows, *shape)
    dtype = np.dtype(spec.input_dtype).newbyteorder("<")
    if dtype.kind == "f":
        data = np.random.default_rng(seed).standard_normal(shape).astype(dtype)
    else:
        data = np.zeros(shape, dtype)
    return pb.Tensor(
        name=spec.input_name, dtype=wire.enum_of(dtype), shape=list(shape), data=data.tobytes()
    )


def stream_message_sizes(spec: LoadSpec, output: tuple[str, str, tuple[int, ...]]) -> tuple[int, int]:
    """Serialized sizes of one ``StreamRequest`` and of its ``StreamResponse``.

    ``output`` is the model's data output ``(name, dtype, dims after (batch, time))``.
    """
    req = pb.StreamRequest(seq=123456, inputs=[chunk_tensor(spec)])
    name, dtype, tail = output
    shape = (spec.steps_per_message, *tail)
    dt = np.dtype(dtype)
    y = pb.Tensor(
        name=name, dtype=wire.enum_of(dt), shape=list(shape), data=bytes(int(np.prod(shape)) * dt.itemsize)
    )
    resp = pb.StreamResponse(seq=123456, outputs=[y])
    return req.ByteSize(), resp.ByteSize()


class StreamDriver(Driver):
    """One session per bidi ``Stream``: the first message opens the session, the rest carry chunks."""

    def __init__(self, spec: LoadSpec, channel: grpc.aio.Channel) -> None:
        self._stub = pb_grpc.RecurrentServiceStub(channel)
        self._spec = spec
        self._req = pb.StreamRequest(inputs=[chunk_tensor(spec)])
        self._call: Any = None
        self._seq = 0

    async def open(self) -> None:
        self._call = self._stub.Stream()
        await self._call.write(pb.StreamRequest(open=pb.StreamOpen(model=self._spec.model)))
        resp = await self._call.read()
        if not resp.session.session_id:
            raise RuntimeError(f"Stream open answered without a session: {resp}")

    async def step(self) -> None:
        self._seq += 1
        self._req.seq = self._seq
        await self._call.write(self._req)
        resp = await self._call.read()
        if getattr(resp, "seq", None) != self._seq:
            raise RuntimeError(f"expected the answer to seq {self._seq}, got {resp!r}"[:300])

    async def close(self) -> None:
        if self._call is not None:
            await self._call.done_writing()
            self._call.cancel()


class StreamManyDriver(Driver):
    """``sessions_per_message`` sessions stepped together by one ``StreamMany`` message per round trip."""

    def __init__(self, spec: LoadSpec, channel: grpc.aio.Channel) -> None:
        self._stub = pb_grpc.RecurrentServiceStub(channel)
        self._spec = spec
        self._n = spec.sessions_per_message
        self._req = pb.StepManyRequest(inputs=[chunk_tensor(spec, rows=self._n)])
        self._call: Any = None
        self._seq = 0
        self._ids: list[str] = []

    async def open(self) -> None:
        for _ in range(self._n):
            info = await self._stub.CreateSession(pb.CreateSessionRequest(model=self._spec.model))
            self._ids.append(info.session_id)
        self._req.session_ids.extend(self._ids)
        self._call = self._stub.StreamMany()

    async def step(self) -> None:
        self._seq += 1
        self._req.tag = self._seq
        del self._req.seqs[:]
        self._req.seqs.extend([self._seq] * self._n)
        await self._call.write(self._req)
        resp = await self._call.read()
        if getattr(resp, "tag", None) != self._seq:
            raise RuntimeError(f"expected the answer tagged {self._seq}, got {resp!r}"[:300])
        if any(resp.codes):
            bad = next(i for i, c in enumerate(resp.codes) if c)
            raise RuntimeError(f"session {bad} failed: code {resp.codes[bad]} {resp.messages[bad]}")

    async def close(self) -> None:
        if self._call is not None:
            await self._call.done_writing()
            self._call.cancel()
        for sid in self._ids:
            try:
                await self._stub.Close(pb.SessionRequest(session_id=sid))
            except Exception:  # noqa: BLE001 - best effort at teardown; the server stops right after
                break


def make(spec: LoadSpec, channel: grpc.aio.Channel) -> Driver:
    """Build the service driver ``spec.target`` names."""
    if spec.target == "stream":
        return StreamDriver(spec, channel)
    return StreamManyDriver(spec, channel)
