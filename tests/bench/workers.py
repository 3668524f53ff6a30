"""1 vs 2 worker processes (`--workers N`): native `Stream` and KServe unary `ModelInfer` at 64 streams.

`python -m tests.bench.workers [--duration S] [--repeats N] [--out DIR]` starts the real server on the
benchmark reference LSTM (tests/bench/refmodel.py) once per (workers, protocol), drives it with the load
generator's client processes (64 sequences in all, closed loop, one step per message) and reads, over the
measurement window: steps/s, the server's CPU (supervisor and workers) as cores, steps per server core-second,
the clients' CPU, and the share of calls a worker forwarded to another (`rnnserve_forwarded_total`). Each
client process opens 4 connections and keeps each sequence on one of them, as a Triton client keeps a
sequence on its channel (the kernel spreads connections, not calls, over the workers). On a 2-core machine
the clients compete with the server for the cores, so both figures matter. Writes
`docs/bench/workers.{json,md,png}` (the README includes the markdown). `make bench` runs it after the suite.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import tempfile
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm
from tritonclient.grpc import service_pb2, service_pb2_grpc

from tests.bench.drivers import Driver
from tests.bench.kserve_drivers import infer_request
from tests.bench.loadgen import LoadResult, LoadSpec, cpu_count, run_load
from tests.bench.refmodel import RefModelConfig, write_reference_repository
from tests.bench.servers import start_echo, start_service

if TYPE_CHECKING:
    import grpc

STREAMS = 64
PROTOCOLS = {"Stream": "stream", "KServe unary": "kserve_unary"}
# The floors, with the same message sizes: the no-op echo as 1 process and as 2 sharing the port.
FLOORS = {"bidi echo": ("echo", "Stream"), "unary echo": ("unary_echo", "KServe unary")}
OUT = Path("docs/bench")


class KServeUnaryDriver(Driver):
    """One KServe sequence stepped with unary `ModelInfer` calls (start on `open`, end on `close`)."""

    def __init__(self, spec: LoadSpec, channel: grpc.aio.Channel) -> None:
        self._stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        self.sequence_id = int.from_bytes(os.urandom(7), "little") | 1
        self._req = infer_request(spec, self.sequence_id)

    async def _call(self, start: bool = False, end: bool = False) -> None:
        req = self._req
        if start or end:
            req = service_pb2.ModelInferRequest()
            req.CopyFrom(self._req)
            req.parameters["sequence_start" if start else "sequence_end"].bool_param = True
        resp = await self._stub.ModelInfer(req, timeout=30)
        if not resp.raw_output_contents and not resp.outputs:
            raise RuntimeError(f"sequence {self.sequence_id}: answer without outputs")

    async def open(self) -> None:
        await self._call(start=True)

    async def step(self) -> None:
        await self._call()

    async def close(self) -> None:
        await self._call(end=True)


@dataclass(slots=True)
class Row:
    """One measured configuration (the median run of `repeats` by steps/s; the upper one of an even count)."""

    workers: int
    protocol: str
    steps_per_s: float
    server_cores: float
    steps_per_core_s: float
    client_cores: float
    p50_ms: float
    p99_ms: float
    errors: int
    forwarded: float = 0.0  # calls (or stream messages) forwarded to another worker, per step served


def forwarded_total(metrics_port: int | None) -> float:
    """Sum of `rnnserve_forwarded_total` over methods on the server's /metrics (0 when it has none)."""
    if not metrics_port:
        return 0.0
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return sum(float(v) for v in re.findall(r"^rnnserve_forwarded_total\{[^}]*\} (\S+)$", text, re.M))


def _echo_sizes(repository: Path) -> dict[str, tuple[int, int]]:
    """(request, response) bytes of one step's message, per echo target (sized like the service's)."""
    from tests.bench.kserve_drivers import kserve_message_sizes
    from tests.bench.service_drivers import stream_message_sizes
    from tests.bench.streams import model_io

    _, _, output = model_io(repository, "ref_lstm")
    spec = _spec("stream", "", 1.0, 1)
    return {
        "echo": stream_message_sizes(spec, output),
        "unary_echo": kserve_message_sizes(spec, output),
    }


def _spec(
    target: str, address: str, duration_s: float, client_procs: int, request_bytes: int = 0
) -> LoadSpec:
    return LoadSpec(
        target,
        address,
        STREAMS,
        client_procs,
        warmup_s=2.0,
        duration_s=duration_s,
        request_bytes=request_bytes,
        model="ref_lstm",
        input_name="x",
        input_dtype="float32",
        input_tail=(RefModelConfig().features,),
        # Several connections per client process, as a client with several channels has: the kernel
        # spreads connections (not calls) over the workers; one connection pins a client to one worker.
        channels_per_worker=4,
    )


def measure_echo(
    sizes: dict[str, tuple[int, int]], processes: int, floor: str, duration_s: float, client_procs: int
) -> Row:
    """The same window against the no-op echo run as `processes` processes on one port."""
    target = FLOORS[floor][0]
    req, resp = sizes[target]
    echo = start_echo(resp, resp, processes) if target == "echo" else start_echo(0, resp, processes)
    try:
        res = run_load(_spec(target, echo.address, duration_s, client_procs, req), echo.pid)
    finally:
        echo.stop()
    return _row(processes, floor, res)


def measure(repository: Path, workers: int, protocol: str, duration_s: float, client_procs: int) -> Row:
    """Start the server with `--workers`, run one load window, stop it."""
    server = start_service(repository, "--workers", str(workers), timeout_s=180)
    try:
        spec = _spec(PROTOCOLS[protocol], server.address, duration_s, client_procs)
        marks: dict[str, float] = {}

        def on_window(edge: str) -> None:
            marks[edge] = forwarded_total(server.metrics_port)

        res = run_load(spec, server.pid, on_window)
    finally:
        server.stop()
    if res.errors:
        print(f"{protocol}, {workers} workers: {res.errors} errors, first: {res.first_error}")
    steps = res.steps_per_s * duration_s
    forwarded = (marks.get("end", 0.0) - marks.get("start", 0.0)) / steps if steps else 0.0
    return _row(workers, protocol, res, forwarded)


def _row(workers: int, protocol: str, res: LoadResult, forwarded: float = 0.0) -> Row:
    per_core = res.steps_per_s / res.server_cpu_cores if res.server_cpu_cores > 0 else float("nan")
    return Row(
        workers, protocol, res.steps_per_s, res.server_cpu_cores, per_core, res.client_cpu_cores,
        res.p50_ms, res.p99_ms, res.errors, forwarded,
    )  # fmt: skip


def render(rows: list[Row], env: dict[str, Any]) -> str:
    """The markdown table the README includes, with the ratios the target is judged on."""
    lines = [
        f"{STREAMS} closed-loop sequences, one step per message, reference LSTM (H=256, 2 layers); "
        f"{env['cpus']} cores shared by server and clients; median of {env['repeats']} runs of "
        f"{env['duration_s']:g} s each ([workers.json](workers.json), `python -m tests.bench.workers`); load "
        f"average {env['load_average_start']:g} at start, {env['load_average_end']:g} at end (other work on "
        "the machine takes cores from server and clients alike).",
        "",
        "| API | workers | steps/s | server cores | steps per server core-s | client cores | p50 ms | p99 ms"
        " | forwarded |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.protocol} | {r.workers} | {r.steps_per_s:,.0f} | {r.server_cores:.2f} | "
            f"{r.steps_per_core_s:,.0f} | {r.client_cores:.2f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | "
            f"{r.forwarded:.0%} |"
        )
    lines.append("")
    floors = {protocol: floor for floor, (_, protocol) in FLOORS.items()}
    for protocol in PROTOCOLS:
        one, two = _pair(rows, protocol)
        if one and two:
            text = (
                f"- {protocol}: 2 workers give {two.steps_per_s / one.steps_per_s:.2f}x the steps/s of 1 and "
                f"{two.steps_per_core_s / one.steps_per_core_s:.2f}x its steps per server core-second "
                "(target: > 1 and >= 0.8)"
            )
            e1, e2 = _pair(rows, floors.get(protocol, ""))
            if e1 and e2:
                text += (
                    f"; the {floors[protocol]} (no service at all) as 2 processes on one port: "
                    f"{e2.steps_per_s / e1.steps_per_s:.2f}x and "
                    f"{e2.steps_per_core_s / e1.steps_per_core_s:.2f}x"
                )
            lines.append(text + ".")
    return "\n".join(lines) + "\n"


def _pair(rows: list[Row], protocol: str) -> tuple[Row | None, Row | None]:
    one = next((r for r in rows if r.protocol == protocol and r.workers == 1), None)
    two = next((r for r in rows if r.protocol == protocol and r.workers == 2), None)
    return one, two


def plot(rows: list[Row], path: Path) -> None:
    """Steps/s and steps per server core-second, 1 vs 2 workers, per API (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    protocols = [*PROTOCOLS, *FLOORS]
    x = np.arange(len(protocols))
    for ax, field, title in (
        (axes[0], "steps_per_s", "steps/s"),
        (axes[1], "steps_per_core_s", "steps per server core-second"),
    ):
        for i, w in enumerate((1, 2)):
            vals = [
                next((getattr(r, field) for r in rows if r.protocol == p and r.workers == w), 0)
                for p in protocols
            ]
            ax.bar(x + (i - 0.5) * 0.38, vals, 0.38, label=f"{w} worker{'s' if w > 1 else ''}")
        ax.set_xticks(x, protocols)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"--workers 1 vs 2, {STREAMS} sequences ({cpu_count()} cores shared with the clients)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Run the comparison and write the report files."""
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.workers", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--duration", type=float, default=8.0, help="measurement window per run, seconds")
    parser.add_argument("--repeats", type=int, default=3, help="runs per configuration (median kept)")
    parser.add_argument("--clients", type=int, default=2, help="client processes")
    parser.add_argument("--out", type=Path, default=OUT, help="folder for workers.{json,md,png}")
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="rnnserve-bench-workers-"))
    rows: list[Row] = []
    load_start = os.getloadavg()[0]
    try:
        write_reference_repository(tmp)
        sizes = _echo_sizes(tmp)
        plan = [(w, p) for p in (*PROTOCOLS, *FLOORS) for w in (1, 2)]
        with tqdm(total=len(plan) * args.repeats, desc="workers bench", unit="run") as bar:
            for w, p in plan:
                runs = []
                for _ in range(args.repeats):
                    if p in FLOORS:
                        runs.append(measure_echo(sizes, w, p, args.duration, args.clients))
                    else:
                        runs.append(measure(tmp, w, p, args.duration, args.clients))
                    bar.update()
                rows.append(sorted(runs, key=lambda r: r.steps_per_s)[len(runs) // 2])  # the (upper) median
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    env = {
        "cpus": cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "duration_s": args.duration,
        "repeats": args.repeats,
        "client_processes": args.clients,
        "streams": STREAMS,
        "load_average_start": round(load_start, 1),
        "load_average_end": round(os.getloadavg()[0], 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "workers.json").write_text(
        json.dumps({"env": env, "rows": [asdict(r) for r in rows]}, indent=2)
    )
    (args.out / "workers.md").write_text(render(rows, env))
    plot(rows, args.out / "workers.png")
    print(render(rows, env))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
