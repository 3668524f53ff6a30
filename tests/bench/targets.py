"""The targets: each a ratio (or a bound) from one run's results, with what is required and met/missed.

Per-message targets compare a path of the service with the no-op echo of the same call kind, measured in the
same run with the same message sizes: KServe unary (perf_analyzer) with the unary echo, ``Stream`` and KServe
streaming with the bidi echo; and, with the very same client, perf_analyzer against the server with
perf_analyzer against the no-op KServe server. The rest (16-step chunks against raw ONNX Runtime, cost flat in
stream position, stateless recompute, idle memory) carry over from the earlier suite.
"""

from __future__ import annotations

from dataclasses import dataclass

from tests.bench.suite import (
    BIDI_ECHO,
    KSERVE_STREAM,
    PA_ECHO_STREAM,
    PA_ECHO_UNARY,
    PA_STREAM,
    PA_UNARY,
    REF_MODEL,
    STREAM,
    STREAM_MANY,
    UNARY_ECHO,
    LoadRow,
    SuiteResult,
    paced_name,
)

THROUGHPUT_MIN = 0.8  # messages/s at the reference concurrency, against the echo of the same kind
CPU_MAX = 1.5  # server CPU per one-step message, against the echo's CPU per message
HALF_LOAD_P99_MS = 5.0
ONE_STREAM_P50_MAX = 1.3
PA_UNARY_ONE_MIN = 1000.0  # steps/s of one sequence over KServe unary (perf_analyzer, concurrency 1)
CHUNK_MIN = 0.6  # 16-step chunks against raw ONNX Runtime at the same batch

# (service path, the echo it is held against)
PER_MESSAGE_PAIRS = (
    (PA_UNARY, UNARY_ECHO),
    (PA_UNARY, PA_ECHO_UNARY),  # the same client (perf_analyzer) on both sides
    (KSERVE_STREAM, BIDI_ECHO),
    (PA_STREAM, PA_ECHO_STREAM),
    (STREAM, BIDI_ECHO),
)


@dataclass(frozen=True, slots=True)
class Verdict:
    """One target: what was asked, what was measured, met or not."""

    target: str
    measured: str
    ratio: float
    threshold: str
    met: bool | None  # None: not measured in this run


def row(
    res: SuiteResult, system: str, sessions: int, steps: int = 1, model: str = REF_MODEL
) -> LoadRow | None:
    """The load row of ``system`` at ``sessions`` concurrent sessions and ``steps`` per message, if any."""
    return next(
        (
            r
            for r in res.loads
            if r.model == model
            and r.system == system
            and r.sessions == sessions
            and r.steps_per_message == steps
        ),
        None,
    )


def ratio_verdict(
    target: str, num: float, den: float, what: str, threshold: float, *, at_least: bool
) -> Verdict:
    """``num / den`` against ``threshold`` (``>=`` when ``at_least``, else ``<=``); NaN inputs give n/a."""
    ratio = num / den if den and num == num and den == den else float("nan")
    met = None if ratio != ratio else (ratio >= threshold if at_least else ratio <= threshold)
    return Verdict(target, what, ratio, f"{'>=' if at_least else '<='} {threshold:g}", met)


def bound_verdict(
    target: str, value: float, what: str, limit: float, unit: str, *, at_least: bool
) -> Verdict:
    """An absolute bound (``value >= limit`` or ``<= limit``); NaN gives n/a."""
    met = None if value != value else (value >= limit if at_least else value <= limit)
    return Verdict(target, what, value, f"{'>=' if at_least else '<='} {limit:,g} {unit}", met)


def _per_message(res: SuiteResult) -> list[Verdict]:
    n = res.plan.reference_streams
    out: list[Verdict] = []
    for system, echo_name in PER_MESSAGE_PAIRS:
        svc, echo = row(res, system, n), row(res, echo_name, n)
        if not (svc and echo):
            continue
        out.append(
            ratio_verdict(
                f"msgs/s @{n}: {system} / {echo_name}",
                svc.messages_per_s,
                echo.messages_per_s,
                f"{svc.messages_per_s:,.0f} vs {echo.messages_per_s:,.0f} msg/s",
                THROUGHPUT_MIN,
                at_least=True,
            )
        )
    for system, echo_name in PER_MESSAGE_PAIRS:
        svc, echo = row(res, system, n), row(res, echo_name, n)
        if not (svc and echo):
            continue
        out.append(
            ratio_verdict(
                f"server CPU per one-step message @{n}: {system} / {echo_name}",
                svc.server_cpu_us_per_step,
                echo.server_cpu_us_per_step,
                f"{svc.server_cpu_us_per_step:,.0f} vs {echo.server_cpu_us_per_step:,.0f} us",
                CPU_MAX,
                at_least=False,
            )
        )
    return out


def _latency(res: SuiteResult) -> list[Verdict]:
    out: list[Verdict] = []
    for system in (STREAM, KSERVE_STREAM, STREAM_MANY):
        half = next(
            (r for r in res.loads if r.model == REF_MODEL and r.system == paced_name(system, 0.5)), None
        )
        if half is None:
            continue
        offered = half.rate_per_s * half.sessions / max(1, half.streams)
        floor = next(
            (r for r in res.loads if r.model == REF_MODEL and r.system == paced_name(BIDI_ECHO, 0.5)), None
        )
        # The bidi echo paced at Stream's half-peak rate: the tail of Python gRPC alone at such a rate here.
        echo_note = (
            f"; bidi echo paced at {floor.rate_per_s:,.0f} msg/s: p99 {floor.p99_ms:.2f} ms"
            if floor is not None
            else ""
        )
        out.append(
            bound_verdict(
                f"p99 at 50% of peak: {system} ({offered:,.0f} steps/s offered, {half.sessions} sessions)",
                half.p99_ms,
                f"p99 {half.p99_ms:.2f} ms (achieved {half.steps_per_s:,.0f} steps/s){echo_note}",
                HALF_LOAD_P99_MS,
                "ms",
                at_least=False,
            )
        )
    for system, echo_name in PER_MESSAGE_PAIRS:
        svc, echo = row(res, system, 1), row(res, echo_name, 1)
        if svc and echo:
            out.append(
                ratio_verdict(
                    f"p50 @1 stream: {system} / {echo_name}",
                    svc.p50_ms,
                    echo.p50_ms,
                    f"{svc.p50_ms:.3f} vs {echo.p50_ms:.3f} ms",
                    ONE_STREAM_P50_MAX,
                    at_least=False,
                )
            )
    one = row(res, PA_UNARY, 1)
    if one:
        out.append(
            bound_verdict(
                "one sequence over KServe unary (perf_analyzer, concurrency 1)",
                one.steps_per_s,
                f"{one.steps_per_s:,.0f} steps/s, p50 {one.p50_ms:.2f} ms, "
                f"{one.server_cpu_cores:.2f} server cores",
                PA_UNARY_ONE_MIN,
                "steps/s",
                at_least=True,
            )
        )
    return out


def _chunks(res: SuiteResult) -> list[Verdict]:
    out: list[Verdict] = []
    n, steps = res.plan.chunk_streams, res.plan.chunk_steps
    for system in (STREAM, STREAM_MANY):
        chunk = row(res, system, n, steps)
        if not chunk or chunk.ceiling_steps_per_s != chunk.ceiling_steps_per_s:
            continue
        label = f"{steps}-step chunks @{n} sessions: {system} / raw ORT"
        out.append(
            ratio_verdict(
                f"{label} (1 intra-op thread, as served)",
                chunk.steps_per_s,
                chunk.ceiling_steps_per_s,
                f"{chunk.steps_per_s:,.0f} steps/s vs ORT {chunk.ceiling_steps_per_s:,.0f} at batch "
                f"{chunk.ceiling_batch}, measured right after (CPU: {chunk.server_cpu_us_per_step:.1f} "
                f"us/step served vs {1e6 / chunk.ceiling_steps_per_cpu_s:.1f} us/step raw)",
                CHUNK_MIN,
                at_least=True,
            )
        )
        every = next(
            (
                c
                for c in res.ceilings
                if c["model"] == REF_MODEL
                and c["batch"] == max(1, round(chunk.batch_mean))
                and c["steps"] == chunk.steps_per_message
                and c.get("intra_op_threads") == 0
            ),
            None,
        )
        if every:
            out.append(
                ratio_verdict(
                    f"{label} (every core)",
                    chunk.steps_per_s,
                    every["steps_per_s"],
                    f"{chunk.steps_per_s:,.0f} steps/s vs ORT {every['steps_per_s']:,.0f} at batch "
                    f"{every['batch']} with ORT's default threads",
                    CHUNK_MIN,
                    at_least=True,
                )
            )
    return out


def _state(res: SuiteResult) -> list[Verdict]:
    out: list[Verdict] = []
    pos = {p["position"]: p for p in res.positions if p["model"] == REF_MODEL}
    if 1 in pos and 1000 in pos:
        out.append(
            ratio_verdict(
                "latency flat in position: pos 1000 / pos 1",
                pos[1000]["stream_ms"],
                pos[1]["stream_ms"],
                f"{pos[1000]['stream_ms']:.2f} ms vs {pos[1]['stream_ms']:.2f} ms",
                1.1,
                at_least=False,
            )
        )
        out.append(
            ratio_verdict(
                "stateless recompute / streamed step @ pos 1000",
                pos[1000]["stateless_ms"],
                pos[1000]["stream_ms"],
                f"{pos[1000]['stateless_ms']:.1f} ms vs {pos[1000]['stream_ms']:.2f} ms",
                100,
                at_least=True,
            )
        )
        # What a round trip over Python gRPC can reach at all: the echo's own latency plus one raw ORT step.
        echo1 = row(res, BIDI_ECHO, 1)
        ort1 = min(
            (c for c in res.ceilings if c["model"] == REF_MODEL and c["batch"] == 1 and c["steps"] == 1),
            key=lambda c: c["ms_per_run"],
            default=None,
        )
        if echo1 and ort1:
            floor = echo1.p50_ms + ort1["ms_per_run"]
            out.append(
                ratio_verdict(
                    "(bound) stateless @ pos 1000 / (echo round trip + raw ORT step)",
                    pos[1000]["stateless_ms"],
                    floor,
                    f"best any gRPC step could do here: {echo1.p50_ms:.2f} ms echo p50 + "
                    f"{ort1['ms_per_run']:.2f} ms ORT = {floor:.2f} ms",
                    100,
                    at_least=True,
                )
            )
        batched = [
            r
            for r in res.loads
            if r.model == REF_MODEL
            and r.batch_mean == r.batch_mean
            and r.steps_per_message == 1
            and r.rate_per_s == 0
            and r.server_cpu_us_per_step == r.server_cpu_us_per_step
        ]
        if batched:
            best = min(batched, key=lambda r: r.server_cpu_us_per_step)
            out.append(
                ratio_verdict(
                    "(cost) stateless raw ORT CPU @ pos 1000 / served CPU per step",
                    pos[1000]["ort_stateless_ms"] * 1e3,
                    best.server_cpu_us_per_step,
                    f"{pos[1000]['ort_stateless_ms']:.1f} ms vs {best.server_cpu_us_per_step:.0f} us server "
                    f"CPU per step ({best.system}, {best.sessions} sessions)",
                    100,
                    at_least=True,
                )
            )
    written = next((m for m in res.memory if m["state"] == "written"), None)
    if written:
        out.append(
            bound_verdict(
                f"idle memory @ {written['sessions']:,} sessions / raw state bytes",
                float(written["ratio"]),
                f"{written['rss_per_session_bytes']:,.0f} B/session RSS vs "
                f"{written['raw_state_bytes_per_session']:,} B raw state",
                1.25,
                "x",
                at_least=False,
            )
        )
    return out


def verdicts(res: SuiteResult) -> list[Verdict]:
    """Every target, in the order the report shows them, from this run's measurements only."""
    return _per_message(res) + _latency(res) + _chunks(res) + _state(res)
