"""The benchmark suite: every scenario and reference point of issue 5, run in one go.

Each scenario starts its own server process (the real ``python -m service.server``, or the echo) and drives it
from separate client processes (``loadgen``). Load scenarios are repeated ``repeats`` times and the median of
each figure kept (the machine is shared; single runs are noisy). Everything measured goes into one
``SuiteResult`` that ``report`` turns into JSON, a markdown table, PNG plots and the targets verdict.
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

from tests.bench.ceiling import CeilingPoint, measure_ceiling, stateless_seconds
from tests.bench.loadgen import LoadResult, LoadSpec, run_load
from tests.bench.position import PositionPoint, measure_positions
from tests.bench.refmodel import RefModelConfig, write_reference_repository
from tests.bench.servers import BatchHistogram, ServerProcess, scrape_batch_sizes, start_echo, start_service
from tests.bench.service_drivers import stream_message_sizes

REF_MODEL = "ref_lstm"
DEFAULT_REPOSITORY = Path("models/repository")


@dataclass(frozen=True, slots=True)
class Plan:
    """What a run covers: the full suite or the ``--quick`` subset."""

    quick: bool
    one_step_streams: tuple[int, ...]
    chunk_streams: int = 64
    chunk_steps: int = 16
    warmup_s: float = 1.0
    duration_s: float = 4.0
    repeats: int = 3
    workers: int = 2
    many_sessions_per_message: int = 32
    positions: tuple[int, ...] = (1, 100, 1000)
    position_sessions: int = 3
    position_window: int = 10
    idle_sessions: int = 1_000_000
    ceiling_seconds: float = 1.5

    @staticmethod
    def make(quick: bool, repeats: int | None = None) -> Plan:
        """The full plan (~15 min on 2 cores) or the quick one (well under a minute or two)."""
        if quick:
            return Plan(
                True,
                (1, 128),
                warmup_s=0.5,
                duration_s=1.5,
                repeats=repeats or 1,
                position_sessions=1,
                idle_sessions=20_000,
                ceiling_seconds=0.5,
            )
        return Plan(False, (1, 16, 128, 512), repeats=repeats or 3)


@dataclass(slots=True)
class LoadRow:
    """One load scenario: medians over repeats, plus every run's raw figures."""

    model: str
    system: str  # echo | service | service (batching off) | service StreamMany
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
    good = [h for h in hists if h is not None and h.count > 0]
    if good:
        total = good[0]
        for h in good[1:]:
            total = BatchHistogram(
                tuple((le, c + dict(h.buckets).get(le, 0.0)) for le, c in total.buckets),
                total.total + h.total,
                total.count + h.count,
            )
        row.batch_mean, row.batch_p50, row.batch_p99 = total.mean, total.quantile(0.5), total.quantile(0.99)
        row.batch_buckets = list(total.buckets)
    return row


class Runner:
    """Runs the plan; owns the temporary model repository and the progress bar."""

    def __init__(self, plan: Plan, out: Path) -> None:
        self.plan = plan
        self.out = out
        self.tmp = Path(tempfile.mkdtemp(prefix="rnnserve-bench-"))
        self.repo = self.tmp / "repository"
        self.ref_cfg = RefModelConfig()
        self.ref_path = write_reference_repository(self.repo, self.ref_cfg, name=REF_MODEL)
        self.result = SuiteResult(plan, _environment(plan.quick))
        self.models: dict[str, Path] = {REF_MODEL: self.ref_path}
        default = DEFAULT_REPOSITORY / "default"
        if default.is_dir():
            shutil.copytree(default, self.repo / "default")
            versions = sorted(
                (p for p in (self.repo / "default").iterdir() if p.name.isdigit()), key=lambda p: int(p.name)
            )
            if versions:
                self.models["default"] = versions[-1] / "model.onnx"
        else:
            self.result.notes.append(f"{default} not found: the default model was not benchmarked")
        self.bar = tqdm(total=self._count_steps(), desc="bench", unit="scenario", file=sys.stderr)

    def _count_steps(self) -> int:
        p = self.plan
        per_model_loads = (
            len(p.one_step_streams) * 2 + 2 * 2 + 2 + 1
        )  # echo+service one-step, chunk, many, nobatch
        loads = per_model_loads * p.repeats * len(self.models) + len(p.one_step_streams) * p.repeats + 1
        return loads + 6

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
        return spec

    # -- scenarios -----------------------------------------------------------------------------------------
    def _load(self, model: str, system: str, server: ServerProcess, spec: LoadSpec) -> LoadRow:
        results, hists = [], []
        for _ in range(self.plan.repeats):
            marks: dict[str, BatchHistogram] = {}

            def on_window(edge: str, marks: dict[str, BatchHistogram] = marks) -> None:
                if server.metrics_port:
                    marks[edge] = scrape_batch_sizes(server.metrics_port, model)

            results.append(run_load(spec, server.pid, on_window))
            hists.append(marks["end"].minus(marks["start"]) if len(marks) == 2 else None)
            self.bar.update()
        row = _median_row(model, system, spec, results, hists)
        if row.errors:
            self.result.notes.append(
                f"{model} {system} {spec.streams}x{spec.steps_per_message}: {row.errors} "
                f"errors, first: {row.first_error[:300]}"
            )
        self.bar.set_postfix_str(
            f"{system} {spec.streams}s x{spec.steps_per_message}: {row.steps_per_s:,.0f} st/s"
        )
        self.result.loads.append(row)
        return row

    def echo(self, model: str) -> None:
        """The Python gRPC edge floor at the service's message sizes."""
        _, out = self._io(model)
        for steps, streams_list in (
            (1, self.plan.one_step_streams),
            (self.plan.chunk_steps, (self.plan.chunk_streams,)),
        ):
            probe = self._spec(model, "echo", "", 1, steps)
            _, resp_bytes = stream_message_sizes(probe, out)
            server = start_echo(resp_bytes)
            try:
                for n in streams_list:
                    self._load(model, "echo", server, self._spec(model, "echo", server.address, n, steps))
            finally:
                server.stop()

    def service(self, model: str, *, batching: bool) -> list[LoadRow]:
        """The service over ``Stream`` (and ``StreamMany`` when batching), one-step and chunked."""
        flags = () if batching else ("--max-batch-size", "1")
        system = "service" if batching else "service (batching off)"
        server = start_service(self.repo, *flags)
        rows = []
        try:
            for n in self.plan.one_step_streams:
                rows.append(
                    self._load(model, system, server, self._spec(model, "stream", server.address, n, 1))
                )
            rows.append(
                self._load(
                    model,
                    system,
                    server,
                    self._spec(
                        model, "stream", server.address, self.plan.chunk_streams, self.plan.chunk_steps
                    ),
                )
            )
            if batching:
                k = self.plan.many_sessions_per_message
                many = sorted(
                    {n for n in (128, max(self.plan.one_step_streams)) if n in self.plan.one_step_streams}
                )
                for sessions, steps in [(n, 1) for n in many] + [
                    (self.plan.chunk_streams, self.plan.chunk_steps)
                ]:
                    per = min(k, sessions)
                    self._load(
                        model,
                        "service StreamMany",
                        server,
                        self._spec(
                            model,
                            "stream_many",
                            server.address,
                            sessions // per,
                            steps,
                            sessions_per_message=per,
                        ),
                    )
                if model == REF_MODEL:
                    self._half_peak(model, server, rows)
                    self._positions(model, server)
        finally:
            server.stop()
        return rows

    def _half_peak(self, model: str, server: ServerProcess, rows: list[LoadRow]) -> None:
        one_step = [r for r in rows if r.steps_per_message == 1]
        peak = max(one_step, key=lambda r: r.steps_per_s)
        streams = 128 if 128 in self.plan.one_step_streams else peak.streams
        spec = self._spec(model, "stream", server.address, streams, 1, rate=peak.steps_per_s / 2)
        self._load(model, "service (half of peak, paced)", server, spec)

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
            if r.system.startswith("service") and r.batch_mean == r.batch_mean:  # not NaN
                wanted.add((r.model, max(1, round(r.batch_mean)), r.steps_per_message))
        for model in self.models:
            wanted.add((model, 1, 1))
        for model, batch, steps in sorted(wanted):
            c: CeilingPoint = measure_ceiling(
                self.models[model], batch, steps, seconds=self.plan.ceiling_seconds
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

    def run(self) -> SuiteResult:
        """Run every scenario in the plan."""
        try:
            for model in self.models:
                self.echo(model)
                self.service(model, batching=True)
                if model == REF_MODEL:
                    self.service(model, batching=False)
            self.ceilings()
            self.memory()
        finally:
            self.result.environment["load_average_1m_at_end"] = os.getloadavg()[0]
            self.result.environment["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        return self.result
