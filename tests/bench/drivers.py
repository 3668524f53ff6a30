"""Stream drivers: one bidi stream each, ``open`` / ``step`` (one round trip) / ``close``.

A driver hides what one round trip is for a target (the echo, the service's ``Stream``, its multiplexed
``StreamMany``), so the load generator's timing loop is the same for all of them.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import grpc

    from tests.bench.loadgen import LoadSpec


class Driver(abc.ABC):
    """One bidi stream under closed-loop load."""

    @abc.abstractmethod
    async def open(self) -> None:
        """Open the stream (and its session, for the service)."""

    @abc.abstractmethod
    async def step(self) -> None:
        """Send one message and wait for its answer."""

    @abc.abstractmethod
    async def close(self) -> None:
        """End the stream."""


class EchoDriver(Driver):
    """The no-op echo of ``tests.bench.echo``: raw bytes, same sizes as the service's messages."""

    def __init__(self, spec: LoadSpec, channel: grpc.aio.Channel) -> None:
        from tests.bench.echo import METHOD

        self._payload = b"\x01" * spec.request_bytes
        self._method = channel.stream_stream(METHOD)
        self._call: Any = None

    async def open(self) -> None:
        self._call = self._method()

    async def step(self) -> None:
        await self._call.write(self._payload)
        resp = await self._call.read()
        if not isinstance(resp, bytes):
            raise RuntimeError(f"echo stream ended early: {resp!r}")

    async def close(self) -> None:
        if self._call is not None:
            await self._call.done_writing()
            self._call.cancel()


def make_driver(spec: LoadSpec, channel: grpc.aio.Channel) -> Driver:
    """Build the driver ``spec.target`` names."""
    if spec.target == "echo":
        return EchoDriver(spec, channel)
    if spec.target in ("stream", "stream_many"):
        from tests.bench import service_drivers

        return service_drivers.make(spec, channel)
    raise ValueError(f"unknown load target {spec.target!r}; expected echo, stream or stream_many")
