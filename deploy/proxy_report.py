"""Sessions through the real front proxy, full run: writes the figures the README's Deploy section shows.

Runs the scenario of tests/deploy/routing.py (real redis-server, three then four server replicas, dnsmasq as
the cluster DNS, HAProxy 2.6 with the shipped deploy/components/haproxy/haproxy.cfg) with a few hundred
sessions, then, for comparison only, once more with HAProxy's own consistent-hash ring in place of
affinity.lua (the same file with the three routing lines replaced; never shipped). Writes

    docs/deploy/proxy.json   every figure of both runs
    docs/deploy/proxy.md     the table the README includes
    docs/deploy/proxy.png    sessions per replica after each phase, and the per-step round trip with and
                             without the proxy

Run: `make proxy-check` (about two minutes; needs redis-server, dnsmasq and haproxy: `make system-deps`).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import fixtures  # noqa: E402

from tests.deploy import routing  # noqa: E402
from tests.deploy.proxy import HAPROXY_CFG  # noqa: E402
from tests.deploy.redis_server import start_redis, stop_redis  # noqa: E402

ROUTING_LINES = (
    "    balance roundrobin\n"
    "    http-request set-var(txn.replica) lua.rnnserve_replica\n"
    "    use-server %[var(txn.replica)] if { var(txn.replica) -m found }\n"
)
# weight 64: 16 x 64 = 1024 points per server on HAProxy's ring (weight 1 gives 16), for a fair comparison.
BUILTIN_RING = (
    "    balance hdr(x-rnnserve-affinity)\n"
    "    hash-type consistent sdbm avalanche\n"
    "    default-server weight 64\n"
)
STEPS = ("open", "kserve", "latency", "scale", "kill", "drain", "outputs", "second")


def builtin_variant(workdir: Path) -> Path:
    """Write haproxy.cfg with HAProxy's own ring (`hash-type consistent`) instead of the Lua pick."""
    text = HAPROXY_CFG.read_text()
    assert ROUTING_LINES in text, "haproxy.cfg's routing lines changed; update deploy/proxy_report.py"
    out = workdir / "haproxy-builtin-ring.cfg"
    out.write_text(text.replace(ROUTING_LINES, BUILTIN_RING))
    return out


def run_one(  # noqa: D103 - one scenario run with a progress bar
    label: str, scale: routing.Scale, config: Path, repository: Path, workdir: Path
) -> routing.Report:
    redis = start_redis(workdir)
    bar = tqdm(total=len(STEPS), desc=label, unit="phase")
    try:
        return routing.run(
            workdir, repository, redis, scale, progress=lambda _text: bar.update(1), config=config
        )
    finally:
        bar.close()
        stop_redis(redis)


def fmt(x: float) -> str:  # noqa: D103
    return f"{x:.2f}"


def table(shipped: routing.Report, ring: routing.Report | None) -> str:
    """Render the README table: one column per routing (shipped, and HAProxy's ring for comparison)."""
    runs = [("shipped: affinity.lua (rendezvous)", shipped)]
    if ring is not None:
        runs.append(("comparison: HAProxy ring (`hash-type consistent`)", ring))

    def spread(r: routing.Report) -> str:
        counts = "/".join(str(v) for v in r.sessions_per_replica.values())
        return f"{counts} (max/min {r.spread_max_over_min:.2f})"

    def lat(r: routing.Report, kind: str) -> str:
        direct, proxy, added = (r.latency_ms[f"{kind} {x}"] for x in ("direct", "proxy", "added"))
        return (
            f"{fmt(direct['p50'])} / {fmt(proxy['p50'])} (+{fmt(added['p50'])}); "
            f"p99 {fmt(direct['p99'])} / {fmt(proxy['p99'])}"
        )

    rows = [
        ("native sessions; KServe sequences", lambda r: f"{r.scale['sessions']}; {r.scale['sequences']}"),
        (
            "calls of a session on one replica (native calls; KServe calls)",
            lambda r: (
                f"{r.sessions_on_one_replica}/{r.scale['sessions']} ({r.calls_checked}); "
                f"{r.kserve_sequences_on_one_replica}/{r.scale['sequences']} ({r.kserve_calls_checked})"
            ),
        ),
        ("sessions per replica, 3 replicas", spread),
        (
            "scale-out 3 -> 4: sessions moved (all to the new one?)",
            lambda r: (
                f"{r.scale_out_moved} = {r.scale_out_moved_fraction:.1%} "
                f"({'yes' if not r.scale_out_moved_elsewhere else f'{r.scale_out_moved_elsewhere} not'})"
            ),
        ),
        (
            "SIGKILL of a replica: its sessions moved; others moved",
            lambda r: f"{r.kill_victim_sessions}; {r.kill_moved_others}",
        ),
        (
            "SIGTERM (drain) while streaming: its sessions moved; others moved; client errors",
            lambda r: f"{r.drain_victim_sessions}; {r.drain_moved_others}; {r.drain_client_errors}",
        ),
        ("max abs diff of all outputs vs one ORT pass per session", lambda r: f"{r.max_abs_diff:.1e}"),
        (
            "keys a second proxy (started after the churn, pods in another DNS order) routes elsewhere",
            lambda r: (
                f"{r.proxies_disagree_fraction:.1%}" if r.proxies_disagree_fraction is not None else "n/a"
            ),
        ),
        ("unary step, ms p50 direct / proxy (+added); p99", lambda r: lat(r, "unary")),
        ("stream chunk, ms p50 direct / proxy (+added); p99", lambda r: lat(r, "stream")),
    ]
    head = "| | " + " | ".join(name for name, _ in runs) + " |"
    lines = [head, "|---" * (len(runs) + 1) + "|"]
    for title, cell in rows:
        lines.append(f"| {title} | " + " | ".join(cell(r) for _, r in runs) + " |")
    return "\n".join(lines) + "\n"


def plot(report: routing.Report, out: Path) -> None:
    """Sessions per replica after each phase, and the round-trip distributions with and without the proxy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.2))
    phases = list(report.sessions_per_replica_by_phase)
    replicas = sorted({r for counts in report.sessions_per_replica_by_phase.values() for r in counts})
    width = 0.8 / len(replicas)
    for i, name in enumerate(replicas):
        values = [report.sessions_per_replica_by_phase[p].get(name, 0) for p in phases]
        ax.bar(np.arange(len(phases)) + i * width, values, width, label=name)
    ax.set_xticks(np.arange(len(phases)) + width * (len(replicas) - 1) / 2)
    ax.set_xticklabels(["3 replicas", "+r4 (scale-out)", "r2 SIGKILL", "r3 SIGTERM"])
    ax.set_ylabel("sessions")
    ax.set_title(f"{report.scale['sessions']} sessions through HAProxy: where each lives")
    ax.legend()
    for name, samples in report.latency_samples_ms.items():
        xs = np.sort(samples)
        color = "tab:blue" if name.startswith("unary") else "tab:green"
        style = "-" if "proxy" in name else "--"
        bx.plot(xs, np.arange(1, len(xs) + 1) / len(xs), label=name, color=color, linestyle=style)
    bx.set_xscale("log")
    bx.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    bx.set_xlabel("round trip per step (ms)")
    bx.set_ylabel("fraction of steps")
    bx.set_title("Same replica, through the proxy and direct (interleaved)")
    bx.grid(True, which="both", alpha=0.3)
    bx.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> int:
    """Run the full scenario (and the comparison) and write the JSON, the table and the plot."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=routing.FULL.sessions)
    parser.add_argument("--sequences", type=int, default=routing.FULL.sequences)
    parser.add_argument("--latency-pairs", type=int, default=routing.FULL.latency_pairs)
    parser.add_argument("--no-comparison", action="store_true", help="skip the run with HAProxy's own ring")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "deploy")
    args = parser.parse_args()
    scale = replace(
        routing.FULL, sessions=args.sessions, sequences=args.sequences, latency_pairs=args.latency_pairs
    )
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        repository = tmp_path / "repository"
        repository.mkdir()
        fixtures.token_lstm(repository, routing.MODEL)
        (tmp_path / "shipped").mkdir()
        shipped = run_one("shipped", scale, HAPROXY_CFG, repository, tmp_path / "shipped")
        ring = None
        if not args.no_comparison:
            (tmp_path / "ring").mkdir()
            ring = run_one("ring", scale, builtin_variant(tmp_path), repository, tmp_path / "ring")
    args.out.mkdir(parents=True, exist_ok=True)
    figures = {"shipped": shipped.as_dict(), "builtin_ring": ring.as_dict() if ring else None}
    (args.out / "proxy.json").write_text(json.dumps(figures, indent=1) + "\n")
    (args.out / "proxy.md").write_text(table(shipped, ring))
    plot(shipped, args.out / "proxy.png")
    print(table(shipped, ring))
    return 0


if __name__ == "__main__":
    sys.exit(main())
