"""Server replicas as real processes (`python -m service.server`), configured through RNNSERVE_* variables.

Each replica logs to its own file; its gRPC port (the server binds port 0) is read from the
"rnnserve listening: gRPC host:port" line that `service.server` prints once it serves.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_LISTENING = re.compile(r"rnnserve listening: gRPC [^\s]+:(\d+)")


@dataclass
class Replica:
    """One running server process."""

    name: str
    process: subprocess.Popen
    log: Path
    port: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def kill(self) -> None:
        """SIGKILL: no drain, no flush, no lease release (a crashed pod)."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def terminate(self) -> None:
        """SIGTERM: what the kubelet sends; the server drains (see service/server/app.py)."""
        self.process.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def mapped_files(self) -> str:
        """The process's memory map (which shared libraries it loaded)."""
        return Path(f"/proc/{self.process.pid}/maps").read_text()


def start_replica(
    name: str, workdir: Path, repository: Path, *, start_timeout_s: float = 30.0, **settings: object
) -> Replica:
    """Start a replica with `RNNSERVE_<KEY>=value` per keyword; wait until it serves (`start_timeout_s`)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RNNSERVE_")}
    env.update(
        {
            "RNNSERVE_GRPC_HOST": "127.0.0.1",
            "RNNSERVE_GRPC_PORT": "0",
            "RNNSERVE_METRICS_PORT": "-1",
            "RNNSERVE_MODEL_REPOSITORY": str(repository),
            "RNNSERVE_REPLICA_ID": name,
            "RNNSERVE_WORKERS": "1",  # one process per replica: its pid is what faults hit
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update({f"RNNSERVE_{k.upper()}": str(v) for k, v in settings.items()})
    log = workdir / f"replica-{name}.log"
    out = log.open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.server"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
    )
    out.close()
    replica = Replica(name, proc, log)
    deadline = time.monotonic() + start_timeout_s
    while time.monotonic() < deadline:
        m = _LISTENING.search(replica.log_text())
        if m:
            replica.port = int(m.group(1))
            return replica
        if proc.poll() is not None:
            raise RuntimeError(f"replica {name} exited with {proc.returncode}:\n{replica.log_text()}")
        time.sleep(0.05)
    replica.stop()
    raise RuntimeError(f"replica {name} did not start in {start_timeout_s} s:\n{replica.log_text()}")
