"""One maximal request against a real server: other clients' latency while it runs, and memory after it.

    python -m tests.bench.burst               # writes docs/results/burst.{json,md,png}
    python -m tests.bench.burst --repeats 5   # the default-limits run 5 times: the spread on a busy machine

A replica (`python -m service.server`, the committed default model, version 2: LSTM 1x256 with attention) is
started twice: with the default request limits (a stateless request longer than `slice_steps` runs in slices,
memory is given back after it), and with slicing and trimming switched off (`slice_steps` and
`max_request_steps` huge, `trim_after_steps` 0: the server before the limits existed). Each time, one client
steps a session one token at a time for the whole run (its round trips are the latency figures); after a quiet
phase a second client sends maximal KServe requests (batch x steps = `max_request_steps`), then everything
idles again. RSS is sampled every 50 ms. The default limits also refuse what the unlimited server took (the
issue's 64 x 4,096 request); that refusal is recorded too.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import psutil
from tqdm import tqdm
from tritonclient.grpc import service_pb2 as kpb
from tritonclient.grpc import service_pb2_grpc as kpb_grpc

from service import wire
from service.config import Settings
from service.proto import rnnserve_pb2 as pb
from service.proto import rnnserve_pb2_grpc as pb_grpc
from tests.deploy.replicas import start_replica

ROOT = Path(__file__).resolve().parents[2]
MODEL = "default"
QUIET_S, AFTER_S = 6.0, 6.0
BURSTS = 3


def _request(batch: int, steps: int, rng: np.random.Generator) -> kpb.ModelInferRequest:
    req = kpb.ModelInferRequest(model_name=MODEL, model_version="2")
    t = req.inputs.add()
    t.name, t.datatype = "tokens", "INT64"
    t.shape.extend([batch, steps])
    req.raw_input_contents.append(rng.integers(0, 80, (batch, steps), dtype=np.int64).astype("<i8").tobytes())
    return req


def _p(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def run_one(label: str, workdir: Path, repository: Path, **settings: object) -> dict:
    """Start a replica with `settings`, measure a quiet phase, bursts and the idle after; stop it."""
    replica = start_replica(label, workdir, repository, start_timeout_s=120, metrics_port=-1, **settings)
    rss: list[tuple[float, float]] = []
    lat: list[tuple[float, float]] = []
    stop = threading.Event()
    proc = psutil.Process(replica.process.pid)
    t0 = time.monotonic()

    def sample() -> None:
        while not stop.is_set():
            rss.append((time.monotonic() - t0, proc.memory_info().rss / 2**20))
            time.sleep(0.05)

    channel = grpc.insecure_channel(replica.address, options=[("grpc.max_receive_message_length", 1 << 30)])
    stub = pb_grpc.RecurrentServiceStub(channel)
    sid = stub.CreateSession(pb.CreateSessionRequest(model=MODEL, version=2), timeout=30).session_id

    def light() -> None:
        seq = 0
        tok = [wire.array_to_tensor("tokens", np.array([i % 80], np.int64)) for i in range(80)]
        while not stop.is_set():
            seq += 1
            start = time.monotonic()
            stub.Step(pb.StepRequest(session_id=sid, seq=seq, inputs=[tok[seq % 80]]), timeout=120)
            lat.append((start - t0, (time.monotonic() - start) * 1000))
            time.sleep(0.005)

    rng = np.random.default_rng(0)
    limit = int(settings.get("max_request_steps", Settings().max_request_steps))  # type: ignore[call-overload]
    steps = 4096
    batch = max(1, Settings().max_request_steps // steps)  # the same request for both runs: 16 x 4096
    threads = [threading.Thread(target=sample, daemon=True), threading.Thread(target=light, daemon=True)]
    kstub = kpb_grpc.GRPCInferenceServiceStub(channel)
    kstub.ModelInfer(_request(1, 16, rng), timeout=60)  # warm the stateless path
    for t in threads:
        t.start()
    time.sleep(QUIET_S)
    rss_before = float(np.median([r for t, r in rss if t > QUIET_S - 2]))
    burst_start = time.monotonic() - t0
    for _ in tqdm(range(BURSTS), desc=f"{label}: {batch} x {steps}", leave=False):
        kstub.ModelInfer(_request(batch, steps, rng), timeout=600)
    burst_end = time.monotonic() - t0
    refused = ""
    try:
        kstub.ModelInfer(_request(64, 4096, rng), timeout=600)
    except grpc.RpcError as err:
        refused = f"{err.code().name}: {err.details()}"
    time.sleep(AFTER_S)
    stop.set()
    for t in threads:
        t.join(130)
    channel.close()
    replica.stop()
    quiet = [ms for t, ms in lat if t < burst_start]
    during = [ms for t, ms in lat if burst_start <= t < burst_end]
    after = [r for t, r in rss if t > burst_end + AFTER_S - 2]
    return {
        "label": label,
        "settings": {k: v for k, v in settings.items() if k != "model_repository"},
        "request": f"{BURSTS} x stateless batch {batch} x {steps} steps",
        "max_request_steps": limit,
        "quiet_p50_ms": _p(quiet, 50),
        "quiet_p99_ms": _p(quiet, 99),
        "during_p50_ms": _p(during, 50),
        "during_p99_ms": _p(during, 99),
        "during_max_ms": max(during) if during else float("nan"),
        "rss_before_mib": rss_before,
        "rss_peak_mib": max(r for _, r in rss),
        "rss_after_mib": float(np.median(after)) if after else float("nan"),
        "burst_s": burst_end - burst_start,
        "issue_request_64x4096": refused or "accepted",
        "load_average_1min": os.getloadavg()[0],
        "trace": {"rss": rss, "latency": lat, "burst": [burst_start, burst_end]},
    }


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(results), figsize=(6 * len(results), 6), sharex="col", squeeze=False)
    for col, r in enumerate(results):
        tr = r["trace"]
        ax = axes[0][col]
        ax.plot([t for t, _ in tr["rss"]], [m for _, m in tr["rss"]])
        ax.axvspan(*tr["burst"], color="orange", alpha=0.2, label="maximal requests")
        ax.set_title(r["label"])
        ax.set_ylabel("RSS (MiB)")
        ax.legend(loc="upper left")
        ax = axes[1][col]
        ax.scatter([t for t, _ in tr["latency"]], [ms for _, ms in tr["latency"]], s=2)
        ax.axvspan(*tr["burst"], color="orange", alpha=0.2)
        ax.set_yscale("log")
        ax.set_ylabel("other client's Step round trip (ms)")
        ax.set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def ratio(r: dict) -> float:
    """Other clients' p99 during the maximal requests over their quiet p99 (target: at most 2)."""
    return r["during_p99_ms"] / r["quiet_p99_ms"]


def markdown(results: list[dict]) -> str:
    lines = [
        "| server | quiet p99 (ms) | p99 during the maximal requests (ms) | ratio | max (ms) "
        "| RSS before / peak / after (MiB) | RSS after vs before | a 64 x 4,096 request | load |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        issue = r["issue_request_64x4096"]
        issue = "accepted" if issue == "accepted" else issue.split(":")[0]
        grew = r["rss_after_mib"] / r["rss_before_mib"] - 1
        lines.append(
            f"| {r['label']} | {r['quiet_p99_ms']:.1f} | {r['during_p99_ms']:.1f} | {ratio(r):.2f}x "
            f"| {r['during_max_ms']:.0f} | {r['rss_before_mib']:.0f} / {r['rss_peak_mib']:.0f} / "
            f"{r['rss_after_mib']:.0f} | {grew:+.1%} | {issue} | {r['load_average_1min']:.1f} |"
        )
    r0 = results[0]
    limited = [r for r in results if not r["settings"]]
    lines.append("")
    if len(limited) > 1:
        ratios = sorted(ratio(r) for r in limited)
        lines.append(
            f"Default limits, {len(limited)} runs: p99 ratio median {float(np.median(ratios)):.2f}x "
            f"(min {ratios[0]:.2f}x, max {ratios[-1]:.2f}x; at most 2x in {sum(x <= 2 for x in ratios)} of "
            f"{len(ratios)}); RSS after vs before at most "
            f"{max(r['rss_after_mib'] / r['rss_before_mib'] - 1 for r in limited):+.1%}."
        )
    lines.append(
        "Load: the 1-minute load average of the 2-core machine (shared with other jobs) at the end of a run."
    )
    lines.append(
        f"Maximal request: {r0['request']} on the default model (v2), while another client steps a session "
        "one token at a time. ![RSS and latency during the burst](burst.png)"
    )
    return "\n".join(lines) + "\n"


LIMITS = (
    "max_request_steps",
    "max_rows_per_message",
    "max_chunk_steps",
    "max_cached_response_bytes",
    "max_message_bytes",
    "max_id_length",
    "max_stream_buffer_bytes",
    "slice_steps",
    "burst_nice",
    "trim_after_steps",
    "store_refused",
)


def limits_table() -> str:
    """The request limits and related settings with their defaults, from `service.config.Settings`."""
    lines = ["| setting (`RNNSERVE_...`) | default | what it bounds |", "|---|---|---|"]
    for name in LIMITS:
        field = Settings.model_fields[name]
        default = field.default
        shown = f"{default:,}" if isinstance(default, int) else str(default)
        lines.append(f"| `{name}` | {shown} | {field.description} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="latency and memory around one maximal request")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    parser.add_argument("--limits-only", action="store_true", help="only rewrite limits.md")
    parser.add_argument("--repeats", type=int, default=1, help="runs with the default limits (the spread)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "limits.md").write_text(limits_table())
    if args.limits_only:
        return 0
    with tempfile.TemporaryDirectory(prefix="rnnserve-burst-") as tmp:
        work = Path(tmp)
        repository = work / "repository"
        repository.mkdir()
        (repository / MODEL).symlink_to(ROOT / "models" / "repository" / MODEL)
        results = [
            run_one(
                "default limits (sliced, memory trimmed)" + (f" #{i + 1}" if args.repeats > 1 else ""),
                work,
                repository,
            )
            for i in range(args.repeats)
        ] + [
            run_one(
                "no slicing, no trim (before)",
                work,
                repository,
                slice_steps=1_000_000,
                trim_after_steps=0,
                max_request_steps=10**9,
            ),
        ]
    args.out.mkdir(parents=True, exist_ok=True)
    plot([results[0], results[-1]], args.out / "burst.png")
    (args.out / "burst.md").write_text(markdown(results))
    (args.out / "burst.json").write_text(
        json.dumps([{k: v for k, v in r.items() if k != "trace"} for r in results], indent=1) + "\n"
    )
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
