"""Worker processes behind one port: `--workers N` (default: the CPUs this container may use).

One Python process serves about one core (its event loop saturates first), so the supervisor starts N worker
processes (`python -m service.server.worker K N RUN_DIR -- <flags>`). Each is the ordinary server
(`app.start`) with three differences: its gRPC port is shared with the others through SO_REUSEPORT (the kernel
spreads new connections over them), it also listens on its own Unix socket, and it routes every call to the
worker that owns the call's session (`service.server.routing`). Worker k has replica id `<replica id>-w<k>`
and session ids `w<k>.<random>`; a replacement for worker k gets the same identity, so with the shared store
on it takes over k's leases at once and resumes k's sessions on their next call.

The supervisor creates the run directory's KServe sequence owner table (`service.server.ownership`), which
every worker maps, binds nothing but /metrics (the workers' registries summed, `service.server.fleet`),
prints the listen line once every worker serves, restarts a worker that exits, and on SIGTERM/SIGINT sends
SIGTERM to every worker (each drains as a single server does) and waits for them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from service.config import Settings
from service.server.ownership import MAX_WORKERS, OWNER_TABLE, create_table

_log = logging.getLogger("rnnserve.supervisor")
RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 5.0)


def default_workers(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """Return the CPUs this process may use: the cgroup v2 quota (cpu.max, rounded up), else the affinity."""
    cpus = len(os.sched_getaffinity(0))
    with contextlib.suppress(OSError, ValueError):
        quota, period = (cgroup_root / "cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    return max(1, min(cpus, MAX_WORKERS))


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind((host.strip("[]"), 0))
        return int(s.getsockname()[1])


class Supervisor:
    """Start, watch, restart and stop the worker processes (module docstring)."""

    def __init__(self, settings: Settings, argv: list[str], workers: int) -> None:
        self.settings = settings
        self.argv = argv
        self.workers = workers
        self.port = settings.grpc_port or _free_port(settings.grpc_host)
        # The plaintext health port (when on) is shared by the workers too: a concrete one when 0 is asked.
        self.health_port = settings.health_port or _free_port(settings.grpc_host)
        self.run_dir = Path(tempfile.mkdtemp(prefix="rnnserve-workers-"))
        slots = 1 << max(settings.owner_table_slots - 1, 1).bit_length()  # a power of two, rounded up
        create_table(self.run_dir / OWNER_TABLE, slots)
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * workers
        self.restarts = [0] * workers
        self.stopping = False

    def command(self, k: int) -> list[str]:
        """Return worker k's command line: the supervisor's own flags, then the worker's identity on top."""
        return [
            sys.executable, "-m", "service.server.worker", str(k), str(self.workers),
            str(self.run_dir), "--", *self.argv,
            "--workers", "1", "--grpc-port", str(self.port), "--metrics-port", "-1",
            "--replica-id", f"{self.settings.replica_id}-w{k}", "--session-id-prefix", f"w{k}.",
            "--health-port", str(self.health_port),
        ]  # fmt: skip

    def spawn(self, k: int) -> None:
        """Start worker k (again)."""
        with contextlib.suppress(FileNotFoundError):
            (self.run_dir / f"w{k}.json").unlink()
        self.procs[k] = subprocess.Popen(self.command(k))

    def ready(self, k: int) -> dict[str, int] | None:
        """Worker k's announcement ({"pid", "metrics_port"}) once it serves, else None."""
        proc = self.procs[k]
        try:
            info = json.loads((self.run_dir / f"w{k}.json").read_text())
        except (OSError, ValueError):
            return None
        return info if proc is not None and info.get("pid") == proc.pid else None

    def wait_ready(self, timeout_s: float) -> None:
        """Block until every worker serves; SystemExit if one exits or the time runs out."""
        deadline = time.monotonic() + timeout_s
        while not all(self.ready(k) for k in range(self.workers)):
            for k, proc in enumerate(self.procs):
                if proc is not None and proc.poll() is not None:
                    self.stop()
                    raise SystemExit(f"worker {k} exited with code {proc.returncode} during start-up")
            if time.monotonic() > deadline or self.stopping:
                self.stop()
                raise SystemExit(f"workers did not start within {timeout_s:g}s")
            time.sleep(0.05)

    def watch(self, on_restart: object = None) -> None:
        """Restart workers that exit, until `stopping` is set (by SIGTERM/SIGINT)."""
        due: dict[int, float] = {}
        while not self.stopping:
            now = time.monotonic()
            for k, proc in enumerate(self.procs):
                if proc is None or proc.poll() is None:
                    continue
                if k not in due:
                    delay = RESTART_BACKOFF_S[min(self.restarts[k], len(RESTART_BACKOFF_S) - 1)]
                    _log.warning(
                        "worker %d (pid %d) exited with %s; restarting", k, proc.pid, proc.returncode
                    )
                    due[k] = now + (0.0 if self.restarts[k] == 0 else delay)
                if now >= due[k]:
                    del due[k]
                    self.restarts[k] += 1
                    if callable(on_restart):
                        on_restart(k, proc.pid)
                    self.spawn(k)
            time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM every worker (each drains), wait up to the drain grace (+5 s), then SIGKILL the rest."""
        self.stopping = True
        for proc in self.procs:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.settings.drain_grace_s + 5.0
        for proc in self.procs:
            if proc is None:
                continue
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(self.run_dir, ignore_errors=True)


def _models_line(sup: Supervisor) -> str:
    import grpc

    from service.proto import rnnserve_pb2 as pb
    from service.proto import rnnserve_pb2_grpc as pb_grpc

    with grpc.insecure_channel(f"unix:{sup.run_dir / 'w0.sock'}") as ch:
        try:
            answer = pb_grpc.RecurrentServiceStub(ch).ListModels(pb.ListModelsRequest(), timeout=10)
        except grpc.RpcError:
            return "(unknown)"
    return ", ".join(f"{m.name}:{m.version}" for m in answer.models) or "(none)"


def supervise(
    settings: Settings, argv: list[str], workers: int, banner: Callable[[Settings, int], str] | None = None
) -> None:
    """Run `workers` worker processes until SIGTERM/SIGINT (the `--workers N` > 1 path of `main()`)."""
    from service.server.fleet import start_metrics

    sup = Supervisor(settings, argv, workers)
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def on_signal(signum: int, frame: object) -> None:
        sup.stopping = True

    for sig in previous:
        signal.signal(sig, on_signal)
    metrics = None
    try:
        for k in range(workers):
            sup.spawn(k)
        sup.wait_ready(timeout_s=300)
        metrics = start_metrics(sup)
        host = settings.grpc_host if settings.grpc_host not in ("0.0.0.0", "::", "[::]", "") else "127.0.0.1"
        scheme = "https" if settings.metrics_tls else "http"
        metrics_text = f"{scheme}://{host}:{metrics.port}/metrics" if metrics is not None else "off"
        print(
            f"rnnserve listening: gRPC {settings.grpc_host}:{sup.port} | metrics {metrics_text} | "
            f"models {_models_line(sup)} | repository {settings.model_repository} | workers {workers}",
            flush=True,
        )
        if banner is not None:
            print(banner(settings, sup.port), flush=True)
        sup.watch(on_restart=metrics.retire if metrics is not None else None)
        print(f"rnnserve draining (grace {settings.drain_grace_s:g}s, {workers} workers)", flush=True)
    finally:
        sup.stop()
        if metrics is not None:
            metrics.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
