"""Soak: a million create/step/close cycles against the real server on loopback; RSS must not creep up.

    python -m tests.soak [--cycles 1000000] [--max-seconds 1800] [--out docs/security]

Each cycle is one native `Stream`: its first message opens a session and steps one chunk, the answer comes
back, the client ends the stream and the server closes the session (create, step, close). `--workers` cycles
run at a time. The server's RSS is read (psutil) every `--sample-every` cycles; the start figure is taken
after
a warm-up (allocator arenas, ONNX Runtime buffers, tombstone table filled to its bound), the end figure after
the last cycle. Growth must stay <= 5%. Writes soak.json, soak.md (included in the README) and soak.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
import psutil
from grpc import aio
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "tests", ROOT / "tests" / "service"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import fixtures  # noqa: E402
from server_thread import ServerProcess  # noqa: E402

from service import wire  # noqa: E402
from service.proto import rnnserve_pb2 as pb  # noqa: E402
from service.proto import rnnserve_pb2_grpc as pb_grpc  # noqa: E402

MAX_GROWTH = 0.05


async def _cycles(address: str, n: int, workers: int, on_done) -> int:  # noqa: ANN001
    chunk = wire.arrays_to_tensors({"tokens": np.array([3, 1, 4], dtype=np.int64)})
    first = pb.StreamRequest(open=pb.StreamOpen(model="soak"), seq=1, inputs=chunk)
    remaining = [n]
    failures = [0]

    async with aio.insecure_channel(address) as channel:
        stub = pb_grpc.RecurrentServiceStub(channel)

        async def worker() -> None:
            while remaining[0] > 0:
                remaining[0] -= 1
                call = stub.Stream()
                await call.write(first)
                resp = await call.read()
                await call.done_writing()
                code = await call.code()  # the server closed the session when the stream ended
                if resp is aio.EOF or resp.seq != 1 or code != grpc.StatusCode.OK:
                    failures[0] += 1
                on_done()

        await asyncio.gather(*(worker() for _ in range(workers)))
    return failures[0]


def run(cycles: int, workers: int, sample_every: int, warmup: int, max_seconds: float) -> dict:
    """Run the soak; return the figures."""
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp)
        fixtures.token_lstm(repo, "soak", hidden=32)
        # Tombstones fill to their bound during the warm-up: their (bounded) memory counts in the start RSS.
        srv = ServerProcess(repo, "--max-tombstones", str(warmup // 2))
        try:
            proc = psutil.Process(srv.proc.pid)
            samples: list[tuple[int, int]] = []
            done = [0]
            bar = tqdm(total=warmup + cycles, unit="cycle", smoothing=0.05, mininterval=1.0)

            def on_done() -> None:
                done[0] += 1
                bar.update(1)
                if done[0] >= warmup and (done[0] - warmup) % sample_every == 0:
                    samples.append((done[0] - warmup, proc.memory_info().rss))

            failures = asyncio.run(_cycles(srv.address, warmup, workers, on_done))
            start = time.monotonic()
            target = cycles
            while done[0] - warmup < target and time.monotonic() - start < max_seconds:
                step = min(sample_every * 10, target - (done[0] - warmup))
                failures += asyncio.run(_cycles(srv.address, step, workers, on_done))
            seconds = time.monotonic() - start
            bar.close()
            rss_end = proc.memory_info().rss
        finally:
            srv.stop()
    measured = done[0] - warmup
    rss_start = samples[0][1]
    return {
        "cycles": measured,
        "cycles_requested": cycles,
        "warmup_cycles": warmup,
        "workers": workers,
        "failures": failures,
        "seconds": round(seconds, 1),
        "cycles_per_s": round(measured / seconds, 1),
        "rss_start_bytes": rss_start,
        "rss_end_bytes": rss_end,
        "rss_growth": round((rss_end - rss_start) / rss_start, 4),
        "max_growth": MAX_GROWTH,
        "samples": samples,
    }


def write(result: dict, out: Path) -> None:
    """soak.json, soak.md and soak.png in `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(result, indent=1) + "\n")
    xs = [c for c, _ in result["samples"]]
    ys = [r / 2**20 for _, r in result["samples"]]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.plot(xs, ys, lw=1.2)
    ax.axhline(
        result["rss_start_bytes"] / 2**20 * (1 + MAX_GROWTH), ls="--", c="r", lw=0.8, label="start + 5%"
    )
    ax.set_xlabel("create/step/close cycles after warm-up")
    ax.set_ylabel("server RSS (MiB)")
    ax.set_ylim(0, max(ys) * 1.2)
    ax.legend(loc="lower right")
    ax.set_title("Soak: server RSS over create/step/close cycles")
    fig.tight_layout()
    fig.savefig(out / "soak.png", dpi=110)
    ok = result["rss_growth"] <= MAX_GROWTH and result["cycles"] == result["cycles_requested"]
    mib = 2**20
    (out / "soak.md").write_text(
        "| cycles | seconds | cycles/s | failed | RSS start | RSS end | growth | bound |\n"
        "|---:|---:|---:|---:|---:|---:|---:|---:|\n"
        f"| {result['cycles']:,} | {result['seconds']:,} | {result['cycles_per_s']:,} "
        f"| {result['failures']} | "
        f"{result['rss_start_bytes'] / mib:.1f} MiB | {result['rss_end_bytes'] / mib:.1f} MiB | "
        f"{result['rss_growth'] * 100:+.2f}% | {'within' if ok else 'OUTSIDE'} {MAX_GROWTH:.0%} |\n\n"
        f"Generated by `make soak` (`python -m tests.soak`): {result['workers']} concurrent streams on "
        "loopback, "
        f"each a create/step/close cycle; RSS start after {result['warmup_cycles']:,} warm-up cycles.\n\n"
        "![server RSS over the soak](soak.png)\n"
    )


def main(argv: list[str] | None = None) -> int:
    """Command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=1_000_000)
    parser.add_argument("--workers", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=20_000)
    parser.add_argument("--sample-every", type=int, default=5_000)
    parser.add_argument("--max-seconds", type=float, default=1800.0)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "security")
    args = parser.parse_args(argv)
    result = run(args.cycles, args.workers, args.sample_every, args.warmup, args.max_seconds)
    write(result, args.out)
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}))
    ok = result["rss_growth"] <= MAX_GROWTH and result["failures"] == 0
    return 0 if ok and result["cycles"] == args.cycles else 1


if __name__ == "__main__":
    sys.exit(main())
