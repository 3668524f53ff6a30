"""Server processes under test: the real ``python -m service.server`` and the echo, each in its own process.

Each runs in a subprocess so its CPU time can be read off its pid (psutil) apart from the clients', and so a
crash or leak in one scenario cannot leak into the next.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

_LISTENING = re.compile(r"gRPC \S+:(\d+) \| metrics http://[^:]+:(\d+)/metrics")


@dataclass(slots=True)
class ServerProcess:
    """A started server subprocess."""

    proc: subprocess.Popen[str]
    port: int
    metrics_port: int | None = None
    log: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        """The server's process id (for psutil CPU/RSS readings)."""
        return self.proc.pid

    @property
    def address(self) -> str:
        """``127.0.0.1:port``."""
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not exit within 10 s."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_service(repository: Path, *flags: str, timeout_s: float = 60.0) -> ServerProcess:
    """Start the real server on a free loopback port serving ``repository``; wait until it listens.

    One process (``--workers 1``) unless ``flags`` ask for more: the floors it is compared with (the echo
    servers) are one process each, so a row's CPU and throughput compare like for like.
    """
    cmd = [
        sys.executable,
        "-m",
        "service.server",
        "--grpc-host",
        "127.0.0.1",
        "--grpc-port",
        "0",
        "--metrics-port",
        "0",
        "--model-repository",
        str(repository),
        "--log-level",
        "WARNING",
        "--workers",
        "1",
        *flags,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    log: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        log.append(line.rstrip())
        m = _LISTENING.search(line)
        if m:
            return ServerProcess(proc, int(m.group(1)), int(m.group(2)), log)
    proc.kill()
    raise RuntimeError("server did not start:\n" + "\n".join(log[-40:]))


def start_echo(response_bytes: int, unary_response_bytes: int = 0, processes: int = 1) -> ServerProcess:
    """Start the no-op echo server: ``response_bytes``-byte stream answers, ``unary_response_bytes`` unary;
    ``processes`` > 1: that many echo processes on one port (its pid is their parent's)."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.bench.echo",
            "--response-bytes",
            str(response_bytes),
            "--unary-response-bytes",
            str(unary_response_bytes),
            "--processes",
            str(processes),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    try:
        return ServerProcess(proc, int(json.loads(line)["port"]))
    except (ValueError, KeyError) as exc:
        proc.kill()
        raise RuntimeError(f"echo server did not start: {line!r}") from exc


def start_kserve_echo(answers: dict[str, bytes], folder: Path) -> ServerProcess:
    """Start the no-op KServe server (``tests.bench.kserve_echo``) answering with ``answers``."""
    from tests.bench.kserve_echo import write_answers

    path = folder / "kserve_echo_answers.json"
    write_answers(answers, path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.bench.kserve_echo", str(path)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    try:
        return ServerProcess(proc, int(json.loads(line)["port"]))
    except (ValueError, KeyError) as exc:
        proc.kill()
        raise RuntimeError(f"KServe echo did not start: {line!r}") from exc


@dataclass(frozen=True, slots=True)
class BatchHistogram:
    """Cumulative ``rnnserve_batch_size`` histogram of one model: bucket upper bound -> count, sum, count."""

    buckets: tuple[tuple[float, float], ...]
    total: float
    count: float

    def minus(self, earlier: BatchHistogram) -> BatchHistogram:
        """The batches formed between ``earlier`` and this reading."""
        before = dict(earlier.buckets)
        return BatchHistogram(
            tuple((le, c - before.get(le, 0.0)) for le, c in self.buckets),
            self.total - earlier.total,
            self.count - earlier.count,
        )

    @property
    def mean(self) -> float:
        """Mean sessions per ONNX Runtime run."""
        return self.total / self.count if self.count else float("nan")

    def quantile(self, q: float) -> float:
        """Upper bucket bound below which a fraction ``q`` of batches fall."""
        for le, c in self.buckets:
            if self.count and c >= q * self.count:
                return le
        return float("nan")


SERVER_HISTOGRAMS = (
    "rnnserve_batch_size",
    "rnnserve_request_seconds",
    "rnnserve_queue_seconds",
    "rnnserve_compute_seconds",
)


def scrape_histograms(metrics_port: int, model: str) -> dict[str, BatchHistogram]:
    """Read the server's batch-size and latency histograms for ``model`` (all versions summed)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    out: dict[str, BatchHistogram] = {}
    for fam in text_string_to_metric_families(text):
        if fam.name not in SERVER_HISTOGRAMS:
            continue
        buckets: dict[float, float] = {}
        total = count = 0.0
        for s in fam.samples:
            if s.labels.get("model") != model:
                continue
            if s.name.endswith("_bucket"):
                le = float(s.labels["le"])
                buckets[le] = buckets.get(le, 0.0) + s.value
            elif s.name.endswith("_sum"):
                total += s.value
            elif s.name.endswith("_count"):
                count += s.value
        out[fam.name] = BatchHistogram(tuple(sorted(buckets.items())), total, count)
    return out


def scrape_batch_sizes(metrics_port: int, model: str) -> BatchHistogram:
    """Read the server's Prometheus batch-size histogram for ``model`` (all versions summed)."""
    return scrape_histograms(metrics_port, model).get("rnnserve_batch_size", BatchHistogram((), 0.0, 0.0))
