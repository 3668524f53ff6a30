"""The benchmark suite: every scenario and reference point, run in one go.

Each scenario starts its own server process (the real ``python -m service.server``, or the echo) and drives it
from separate client processes (``loadgen``) or with Triton's ``perf_analyzer``. Load scenarios are repeated
``repeats`` times and the median of each figure kept (the machine is shared; single runs are noisy).
Everything measured goes into one ``SuiteResult`` that ``report`` turns into JSON, a markdown table, PNG plots
and the targets verdict.

Paths measured on the reference model, one step per message unless said otherwise:

- the floors: a no-op grpc.aio bidi echo (``Chat``) and unary echo (``Call``), message sizes as the service's;
- native ``Stream`` (one session per stream), ``StreamMany`` (many sessions per message), ``Stream`` with
  batching off;
- KServe ``ModelStreamInfer`` from our own driver (one Triton sequence per stream; it can be paced);
- KServe ``ModelInfer`` and ``ModelStreamInfer`` from ``perf_analyzer`` at concurrency 1 and 64, against the
  server and against a no-op KServe server (``kserve_echo``: the floor with the same client);
- paced (open-loop) load at fractions of each path's own peak for ``Stream``, KServe streaming and
  ``StreamMany``;
- tens of thousands of open streams on one process (``tests.bench.streams``, in a subprocess of its own as
  the idle-memory scenario is: ``streams.{json,md,png}`` next to the suite's results).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from tqdm import tqdm

from tests.bench import perf_analyzer
from tests.bench.ceiling import CeilingPoint, measure_ceiling, stateless_seconds
from tests.bench.kserve_drivers import infer_request, kserve_message_sizes
from tests.bench.kserve_echo import capture, served_calls
from tests.bench.loadgen import LoadResult, LoadSpec, run_load
from tests.bench.position import PositionPoint, measure_positions
from tests.bench.refmodel import RefModelConfig, write_reference_repository
from tests.bench.servers import (
    BatchHistogram,
    ServerProcess,
    scrape_histograms,
    start_echo,
    start_kserve_echo,
    start_service,
)
from tests.bench.service_drivers import stream_message_sizes

REF_MODEL = "ref_lstm"
DEFAULT_REPOSITORY = Path("models/repository")

# Load-row systems (the ``system`` column of the results).
BIDI_ECHO = "bidi echo"
UNARY_ECHO = "unary echo"
STREAM = "Stream"
STREAM_MANY = "StreamMany"
NOBATCH = "Stream (batching off)"
KSERVE_STREAM = "KServe streaming"
PA_UNARY = "KServe unary (perf_analyzer)"
PA_STREAM = "KServe streaming (perf_analyzer)"
PA_ECHO_UNARY = "KServe echo unary (perf_analyzer)"
PA_ECHO_STREAM = "KServe echo streaming (perf_analyzer)"
ECHOES = (BIDI_ECHO, UNARY_ECHO, PA_ECHO_UNARY, PA_ECHO_STREAM)
PACED_TARGETS = {STREAM: "stream", KSERVE_STREAM: "kserve_stream", STREAM_MANY: "stream_many"}


def paced_name(system: str, fraction: float) -> str:
    """The system name of a paced run of ``system`` at ``fraction`` of its peak."""
    return f"{system} (paced, {fraction:.0%} of peak)"


@dataclass(frozen=True, slots=True)
class Plan:
    """What a run covers: the full suite or the ``--quick`` subset."""

    quick: bool
    one_step_streams: tuple[int, ...]
    chunk_streams: int = 64
    chunk_steps: int = 16
    warmup_s: float = 0.75
    duration_s: float = 3.0
    repeats: int = 3
    workers: int = 2
    many_sessions_per_message: int = 32
    positions: tuple[int, ...] = (1, 100, 1000)
    position_sessions: int = 3
    position_window: int = 10
    idle_sessions: int = 1_000_000
    ceiling_seconds: float = 1.5
    paced_fractions: tuple[float, ...] = (0.25, 0.5, 0.75)  # paced load, as fractions of the closed-loop peak
    reference_streams: int = 64  # the concurrency the targets compare at; paced runs use it too
    pa_concurrency: tuple[int, ...] = (1, 64)  # perf_analyzer --concurrency-range (and the unary echo's)
    pa_interval_ms: int = 2000  # perf_analyzer --measurement-interval (three windows per run)

    @staticmethod
    def make(quick: bool, repeats: int | None = None) -> Plan:
        """The full plan (~17 min on 2 cores) or the quick one (two to three minutes)."""
        if quick:
            return Plan(
                True,
                (1, 64),
                warmup_s=0.5,
                duration_s=1.5,
                repeats=repeats or 1,
                position_sessions=1,
                idle_sessions=20_000,
                ceiling_seconds=0.5,
                paced_fractions=(0.5,),
                pa_interval_ms=1000,
            )
        return Plan(False, (1, 64, 512), repeats=repeats or 3)


@dataclass(slots=True)
class LoadRow:
    """One load scenario: medians over repeats, plus every run's raw figures."""

    model: str
    system: str  # one of the names above (BIDI_ECHO, STREAM, ...), or a paced_name() of one
    streams: int  # concurrent gRPC streams
    sessions: int  # sessions stepped (StreamMany: streams x sessions per message)
    steps_per_message: int
    steps_per_s: float
    messages_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    client_cpu_cores: float
    server_cpu_cores: float
    server_cpu_us_per_step: float
    batch_mean: float = float("nan")
    batch_p50: float = float("nan")
    batch_p99: float = float("nan")
    batch_buckets: list[tuple[float, float]] = field(default_factory=list)
    rate_per_s: float = 0.0
    ceiling_steps_per_s: float = float("nan")  # raw ORT at this row's batch size, measured right after it
    ceiling_steps_per_cpu_s: float = float("nan")
    ceiling_batch: int = 0
    # Server-side latency (the engine's histograms; bucket upper bounds, so coarse): what the server itself
    # adds, apart from the gRPC transport and the load generator.
    server_request_p50_ms: float = float("nan")
    server_request_p99_ms: float = float("nan")
    server_queue_p50_ms: float = float("nan")
    server_queue_p99_ms: float = float("nan")
    server_compute_p50_ms: float = float("nan")
    server_compute_p99_ms: float = float("nan")
    errors: int = 0
    first_error: str = ""
    runs: list[dict[str, float]] = field(default_factory=list)


@dataclass(slots=True)
class SuiteResult:
    """Everything one run measured."""

    plan: Plan
    environment: dict[str, str | float | int]
    loads: list[LoadRow] = field(default_factory=list)
    ceilings: list[dict[str, float | int | str]] = field(default_factory=list)
    positions: list[dict[str, float | int | str]] = field(default_factory=list)
    memory: list[dict[str, float | int | str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _environment(quick: bool) -> dict[str, str | float | int]:
    import grpc
    import onnxruntime

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "mode": "quick" if quick else "full",
        "git_commit": commit,
        "cpus": len(os.sched_getaffinity(0)),
        "load_average_1m_at_start": os.getloadavg()[0],
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "grpcio": grpc.__version__,
        "machine": platform.machine(),
    }


def _merge_hists(hists: list[BatchHistogram]) -> BatchHistogram | None:
    """Sum histograms of the same metric (repeats of one scenario)."""
    if not hists:
        return None
    total = hists[0]
    for h in hists[1:]:
        other = dict(h.buckets)
        total = BatchHistogram(
            tuple((le, c + other.get(le, 0.0)) for le, c in total.buckets),
            total.total + h.total,
            total.count + h.count,
        )
    return total


def _median_row(
    model: str, system: str, spec: LoadSpec, results: list[LoadResult], hists: list[BatchHistogram | None]
) -> LoadRow:
    def med(attr: str) -> float:
        return float(np.median([getattr(r, attr) for r in results]))

    steps = med("steps_per_s")
    server = med("server_cpu_cores")
    row = LoadRow(
        model=model,
        system=system,
        streams=spec.streams,
        sessions=spec.streams * spec.sessions_per_message,
        steps_per_message=spec.steps_per_message,
        steps_per_s=steps,
        messages_per_s=med("messages_per_s"),
        p50_ms=med("p50_ms"),
        p95_ms=med("p95_ms"),
        p99_ms=med("p99_ms"),
        client_cpu_cores=med("client_cpu_cores"),
        server_cpu_cores=server,
        server_cpu_us_per_step=float(
            np.median(
                [r.server_cpu_cores / r.steps_per_s * 1e6 for r in results if r.steps_per_s > 0]
                or [float("nan")]
            )
        ),
        rate_per_s=spec.rate_per_s,
        errors=sum(r.errors for r in results),
        first_error=next((r.first_error for r in results if r.first_error), ""),
        runs=[
            {
                k: getattr(r, k)
                for k in ("steps_per_s", "p50_ms", "p99_ms", "client_cpu_cores", "server_cpu_cores")
            }
            for r in results
        ],
    )
    total = _merge_hists([h for h in hists if h is not None and h.count > 0])
    if total is not None:
        row.batch_mean, row.batch_p50, row.batch_p99 = total.mean, total.quantile(0.5), total.quantile(0.99)
        row.batch_buckets = list(total.buckets)
    return row


class Runner:
    """Runs the plan; owns the temporary model repository and the progress bar."""

    def __init__(self, plan: Plan, out: Path) -> None:
        # Before anything is measured: a missing perf_analyzer fails the run at once, not after 15 minutes.
        perf_analyzer.probe()
        self.plan = plan
        self.out = out
        self.tmp = Path(tempfile.mkdtemp(prefix="rnnserve-bench-"))
        self.repo = self.tmp / "repository"
        self.ref_cfg = RefModelConfig()
        self.ref_path = write_reference_repository(self.repo, self.ref_cfg, name=REF_MODEL)
        self.result = SuiteResult(plan, _environment(plan.quick))
        self.failures: list[str] = []  # measurements that could not be made (the run exits non-zero)
        self.models: dict[str, Path] = {REF_MODEL: self.ref_path}
        default = DEFAULT_REPOSITORY / "default"
        if plan.quick:
            self.result.notes.append("quick run: the default model is benchmarked only in the full run")
        elif default.is_dir():
            shutil.copytree(default, self.repo / "default")
            versions = sorted(
                (p for p in (self.repo / "default").iterdir() if p.name.isdigit()), key=lambda p: int(p.name)
            )
            if versions:
                self.models["default"] = versions[-1] / "model.onnx"
        else:
            self.result.notes.append(f"{default} not found: the default model was not benchmarked")
        self.bar = tqdm(total=self._count_steps(), desc="bench", unit="scenario", file=sys.stderr)

    def _many_sizes(self) -> set[int]:
        """One-step concurrencies that also run over ``StreamMany``."""
        p = self.plan
        return {n for n in (p.reference_streams, max(p.one_step_streams)) if n in p.one_step_streams}

    def _count_steps(self) -> int:
        """Progress-bar units: a load run, a perf_analyzer run; positions, ceilings and memory."""
        p = self.plan
        many = len(self._many_sizes()) + 1
        scenarios = len(p.one_step_streams) + 1
        pa = [c for c in p.pa_concurrency if c in p.one_step_streams]
        runs = extra = 0
        for model in self.models:
            runs += 2 * scenarios + many
            if model == REF_MODEL:
                # batching off; KServe streaming; unary echo; paced echo, Stream, KServe streaming, StreamMany
                runs += scenarios + len(p.one_step_streams) + len(pa) + 4 * len(p.paced_fractions)
                extra += 4 * len(pa)  # perf_analyzer, unary and streaming, against the echo and the server
        return runs * p.repeats + extra + 1 + 1 + 2 + 1

    def close(self) -> None:
        """Drop the temporary repository."""
        self.bar.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- model introspection -------------------------------------------------------------------------------
    def _io(self, model: str) -> tuple[tuple[str, str, tuple[int, ...]], tuple[str, str, tuple[int, ...]]]:
        """(name, dtype, dims after batch and time) of the model's first data input and output."""
        m = onnx.load(str(self.models[model]), load_external_data=False)

        def describe(vi: onnx.ValueInfoProto) -> tuple[str, str, tuple[int, ...]]:
            t = vi.type.tensor_type
            dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name
            dims = tuple(d.dim_value for d in t.shape.dim[2:])
            return vi.name, dtype, dims

        inp = next(i for i in m.graph.input if not i.name.startswith("state_in_"))
        out = next(o for o in m.graph.output if not o.name.startswith("state_out_"))
        return describe(inp), describe(out)

    def _spec(
        self,
        model: str,
        target: str,
        address: str,
        streams: int,
        steps: int,
        *,
        sessions_per_message: int = 1,
        rate: float = 0.0,
    ) -> LoadSpec:
        (iname, idtype, itail), out = self._io(model)
        spec = LoadSpec(
            target,
            address,
            streams,
            self.plan.workers if streams > 1 else 1,
            self.plan.warmup_s,
            self.plan.duration_s,
            steps_per_message=steps,
            model=model,
            input_name=iname,
            input_dtype=idtype,
            input_tail=itail,
            sessions_per_message=sessions_per_message,
            rate_per_s=rate,
        )
        if target == "echo":
            req, _ = stream_message_sizes(spec, out)
            spec = dataclasses.replace(spec, request_bytes=req)
        elif target == "unary_echo":
            req, _ = kserve_message_sizes(spec, out)
            spec = dataclasses.replace(spec, request_bytes=req)
        return spec

    # -- scenarios -----------------------------------------------------------------------------------------
    def _loads(self, model: str, items: list[tuple[str, ServerProcess, LoadSpec]]) -> list[LoadRow]:
        """Run each item ``repeats`` times, interleaved (item 1, item 2, ..., item 1, ...), one row per item.

        Interleaving puts the runs a ratio compares (service vs echo, batching on vs off) next to each other
        in time, so slow drifts in the machine's background load hit both sides alike. A service run is
        followed at once by raw ONNX Runtime at the batch size it formed, for the same reason.
        """
        results: list[list[LoadResult]] = [[] for _ in items]
        hists: list[list[BatchHistogram | None]] = [[] for _ in items]
        ceilings: list[list[CeilingPoint]] = [[] for _ in items]
        server_hists: list[dict[str, list[BatchHistogram]]] = [{} for _ in items]
        for _ in range(self.plan.repeats):
            for i, (_system, server, spec) in enumerate(items):
                marks: dict[str, dict[str, BatchHistogram]] = {}

                def on_window(
                    edge: str,
                    marks: dict[str, dict[str, BatchHistogram]] = marks,
                    server: ServerProcess = server,
                ) -> None:
                    if server.metrics_port:
                        marks[edge] = scrape_histograms(server.metrics_port, model)

                results[i].append(run_load(spec, server.pid, on_window))
                deltas = (
                    {k: v.minus(marks["start"][k]) for k, v in marks["end"].items() if k in marks["start"]}
                    if len(marks) == 2
                    else {}
                )
                for name, delta in deltas.items():
                    server_hists[i].setdefault(name, []).append(delta)
                hist = deltas.get("rnnserve_batch_size")
                hists[i].append(hist)
                if hist is not None and hist.count:
                    ceilings[i].append(
                        measure_ceiling(
                            self.models[model],
                            max(1, round(hist.mean)),
                            spec.steps_per_message,
                            seconds=self.plan.ceiling_seconds,
                        )
                    )
                self.bar.update()
        rows = []
        for i, (system, _server, spec) in enumerate(items):
            row = _median_row(model, system, spec, results[i], hists[i])
            for name, field_name in (
                ("rnnserve_request_seconds", "server_request"),
                ("rnnserve_queue_seconds", "server_queue"),
                ("rnnserve_compute_seconds", "server_compute"),
            ):
                merged = _merge_hists(server_hists[i].get(name, []))
                if merged is not None and merged.count:
                    setattr(row, f"{field_name}_p50_ms", merged.quantile(0.5) * 1e3)
                    setattr(row, f"{field_name}_p99_ms", merged.quantile(0.99) * 1e3)
            if ceilings[i]:
                row.ceiling_steps_per_s = float(np.median([c.steps_per_s for c in ceilings[i]]))
                row.ceiling_steps_per_cpu_s = float(np.median([c.steps_per_cpu_s for c in ceilings[i]]))
                row.ceiling_batch = int(np.median([c.batch for c in ceilings[i]]))
            if row.errors:
                self.result.notes.append(
                    f"{model} {system} {spec.streams}x{spec.steps_per_message}: {row.errors} "
                    f"errors, first: {row.first_error[:300]}"
                )
            self.bar.set_postfix_str(
                f"{system} {row.sessions}x{spec.steps_per_message}: {row.steps_per_s:,.0f} st/s"
            )
            self.result.loads.append(row)
            rows.append(row)
        return rows

    def model_suite(self, model: str) -> None:
        """Every load scenario of one model: the echo floors, the native and KServe paths, paced load."""
        _, out = self._io(model)
        p = self.plan
        ref = model == REF_MODEL
        chunk = (p.chunk_streams, p.chunk_steps)
        echo_sizes = {
            steps: stream_message_sizes(self._spec(model, "echo", "", 1, steps), out)[1]
            for steps in (1, p.chunk_steps)
        }
        unary_size = kserve_message_sizes(self._spec(model, "unary_echo", "", 1, 1), out)[1]
        echo = {
            steps: start_echo(size, unary_size if steps == 1 else 0) for steps, size in echo_sizes.items()
        }
        service = start_service(self.repo)
        nobatch = start_service(self.repo, "--max-batch-size", "1") if ref else None
        kserve_echo = self._start_kserve_echo(model, service) if ref else None
        try:
            k = p.many_sessions_per_message
            one_step_rows: list[LoadRow] = []
            for sessions, steps in [(n, 1) for n in p.one_step_streams] + [chunk]:
                one = steps == 1
                items = [
                    (BIDI_ECHO, echo[steps], self._spec(model, "echo", echo[steps].address, sessions, steps))
                ]
                if ref and one and sessions in p.pa_concurrency:
                    items.append(
                        (UNARY_ECHO, echo[1], self._spec(model, "unary_echo", echo[1].address, sessions, 1))
                    )
                items.append((STREAM, service, self._spec(model, "stream", service.address, sessions, steps)))
                if sessions in self._many_sizes() or (sessions, steps) == chunk:
                    per = min(k, sessions)
                    items.append(
                        (
                            STREAM_MANY,
                            service,
                            self._spec(
                                model,
                                "stream_many",
                                service.address,
                                sessions // per,
                                steps,
                                sessions_per_message=per,
                            ),
                        )
                    )
                if ref and one:
                    items.append(
                        (
                            KSERVE_STREAM,
                            service,
                            self._spec(model, "kserve_stream", service.address, sessions, 1),
                        )
                    )
                if nobatch is not None:
                    items.append(
                        (NOBATCH, nobatch, self._spec(model, "stream", nobatch.address, sessions, steps))
                    )
                rows = self._loads(model, items)
                if kserve_echo is not None and one and sessions in p.pa_concurrency:
                    # Right after the unary echo it is compared with, on the same server.
                    rows += self._perf_analyzer(model, service, kserve_echo, sessions)
                if one:
                    one_step_rows += rows
            if ref:
                self._paced(model, service, one_step_rows, echo[1])
                self._positions(model, service)
        finally:
            for server in (*echo.values(), service, nobatch, kserve_echo):
                if server is not None:
                    server.stop()

    def _start_kserve_echo(self, model: str, service: ServerProcess) -> ServerProcess:
        """The no-op KServe server, answering with what ``service`` answers for ``model``."""
        step = infer_request(self._spec(model, "kserve_stream", "", 1, 1), sequence_id=1)
        step.parameters["sequence_start"].bool_param = True  # a one-step sequence: opened and ended
        step.parameters["sequence_end"].bool_param = True
        return start_kserve_echo(capture(service.address, model, step.SerializeToString()), self.tmp)

    def _perf_analyzer(
        self, model: str, server: ServerProcess, echo: ServerProcess, concurrency: int
    ) -> list[LoadRow]:
        """perf_analyzer, unary and ``--streaming``, at ``concurrency`` sequences: the no-op KServe server,
        then the service, one after the other."""
        (iname, _, itail), _ = self._io(model)
        shape = f"{iname}:{','.join(str(d) for d in (1, *itail))}"  # T=1: one step per request
        rows = []
        for system, streaming, target in (
            (PA_ECHO_UNARY, False, echo),
            (PA_UNARY, False, server),
            (PA_ECHO_STREAM, True, echo),
            (PA_STREAM, True, server),
        ):
            before = scrape_histograms(target.metrics_port, model) if target.metrics_port else {}
            try:
                run = perf_analyzer.run(
                    target.address,
                    model,
                    concurrency,
                    target.pid,
                    streaming=streaming,
                    shape=shape,
                    interval_ms=self.plan.pa_interval_ms,
                    requests=served_calls if target is echo else None,
                )
            except RuntimeError as exc:
                note = f"{system} at concurrency {concurrency} failed: {str(exc)[-1500:]}"
                self.result.notes.append(note)
                self.failures.append(note)
                print(f"error: {note}", file=sys.stderr)
                self.bar.update()
                continue
            after = scrape_histograms(target.metrics_port, model) if target.metrics_port else {}
            r = run.row
            row = LoadRow(
                model=model,
                system=system,
                streams=concurrency,
                sessions=concurrency,
                steps_per_message=1,
                steps_per_s=r.throughput,
                messages_per_s=r.throughput,
                p50_ms=r.p50_us / 1e3,
                p95_ms=r.p95_us / 1e3,
                p99_ms=r.p99_us / 1e3,
                client_cpu_cores=run.client_cpu_s / run.wall_s,
                server_cpu_cores=run.server_cpu_s / run.wall_s,
                server_cpu_us_per_step=run.server_cpu_us_per_step,
                runs=[{"wall_s": run.wall_s, "server_requests": float(run.server_requests)}],
            )
            hist = after.get("rnnserve_batch_size")
            if hist is not None and "rnnserve_batch_size" in before:
                delta = hist.minus(before["rnnserve_batch_size"])
                if delta.count:
                    row.batch_mean, row.batch_p50, row.batch_p99 = (
                        delta.mean,
                        delta.quantile(0.5),
                        delta.quantile(0.99),
                    )
                    row.batch_buckets = list(delta.buckets)
            self.result.loads.append(row)
            rows.append(row)
            self.bar.set_postfix_str(f"{system} {concurrency}: {row.steps_per_s:,.0f} st/s")
            self.bar.update()
        return rows

    def _paced(
        self, model: str, server: ServerProcess, rows: list[LoadRow], echo: ServerProcess | None = None
    ) -> None:
        """Paced (open-loop) one-step load at fractions of each path's own closed-loop peak.

        Paths: ``Stream``, KServe streaming and ``StreamMany``, each on the streams of its run at the
        reference concurrency; latency counts from each scheduled send time, so a server that falls behind
        is charged for it. The bidi echo is paced at ``Stream``'s rate too: the tail the Python gRPC floor
        itself shows at that rate on this machine, in the same run.
        """
        items = []
        for fraction in self.plan.paced_fractions:
            stream = [r for r in rows if r.system == STREAM]
            if echo is not None and stream:
                peak = max(stream, key=lambda r: r.steps_per_s)
                at = next((r for r in stream if r.sessions == self.plan.reference_streams), peak)
                rate = peak.steps_per_s * fraction
                spec = self._spec(model, "echo", echo.address, at.streams, 1, rate=rate)
                items.append((paced_name(BIDI_ECHO, fraction), echo, spec))
            for system, target in PACED_TARGETS.items():
                one_step = [r for r in rows if r.system == system]
                if not one_step:
                    continue
                peak = max(one_step, key=lambda r: r.steps_per_s)
                at = next((r for r in one_step if r.sessions == self.plan.reference_streams), peak)
                per = at.sessions // at.streams
                spec = self._spec(
                    model,
                    target,
                    server.address,
                    at.streams,
                    1,
                    sessions_per_message=per,
                    rate=peak.steps_per_s * fraction / per,
                )
                items.append((paced_name(system, fraction), server, spec))
        self._loads(model, items)

    def _positions(self, model: str, server: ServerProcess) -> None:
        spec = self._spec(model, "stream", server.address, 1, 1)
        points: list[PositionPoint] = asyncio.run(
            measure_positions(
                server.address,
                spec,
                self.plan.positions,
                sessions=self.plan.position_sessions,
                window=self.plan.position_window,
                stateless_repeats=3 if self.plan.quick else 5,
            )
        )
        for p in points:
            d = dataclasses.asdict(p)
            d["model"] = model
            d["ort_stateless_ms"] = stateless_seconds(self.models[model], p.position) * 1e3
            self.result.positions.append(d)
        self.bar.update()

    def ceilings(self) -> None:
        """Raw ONNX Runtime at every (batch formed, T) the service rows saw, plus batch 1."""
        wanted: set[tuple[str, int, int]] = set()
        for r in self.result.loads:
            if r.batch_mean == r.batch_mean:  # not NaN: a service row
                wanted.add((r.model, max(1, round(r.batch_mean)), r.steps_per_message))
        for model in self.models:
            wanted.add((model, 1, 1))
        for model, batch, steps in sorted(wanted):
            # The server runs ORT with one intra-op thread (its other core serves gRPC); the machine's ceiling
            # is ORT on every core. Both are recorded for the chunk rows, whose targets are judged against
            # each; one-step rows need only the first.
            for threads in (1, 0) if steps == self.plan.chunk_steps else (1,):
                c: CeilingPoint = measure_ceiling(
                    self.models[model],
                    batch,
                    steps,
                    intra_op_threads=threads,
                    seconds=self.plan.ceiling_seconds,
                )
                d = dataclasses.asdict(c)
                d["model"] = model
                self.result.ceilings.append(d)
        self.bar.update()

    def memory(self) -> None:
        """RSS per idle session in an engine subprocess, fresh and with state written."""
        for written in (False, True):
            cmd = [
                sys.executable,
                "-m",
                "tests.bench.memory",
                "--repository",
                str(self.repo),
                "--model",
                REF_MODEL,
                "--sessions",
                str(self.plan.idle_sessions),
            ] + (["--written"] if written else [])
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                self.result.notes.append(f"memory scenario failed: {proc.stderr[-1500:]}")
                continue
            self.result.memory.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            self.bar.update()

    def streams(self) -> None:
        """Open streams on one process (64 to 20,000; ``--quick``: a few hundred): ``tests.bench.streams``."""
        cmd = [sys.executable, "-m", "tests.bench.streams", "--out", str(self.out)]
        # The full run includes the five-minute runs the flat-tail target is judged on (30 s windows).
        cmd += ["--quick"] if self.plan.quick else ["--long", "300"]
        proc = subprocess.run(cmd, text=True, check=False)
        if proc.returncode != 0:
            note = f"open-streams scenario failed (exit {proc.returncode}; its output is above)"
            self.result.notes.append(note)
            self.failures.append(note)
        self.bar.update()

    def run(self) -> SuiteResult:
        """Run every scenario in the plan."""
        try:
            for model in self.models:
                self.model_suite(model)
            self.ceilings()
            self.memory()
            self.streams()
        finally:
            self.result.environment["load_average_1m_at_end"] = os.getloadavg()[0]
            self.result.environment["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        return self.result


def load_result(path: Path) -> SuiteResult:
    """Read a ``results.json`` back into a ``SuiteResult`` (to re-render the report without re-running)."""
    d = json.loads(path.read_text())
    plan_fields = {f.name for f in dataclasses.fields(Plan)}
    plan = Plan(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in d["plan"].items() if k in plan_fields}
    )
    row_fields = {f.name for f in dataclasses.fields(LoadRow)}
    loads = []
    for row in d["loads"]:
        kw = {k: v for k, v in row.items() if k in row_fields}
        kw["batch_buckets"] = [tuple(b) for b in kw.get("batch_buckets", [])]
        loads.append(LoadRow(**kw))
    return SuiteResult(plan, d["environment"], loads, d["ceilings"], d["positions"], d["memory"], d["notes"])
