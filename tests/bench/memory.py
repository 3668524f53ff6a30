"""Resident memory of idle sessions: an ``Engine`` in its own process, RSS before and after N sessions.

Run as ``python -m tests.bench.memory --repository R --model M --sessions N``; prints one JSON object. The
engine is the real one (slab, session table, tombstone bookkeeping); only the gRPC edge is left out, because
creating a million sessions over unary RPCs would take minutes and add nothing an idle session keeps. A few
sessions are stepped afterwards to show the slab rows are live state, not a reservation.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
import time
from pathlib import Path

import numpy as np
import psutil
from prometheus_client import CollectorRegistry
from tqdm import tqdm

from service.config import Settings
from service.core.engine import Engine


async def measure(repository: Path, model: str, sessions: int, written: bool) -> dict[str, float | int | str]:
    """Create ``sessions`` idle sessions on ``model``; return RSS readings and raw state bytes.

    ``written=False``: fresh sessions whose state is the (zero) initial state; the slab's zero pages are not
    resident until written, so this shows the bookkeeping cost alone. ``written=True``: every session is
    created with a non-zero ``initial_state`` (the public API), so each state row is really in memory, as it
    is for a session that has streamed and gone idle. The target is judged on the written case.
    """
    settings = Settings(
        model_repository=repository,
        metrics_port=-1,
        max_sessions=sessions + 16,
        max_sessions_per_model=sessions + 16,
        idle_ttl_s=86_000.0,
        sweep_interval_s=3600.0,
    )
    engine = Engine(settings, registry=CollectorRegistry())
    await engine.start()
    spec = engine.get_model(model)
    row_bytes = sum(int(np.prod(s.shape)) * np.dtype(s.dtype).itemsize for s in spec.states)
    # Warm the code paths (first session, first step) before the baseline reading.
    warm = await engine.create_session(model)
    await engine.close(warm.session_id)
    gc.collect()
    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    t0 = time.perf_counter()
    ids: list[str] = []
    initial = {s.name: np.full(s.shape, 1, s.dtype) for s in spec.states} if written else None
    label = "written" if written else "fresh"
    for _ in tqdm(
        range(sessions),
        desc=f"{sessions:,} idle sessions ({label})",
        unit="sess",
        mininterval=2.0,
        file=sys.stderr,
    ):
        ids.append((await engine.create_session(model, initial_state=initial)).session_id)
    create_s = time.perf_counter() - t0
    gc.collect()
    rss1 = proc.memory_info().rss
    # The ids list is the client's, not the server's: measure it and take it off.
    ids_bytes = sys.getsizeof(ids) + sum(sys.getsizeof(i) for i in ids)
    # A full collection walks every tracked object, sessions included: its pause grows with the session
    # count and lands on the event loop (a latency spike for every stream): part of what idle sessions cost.
    t_gc = time.perf_counter()
    gc.collect()
    gc_full_ms = (time.perf_counter() - t_gc) * 1e3
    tracked = len(gc.get_objects())
    inputs = {
        t.name: np.zeros(tuple(1 if d is None else d for d in t.shape[1:]), t.dtype) for t in spec.inputs
    }
    stepped = 0
    for sid in ids[:: max(1, sessions // 8)]:
        await engine.step(sid, 1, inputs)
        stepped += 1
    await engine.stop()
    per_session = (rss1 - rss0 - ids_bytes) / sessions
    return {
        "model": model,
        "sessions": sessions,
        "state": label,
        "rss_before_bytes": rss0,
        "rss_after_bytes": rss1,
        "client_ids_bytes": ids_bytes,
        "rss_per_session_bytes": per_session,
        "raw_state_bytes_per_session": row_bytes,
        "ratio": per_session / row_bytes,
        "create_seconds": create_s,
        "gc_full_collection_ms": gc_full_ms,
        "gc_tracked_objects": tracked,
        "sessions_stepped_after": stepped,
    }


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point: prints the measurement as JSON on stdout."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--sessions", type=int, default=1_000_000)
    parser.add_argument("--written", action="store_true", help="give every session a non-zero initial state")
    args = parser.parse_args(argv)
    print(
        json.dumps(asyncio.run(measure(args.repository, args.model, args.sessions, args.written))), flush=True
    )


if __name__ == "__main__":
    main()
