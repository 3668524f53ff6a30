"""Tens of thousands of open streams on one server process: tail latency, CPU per step, memory, loop stalls.

`python -m tests.bench.streams [--quick] [--long S] [--out DIR]` (`make bench-streams`; `make bench` runs it
too) starts the real server (`--workers 1`, default settings otherwise) on the shipped `default` model and
client processes that hold the streams, 100 per connection (tests/bench/stream_clients.py). It opens 64,
then 1,000, 10,000 and 20,000 streams on the same server (each stream opens its session and applies one step,
so its state row is written), and at each count paces 1,000 and 2,000 steps/s spread over all open streams
(open loop per stream: latency counts from the scheduled send, so a stall is charged to every step it delays).
At 20,000 streams each stream steps once every 20 s: every step is one of a stream that was idle. At 64 open
streams it also runs them closed loop (saturation), the CPU-per-step reference.

Measured per run: p50 / p99 / max latency, p99 per window, server CPU per step (the server process's CPU
seconds over the run / steps answered in it), the longest event-loop stall and full-collection pause (the
server's `rnnserve_event_loop_lag_seconds` and `rnnserve_gc_pause_seconds` histograms: bucket upper bounds).
Memory: the server's RSS per open stream against a bare grpc.aio bidi echo holding the same streams in the
same run, and RSS after every stream closed against before they opened. `--long S` adds an S-second run at
1,000 steps/s over 64 and over 20,000 streams with 30 s windows (the target is judged per window). Writes
`streams.{json,md,png}` to `--out` (default docs/bench; `--quick`: docs/bench/quick).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from prometheus_client.parser import text_string_to_metric_families
from tqdm import tqdm

from tests.bench.ceiling import measure_ceiling
from tests.bench.servers import ServerProcess, scrape_batch_sizes, start_echo, start_service
from tests.bench.service_drivers import stream_message_sizes
from tests.bench.stream_clients import StreamClients, Target

OUT = Path("docs/bench")
REFERENCE_STREAMS = 64


@dataclass(frozen=True, slots=True)
class Plan:
    """What one run covers."""

    counts: tuple[int, ...] = (1000, 10_000, 20_000)
    rates: tuple[float, ...] = (1000.0, 2000.0)
    seconds: float = 20.0
    window_s: float = 10.0
    long_s: float = 0.0
    workers: int = 2
    settle_s: float = 8.0  # before reading RSS after streams closed (the quick run skips the second trim)
    server_flags: tuple[str, ...] = ()

    @staticmethod
    def quick() -> Plan:
        """Smoke-test size: well under a minute."""
        return Plan(counts=(200,), rates=(200.0,), seconds=1.5, window_s=0.75, settle_s=2.0)


@dataclass(slots=True)
class Row:
    """One paced (or closed-loop) run."""

    open_streams: int
    active_streams: int
    rate: float  # offered steps/s (0: closed loop)
    steps_per_s: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    server_cpu_us_per_step: float
    client_cores: float
    longest_loop_lag_ms: float
    longest_gc_pause_ms: float
    full_collections: float
    window_p99_ms: list[float] = field(default_factory=list)
    errors: int = 0
    first_error: str = ""


@dataclass(slots=True)
class Result:
    """Everything one run measured."""

    env: dict[str, Any]
    model: str
    state_bytes: int
    rows: list[Row] = field(default_factory=list)
    rss: dict[str, int] = field(default_factory=dict)  # service: "before", "<n>" open, "after"
    echo_rss: dict[str, int] = field(default_factory=dict)
    # What a step costs at least, measured in the same run: the bare echo's CPU per message (paced at the
    # first rate, and closed loop) over the reference streams, and raw ONNX Runtime's CPU per step at batch 1
    # (a paced step runs alone) and at the mean batch the server formed at saturation.
    floor: dict[str, float] = field(default_factory=dict)


def _histograms(metrics_port: int) -> dict[str, dict[str, float]]:
    """Cumulative bucket counts of the loop-lag and full-collection-pause histograms (le -> count)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    out: dict[str, dict[str, float]] = {"lag": {}, "gc2": {}}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "rnnserve_event_loop_lag_seconds_bucket":
                out["lag"][s.labels["le"]] = s.value
            elif s.name == "rnnserve_gc_pause_seconds_bucket" and s.labels.get("generation") == "2":
                out["gc2"][s.labels["le"]] = s.value
    return out


def _longest(before: dict[str, float], after: dict[str, float]) -> tuple[float, float]:
    """(upper bound in ms of the largest value observed between two readings, how many were observed)."""
    bounds = sorted(after, key=float)
    delta = [after[b] - before.get(b, 0.0) for b in bounds]
    total = delta[-1] if delta else 0.0
    longest = 0.0
    for i, b in enumerate(bounds):
        below = delta[i - 1] if i else 0.0
        if delta[i] > below:
            longest = float(b) * 1e3
    return longest, total


def _cpu(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def _rss(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


def _settled_rss(pid: int, wait_s: float, seconds: float = 8.0) -> int:
    """RSS once it stops falling, read no sooner than `wait_s` (the server trims a second after streams closed
    and again five seconds later)."""
    time.sleep(wait_s)
    last = _rss(pid)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now = _rss(pid)
        if now >= last - (1 << 20):
            return now
        last = now
    return last


def measure_run(
    server: ServerProcess, clients: StreamClients, rate: float, active: int, seconds: float, window_s: float
) -> Row:
    """One run of `seconds`: `active` streams at `rate` steps/s (0: closed loop)."""
    lead = 0.5
    hist0 = _histograms(server.metrics_port) if server.metrics_port else {}
    start = time.monotonic() + lead
    import threading

    cpu: list[float] = []

    def sample() -> None:
        for mark in (start, start + seconds):
            time.sleep(max(0.0, mark - time.monotonic()))
            cpu.append(_cpu(server.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    results = clients.run(rate, active, seconds, lead_s=lead)
    sampler.join()
    hist1 = _histograms(server.metrics_port) if server.metrics_port else {}
    ends = np.concatenate([r.ends for r in results])
    lat = np.concatenate([r.latencies_s for r in results]) * 1e3
    steps = int(((ends >= start) & (ends <= start + seconds)).sum())
    windows = []
    for w0 in np.arange(start, start + seconds - 1e-9, window_s):
        inside = lat[(ends >= w0) & (ends < w0 + window_s)]
        windows.append(float(np.percentile(inside, 99)) if inside.size else float("nan"))
    pct = np.percentile(lat, [50, 99]) if lat.size else [float("nan")] * 2
    lag, _ = _longest(hist0.get("lag", {}), hist1.get("lag", {}))
    gc_pause, full = _longest(hist0.get("gc2", {}), hist1.get("gc2", {}))
    return Row(
        open_streams=clients.open_streams,
        active_streams=active,
        rate=rate,
        steps_per_s=steps / seconds,
        p50_ms=float(pct[0]),
        p99_ms=float(pct[1]),
        max_ms=float(lat.max()) if lat.size else float("nan"),
        server_cpu_us_per_step=(cpu[1] - cpu[0]) / steps * 1e6 if steps and len(cpu) == 2 else float("nan"),
        client_cores=sum(r.cpu_s for r in results) / seconds,
        longest_loop_lag_ms=lag,
        longest_gc_pause_ms=gc_pause,
        full_collections=full,
        window_p99_ms=windows,
        errors=sum(r.errors for r in results),
        first_error=next((r.first_error for r in results if r.first_error), ""),
    )


def model_io(repository: Path, model: str) -> tuple[Target, int, tuple[str, str, tuple[int, ...]]]:
    """The stream target's input description, the state bytes per session and the data output."""
    import onnx

    versions = sorted(
        (p for p in (repository / model).iterdir() if p.name.isdigit()), key=lambda p: int(p.name)
    )
    m = onnx.load(str(versions[-1] / "model.onnx"), load_external_data=False)

    def describe(vi: Any) -> tuple[str, str, tuple[int, ...]]:
        t = vi.type.tensor_type
        return (
            vi.name,
            onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
            tuple(d.dim_value for d in t.shape.dim[2:]),
        )

    inp = next(i for i in m.graph.input if not i.name.startswith("state_in_"))
    out = next(o for o in m.graph.output if not o.name.startswith("state_out_"))
    state_bytes = 0
    for i in m.graph.input:
        if i.name.startswith("state_in_"):
            t = i.type.tensor_type
            n = int(np.prod([d.dim_value for d in t.shape.dim[1:]]))
            state_bytes += n * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)).itemsize
    name, dtype, tail = describe(inp)
    return Target("service", "", model, name, dtype, tail), state_bytes, describe(out)


def run(plan: Plan, repository: Path, model: str, bar: tqdm) -> Result:
    """Measure the service, then the echo (see the module docstring)."""
    target, state_bytes, output = model_io(repository, model)
    env = {
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpus": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "load_average_start": round(os.getloadavg()[0], 1),
        "plan": asdict(plan),
    }
    result = Result(env, model, state_bytes)
    server = start_service(repository, "--workers", "1", *plan.server_flags, timeout_s=180)
    clients = StreamClients(_replace(target, address=server.address), plan.workers)
    try:
        clients.open(REFERENCE_STREAMS)  # warm every code path, then close: "before" is a warm, empty server
        clients.close()
        result.rss["before"] = _settled_rss(server.pid, plan.settle_s)
        clients.open(REFERENCE_STREAMS)
        result.rss[str(REFERENCE_STREAMS)] = _rss(server.pid)
        bar.update()
        if plan.long_s:
            result.rows.append(
                measure_run(server, clients, plan.rates[0], REFERENCE_STREAMS, plan.long_s, 30.0)
            )
            bar.update()
        for rate in plan.rates:
            result.rows.append(
                measure_run(server, clients, rate, REFERENCE_STREAMS, plan.seconds, plan.window_s)
            )
            bar.update()
        assert server.metrics_port
        batches0 = scrape_batch_sizes(server.metrics_port, model)
        result.rows.append(measure_run(server, clients, 0.0, REFERENCE_STREAMS, plan.seconds, plan.window_s))
        batches = scrape_batch_sizes(server.metrics_port, model).minus(batches0)
        result.floor["saturation_mean_batch"] = batches.mean
        bar.update()
        for n in plan.counts:
            clients.open(n)
            result.rss[str(n)] = _rss(server.pid)
            bar.update()
            for rate in plan.rates:
                result.rows.append(measure_run(server, clients, rate, n, plan.seconds, plan.window_s))
                bar.set_postfix_str(f"{n:,} streams @ {rate:,.0f}/s: p99 {result.rows[-1].p99_ms:.1f} ms")
                bar.update()
        if plan.long_s:
            top = max(plan.counts)
            result.rows.append(measure_run(server, clients, plan.rates[0], top, plan.long_s, 30.0))
            bar.update()
        clients.close()
        result.rss["after"] = _settled_rss(server.pid, plan.settle_s)
        bar.update()
    finally:
        clients.stop()
        server.stop()
    req, resp = stream_message_sizes(_load_spec(target), output)
    echo = start_echo(resp)
    clients = StreamClients(Target("echo", echo.address, echo_request_bytes=req), plan.workers)
    try:
        clients.open(REFERENCE_STREAMS)
        clients.close()
        result.echo_rss["before"] = _settled_rss(echo.pid, 1.0)
        for n in (REFERENCE_STREAMS, *plan.counts):
            clients.open(n)
            result.echo_rss[str(n)] = _rss(echo.pid)
            if n == REFERENCE_STREAMS:
                paced = measure_run(echo, clients, plan.rates[0], n, plan.seconds, plan.window_s)
                closed = measure_run(echo, clients, 0.0, n, plan.seconds, plan.window_s)
                result.floor["echo_paced_cpu_us"] = paced.server_cpu_us_per_step
                result.floor["echo_saturation_cpu_us"] = closed.server_cpu_us_per_step
            bar.update()
        clients.close()
        result.echo_rss["after"] = _settled_rss(echo.pid, 1.0)
    finally:
        clients.stop()
        echo.stop()
    model_file = max((repository / model).glob("*/model.onnx"), key=lambda p: int(p.parent.name))
    batch = max(1, round(result.floor.get("saturation_mean_batch", 1.0)))
    for key, b in (("ort_batch1_cpu_us", 1), ("ort_saturation_cpu_us", batch)):
        result.floor[key] = 1e6 / measure_ceiling(model_file, b, 1, seconds=2.0).steps_per_cpu_s
    result.env["load_average_end"] = round(os.getloadavg()[0], 1)
    return result


def _replace(target: Target, **kw: Any) -> Target:
    d = asdict(target)
    d.update(kw)
    d["input_tail"] = tuple(d["input_tail"])
    return Target(**d)


def _load_spec(target: Target) -> Any:
    from tests.bench.loadgen import LoadSpec

    return LoadSpec(
        "stream", "", 1, 1, 0.0, 1.0, model=target.model, input_name=target.input_name,
        input_dtype=target.input_dtype, input_tail=target.input_tail,
    )  # fmt: skip


def steps_total(plan: Plan) -> int:
    """Progress-bar units of a plan."""
    long_runs = 2 if plan.long_s else 0
    return (
        1
        + len(plan.rates)
        + 1
        + len(plan.counts) * (1 + len(plan.rates))
        + long_runs
        + 1
        + 1
        + len(plan.counts)
    )


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write streams.{json,md,png}."""
    from tests.bench import streams_report

    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.streams", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help="smoke-test size (well under a minute)")
    parser.add_argument(
        "--long", type=float, default=0.0, help="add S-second runs at the first rate (64 / top)"
    )
    parser.add_argument("--seconds", type=float, default=None, help="seconds per paced run")
    parser.add_argument("--counts", default=None, help="open-stream counts, comma-separated")
    parser.add_argument("--repository", type=Path, default=Path("models/repository"))
    parser.add_argument("--model", default="default")
    parser.add_argument("--out", type=Path, default=None, help=f"results folder (default {OUT})")
    parser.add_argument("--server-flag", action="append", default=[], help="extra server flag (repeatable)")
    args = parser.parse_args(argv)
    plan = Plan.quick() if args.quick else Plan()
    changes: dict[str, Any] = {"long_s": args.long, "server_flags": tuple(args.server_flag)}
    if args.seconds:
        changes["seconds"] = args.seconds
    if args.counts:
        changes["counts"] = tuple(int(c) for c in args.counts.split(","))
    plan = Plan(**{**asdict(plan), **changes})
    out = args.out or (OUT / "quick" if args.quick else OUT)
    tmp = Path(tempfile.mkdtemp(prefix="rnnserve-bench-streams-"))
    try:
        repo = tmp / "repository"
        repo.mkdir()
        # The newest version only (what new sessions get): the server loads and self-checks nothing else.
        src, dst = args.repository / args.model, repo / args.model
        newest = max((p for p in src.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
        shutil.copytree(newest, dst / newest.name)
        if (src / "config.yaml").exists():
            shutil.copy(src / "config.yaml", dst / "config.yaml")
        with tqdm(total=steps_total(plan), desc="open streams", unit="step", file=sys.stderr) as bar:
            result = run(plan, repo, args.model, bar)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    data = {
        "env": result.env,
        "model": result.model,
        "state_bytes": result.state_bytes,
        "rss": result.rss,
        "echo_rss": result.echo_rss,
        "floor": result.floor,
        "rows": [asdict(r) for r in result.rows],
    }
    (out / "streams.json").write_text(json.dumps(data, indent=2))
    text = streams_report.render(data)
    (out / "streams.md").write_text(text)
    streams_report.plot(data, out / "streams.png")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
