"""In-process ONNX Runtime reference points: the compute ceiling and stateless recompute.

Both use ``service.core.runtime.Runtime`` with the server's own session options (sequential, the same intra-op
thread count), so the only difference from the served number is everything the server does around ``run``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.core.runtime import ORT_DTYPES, Runtime


@dataclass(frozen=True, slots=True)
class CeilingPoint:
    """Raw ONNX Runtime throughput at one batch size and chunk length."""

    batch: int
    steps: int
    intra_op_threads: int  # 1 = the server's default; 0 = ONNX Runtime's default (every core)
    runs_per_s: float
    steps_per_s: float  # batch * steps * runs_per_s (wall clock)
    ms_per_run: float
    steps_per_cpu_s: float  # steps per second of this thread's CPU time: robust when the machine is shared


def feeds_for(rt: Runtime, batch: int, steps: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs for one run: zero states, normal floats / zero ids for data; batch and time dims filled in."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for i in rt.session.get_inputs():
        dims = []
        for k, d in enumerate(i.shape):
            if k == 0:
                dims.append(batch)
            elif isinstance(d, int):
                dims.append(d)
            else:  # the symbolic time axis (named "time" by the contract)
                dims.append(steps)
        dtype = ORT_DTYPES[i.type]
        if i.name.startswith("state_in_") or dtype.kind != "f":
            feeds[i.name] = np.zeros(dims, dtype)
        else:
            feeds[i.name] = rng.standard_normal(dims).astype(dtype)
    return feeds


def measure_ceiling(
    model: Path, batch: int, steps: int, *, intra_op_threads: int = 1, seconds: float = 1.0
) -> CeilingPoint:
    """Run the model back to back for ``seconds`` at ``(batch, steps)``; state carried from run to run."""
    rt = Runtime(model, intra_op_threads)
    feeds = feeds_for(rt, batch, steps)
    state_pairs = [(n, "state_out_" + n[len("state_in_") :]) for n in feeds if n.startswith("state_in_")]
    for _ in range(3):
        rt.run(feeds)
    runs = 0
    t0, c0 = time.perf_counter(), time.thread_time()
    while (elapsed := time.perf_counter() - t0) < seconds:
        out = rt.run(feeds)
        for n_in, n_out in state_pairs:  # carry state like a stream does (values differ; cost does not)
            feeds[n_in] = out[n_out]
        runs += 1
    cpu = time.thread_time() - c0
    rate = runs / elapsed
    # With one intra-op thread ORT computes on the calling thread, so thread CPU time is the compute cost.
    per_cpu = runs * batch * steps / cpu if cpu > 0 and intra_op_threads == 1 else float("nan")
    return CeilingPoint(batch, steps, intra_op_threads, rate, rate * batch * steps, 1e3 / rate, per_cpu)


def stateless_seconds(model: Path, history: int, *, intra_op_threads: int = 1, repeats: int = 5) -> float:
    """Median seconds to recompute a whole history of ``history`` steps from the initial state, batch 1."""
    rt = Runtime(model, intra_op_threads)
    feeds = feeds_for(rt, 1, history)
    rt.run(feeds)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        rt.run(feeds)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))
