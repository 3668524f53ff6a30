"""In-process microbenchmark of the engine alone (no gRPC): steps/s through `Engine.step` or `step_many`.

    .venv/bin/python tests/service/engine_microbench.py --streams 128 --seconds 5

N concurrent coroutines each stream one-step chunks into their own session of a tiny token LSTM; the number
says how much per-message budget the engine leaves the gRPC edge. `--multiplex` sends all streams' chunks in
one `step_many` call per round instead (the gateway shape). `--sweep DIR` measures both modes at 1, 16, 128
and 512 streams and writes `engine_microbench.json` and `engine_microbench.png` to DIR. `--idle N` opens N
sessions on a 2-layer H=256 LSTM, applies one step to each (so each caches a result, as real idle sessions
do), and prints resident memory per session against the raw state bytes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fixtures  # noqa: E402

from service.config import Settings  # noqa: E402
from service.core.engine import Engine, StepCall  # noqa: E402


async def run(repo: Path, streams: int, seconds: float, multiplex: bool) -> tuple[float, float, float]:
    engine = Engine(Settings(model_repository=repo), registry=CollectorRegistry())
    await engine.start()
    ids = [(await engine.create_session("bench")).session_id for _ in range(streams)]
    tok = {"tokens": np.array([3], np.int64)}
    count = 0
    stop = False

    async def worker(sid: str) -> None:
        nonlocal count
        seq = 1
        while not stop:
            await engine.step(sid, seq, tok)
            seq += 1
            count += 1

    async def gateway() -> None:
        nonlocal count
        seq = 1
        while not stop:
            await engine.step_many([StepCall(sid, seq, tok) for sid in ids])
            seq += 1
            count += len(ids)

    tasks = [asyncio.create_task(gateway())] if multiplex else [asyncio.create_task(worker(s)) for s in ids]
    await asyncio.sleep(1.0)  # warm-up
    c0, t0, cpu0 = count, time.perf_counter(), time.process_time()
    await asyncio.sleep(seconds)
    c1, t1, cpu1 = count, time.perf_counter(), time.process_time()
    stop = True
    await asyncio.gather(*tasks)
    await engine.stop()
    rate = (c1 - c0) / (t1 - t0)
    cores = (cpu1 - cpu0) / (t1 - t0)
    return rate, cores, cores / rate * 1e6


def sweep(repo: Path, out: Path, seconds: float) -> None:
    """Both modes at several stream counts -> JSON + PNG in `out` (tqdm shows progress)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from tqdm import tqdm

    streams = [1, 16, 128, 512]
    rows = []
    for n, multiplex in tqdm([(n, m) for m in (False, True) for n in streams], desc="engine microbench"):
        rate, cores, us = asyncio.run(run(repo, n, seconds, multiplex))
        rows.append(
            {
                "mode": "step_many" if multiplex else "step",
                "streams": n,
                "steps_per_s": rate,
                "cpu_cores": cores,
                "cpu_us_per_step": us,
            }
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / "engine_microbench.json").write_text(json.dumps(rows, indent=2))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for mode in ("step", "step_many"):
        sel = [r for r in rows if r["mode"] == mode]
        ax1.plot([r["streams"] for r in sel], [r["steps_per_s"] for r in sel], marker="o", label=mode)
        ax2.plot([r["streams"] for r in sel], [r["cpu_us_per_step"] for r in sel], marker="o", label=mode)
    for ax, label in ((ax1, "steps/s (engine only, no gRPC)"), (ax2, "CPU us per step")):
        ax.set_xscale("log")
        ax.set_xlabel("concurrent streams (one-step chunks)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle("rnnserve engine microbenchmark (tiny token LSTM)")
    fig.tight_layout()
    fig.savefig(out / "engine_microbench.png", dpi=120)
    for r in rows:
        print(r)


async def idle(repo: Path, n: int) -> tuple[float, float]:
    """Resident bytes added per session, and that over the raw state bytes, for `n` stepped idle sessions."""
    import gc

    import psutil
    from tqdm import tqdm

    engine = Engine(
        Settings(model_repository=repo, max_sessions=n + 1, max_sessions_per_model=n + 1),
        registry=CollectorRegistry(),
    )
    await engine.start()
    gc.collect()
    proc = psutil.Process()
    before = proc.memory_info().rss
    ids = [(await engine.create_session("ref")).session_id for _ in tqdm(range(n), desc="open sessions")]
    tok = {"tokens": np.array([1], np.int64)}
    for k in tqdm(range(0, n, 256), desc="one step each"):
        await asyncio.gather(*(engine.step(s, 1, tok) for s in ids[k : k + 256]))
    gc.collect()
    per_session = (proc.memory_info().rss - before) / n
    raw = engine.get_model("ref").state_bytes
    await engine.stop()
    return per_session, per_session / raw


def main() -> None:
    """Parse flags, build the tiny model, print steps/s and CPU microseconds per step (or run a sweep)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--streams", type=int, default=128)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--multiplex", action="store_true")
    parser.add_argument("--sweep", type=Path, default=None, help="write JSON + PNG for 1..512 streams here")
    parser.add_argument(
        "--idle", type=int, default=0, help="measure memory of this many stepped idle sessions"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp)
        if args.idle:
            fixtures.token_lstm(repo, "ref", hidden=256, layers=2)
            per, ratio = asyncio.run(idle(repo, args.idle))
            print(f"idle: sessions={args.idle} resident={per:.0f} B/session = {ratio:.3f} x raw state bytes")
            return
        fixtures.token_lstm(repo, "bench")
        if args.sweep is not None:
            sweep(repo, args.sweep, args.seconds)
            return
        rate, cores, us = asyncio.run(run(repo, args.streams, args.seconds, args.multiplex))
    mode = "step_many" if args.multiplex else "step"
    print(
        f"{mode}: streams={args.streams} steps/s={rate:.0f} cpu={cores:.2f} cores ({us:.1f} us CPU per step)"
    )


if __name__ == "__main__":
    main()
