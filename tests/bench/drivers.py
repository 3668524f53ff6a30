"""Drivers: one caller each (a bidi stream, or a loop of unary calls), ``open`` / ``step`` (one round trip) /
``close``.

A driver hides what one round trip is for a target (the echo's stream or unary call, the service's
``Stream``, its multiplexed ``StreamMany``, KServe's ``ModelStreamInfer``), so the load generator's timing
loop is the same for all of them.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import grpc

    from tests.bench.loadgen import LoadSpec


class Driver(abc.ABC):
    """One caller under load: a bidi stream, or one unary call in flight at a time."""

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


class UnaryEchoDriver(Driver):
    """The echo's unary ``Call``: one call per round trip, request sized like a KServe ``ModelInfer``."""

    def __init__(self, spec: LoadSpec, channel: grpc.aio.Channel) -> None:
        from tests.bench.echo import UNARY_METHOD

        self._payload = b"\x01" * spec.request_bytes
        self._method = channel.unary_unary(UNARY_METHOD)

    async def open(self) -> None:
        pass

    async def step(self) -> None:
        resp = await self._method(self._payload)
        if not isinstance(resp, bytes):
            raise RuntimeError(f"echo call answered {resp!r}")

    async def close(self) -> None:
        pass


TARGETS = ("echo", "unary_echo", "stream", "stream_many", "kserve_stream", "kserve_unary")


def make_driver(spec: LoadSpec, channel: grpc.aio.Channel) -> Driver:
    """Build the driver ``spec.target`` names."""
    if spec.target == "echo":
        return EchoDriver(spec, channel)
    if spec.target == "unary_echo":
        return UnaryEchoDriver(spec, channel)
    if spec.target in ("stream", "stream_many"):
        from tests.bench import service_drivers

        return service_drivers.make(spec, channel)
    if spec.target == "kserve_unary":
        from tests.bench.workers import KServeUnaryDriver

        return KServeUnaryDriver(spec, channel)
    if spec.target == "kserve_stream":
        from tests.bench.kserve_drivers import KServeStreamDriver

        return KServeStreamDriver(spec, channel)
    raise ValueError(f"unknown load target {spec.target!r}; expected one of {', '.join(TARGETS)}")
