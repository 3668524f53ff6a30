"""A million idle sessions: the spill tier's memory, disk, resume latency, hot-session rate and GC stalls.

`python -m tests.bench.sessions [--sessions N] [--quick] [--out DIR]` (`make bench-sessions`) runs the real
`Engine` (slab, session table, batcher, ONNX Runtime, spiller) on the benchmark reference LSTM (2 layers,
H=256: 4,096 B of raw state per session) in this process, without the gRPC edge: creating a million sessions
over unary RPCs would take many minutes and add nothing an idle session keeps. RSS is this process's.

1. Baseline RSS with the model loaded and 64 hot sessions open.
2. N sessions created and stepped once (all resident): RSS per session, and the garbage collector's full
   collection time (`gc.collect()`, plus the longest generation-2 pause seen through `gc.callbacks`).
3. The 64 hot sessions step in a closed loop (one `step_many` of 64 rows at a time).
4. The model's `spill_after_s` is set to 1 s at run time (as a config.yaml change and reload would) and back
   to 0, alternately, in pairs of windows: the hot step rate with the spiller at work (at the default
   `spill_duty`) against without, measured in the same minute. Then the hot loop stops and the spiller moves
   the rest at `--bulk-duty`; resident / spilled counts and RSS are sampled for the plot.
5. RSS per spilled session, spill file bytes per session against the raw state, and the full collection time
   again (after).
6. Resume latency: single steps of spilled sessions (each brought back from disk) interleaved with single
   steps of resident sessions; the added p99 is the difference of the two p99s.

Writes `sessions.json`, `sessions.md` and `sessions.png` to `--out` (default docs/bench; --quick: 50,000
sessions to docs/bench/quick/).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from prometheus_client import CollectorRegistry
from tqdm import tqdm

from service.config import Settings
from service.core import limits
from service.core.engine import Engine
from service.core.types import StepCall
from tests.bench.refmodel import RefModelConfig, write_reference_repository

MODEL = "ref_lstm"
HOT = 64
BATCH = 1024


class GcPauses:
    """Generation-2 collection pauses seen through `gc.callbacks` (the stalls the event loop suffers)."""

    def __init__(self) -> None:
        self.pauses: list[float] = []
        self._t0 = 0.0
        gc.callbacks.append(self._cb)

    def _cb(self, phase: str, info: dict[str, int]) -> None:
        if info.get("generation") != 2:
            return
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.pauses.append((time.perf_counter() - self._t0) * 1e3)

    def take(self) -> float:
        """Longest pause since the last call (ms; 0 if none), then forget them."""
        worst = max(self.pauses, default=0.0)
        self.pauses.clear()
        return worst


def full_collection_ms(repeats: int = 3) -> tuple[float, float]:
    """Median wall and CPU time of `gc.collect()` (a full collection) in ms (CPU: without preemption)."""
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.thread_time()
        gc.collect()
        wall.append((time.perf_counter() - t0) * 1e3)
        cpu.append((time.thread_time() - c0) * 1e3)
    return float(np.median(wall)), float(np.median(cpu))


class HotLoop:
    """64 sessions stepped in a closed loop; counts steps (rows) as they complete."""

    def __init__(self, engine: Engine, ids: list[str], x: np.ndarray) -> None:
        self.engine, self.ids, self.x = engine, ids, x
        self.seq = {sid: 1 for sid in ids}  # the next seq per session
        self.steps = 0
        self.running = False
        self.task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while self.running:
            calls = [StepCall(sid, self.seq[sid], {"x": self.x}) for sid in self.ids]
            results = await self.engine.step_many(calls)
            for sid, r in zip(self.ids, results, strict=True):
                if isinstance(r, Exception):
                    raise r
                self.seq[sid] += 1
            self.steps += len(results)

    def start(self) -> None:
        self.running = True
        self.task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        self.running = False
        if self.task is not None:
            await self.task

    async def rate(self, seconds: float) -> float:
        """Hot steps per second over a window of `seconds`."""
        s0, t0 = self.steps, time.perf_counter()
        await asyncio.sleep(seconds)
        return (self.steps - s0) / (time.perf_counter() - t0)


async def run(  # noqa: C901 - the phases of the module docstring, in order, one after the other
    n: int, window_s: float, pairs: int, spill_after_s: float, repo: Path, spill_dir: Path, bulk_duty: float
) -> dict[str, Any]:
    """Run the phases of the module docstring; return every figure."""
    settings = Settings(
        model_repository=repo,
        metrics_port=-1,
        max_sessions=n + 10_000,
        max_sessions_per_model=n + 10_000,
        idle_ttl_s=86_000.0,
        sweep_interval_s=1.0,
        spill_after_s=0,  # off while the sessions are created; lowered per model in phase 4
        spill_dir=spill_dir,
        repository_poll_s=0,
    )
    engine = Engine(settings, registry=CollectorRegistry())
    await engine.start()
    proc = psutil.Process()
    pauses = GcPauses()
    x = np.zeros((1, RefModelConfig().features), np.float32)
    hot_ids = [(await engine.create_session(MODEL)).session_id for _ in range(HOT)]
    hot = HotLoop(engine, hot_ids, x)
    hot.start()
    await asyncio.sleep(0.5)  # warm: batches, arenas
    await hot.stop()
    # Warm ONNX Runtime's arena for the creation phase's 1,024-row batches too: it keeps its largest batch's
    # buffers for good, which is not per-session memory.
    warm = [(await engine.create_session(MODEL)).session_id for _ in range(BATCH)]
    await engine.step_many([StepCall(sid, 1, {"x": x}) for sid in warm])
    for sid in warm:
        await engine.close(sid)
    del warm
    gc.collect()
    limits.trim_memory()
    rss0 = proc.memory_info().rss

    # 2. N sessions, created and stepped once. The resume sample's ids are kept as bytes in one array: a str
    # object kept every few hundred sessions would pin the allocator's pools and skew the RSS figures.
    sample_every = max(1, n // 2000)
    sample_parts: list[np.ndarray] = []
    t0 = time.perf_counter()
    with tqdm(total=n, desc="create + step", unit="sess", mininterval=2.0, file=sys.stderr) as bar:
        made = 0
        while made < n:
            k = min(BATCH, n - made)
            ids = [(await engine.create_session(MODEL)).session_id for _ in range(k)]
            results = await engine.step_many([StepCall(sid, 1, {"x": x}) for sid in ids])
            bad = [r for r in results if isinstance(r, Exception)]
            if bad:
                raise RuntimeError(f"step failed: {bad[0]}")
            sample_parts.append(np.array([i.encode() for i in ids[::sample_every]], dtype="S64"))
            made += k
            bar.update(k)
    create_s = time.perf_counter() - t0
    pauses_creating = pauses.take()
    rss1 = proc.memory_info().rss
    tracked_before = len(gc.get_objects())
    gc_before_ms, gc_before_cpu = full_collection_ms()

    # 3. Hot rate, no spiller.
    hot.start()
    rate_before = await hot.rate(window_s)
    pauses_before = pauses.take()

    # 4. Spill. First alternate windows with the spiller on and off (same load, same minute: a ratio robust
    # to the machine's other work), then let it finish.
    manager = engine.session_manager
    mv = manager.host.get(MODEL)

    def spill_after(seconds: float) -> None:
        mv.spec = replace(mv.spec, config=replace(mv.spec.config, spill_after_s=seconds))

    on_steps = on_time = off_steps = off_time = 0.0
    trace: list[dict[str, float]] = []
    t_spill = time.perf_counter()
    s_spill = hot.steps
    for _ in tqdm(range(pairs), desc="spiller on/off windows", file=sys.stderr):
        for on in (True, False):
            spill_after(spill_after_s if on else 0.0)
            await asyncio.sleep(0.3)  # the spiller notices (or finishes its turn)
            s0, t0 = hot.steps, time.perf_counter()
            await asyncio.sleep(window_s / 2)
            if on:
                on_steps, on_time = on_steps + hot.steps - s0, on_time + time.perf_counter() - t0
            else:
                off_steps, off_time = off_steps + hot.steps - s0, off_time + time.perf_counter() - t0
    spill_after(spill_after_s)
    # The rest: the hot loop stops and the spiller may take more of the idle loop (an operator's setting;
    # the ratio above is the default duty's), so the run ends in minutes on 2 shared cores.
    await hot.stop()
    engine.settings.spill_duty = bulk_duty
    with tqdm(total=n, desc="spill", unit="sess", mininterval=2.0, file=sys.stderr) as bar:
        resident = manager.table.sessions

        def idle_resident() -> int:  # the hot sessions may spill too once the hot loop stops
            return len(resident) - sum(1 for h in hot_ids if h in resident)

        while idle_resident() > 0:
            await asyncio.sleep(0.5)
            spilled = n - idle_resident()
            trace.append(
                {
                    "t": time.perf_counter() - t_spill,
                    "resident": idle_resident(),
                    "spilled": spilled,
                    "rss": proc.memory_info().rss,
                    "hot_steps": hot.steps - s_spill,
                }
            )
            bar.update(min(n, spilled) - bar.n)
            if time.perf_counter() - t_spill > 3600:
                raise RuntimeError("spilling took over an hour")
    spill_s = time.perf_counter() - t_spill
    rate_on, rate_off = on_steps / on_time, off_steps / off_time
    pauses_during = pauses.take()
    await asyncio.sleep(1.5)  # the spiller's wave ends: dict compaction, malloc_trim
    hot.start()
    rate_after = await hot.rate(window_s)
    await hot.stop()
    gc.collect()
    rss2 = proc.memory_info().rss
    trace.append(
        {
            "t": time.perf_counter() - t_spill,
            "resident": 0,
            "spilled": n,
            "rss": rss2,
            "hot_steps": hot.steps - s_spill,
        }
    )
    tracked_after = len(gc.get_objects())
    gc_after_ms, gc_after_cpu = full_collection_ms()
    files = manager.tiering.files
    disk_bytes = sum(f.disk_bytes for f in files)
    file_bytes = sum(f.size_bytes for f in files)
    index_bytes = manager.tiering.where.nbytes

    # 6. Resume latency against resident single steps, interleaved; and the resume itself (read, slab row,
    # table entry: what a spilled session adds to its step), timed around `Tiering.resume`.
    resumed, resident, resume_op, resume_cpu = [], [], [], []
    seq = dict(hot.seq)
    tiering = manager.tiering
    bare_resume = tiering.resume

    def timed_resume(session_id: str) -> Any:
        t, c = time.perf_counter(), time.thread_time()
        try:
            return bare_resume(session_id)
        finally:
            resume_op.append(time.perf_counter() - t)
            resume_cpu.append(time.thread_time() - c)

    spill_after(0.0)  # nothing spills again while resumes are measured
    for hid in hot_ids:  # the hot sessions may have spilled while the hot loop was stopped: bring them back
        await engine.step(hid, seq[hid], {"x": x})
        seq[hid] += 1
    tiering.resume = timed_resume  # type: ignore[method-assign]
    sample = [b.decode() for b in np.concatenate(sample_parts)]
    for i, sid in enumerate(tqdm(sample, desc="resume", unit="step", mininterval=2.0, file=sys.stderr)):
        hid = hot_ids[i % HOT]
        t = time.perf_counter()
        await engine.step(hid, seq[hid], {"x": x})
        resident.append(time.perf_counter() - t)
        seq[hid] += 1
        t = time.perf_counter()
        await engine.step(sid, 2, {"x": x})
        resumed.append(time.perf_counter() - t)
    await engine.stop()
    raw = 2 * RefModelConfig().layers * RefModelConfig().hidden * 4
    p = np.percentile
    return {
        "sessions": n,
        "raw_state_bytes_per_session": raw,
        "create_and_step_s": create_s,
        "rss_baseline_bytes": rss0,
        "rss_resident_bytes": rss1,
        "rss_spilled_bytes": rss2,
        "rss_per_resident_session_bytes": (rss1 - rss0) / n,
        "rss_per_spilled_session_bytes": (rss2 - rss0) / n,
        "spill_index_bytes": index_bytes,
        "spill_file_bytes": file_bytes,
        "spill_disk_bytes": disk_bytes,
        "disk_per_session_bytes": disk_bytes / n,
        "disk_vs_raw": disk_bytes / (n * raw),
        "spill_seconds": spill_s,
        "spill_duty": Settings().spill_duty,
        "spill_batch": engine.settings.spill_batch,
        "hot_rate_before": rate_before,
        "hot_rate_after": rate_after,
        "hot_rate_spiller_on": rate_on,
        "hot_rate_spiller_off": rate_off,
        "hot_rate_ratio": rate_on / rate_off,
        "on_off_windows": pairs,
        "resume_op_ms_p50": float(p(resume_op, 50) * 1e3),
        "resume_op_ms_p99": float(p(resume_op, 99) * 1e3),
        "resume_cpu_ms_p50": float(p(resume_cpu, 50) * 1e3),
        "resume_cpu_ms_p99": float(p(resume_cpu, 99) * 1e3),
        "bulk_spill_duty": bulk_duty,
        "deadline_bytes": sum(f.deadlines.nbytes for f in files),
        "resident_step_ms_p50": float(p(resident, 50) * 1e3),
        "resident_step_ms_p99": float(p(resident, 99) * 1e3),
        "resumed_step_ms_p50": float(p(resumed, 50) * 1e3),
        "resumed_step_ms_p99": float(p(resumed, 99) * 1e3),
        "resume_added_p99_ms": float((p(resumed, 99) - p(resident, 99)) * 1e3),
        "resume_samples": len(resumed),
        "gc_full_ms_resident": gc_before_ms,
        "gc_full_ms_spilled": gc_after_ms,
        "gc_full_cpu_ms_resident": gc_before_cpu,
        "gc_full_cpu_ms_spilled": gc_after_cpu,
        "gc_tracked_resident": tracked_before,
        "gc_tracked_spilled": tracked_after,
        "gc_max_gen2_pause_ms_creating": pauses_creating,
        "gc_max_gen2_pause_ms_resident_window": pauses_before,
        "gc_max_gen2_pause_ms_while_spilling": pauses_during,
        "trace": trace,
    }


def _fmt(v: float, digits: int = 0) -> str:
    return f"{v:,.{digits}f}"


def render_md(r: dict[str, Any]) -> str:
    """The markdown the README includes (every figure from the JSON)."""
    raw = r["raw_state_bytes_per_session"]
    lines = [
        f"{r['sessions']:,} sessions of the reference LSTM (2 layers, H=256: {raw:,} B of raw state each), "
        "each created and stepped once, then idle past the spill threshold, while 64 hot sessions step (see "
        f"below). One run of `python -m tests.bench.sessions` ([sessions.json](sessions.json)), engine "
        f"in-process (no gRPC edge), spiller at `spill_duty` {r['spill_duty']:g}, `spill_batch` "
        f"{r['spill_batch']}; load average {r['load_start']:.1f} at start, {r['load_end']:.1f} at end on "
        f"{r['cpus']} cores shared with other work.",
        "",
        "| figure | resident (before) | spilled (after) | target |",
        "|---|---:|---:|---|",
        f"| server RSS per session | {_fmt(r['rss_per_resident_session_bytes'])} B | "
        f"{_fmt(r['rss_per_spilled_session_bytes'])} B | <= 600 B after spill |",
        f"| disk per session | - | {_fmt(r['disk_per_session_bytes'])} B ({r['disk_vs_raw']:.2f}x raw) "
        "| <= 1.2x raw |",
        f"| GC full collection (`gc.collect()`), wall / CPU | {_fmt(r['gc_full_ms_resident'], 1)} / "
        f"{_fmt(r['gc_full_cpu_ms_resident'], 1)} ms | {_fmt(r['gc_full_ms_spilled'], 1)} / "
        f"{_fmt(r['gc_full_cpu_ms_spilled'], 1)} ms | no stall that grows with idle sessions |",
        f"| objects tracked by the GC | {r['gc_tracked_resident']:,} | {r['gc_tracked_spilled']:,} | |",
        f"| step p50 / p99 (single step) | {r['resident_step_ms_p50']:.2f} / "
        f"{r['resident_step_ms_p99']:.2f} ms | {r['resumed_step_ms_p50']:.2f} / "
        f"{r['resumed_step_ms_p99']:.2f} ms (resumed from disk) | resume adds <= 1 ms p99 |",
        f"| hot steps/s (alternating windows) | {_fmt(r['hot_rate_spiller_off'])} spiller off | "
        f"{_fmt(r['hot_rate_spiller_on'])} spiller on ({r['hot_rate_ratio']:.2f}x) | drop <= 10% |",
        "",
        f"- RSS per spilled session: {_fmt(r['rss_per_spilled_session_bytes'])} B "
        f"({r['rss_per_resident_session_bytes'] / max(r['rss_per_spilled_session_bytes'], 1):.0f}x fewer "
        f"bytes than resident); the spill index itself is {r['spill_index_bytes'] / r['sessions']:.0f} B "
        "per session.",
        f"- Disk: {r['disk_vs_raw']:.2f}x the raw state bytes "
        f"({_fmt(r['spill_disk_bytes'] / 2**20)} MiB for {r['sessions']:,} sessions).",
        f"- Resuming a spilled session (read its record, take a slab row, re-enter the table) takes "
        f"{r['resume_op_ms_p50']:.3f} ms p50, {r['resume_op_ms_p99']:.3f} ms p99 of wall time "
        f"({r['resume_cpu_ms_p50']:.3f} / {r['resume_cpu_ms_p99']:.3f} ms of CPU, free of preemption by the "
        "machine's other work): the latency it adds to its step. Whole single steps, "
        f"{r['resume_samples']:,} resumed interleaved with as many resident ones: "
        f"p99 {r['resumed_step_ms_p99']:.2f} against {r['resident_step_ms_p99']:.2f} ms "
        f"({r['resume_added_p99_ms']:+.2f} ms, scheduling noise of the loaded machine included).",
        f"- Hot sessions step at {r['hot_rate_ratio']:.2f}x their rate without the spiller "
        f"({r['on_off_windows']} pairs of {r['window_s'] / 2:.1f} s windows, spiller on / off at the default "
        f"`spill_duty` {r['spill_duty']:g}); the rest then spilled at `spill_duty` {r['bulk_spill_duty']:g} "
        f"with the hot loop stopped: {r['sessions']:,} sessions in {r['spill_seconds']:.0f} s in all.",
        f"- Longest generation-2 GC pause while the {r['sessions']:,} resident sessions were created: "
        f"{r['gc_max_gen2_pause_ms_creating']:.0f} ms; while spilling: "
        f"{r['gc_max_gen2_pause_ms_while_spilling']:.0f} ms.",
        "",
        "![resident vs spilled sessions and RSS over time](sessions.png)",
    ]
    return "\n".join(lines) + "\n"


def plot(r: dict[str, Any], path: Path) -> None:
    """Resident and spilled sessions over time, and RSS, while the spiller works."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tr = r["trace"]
    t = [p["t"] for p in tr]
    fig, ax = plt.subplots(figsize=(8, 4.2))
    ax.plot(t, [p["resident"] for p in tr], label="resident idle sessions", color="tab:red")
    ax.plot(t, [p["spilled"] for p in tr], label="spilled sessions", color="tab:blue")
    ax.set_xlabel("seconds since the spill threshold was reached")
    ax.set_ylabel("sessions")
    ax2 = ax.twinx()
    ax2.plot(t, [p["rss"] / 2**20 for p in tr], label="server RSS (MiB)", color="tab:gray", linestyle="--")
    ax2.set_ylabel("RSS (MiB)")
    ax2.set_ylim(bottom=0)
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="center right")
    ax.set_title(f"{r['sessions']:,} idle sessions leave memory")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write sessions.{json,md,png}."""
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.sessions", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--sessions", type=int, default=None, help="default 1,000,000 (--quick: 50,000)")
    parser.add_argument("--quick", action="store_true", help="50,000 sessions, short windows")
    parser.add_argument(
        "--out", type=Path, default=None, help="default docs/bench (--quick: docs/bench/quick)"
    )
    parser.add_argument("--window", type=float, default=None, help="seconds per hot-rate window")
    parser.add_argument("--bulk-duty", type=float, default=0.5, help="spill_duty once the ratio is measured")
    parser.add_argument("--render", type=Path, default=None, help="re-render md and PNG from a sessions.json")
    args = parser.parse_args(argv)
    if args.render is not None:
        result = json.loads(args.render.read_text())
        (args.render.parent / "sessions.md").write_text(render_md(result))
        plot(result, args.render.parent / "sessions.png")
        return 0
    n = args.sessions or (50_000 if args.quick else 1_000_000)
    out = args.out or (Path("docs/bench/quick") if args.quick else Path("docs/bench"))
    window = args.window or (3.0 if args.quick else 8.0)
    out.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="rnnserve-bench-sessions-") as tmp:
        repo = Path(tmp) / "repository"
        write_reference_repository(repo, name=MODEL)
        pairs = 4 if args.quick else 6
        result = asyncio.run(run(n, window, pairs, 1.0, repo, Path(tmp) / "spill", args.bulk_duty))
    result.update(
        load_start=load_start,
        load_end=os.getloadavg()[0],
        cpus=os.cpu_count(),
        python=platform.python_version(),
        command="python -m tests.bench.sessions" + (" --quick" if args.quick else ""),
        window_s=window,
    )
    (out / "sessions.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "sessions.md").write_text(render_md(result))
    plot(result, out / "sessions.png")
    print(render_md(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
