"""Test helper: the real server (`service.server.start`) on 127.0.0.1:0, on its own event loop in a thread.

Blocking gRPC clients (the generated stubs, `service.client.Client`) can then call it from the test thread.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from service.config import Settings
from service.server import RunningServer, start


def make_settings(repository: Path, **overrides: Any) -> Settings:
    """Settings for a test server: loopback, free ports, fast sweeps."""
    values: dict[str, Any] = dict(
        model_repository=repository, grpc_host="127.0.0.1", grpc_port=0, metrics_port=0, sweep_interval_s=0.1
    )
    values.update(overrides)
    return Settings(**values)


class ServerThread:
    """A started server; `stop()` drains it and ends the loop thread."""

    def __init__(self, settings: Settings) -> None:
        self.registry = CollectorRegistry()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.running: RunningServer = self.call(start(settings, registry=self.registry), timeout=60)
        self.address = f"127.0.0.1:{self.running.port}"

    def call(self, coro: Any, timeout: float = 30) -> Any:
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=timeout)

    def stop(self, grace: float = 0) -> None:
        """Stop the server (idempotent) and the loop."""
        try:
            self.call(self.running.stop(grace))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)


class ServerProcess:
    """`python -m service.server` as a real subprocess on free loopback ports (for signals and the CLI)."""

    def __init__(
        self,
        repository: Path,
        *extra: str,
        env: dict[str, str] | None = None,
        server: list[str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        """`server`: the command that starts it (default `python -m service.server` from the checkout)."""
        import os
        import re
        import subprocess
        import sys
        import time

        root = Path(__file__).resolve().parents[2]
        cmd = [
            *(server or [sys.executable, "-m", "service.server"]),
            "--model-repository",
            str(repository),
            "--grpc-host",
            "127.0.0.1",
            "--grpc-port",
            "0",
            "--metrics-port",
            "0",
            *extra,
        ]
        self.proc = subprocess.Popen(
            cmd,
            cwd=cwd or root,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.lines: list[str] = []
        deadline = time.monotonic() + 60
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.lines.append(line)
            found = re.search(r"gRPC 127\.0\.0\.1:(\d+) \| metrics http://127\.0\.0\.1:(\d+)/metrics", line)
            if found:
                self.port, self.metrics_port = int(found.group(1)), int(found.group(2))
                self.address = f"127.0.0.1:{self.port}"
                threading.Thread(target=self._drain_output, daemon=True).start()
                return
        self.proc.kill()
        raise RuntimeError("server did not start:\n" + "".join(self.lines))

    def _drain_output(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def stop(self) -> None:
        """Kill the process if it still runs."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)


class CuttableProxy:
    """A loopback TCP proxy; `cut()` resets every open connection (the listener stays up)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                down, _ = self.listener.accept()
            except OSError:
                return
            up = socket.create_connection(self.upstream)
            with self.lock:
                self.conns += [down, up]
            threading.Thread(target=self._pump, args=(down, up), daemon=True).start()
            threading.Thread(target=self._pump, args=(up, down), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        with self.lock:
            conns, self.conns = self.conns, []
        for s in conns:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST
            s.close()

    def close(self) -> None:
        self.closed = True
        self.listener.close()
        self.cut()
