"""`make chaos`: the full chaos run; prints the counts and writes docs/results/chaos.{json,md}.

    python -m tests.chaos                      # full run: at least 1,000 faults (about 15 minutes on 2 cores)
    python -m tests.chaos --faults 100 --out /tmp/chaos   # a smaller one, written elsewhere

Exits 1 if any step was lost, doubled, diverged or acknowledged but missing, or too few faults were injected.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # client channels log every GOAWAY of a killed replica

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from tests.chaos.run import ChaosConfig, ChaosResult, run_chaos  # noqa: E402


def markdown(result: ChaosResult) -> str:
    """The README table of one run."""
    j = result.to_json()
    kinds = ", ".join(f"{k} {v}" for k, v in j["faults_by_kind"].items())
    rows = [
        ("faults injected", f"{j['faults_injected']} ({kinds})"),
        ("run time", f"{j['duration_s']:.0f} s, seed {j['seed']}"),
        (
            "processes",
            f"{j['replicas']} replicas (started {j['replica_starts']} times), "
            "1 redis-server (AOF, fsync always)",
        ),
        (
            "sessions",
            f"{j['native_sessions']} native, {j['kserve_sequences']} KServe drivers; "
            f"{j['sessions']} session histories checked",
        ),
        ("requests", f"{j['requests']} sent, {j['request_errors']} failed and retried or resolved"),
        ("steps checked against ONNX Runtime", str(j["steps_checked"])),
        ("KServe requests with unknown outcome (resolved by the checker)", str(j["unknown_outcomes"])),
        ("**lost**", str(j["lost"])),
        ("**doubled**", str(j["doubled"])),
        ("**diverged**", str(j["diverged"])),
        ("**acknowledged but missing**", str(j["acknowledged_but_missing"])),
    ]
    lines = ["| chaos run (`make chaos`) | |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="chaos run against real replicas and a real redis-server")
    parser.add_argument("--faults", type=int, default=1000, help="faults to inject (the run's length)")
    parser.add_argument("--max-minutes", type=float, default=30.0, help="stop after this long in any case")
    parser.add_argument("--seed", type=int, default=ChaosConfig.seed)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results", help="where chaos.json/.md go")
    args = parser.parse_args(argv)
    cfg = ChaosConfig(seed=args.seed, target_faults=args.faults, max_duration_s=args.max_minutes * 60)
    with tempfile.TemporaryDirectory(prefix="rnnserve-chaos-") as tmp:
        result = run_chaos(Path(tmp), cfg)
    summary = result.to_json()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "chaos.json").write_text(json.dumps(summary, indent=1) + "\n")
    (args.out / "chaos.md").write_text(markdown(result))
    for key in (
        "faults_injected",
        "faults_by_kind",
        "steps_checked",
        "unknown_outcomes",
        "lost",
        "doubled",
        "diverged",
        "acknowledged_but_missing",
        "duration_s",
    ):
        print(f"{key}: {summary[key]}")
    for line in result.counts.faults[:20]:
        print("  ", line)
    ok = result.counts.clean and result.faults_injected >= args.faults
    print("chaos run:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
