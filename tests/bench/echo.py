"""A no-op grpc.aio bidirectional echo server: the floor of the Python gRPC edge.

It answers every request message of a bidi stream with one response of a fixed size and does nothing else, so
a load generator pointed at it measures what Python grpc.aio alone costs per message on this machine. The
request and response sizes are set to the serialized sizes of the service's own Step messages, so the
comparison with the service is like for like. Raw bytes in and out (no protobuf parsing), which favours the
echo slightly: the service parses and builds its messages.

Run as ``python -m tests.bench.echo --response-bytes N``; it prints ``{"port": P, "pid": PID}`` on stdout and
serves until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator

import grpc

SERVICE = "rnnserve.bench.Echo"
METHOD = f"/{SERVICE}/Chat"


def make_handler(response: bytes) -> grpc.GenericRpcHandler:
    """Build a generic handler whose bidi method answers every message with ``response``."""

    async def chat(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        async for _ in requests:
            yield response

    return grpc.method_handlers_generic_handler(
        SERVICE, {"Chat": grpc.stream_stream_rpc_method_handler(chat)}
    )


async def serve(response_bytes: int, host: str = "127.0.0.1") -> None:
    """Serve the echo until a signal arrives; report the bound port on stdout."""
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((make_handler(b"\x00" * response_bytes),))
    port = server.add_insecure_port(f"{host}:0")
    await server.start()
    print(json.dumps({"port": port, "pid": os.getpid()}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0.5)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--response-bytes", type=int, required=True)
    args = parser.parse_args(argv)
    asyncio.run(serve(args.response_bytes))
    sys.exit(0)


if __name__ == "__main__":
    main()
