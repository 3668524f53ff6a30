"""A no-op grpc.aio echo server: the floor of the Python gRPC edge, for streams and for unary calls.

``Chat`` (bidi) answers every request message of a stream with one response of a fixed size; ``Call`` (unary)
answers each call with one response of another fixed size. Neither does anything else, so a load generator
pointed at it measures what Python grpc.aio alone costs per message on this machine. The sizes are set to the
serialized sizes of the service's own messages (``Stream`` messages for ``Chat``, KServe ``ModelInfer``
messages for ``Call``), so the comparison with the service is like for like. Raw bytes in and out (no protobuf
parsing), which favours the echo slightly: the service parses and builds its messages.

Run as ``python -m tests.bench.echo --response-bytes N [--unary-response-bytes M]``; it prints
``{"port": P, "pid": PID}`` on stdout and serves until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import AsyncIterator

import grpc

SERVICE = "rnnserve.bench.Echo"
METHOD = f"/{SERVICE}/Chat"
UNARY_METHOD = f"/{SERVICE}/Call"


def make_handler(response: bytes, unary_response: bytes = b"") -> grpc.GenericRpcHandler:
    """Build a generic handler: bidi ``Chat`` answers every message with ``response``, unary ``Call`` with
    ``unary_response``."""

    async def chat(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        async for _ in requests:
            yield response

    async def call(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return unary_response

    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Chat": grpc.stream_stream_rpc_method_handler(chat),
            "Call": grpc.unary_unary_rpc_method_handler(call),
        },
    )


async def serve(
    response_bytes: int, unary_response_bytes: int = 0, host: str = "127.0.0.1", port: int = 0
) -> None:
    """Serve the echo until a signal arrives; report the bound port on stdout.

    With a `port`, the socket is shared (SO_REUSEPORT) with the other echo processes bound to it.
    """
    server = grpc.aio.server(options=[("grpc.so_reuseport", 1 if port else 0)])
    server.add_generic_rpc_handlers((make_handler(b"\x00" * response_bytes, b"\x00" * unary_response_bytes),))
    port = server.add_insecure_port(f"{host}:{port}")
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
    parser.add_argument("--response-bytes", type=int, required=True, help="size of each Chat answer")
    parser.add_argument("--unary-response-bytes", type=int, default=0, help="size of each Call answer")
    parser.add_argument(
        "--processes", type=int, default=1, help="echo processes sharing one port (SO_REUSEPORT), as workers"
    )
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)  # a child of --processes N
    args = parser.parse_args(argv)
    if args.processes > 1:
        sys.exit(_supervise(args.processes, args.response_bytes, args.unary_response_bytes))
    asyncio.run(serve(args.response_bytes, args.unary_response_bytes, port=args.port))
    sys.exit(0)


def _supervise(n: int, response_bytes: int, unary_response_bytes: int) -> int:
    """Start `n` echo processes on one free port; report it; stop them on SIGTERM/SIGINT (the floor of
    `--workers n`: what the kernel's spreading of connections over processes costs without any service)."""
    with socket.socket() as s:  # a free port; the children bind it with SO_REUSEPORT
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "tests.bench.echo", "--response-bytes", str(response_bytes)]
    cmd += ["--unary-response-bytes", str(unary_response_bytes), "--port", str(port)]
    children = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(n)]
    for child in children:
        assert child.stdout is not None
        json.loads(child.stdout.readline())  # listening
    print(json.dumps({"port": port, "pid": os.getpid()}), flush=True)
    stopped = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopped.set())
    stopped.wait()
    for child in children:
        child.terminate()
    for child in children:
        child.wait(timeout=10)
    return 0


if __name__ == "__main__":
    main()
