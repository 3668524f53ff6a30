"""The processes under test: one redis-server with persistence on, and replicas on fixed loopback ports.

Both can be killed, paused and restarted in place (same port, same data directory), so clients keep their
channels and the store keeps what it acknowledged: Redis runs with `appendonly yes` and `appendfsync always`,
the setting under which an acknowledged write survives a SIGKILL of Redis itself (docs/DESIGN.md).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import redis

from tests.deploy.redis_server import free_port
from tests.deploy.replicas import Replica, start_replica

CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
]


@dataclass
class ChaosRedis:
    """redis-server with AOF persistence (fsync on every write), restartable on its port."""

    workdir: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(
                "redis-server is not installed (Debian package redis-server; make system-deps)"
            )
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.workdir),
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
                "--protected-mode",
                "yes",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if client.ping():
                    return
            except (redis.ConnectionError, redis.BusyLoadingError, redis.TimeoutError):
                time.sleep(0.05)
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}")
        raise RuntimeError("redis-server did not answer PING in 20 s")

    def send(self, sig: int) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)

    def restart(self, sig: int = signal.SIGKILL) -> None:
        """Stop with `sig` (SIGKILL: a crash; SIGTERM: a clean shutdown) and start again on the same port."""
        assert self.process is not None
        self.send(sig)
        self.process.wait(30)
        self.start()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class Cluster:
    """Replicas r0..r{n-1} on fixed ports sharing `redis`; a channel per replica that outlives restarts."""

    def __init__(self, workdir: Path, repository: Path, redis_server: ChaosRedis, n: int, **settings: object):
        self.workdir, self.repository, self.redis = workdir, repository, redis_server
        self.settings = dict(store="redis", redis_url=redis_server.url, store_flush_every=1, **settings)
        self.ports = [free_port() for _ in range(n)]
        self.replicas: list[Replica | None] = [None] * n
        self.channels = [grpc.insecure_channel(f"127.0.0.1:{p}", options=CHANNEL_OPTIONS) for p in self.ports]
        self.lock = threading.Lock()
        self.starts = 0

    def start(self, i: int, attempts: int = 5) -> Replica:
        """Start replica i; like a pod supervisor, start it again if it exits at once (Redis down)."""
        for attempt in range(attempts):
            with self.lock:
                n = self.starts
                self.starts += 1
            try:
                r = start_replica(
                    f"r{i}-{n}", self.workdir, self.repository, start_timeout_s=120, grpc_port=self.ports[i],
                    **self.settings,
                )
            except RuntimeError:
                if attempt == attempts - 1:
                    raise
                time.sleep(0.5 * (attempt + 1))
                continue
            self.replicas[i] = r
            return r
        raise AssertionError("unreachable")

    def start_all(self) -> None:
        """Start every replica (in parallel: each takes a few seconds to import and load)."""
        threads = [threading.Thread(target=self.start, args=(i,)) for i in range(len(self.ports))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        missing = [i for i, r in enumerate(self.replicas) if r is None]
        if missing:
            raise RuntimeError(f"replicas {missing} did not start")

    def pid(self, i: int) -> int | None:
        r = self.replicas[i]
        return None if r is None or r.process.poll() is not None else r.process.pid

    def kill(self, i: int) -> None:
        """SIGKILL replica i (a crashed pod), then start it again."""
        r = self.replicas[i]
        if r is not None and r.process.poll() is None:
            r.process.send_signal(signal.SIGCONT)
            r.kill()
        self.start(i)

    def terminate(self, i: int) -> None:
        """SIGTERM replica i (a drained pod), wait for it to exit, then start it again."""
        r = self.replicas[i]
        if r is not None:
            r.process.send_signal(signal.SIGCONT)
            r.stop()
        self.start(i)

    def pause(self, i: int, seconds: float) -> None:
        """SIGSTOP replica i for `seconds` (a GC pause, a slow node), then SIGCONT."""
        pid = self.pid(i)
        if pid is None:
            return
        os.kill(pid, signal.SIGSTOP)
        time.sleep(seconds)
        os.kill(pid, signal.SIGCONT)

    def stop_all(self) -> None:
        for r in self.replicas:
            if r is not None:
                if r.process.poll() is None:
                    r.process.send_signal(signal.SIGCONT)
                r.stop()
        for ch in self.channels:
            ch.close()
