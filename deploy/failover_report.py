"""Measure what a client sees when the replica serving its stream goes away: SIGKILL (crash), SIGTERM.

Starts a real redis-server and two real server replicas (`python -m service.server`, store=redis) on loopback,
streams one long sequence through the committed default model with the client library's defaults, kills or
drains the serving replica mid-stream, and records every chunk's round-trip time. Writes

    docs/deploy/failover.png   per-chunk latency around the failure, both cases
    docs/deploy/failover.md    the table: chunks, stall, max |difference| from one uninterrupted ORT pass

Run: `.venv/bin/python deploy/failover_report.py` (about half a minute; needs redis-server).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.client import Client  # noqa: E402
from tests.deploy.redis_server import start_redis, stop_redis  # noqa: E402
from tests.deploy.replicas import start_replica  # noqa: E402


@dataclass(frozen=True)
class Run:
    """One stream through a failure."""

    mode: str
    latencies_ms: np.ndarray  # per chunk, in order
    failed_at: int  # answers the client had when the failure was injected
    max_abs_diff: float  # against one uninterrupted ONNX Runtime pass
    lease_s: float


def reference(model: Path, tokens: np.ndarray) -> np.ndarray:
    """Logits of one uninterrupted pass over the whole sequence from the model's initial (zero) state."""
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    feeds: dict[str, np.ndarray] = {"tokens": tokens[None, :]}
    for i in sess.get_inputs():
        if i.name.startswith("state_in_"):
            feeds[i.name] = np.zeros([1, *i.shape[1:]], dtype=np.float32)
    return sess.run(["logits"], feeds)[0][0]


def run_once(  # noqa: D103 - one measurement; see main()
    mode: str,
    workdir: Path,
    repository: Path,
    tokens: np.ndarray,
    chunk: int,
    fail_at: int,
    lease_s: float,
    redis_url: str,
) -> tuple[list[float], list[np.ndarray], int]:
    settings = dict(store="redis", redis_url=redis_url, store_flush_every=1, lease_s=lease_s, drain_grace_s=5)
    a = start_replica(f"{mode}-a", workdir, repository, **settings)
    b = start_replica(f"{mode}-b", workdir, repository, **settings)
    latencies: list[float] = []
    outputs: list[np.ndarray] = []
    seen: list[int] = []

    def fail() -> None:
        seen.append(len(outputs))
        if mode == "SIGKILL":
            a.kill()
        else:
            a.terminate()

    n_chunks = len(tokens) // chunk
    try:
        with Client([a.address, b.address]) as client:
            session = client.session("default")
            stream = session.stream(tokens[i * chunk : (i + 1) * chunk] for i in range(n_chunks))
            t0 = time.perf_counter()
            for i in tqdm(range(n_chunks), desc=mode, unit="chunk", leave=False):
                if i == fail_at:
                    threading.Thread(target=fail, daemon=True).start()
                out = next(stream)
                t1 = time.perf_counter()
                latencies.append((t1 - t0) * 1000)
                outputs.append(out["logits"])
                t0 = t1
            stream.close()
    finally:
        a.stop()
        b.stop()
    return latencies, outputs, seen[0]


def plot(runs: list[Run], out: Path) -> None:
    """Per-chunk round trip of every run, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    for r in runs:
        ax.plot(
            np.arange(1, len(r.latencies_ms) + 1), r.latencies_ms, label=f"{r.mode} at chunk {r.failed_at}"
        )
    ax.set_yscale("log")
    ax.set_xlabel("chunk")
    ax.set_ylabel("round trip (ms)")
    ax.set_title(
        f"One stream across the loss of its replica (lease {runs[0].lease_s:g} s, store flushed every step)"
    )
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def table(runs: list[Run]) -> str:
    """Render the runs as a Markdown table: the stall at the failure vs the round trips elsewhere."""
    rows = [
        "| failure | chunks answered | round trip at the failure (ms) | median elsewhere (ms) "
        "| 99th percentile elsewhere (ms) | max abs diff vs one ORT pass |",
        "|---|---|---|---|---|---|",
    ]
    for r in runs:
        window = slice(r.failed_at, r.failed_at + 10)  # the chunk in flight and the few after it
        at_failure = r.latencies_ms[window].max()
        elsewhere = np.delete(r.latencies_ms, np.arange(len(r.latencies_ms))[window])
        rows.append(
            f"| {r.mode} | {len(r.latencies_ms)} | {at_failure:.0f} | {np.median(elsewhere):.2f} | "
            f"{np.percentile(elsewhere, 99):.1f} | {r.max_abs_diff:.1e} |"
        )
    return "\n".join(rows) + "\n"


def main() -> int:
    """Run both cases and write the plot and the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=300)
    parser.add_argument("--chunk", type=int, default=4, help="tokens per chunk")
    parser.add_argument("--fail-at", type=int, default=100)
    parser.add_argument("--lease-s", type=float, default=2.0)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "deploy")
    args = parser.parse_args()

    repository = ROOT / "models" / "repository"
    model = repository / "default" / "1" / "model.onnx"
    vocab = reference(model, np.zeros(1, dtype=np.int64)).shape[-1]
    tokens = np.random.default_rng(0).integers(0, vocab, size=args.chunks * args.chunk, dtype=np.int64)
    expected = reference(model, tokens)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        redis = start_redis(Path(tmp))
        try:
            for mode in ("SIGKILL", "SIGTERM"):
                redis.client().flushall()
                lat, outs, at = run_once(
                    mode, Path(tmp), repository, tokens, args.chunk, args.fail_at, args.lease_s, redis.url
                )
                got = np.concatenate(outs)
                diff = float(np.abs(got - expected).max()) if got.shape == expected.shape else float("inf")
                runs.append(Run(mode, np.array(lat), at, diff, args.lease_s))
        finally:
            stop_redis(redis)
    args.out.mkdir(parents=True, exist_ok=True)
    plot(runs, args.out / "failover.png")
    (args.out / "failover.md").write_text(table(runs))
    print(table(runs))
    return 0 if all(r.max_abs_diff <= 1e-5 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
