"""Triton's own load generator, ``perf_analyzer`` (in the tritonclient 2.41 wheel), against the server.

A Triton user measures a server with ``perf_analyzer -i grpc -m MODEL --sequence-length N --concurrency-range
C [--streaming]``; this module runs exactly that against the server's KServe port and reads its ``-f`` CSV
(throughput, p50/p90/p95/p99 latency). perf_analyzer reports only client-side figures, so the server's CPU is
read here: the server process's CPU seconds over the whole perf_analyzer run, divided by the requests the
server counted over the same run (KServe ``ModelStatistics`` before and after), gives CPU per step; the
binary's own CPU (``wait4`` rusage) over the run's wall time gives the client's cores.

The binary needs ``libb64`` (Debian ``libb64-0d``) and ``libcudart`` (the ``nvidia-cuda-runtime-cu12`` wheel;
no GPU is used). tritonclient wheels after 2.41 ship a placeholder instead of the binary: ``probe`` fails
loudly with what to install rather than letting the benchmark skip the rows.
"""

from __future__ import annotations

import csv
import io
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

BINARY = Path(sys.executable).parent / "perf_analyzer"
STABILITY_PERCENTAGE = 1_000_000  # windows may differ 10,000-fold and still count as stable
INSTALL_HINT = (
    "perf_analyzer comes with the tritonclient 2.41 wheel (`pip install 'tritonclient[grpc]==2.41.0'`; later "
    "wheels ship a placeholder) and needs `apt-get install libb64-0d` and "
    "`pip install nvidia-cuda-runtime-cu12`"
)


@dataclass(frozen=True, slots=True)
class PerfRow:
    """One line of perf_analyzer's ``-f`` CSV (latencies in microseconds, as perf_analyzer writes them)."""

    concurrency: int
    throughput: float  # inferences/s (one sequence step each here)
    p50_us: float
    p90_us: float
    p95_us: float
    p99_us: float
    avg_us: float  # sum of the latency-breakdown columns (client send + network/server + client recv)


@dataclass(frozen=True, slots=True)
class PerfRun:
    """One perf_analyzer run with the server-side and client-side CPU read around it."""

    row: PerfRow
    wall_s: float
    client_cpu_s: float
    server_cpu_s: float
    server_requests: int  # requests the server counted (ModelStatistics) over the whole run
    output: str

    @property
    def server_cpu_us_per_step(self) -> float:
        """Server CPU seconds over the run / requests the server answered over the run, in microseconds."""
        return self.server_cpu_s / self.server_requests * 1e6 if self.server_requests else float("nan")


def _number(row: dict[str, str], *names: str) -> float:
    for name in names:
        value = row.get(name, "").strip()
        if value:
            return float(value)
    return float("nan")


def parse_csv(text: str) -> list[PerfRow]:
    """Parse perf_analyzer's ``-f`` CSV: a header line, then one line per concurrency level.

    Columns are looked up by name, so extra columns (``--verbose-csv``, newer releases) do not matter. Raises
    ``ValueError`` when a needed column is absent.
    """
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise ValueError("empty perf_analyzer CSV")
    reader = csv.DictReader(io.StringIO("\n".join(lines)))
    header = set(reader.fieldnames or [])
    needed = {"Concurrency", "Inferences/Second", "p50 latency", "p99 latency"}
    if not needed <= header:
        raise ValueError(f"perf_analyzer CSV lacks {sorted(needed - header)}; header: {sorted(header)}")
    breakdown = [
        c
        for c in (
            "Client Send",
            "Network+Server Send/Recv",
            "Server Queue",
            "Server Compute Input",
            "Server Compute Infer",
            "Server Compute Output",
            "Client Recv",
        )
        if c in header
    ]
    rows = []
    for r in reader:
        rows.append(
            PerfRow(
                concurrency=int(_number(r, "Concurrency")),
                throughput=_number(r, "Inferences/Second"),
                p50_us=_number(r, "p50 latency"),
                p90_us=_number(r, "p90 latency"),
                p95_us=_number(r, "p95 latency"),
                p99_us=_number(r, "p99 latency"),
                avg_us=sum(_number(r, c) for c in breakdown) if breakdown else float("nan"),
            )
        )
    return rows


def environment() -> dict[str, str]:
    """The process environment plus the CUDA runtime wheel's library folder on ``LD_LIBRARY_PATH``."""
    env = dict(os.environ)
    try:
        import nvidia.cuda_runtime as cudart  # only a shared library for the binary; no GPU is used

        lib = str(Path(next(iter(cudart.__path__))) / "lib")
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (lib, env.get("LD_LIBRARY_PATH", "")) if p)
    except ImportError:
        pass
    return env


def probe(binary: Path = BINARY) -> None:
    """Raise ``RuntimeError`` (with what to install) unless the perf_analyzer binary starts."""
    if not binary.exists():
        raise RuntimeError(f"{binary} not found. {INSTALL_HINT}")
    proc = subprocess.run(
        [str(binary), "--version"], capture_output=True, text=True, env=environment(), timeout=60
    )
    out = proc.stdout + proc.stderr
    if proc.returncode != 0 or not re.search(r"Perf Analyzer Version \d", out):
        raise RuntimeError(f"{binary} cannot run: {out.strip()[:500]}. {INSTALL_HINT}")


def command(
    binary: Path,
    address: str,
    model: str,
    concurrency: int,
    *,
    streaming: bool,
    shape: str,
    interval_ms: int,
    csv_path: Path,
) -> list[str]:
    """The perf_analyzer command line: a sequence per concurrent slot, sequences that outlast the run."""
    args = [
        str(binary),
        "-i",
        "grpc",
        "-u",
        address,
        "-m",
        model,
        "--sequence-length",
        "100000",
        "--concurrency-range",
        str(concurrency),
        # The input's time axis is dynamic: one step per request is T=1.
        "--shape",
        shape,
        "--input-data",
        "random",
        "--measurement-mode",
        "time_windows",
        "--measurement-interval",
        str(interval_ms),
        # Three windows, reported together: stability is not waited for (the machine is shared, and the
        # other load scenarios are medians of a fixed number of runs too). perf_analyzer still fails a run
        # whose windows differ by more than the stability percentage (max/min of throughput and of p99), so
        # it is set far out of reach.
        "--max-trials",
        "3",
        "--stability-percentage",
        str(STABILITY_PERCENTAGE),
        "--percentile",
        "99",
        "-f",
        str(csv_path),
    ]
    if streaming:
        args.append("--streaming")
    return args


def server_requests(address: str, model: str) -> int:
    """Requests the server has counted for ``model`` (KServe ModelStatistics, every version summed)."""
    import tritonclient.grpc as tc

    client = tc.InferenceServerClient(address)
    try:
        stats = client.get_inference_statistics(model)
        return sum(int(s.inference_stats.success.count) for s in stats.model_stats)
    finally:
        client.close()


def run(
    address: str,
    model: str,
    concurrency: int,
    server_pid: int,
    *,
    streaming: bool,
    shape: str,
    interval_ms: int,
    binary: Path = BINARY,
    timeout_s: float = 300.0,
    requests: Callable[[str, str], int] | None = None,
) -> PerfRun:
    """Run perf_analyzer once; raise ``RuntimeError`` with its output when it fails.

    ``requests(address, model)`` counts the requests the server has answered (default: KServe
    ModelStatistics); the difference over the run is the denominator of the server's CPU per step.
    """
    count = requests or server_requests
    server = psutil.Process(server_pid)
    with tempfile.TemporaryDirectory(prefix="perf-analyzer-") as tmp:
        csv_path = Path(tmp) / "out.csv"
        log_path = Path(tmp) / "out.log"
        cmd = command(
            binary,
            address,
            model,
            concurrency,
            streaming=streaming,
            shape=shape,
            interval_ms=interval_ms,
            csv_path=csv_path,
        )
        before = count(address, model)
        c0 = server.cpu_times()
        t0 = time.monotonic()
        with log_path.open("w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=environment())
        deadline = t0 + timeout_s
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.05)
        wall = time.monotonic() - t0
        c1 = server.cpu_times()
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4; tell Popen so
        after = count(address, model)
        output = log_path.read_text()
        if proc.returncode != 0 or not csv_path.exists():
            raise RuntimeError(
                f"perf_analyzer exited with {proc.returncode}: {' '.join(cmd)}\n{output[-3000:]}"
            )
        rows = parse_csv(csv_path.read_text())
    if len(rows) != 1:
        raise RuntimeError(f"expected one CSV row from perf_analyzer, got {len(rows)}:\n{output[-2000:]}")
    return PerfRun(
        row=rows[0],
        wall_s=wall,
        client_cpu_s=usage.ru_utime + usage.ru_stime,
        server_cpu_s=(c1.user + c1.system) - (c0.user + c0.system),
        server_requests=after - before,
        output=output,
    )
