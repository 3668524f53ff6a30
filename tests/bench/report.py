"""Turn a ``SuiteResult`` into the published results: JSON, markdown, PNG plots and the targets verdict.

Every figure in ``docs/bench/`` and ``docs/performance.md`` is written here from the measurements; nothing is
typed in by hand.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from tests.bench.suite import (  # noqa: E402
    BIDI_ECHO,
    ECHOES,
    KSERVE_STREAM,
    NOBATCH,
    PA_ECHO_STREAM,
    PA_ECHO_UNARY,
    PA_STREAM,
    PA_UNARY,
    PACED_TARGETS,
    REF_MODEL,
    STREAM,
    STREAM_MANY,
    UNARY_ECHO,
    SuiteResult,
    paced_name,
)
from tests.bench.targets import Verdict, row, verdicts  # noqa: E402


def _fmt(x: float, digits: int = 0) -> str:
    if x != x:
        return "-"
    return f"{x:,.{digits}f}"


def load_table(res: SuiteResult) -> str:
    """Markdown table of every load scenario (medians over repeats)."""
    lines = [
        "| model | system | streams | sessions | steps/msg | steps/s | p50 ms | p95 ms | p99 ms | server CPU "
        "(cores) | client CPU (cores) | server CPU us/step | mean batch | p99 batch | "
        "raw ORT steps/s at that batch | engine p50 / p99 ms |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in res.loads:
        steps = f"{_fmt(r.messages_per_s)} msg/s" if r.system in ECHOES else _fmt(r.steps_per_s)
        lines.append(
            f"| {r.model} | {r.system} | {r.streams} | {r.sessions} | {r.steps_per_message} | {steps} | "
            f"{_fmt(r.p50_ms, 2)} | {_fmt(r.p95_ms, 2)} | {_fmt(r.p99_ms, 2)} | "
            f"{_fmt(r.server_cpu_cores, 2)} | {_fmt(r.client_cpu_cores, 2)} | "
            f"{_fmt(r.server_cpu_us_per_step, 1)} | {_fmt(r.batch_mean, 1)} | "
            f"{_fmt(r.batch_p99)} | {_fmt(r.ceiling_steps_per_s)} | "
            f"{_fmt(r.server_request_p50_ms, 2)} / {_fmt(r.server_request_p99_ms, 2)} |"
        )
    return "\n".join(lines) + "\n"


def verdict_table(vs: list[Verdict]) -> str:
    """Markdown table of the targets."""
    lines = ["| target | measured | ratio | required | met |", "|---|---|--:|---|---|"]
    for v in vs:
        met = "n/a" if v.met is None else ("**met**" if v.met else "**missed**")
        lines.append(f"| {v.target} | {v.measured} | {_fmt(v.ratio, 2)} | {v.threshold} | {met} |")
    return "\n".join(lines) + "\n"


def other_tables(res: SuiteResult) -> str:
    """Markdown tables of the ceilings, positions and idle memory."""
    parts = [
        "| model | batch | steps/run | intra-op threads | raw ORT steps/s | ms/run | steps per CPU-second |",
        "|---|--:|--:|--:|--:|--:|--:|",
    ]
    for c in res.ceilings:
        parts.append(
            f"| {c['model']} | {c['batch']} | {c['steps']} | {c.get('intra_op_threads', 1) or 'all'} | "
            f"{_fmt(c['steps_per_s'])} | "
            f"{_fmt(c['ms_per_run'], 3)} | {_fmt(c['steps_per_cpu_s'])} |"
        )
    parts += [
        "",
        "| model | position | streamed step p50 ms | streamed p99 ms | stateless recompute ms (served) | "
        "stateless, raw ORT ms | samples |",
        "|---|--:|--:|--:|--:|--:|--:|",
    ]
    for p in res.positions:
        parts.append(
            f"| {p['model']} | {p['position']} | {_fmt(p['stream_ms'], 2)} | "
            f"{_fmt(p['stream_p99_ms'], 2)} | {_fmt(p['stateless_ms'], 2)} | "
            f"{_fmt(p['ort_stateless_ms'], 2)} | {p['samples']} |"
        )
    parts += [
        "",
        "| model | sessions | state | RSS before MB | RSS after MB | RSS/session B | raw state B | ratio | "
        "create s | full GC pause ms | GC-tracked objects |",
        "|---|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for m in res.memory:
        parts.append(
            f"| {m['model']} | {m['sessions']:,} | {m['state']} | {m['rss_before_bytes'] / 2**20:,.0f} | "
            f"{m['rss_after_bytes'] / 2**20:,.0f} | {_fmt(m['rss_per_session_bytes'])} | "
            f"{m['raw_state_bytes_per_session']:,} | {_fmt(m['ratio'], 3)} | "
            f"{_fmt(m['create_seconds'], 1)} | {_fmt(m.get('gc_full_collection_ms', float('nan')), 1)} | "
            f"{m.get('gc_tracked_objects', 0):,} |"
        )
    return "\n".join(parts) + "\n"


# -- plots ---------------------------------------------------------------------------------------------
_COLORS = {
    BIDI_ECHO: "tab:gray",
    UNARY_ECHO: "silver",
    STREAM: "tab:blue",
    NOBATCH: "tab:orange",
    STREAM_MANY: "tab:green",
    KSERVE_STREAM: "tab:purple",
    PA_STREAM: "tab:pink",
    PA_UNARY: "tab:brown",
    PA_ECHO_UNARY: "black",
    PA_ECHO_STREAM: "darkgray",
    "raw ORT": "tab:red",
}


def plot_throughput(res: SuiteResult, path: Path, model: str = REF_MODEL) -> None:
    """One-step throughput and latency against concurrency, with the echo floors and the ORT ceiling."""
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    for system, color in _COLORS.items():
        rows = sorted(
            (r for r in res.loads if r.model == model and r.system == system and r.steps_per_message == 1),
            key=lambda r: r.sessions,
        )
        if not rows:
            continue
        x = [r.sessions for r in rows]
        y = [r.messages_per_s if system in ECHOES else r.steps_per_s for r in rows]
        label = f"{system} (msgs/s, gRPC floor)" if system in ECHOES else system
        style = "o--" if system in ECHOES else "o-"
        ax.plot(x, y, style, color=color, label=label)
        ax2.plot(x, [r.p50_ms for r in rows], style, color=color, label=f"{system} p50")
        ax2.plot(x, [r.p99_ms for r in rows], "s:", color=color, alpha=0.6, label=f"{system} p99")
        if system == STREAM:
            pts = [
                (r.sessions, r.ceiling_steps_per_s)
                for r in rows
                if r.ceiling_steps_per_s == r.ceiling_steps_per_s
            ]
            if pts:
                ax.plot(
                    *zip(*pts, strict=True),
                    "^:",
                    color=_COLORS["raw ORT"],
                    label="raw ORT at the batch Stream formed",
                )
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="concurrent sessions (one-step messages)",
        ylabel="steps/s",
        title=f"{model}: throughput",
    )
    ax2.set(
        xscale="log",
        yscale="log",
        xlabel="concurrent sessions",
        ylabel="latency ms",
        title="latency (closed loop)",
    )
    for a in (ax, ax2):
        a.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    ax2.legend(fontsize=6, ncol=2)
    fig.suptitle(
        f"rnnserve bench ({res.environment['mode']}, {res.environment['started_utc']}, "
        f"load avg {res.environment['load_average_1m_at_start']:.1f} at start)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_latency_load(res: SuiteResult, path: Path) -> None:
    """Client-observed p50/p99 against achieved throughput: paced runs plus the closed-loop run, per path."""
    n = res.plan.reference_streams
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for system in (*PACED_TARGETS, BIDI_ECHO):  # the echo paced at Stream's rates: the gRPC floor's tail
        paced = sorted(
            (r for r in res.loads if r.model == REF_MODEL and r.system.startswith(f"{system} (paced")),
            key=lambda r: r.rate_per_s,  # in offered order; the x axis shows what was achieved
        )
        closed = row(res, system, n)
        rows = paced + ([closed] if closed else [])
        if not rows:
            continue
        color = _COLORS[system]
        x = [r.steps_per_s for r in rows]
        ax.plot(x, [r.p50_ms for r in rows], "o-", color=color, label=f"{system} p50")
        ax.plot(x, [r.p99_ms for r in rows], "s--", color=color, alpha=0.7, label=f"{system} p99")
        if closed:  # the closed-loop point: the path's own peak at this concurrency
            ax.plot([closed.steps_per_s] * 2, [closed.p50_ms, closed.p99_ms], "*", color=color, ms=12)
    ax.axhline(5.0, color="k", ls=":", lw=1, label="5 ms target (p99 at 50% of peak)")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel=f"achieved steps/s (paced at {', '.join(f'{f:.0%}' for f in res.plan.paced_fractions)} of "
        f"each path's peak; star: closed loop)",
        ylabel="latency ms",
        title=f"{REF_MODEL}: latency against load, one-step messages, {n} sessions",
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_positions(res: SuiteResult, path: Path) -> None:
    """Streamed per-step latency vs stateless recompute, against stream position."""
    pts = [p for p in res.positions if p["model"] == REF_MODEL]
    if not pts:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    x = [p["position"] for p in pts]
    ax.plot(x, [p["stream_ms"] for p in pts], "o-", label="streamed step (server-held state), p50")
    ax.plot(x, [p["stateless_ms"] for p in pts], "s-", label="stateless: whole history re-sent and re-run")
    ax.plot(x, [p["ort_stateless_ms"] for p in pts], "^:", label="stateless, raw ORT compute only")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="stream position (steps)",
        ylabel="ms per step",
        title=f"{REF_MODEL}: cost of a step against stream position",
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_batches_and_cpu(res: SuiteResult, path: Path) -> None:
    """Batch sizes the server formed, and the CPU split between server and clients, per scenario."""
    rows = [
        r
        for r in res.loads
        if r.batch_buckets and r.batch_mean == r.batch_mean and r.model == REF_MODEL and "off" not in r.system
    ]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(14, 5))
    for r in rows:
        edges = [le for le, _ in r.batch_buckets]
        cum = [c for _, c in r.batch_buckets]
        dens = [c - (cum[i - 1] if i else 0.0) for i, c in enumerate(cum)]
        total = sum(dens) or 1.0
        finite = [(e, d / total) for e, d in zip(edges, dens, strict=True) if not math.isinf(e)]
        if finite:
            ax.plot(
                [e for e, _ in finite],
                [d for _, d in finite],
                "o-",
                label=f"{r.model} {r.system} {r.sessions}x{r.steps_per_message}",
                alpha=0.8,
            )
    ax.set(
        xscale="log",
        xlabel=f"batch size (bucket upper bound), {REF_MODEL}",
        ylabel="fraction of ONNX Runtime runs",
        title="batch sizes formed",
    )
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=6)
    all_rows = res.loads
    labels = [f"{r.model[:8]} {r.system[:30]} {r.sessions}x{r.steps_per_message}" for r in all_rows]
    y = range(len(all_rows))
    ax2.barh(list(y), [r.server_cpu_cores for r in all_rows], color="tab:blue", label="server")
    ax2.barh(
        list(y),
        [r.client_cpu_cores for r in all_rows],
        left=[r.server_cpu_cores for r in all_rows],
        color="tab:olive",
        label="clients",
    )
    ax2.set_yticks(list(y), labels, fontsize=6)
    ax2.invert_yaxis()
    ax2.set(xlabel="CPU cores used during the window", title="CPU: server vs load generator")
    ax2.axvline(res.environment["cpus"], color="k", ls=":", lw=1)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(res: SuiteResult, out: Path, performance_md: Path | None) -> list[Verdict]:
    """Write results.json, results.md, the PNGs and (optionally) the performance page; return the verdicts."""
    out.mkdir(parents=True, exist_ok=True)
    vs = verdicts(res)
    payload = {
        "environment": res.environment,
        "plan": dataclasses.asdict(res.plan),
        "targets": [dataclasses.asdict(v) for v in vs],
        "loads": [dataclasses.asdict(r) for r in res.loads],
        "ceilings": res.ceilings,
        "positions": res.positions,
        "memory": res.memory,
        "notes": res.notes,
    }
    (out / "results.json").write_text(json.dumps(payload, indent=1, default=float) + "\n")
    plot_throughput(res, out / "throughput.png")
    plot_positions(res, out / "position.png")
    plot_latency_load(res, out / "latency_load.png")
    plot_batches_and_cpu(res, out / "batches_cpu.png")
    env = res.environment
    header = (
        f"Run: {env['mode']} suite, {env['started_utc']} to {env.get('finished_utc', '?')}, commit "
        f"{env['git_commit']}, {env['cpus']} CPUs, Python {env['python']}, "
        f"ONNX Runtime {env['onnxruntime']}, "
        f"grpcio {env['grpcio']}; load average {env['load_average_1m_at_start']:.1f} at start, "
        f"{env.get('load_average_1m_at_end', float('nan')):.1f} at end. Figures are medians of "
        f"{res.plan.repeats} run(s) of {res.plan.duration_s:g} s after {res.plan.warmup_s:g} s warm-up; "
        f"perf_analyzer rows are one run of three {res.plan.pa_interval_ms / 1e3:g} s windows.\n"
    )
    notes = "".join(f"- {n}\n" for n in res.notes)
    md = (
        f"# Benchmark results\n\n{header}\n## Targets\n\n{verdict_table(vs)}\n"
        f"## Load scenarios\n\n{load_table(res)}\n## Reference points\n\n{other_tables(res)}\n"
        + (f"## Notes\n\n{notes}" if notes else "")
    )
    (out / "results.md").write_text(md)
    if performance_md is not None:
        performance_md.parent.mkdir(parents=True, exist_ok=True)
        performance_md.write_text(_performance(res, vs, header, out, performance_md.parent))
    return vs


def _busy(res: SuiteResult) -> bool:
    """Whether the machine was busy (1-minute load above half the cores) at the run's start or end."""
    env = res.environment
    load = max(float(env["load_average_1m_at_start"]), float(env.get("load_average_1m_at_end", 0.0)))
    return load > 0.5 * float(env["cpus"])


def _cost_note(res: SuiteResult) -> str:
    n = res.plan.reference_streams
    pairs = [
        (row(res, system, n), row(res, echo_name, n))
        for system, echo_name in (
            (PA_UNARY, PA_ECHO_UNARY),
            (PA_STREAM, PA_ECHO_STREAM),
            (KSERVE_STREAM, BIDI_ECHO),
            (STREAM, BIDI_ECHO),
        )
    ]
    parts = [
        f"{svc.system} {svc.server_cpu_us_per_step:.0f} us against the {echo.system}'s "
        f"{echo.server_cpu_us_per_step:.0f} us "
        f"({svc.server_cpu_us_per_step / echo.server_cpu_us_per_step:.1f}x)"
        for svc, echo in pairs
        if svc and echo
    ]
    if not parts:
        return ""
    text = (
        f"- **Per-message cost.** Server CPU per one-step message at {n} concurrent callers: "
        + "; ".join(parts)
        + ". The echo is the Python gRPC edge alone (a read, a write and a `sendmsg` per message, under the "
        "GIL); a service step pays all of that plus protobuf decode/encode, validation, the batcher and "
        "ONNX Runtime. With the server and the load generator sharing the machine's cores, the message rate "
        "follows the server's CPU per message."
    )
    many = row(res, STREAM_MANY, n)
    echo = row(res, BIDI_ECHO, n)
    if many and echo:
        text += (
            f" `StreamMany` carries {many.sessions // max(1, many.streams)} sessions per message and reaches "
            f"{many.steps_per_s:,.0f} steps/s ({many.steps_per_s / echo.messages_per_s:.2f}x the bidi echo's "
            f"messages/s) at {many.server_cpu_us_per_step:.0f} us of server CPU per step."
        )
    return text


def _half_load_notes(res: SuiteResult) -> list[str]:
    halves = [
        r
        for r in res.loads
        if r.model == REF_MODEL and r.system in {paced_name(s, 0.5) for s in PACED_TARGETS}
    ]
    if not halves:
        return []
    suffix = paced_name("", 0.5)
    parts = ", ".join(
        f"{r.system.replace(suffix, '')}: p50 {r.p50_ms:.2f} / p99 {r.p99_ms:.2f} ms at "
        f"{r.steps_per_s:,.0f} steps/s, of which the engine itself p99 <= {r.server_request_p99_ms:.1f} ms"
        for r in halves
    )
    busy = _busy(res)
    notes = [
        f"- **Tail latency at half load** ({parts}). The load average was "
        f"{res.environment['load_average_1m_at_start']:.1f} at the start of this run and "
        f"{res.environment.get('load_average_1m_at_end', float('nan')):.1f} at its end, on "
        f"{res.environment['cpus']} cores. "
        + (
            "Every process, the load generator included, is descheduled for milliseconds at a time on a busy "
            "machine, which is what the p99 sees first."
            if busy
            else "The machine was quiet, so the tail is the server's own: compare the engine's request p99."
        )
    ]
    for half in halves:
        system = half.system.replace(suffix, "")
        peak = row(res, system, half.sessions)
        if peak and peak.server_cpu_us_per_step == peak.server_cpu_us_per_step:
            notes.append(
                f"  - {system}: mean batch {half.batch_mean:.0f} sessions at half load against "
                f"{peak.batch_mean:.0f} closed-loop; {half.server_cpu_us_per_step:.0f} us of server CPU per "
                f"step against {peak.server_cpu_us_per_step:.0f} us, {half.server_cpu_cores:.2f} cores busy "
                f"against {peak.server_cpu_cores:.2f}."
            )
    return notes


def analysis(res: SuiteResult) -> str:
    """What the numbers say, with the figures of this run."""
    notes: list[str] = []
    cost = _cost_note(res)
    if cost:
        notes.append(cost)
    pa1, echo1u = row(res, PA_UNARY, 1), row(res, UNARY_ECHO, 1)
    if pa1 and echo1u:
        notes.append(
            f"- **One sequence over KServe unary** (perf_analyzer, concurrency 1): {pa1.steps_per_s:,.0f} "
            f"steps/s at p50 {pa1.p50_ms:.2f} ms, {pa1.server_cpu_us_per_step:.0f} us of server CPU per "
            "step; "
            f"the unary echo answers one caller in {echo1u.p50_ms:.2f} ms p50 "
            f"({echo1u.messages_per_s:,.0f} calls/s)."
        )
    pos = {p["position"]: p for p in res.positions if p["model"] == REF_MODEL}
    echo1 = row(res, BIDI_ECHO, 1)
    if 1000 in pos and 1 in pos and echo1:
        notes.append(
            f"- **Stream position.** A streamed step costs the same at position 1,000 as at 1 "
            f"({pos[1000]['stream_ms']:.2f} vs {pos[1]['stream_ms']:.2f} ms p50), while recomputing the "
            f"history costs {pos[1000]['stateless_ms']:.1f} ms served "
            f"({pos[1000]['ort_stateless_ms']:.1f} ms "
            f"of it raw ONNX Runtime). The latency ratio is bounded by the round trip itself: the bidi echo "
            f"alone takes {echo1.p50_ms:.2f} ms at one stream, so the table's bound row is the best any "
            "server behind Python gRPC could show here; the CPU-cost ratio is the like-for-like cost "
            "comparison."
        )
    chunk, chunk_many = row(res, STREAM, 64, 16), row(res, STREAM_MANY, 64, 16)
    if chunk and chunk_many:
        notes.append(
            "- **16-step chunks.** Over Stream the server spends "
            f"{chunk.server_cpu_us_per_step:.1f} us of CPU per step "
            f"({16 * chunk.server_cpu_us_per_step:.0f} us per 16-step message, mean batch "
            f"{chunk.batch_mean:.0f}) against raw ONNX Runtime's cost at that batch in the ceiling rows; the "
            "difference is again the per-message gRPC and protobuf work, paid once per session per chunk. "
            "StreamMany pays it once per many sessions: "
            f"{chunk_many.server_cpu_us_per_step:.1f} us per step, {chunk_many.steps_per_s:,.0f} steps/s."
        )
    written = next((m for m in res.memory if m["state"] == "written"), None)
    fresh = next((m for m in res.memory if m["state"] == "fresh"), None)
    if written and fresh:
        notes.append(
            f"- **Idle sessions.** {written['sessions']:,} sessions with their state written take "
            f"{written['rss_per_session_bytes']:,.0f} B each ({written['ratio']:.2f}x the "
            f"{written['raw_state_bytes_per_session']:,} B of raw state); never-stepped sessions take "
            f"{fresh['rss_per_session_bytes']:,.0f} B (the slab's zero pages are not resident until "
            "written). "
            f"A full garbage collection with that many sessions takes "
            f"{written.get('gc_full_collection_ms', float('nan')):,.0f} ms on the event loop "
            f"({written.get('gc_tracked_objects', 0):,} tracked objects)."
        )
    notes += _half_load_notes(res)
    return "\n".join(notes) + "\n" if notes else ""


def _performance(res: SuiteResult, vs: list[Verdict], header: str, out: Path, page_dir: Path) -> str:
    rel = Path(os.path.relpath(out, page_dir)).as_posix()  # links work from the page's own folder
    noisy = _busy(res)
    caveat = (
        "\n**This run was made on a shared, busy machine** (load average above half the core count), so "
        "absolute numbers are low and noisy; the ratios, measured side by side in the same run, and the "
        "CPU-per-step columns are the steadier figures.\n"
        if noisy
        else ""
    )
    n = res.plan.reference_streams
    return (
        "Measured by `make bench` (full suite with the open-streams and workers runs, about 35 minutes on 2 "
        "cores; `make bench BENCH_ARGS=--quick` "
        "for a reduced run in two to three minutes, written to `docs/bench/quick/`, never to the committed "
        "results). The load generator runs closed-loop (or paced) callers from separate client processes; the"
        " reference model is a 2-layer LSTM with hidden size 256 (`tests/bench/refmodel.py`), one step per "
        "message unless said otherwise. Measured in the same run, with the same message sizes: the floors (a "
        "no-op grpc.aio bidi echo and unary echo: what Python gRPC alone costs per message), native `Stream` "
        "and `StreamMany`, KServe `ModelStreamInfer` from our own driver (one Triton sequence per stream), "
        "Triton's `perf_analyzer` (unary and `--streaming`, `--sequence-length 100000`, concurrency 1 and 64)"
        " against the KServe API and against a no-op KServe server (the same client's floor), raw ONNX "
        "Runtime at the batch sizes the server formed (the compute ceiling), the service with batching off, "
        "and stateless recompute of the whole history. Server CPU per step is the server process's CPU "
        "seconds over the window divided by the steps served in it.\n\n"
        f"{header}{caveat}\n"
        f"Ratios against the targets (throughput and CPU at {n} concurrent callers; paced load at fractions "
        "of each path's own closed-loop peak):\n\n"
        f"{verdict_table(vs)}\n"
        f"{analysis(res)}\n"
        f"![latency against load]({rel}/latency_load.png)\n\n"
        f"![throughput and latency]({rel}/throughput.png)\n\n"
        f"![cost against stream position]({rel}/position.png)\n\n"
        f"{load_table(res)}\n"
        f"All figures, the reference-point tables and the batch-size / CPU plot: `{rel}/results.md`, "
        f"`{rel}/results.json`, `{rel}/batches_cpu.png`.\n"
    )
