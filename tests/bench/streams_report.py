"""The open-streams benchmark's report: the markdown table the README includes, the targets, the plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

MIB = 1 << 20


def _rows(data: dict[str, Any], rate: float, active: int | None = None) -> dict[int, dict[str, Any]]:
    """Rows at `rate` by open-stream count (paced over all open streams unless `active` is given); the long
    runs (more windows than the others) are left out."""
    short = min((len(r["window_p99_ms"]) for r in data["rows"]), default=0)
    out = {}
    for r in data["rows"]:
        if r["rate"] != rate or len(r["window_p99_ms"]) > short:
            continue
        if active is None and r["active_streams"] != r["open_streams"]:
            continue
        out[r["open_streams"]] = r
    return out


def _long(data: dict[str, Any], open_streams: int) -> dict[str, Any] | None:
    short = min((len(r["window_p99_ms"]) for r in data["rows"]), default=0)
    return next(
        (r for r in data["rows"] if r["open_streams"] == open_streams and len(r["window_p99_ms"]) > short),
        None,
    )


def targets(data: dict[str, Any]) -> list[tuple[str, str, str, bool]]:
    """(target, measured, required, met) for each of the issue's targets this run can judge."""
    out: list[tuple[str, str, str, bool]] = []
    rates = data["env"]["plan"]["rates"]
    counts = sorted(int(k) for k in data["rss"] if k.isdigit())
    ref, top = counts[0], counts[-1]
    first = _rows(data, rates[0])
    at = f"{rates[0]:,.0f} steps/s"
    if ref in first and top in first:
        a, b = first[top]["p99_ms"], first[ref]["p99_ms"]
        measured = f"{a:.1f} vs {b:.1f} ms ({a / b:.2f}x)"
        out.append((f"p99 at {at}: {top:,} open streams / {ref}", measured, "<= 2x", a / b <= 2.0))
    long_top, long_ref = _long(data, top), _long(data, ref)
    if long_top and long_ref:
        worst = float(np.nanmax(long_top["window_p99_ms"]))
        base = long_ref["p99_ms"]
        name = (
            f"p99 of every 30 s window of a {data['env']['plan']['long_s']:g} s run at {at}: "
            f"{top:,} streams / {ref} streams"
        )
        measured = f"worst window {worst:.1f} vs {base:.1f} ms ({worst / base:.2f}x)"
        out.append((name, measured, "<= 2x", worst / base <= 2.0))
    sat = next((r for r in data["rows"] if r["rate"] == 0), None)
    if sat:
        for n, what in ((ref, "paced"), (top, "every step one of a stream idle since its last")):
            r = first.get(n)
            if r:
                x = r["server_cpu_us_per_step"] / sat["server_cpu_us_per_step"]
                name = f"server CPU per step at {at} over {n:,} streams ({what}) / saturation"
                measured = (
                    f"{r['server_cpu_us_per_step']:.0f} vs {sat['server_cpu_us_per_step']:.0f} us ({x:.2f}x)"
                )
                out.append((name, measured, "<= 1.5x", x <= 1.5))
        out.extend(_floor(data, at))
    rss = data["rss"]
    if "after" in rss and "before" in rss:
        x = rss["after"] / rss["before"]
        kept = rss["after"] - rss["before"]
        echo = data.get("echo_rss", {})
        floor = ""
        if "after" in echo and "before" in echo:
            e_kept = echo["after"] - echo["before"]
            floor = (
                f"; the bare grpc.aio echo, same streams, same run: {echo['after'] / MIB:,.0f} vs "
                f"{echo['before'] / MIB:,.0f} MiB ({echo['after'] / echo['before']:.2f}x, "
                f"{e_kept / MIB:,.0f} MiB kept): the floor grpc.aio and the interpreter set"
            )
        measured = (
            f"{rss['after'] / MIB:,.0f} vs {rss['before'] / MIB:,.0f} MiB ({x:.2f}x, "
            f"{kept / MIB:,.0f} MiB kept; the state slab's {top * data['state_bytes'] / MIB:,.0f} MiB of"
            f" rows are unmapped as sessions end){floor}"
        )
        out.append(("RSS after every stream closed / before they opened", measured, "<= 1.2x", x <= 1.2))
    return out


def _floor(data: dict[str, Any], at: str) -> list[tuple[str, str, str, bool]]:
    """The same CPU ratio for the least any server could spend here: the bare echo's CPU per message plus
    raw ONNX Runtime's CPU per step, at batch 1 (a paced step runs alone) and at the batch of saturation."""
    f = data.get("floor") or {}
    keys = ("echo_paced_cpu_us", "echo_saturation_cpu_us", "ort_batch1_cpu_us", "ort_saturation_cpu_us")
    if not all(k in f for k in keys):
        return []
    paced = f["echo_paced_cpu_us"] + f["ort_batch1_cpu_us"]
    sat = f["echo_saturation_cpu_us"] + f["ort_saturation_cpu_us"]
    batch = max(1, round(f.get("saturation_mean_batch", 1.0)))
    measured = (
        f"({f['echo_paced_cpu_us']:.0f} us echo paced + {f['ort_batch1_cpu_us']:.0f} us ORT at batch 1) vs "
        f"({f['echo_saturation_cpu_us']:.0f} us echo closed loop + {f['ort_saturation_cpu_us']:.0f} us ORT "
        f"per step at batch {batch}) = {paced:.0f} vs {sat:.0f} us ({paced / sat:.2f}x)"
    )
    return [(f"(floor) the same ratio for echo + raw ONNX Runtime, {at} paced / saturation", measured,
             "<= 1.5x", paced / sat <= 1.5)]  # fmt: skip


def render(data: dict[str, Any]) -> str:
    """The markdown the README includes."""
    env, plan = data["env"], data["env"]["plan"]
    rates = plan["rates"]
    counts = sorted(int(k) for k in data["rss"] if k.isdigit())
    ref = counts[0]
    by_rate = {rate: _rows(data, rate) for rate in rates}
    rss, echo = data["rss"], data["echo_rss"]
    lines = [
        f"One server process (`--workers 1`) serving the `{data['model']}` model "
        f"({data['state_bytes']:,} B of state per session); {env['cpus']} cores shared with the client "
        f"processes (2, 100 streams per connection); each paced run {plan['seconds']:g} s, steps spread "
        f"evenly over the open streams, latency from the scheduled send. Load average "
        f"{env['load_average_start']:g} at start, {env.get('load_average_end', float('nan')):g} at end. "
        "`make bench-streams` ([streams.json](streams.json)).",
        "",
        "| open streams | server RSS | RSS per stream (state) | bare grpc.aio echo RSS per stream | "
        + " | ".join(f"{r:,.0f} steps/s: p50 / p99 / max ms, CPU us/step" for r in rates)
        + " | longest loop stall / full-GC pause |",
        "|--:|--:|--:|--:|" + "--:|" * len(rates) + "--:|",
    ]
    for n in counts:
        per = (rss[str(n)] - rss["before"]) / n / 1024
        echo_per = (echo[str(n)] - echo["before"]) / n / 1024 if str(n) in echo else float("nan")
        cells = []
        stall = gcp = 0.0
        for rate in rates:
            r = by_rate[rate].get(n)
            if r is None:
                cells.append("-")
                continue
            cpu = r["server_cpu_us_per_step"]
            cells.append(f"{r['p50_ms']:.1f} / {r['p99_ms']:.1f} / {r['max_ms']:.0f}, {cpu:.0f}")
            stall = max(stall, r["longest_loop_lag_ms"])
            gcp = max(gcp, r["longest_gc_pause_ms"])
        lines.append(
            f"| {n:,} | {rss[str(n)] / MIB:,.0f} MiB | {per:.1f} KiB ({data['state_bytes'] / 1024:.1f}) | "
            f"{echo_per:.1f} KiB | " + " | ".join(cells) + f" | <= {stall:g} / <= {gcp:g} ms |"
        )
    sat = next((r for r in data["rows"] if r["rate"] == 0), None)
    lines.append("")
    if sat:
        lines.append(
            f"Saturation reference: {ref} streams closed loop, {sat['steps_per_s']:,.0f} steps/s at "
            f"{sat['server_cpu_us_per_step']:.0f} us of server CPU per step. RSS: "
            f"{rss['before'] / MIB:,.0f} MiB warm with no stream open, {rss.get('after', 0) / MIB:,.0f} MiB "
            f"after every stream closed (echo: {echo.get('before', 0) / MIB:,.0f} -> "
            f"{echo.get('after', 0) / MIB:,.0f} MiB). Stall and pause columns are histogram bucket bounds."
        )
    for n in counts:
        r = _long(data, n)
        if r:
            w = ", ".join(f"{x:.0f}" for x in r["window_p99_ms"])
            lines.append(
                f"- {plan['long_s']:g} s at {r['rate']:,.0f} steps/s over {n:,} streams: p50 "
                f"{r['p50_ms']:.1f}, p99 {r['p99_ms']:.1f}, max {r['max_ms']:.0f} ms; p99 per 30 s window: "
                f"{w} ms; longest loop "
                f"stall <= {r['longest_loop_lag_ms']:g} ms, {r['full_collections']:.0f} full collections "
                f"(longest <= {r['longest_gc_pause_ms']:g} ms)."
            )
    errors = sum(r["errors"] for r in data["rows"])
    if errors:
        first = next(r["first_error"] for r in data["rows"] if r["first_error"])
        lines.append(f"- **{errors} streams failed**; first: `{first[:200]}`")
    lines += ["", "| target | measured | required | met |", "|---|---|---|---|"]
    for name, measured, required, met in targets(data):
        lines.append(f"| {name} | {measured} | {required} | {'met' if met else '**missed**'} |")
    return "\n".join(lines) + "\n"


def plot(data: dict[str, Any], path: Path) -> None:
    """Latency (p50, p99, max) and server CPU per step against open streams, per rate (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, cx) = plt.subplots(1, 2, figsize=(11, 4))
    for i, rate in enumerate(data["env"]["plan"]["rates"]):
        rows = _rows(data, rate)
        xs = sorted(rows)
        color = f"C{i}"
        for key, style in (("p50_ms", ":"), ("p99_ms", "-"), ("max_ms", "--")):
            ax.plot(xs, [rows[x][key] for x in xs], style, color=color, marker="o",
                    label=f"{rate:,.0f}/s {key[:-3]}")  # fmt: skip
        cx.plot(
            xs,
            [rows[x]["server_cpu_us_per_step"] for x in xs],
            color=color,
            marker="o",
            label=f"{rate:,.0f}/s",
        )
    sat = next((r for r in data["rows"] if r["rate"] == 0), None)
    if sat:
        cx.axhline(sat["server_cpu_us_per_step"], color="k", lw=0.8, label="saturation (64, closed loop)")
    for a in (ax, cx):
        a.set_xscale("log")
        a.set_xlabel("open streams")
        a.grid(alpha=0.3)
    ax.set_yscale("log")
    ax.set_ylabel("latency, ms")
    ax.set_title("step latency vs open streams")
    cx.set_ylabel("server CPU per step, us")
    cx.set_title("server CPU per step")
    ax.legend(fontsize=7, ncol=2)
    cx.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
