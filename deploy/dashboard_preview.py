"""The Grafana dashboard's panels, from a real Prometheus scraping real server replicas under load.

Starts two replicas (`python -m service.server`, the committed default model, /metrics on free ports) and a
real Prometheus (Debian's `prometheus`) that scrapes both every second with the labels a PodMonitor gives them
(job "rnnserve/rnnserve", namespace, pod) and evaluates the PrometheusRule's alert rules. A mixed load runs
for a while: streaming sessions of varied chunk lengths, sessions left to expire idle, a session-count limit
that refuses some sessions, and bad requests. Then every panel query of the dashboard (deploy/components/
monitoring/dashboard.json) is evaluated over the run (`query_range`, Grafana's variables filled in) and the
panels are drawn in their grid layout:

    docs/deploy/dashboard.png

Run: `.venv/bin/python deploy/dashboard_preview.py [--seconds 90]` (or `make dashboard-preview`).
tests/deploy/test_dashboard_live.py runs a short one and checks that every panel shows data and every alert
rule evaluates without error.
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.client import Client  # noqa: E402
from tests.deploy.replicas import Replica, start_replica  # noqa: E402

MONITORING = ROOT / "deploy" / "components" / "monitoring"
OUT = ROOT / "docs" / "deploy" / "dashboard.png"
TUNE = (
    "X:1\nT:The Kesh\nM:6/8\nL:1/8\nK:G\n|:GAG GAB|ABA ABd|edd gdd|edB dBA|GAG GAB|ABA ABd|edd gdB|AGF G3:|\n"
)
NAMESPACE = "rnnserve"
JOB = "rnnserve/rnnserve"


@dataclass
class Series:
    """One result series of a range query."""

    labels: dict[str, str]
    times: np.ndarray
    values: np.ndarray


@dataclass
class Preview:
    """Every panel target's series, and the alert rules' state at the end of the run."""

    panels: dict[tuple[str, str], list[Series]] = field(default_factory=dict)
    rules: list[dict] = field(default_factory=list)
    start: float = 0.0
    end: float = 0.0


def free_port() -> int:
    """Return a free loopback TCP port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 10) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read().decode())


class Prometheus:
    """A real Prometheus on loopback scraping the given /metrics ports every second, with the alert rules."""

    def __init__(self, workdir: Path, targets: dict[str, int]) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        spec = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())["spec"]
        (workdir / "rules.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(workdir / "rules.yaml")],
            "scrape_configs": [
                {
                    "job_name": JOB,
                    "static_configs": [
                        {"targets": [f"127.0.0.1:{port}"], "labels": {"namespace": NAMESPACE, "pod": pod}}
                        for pod, port in targets.items()
                    ],
                }
            ],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = (workdir / "prometheus.log").open("w")
        self.proc = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{self.url}/-/ready", timeout=1).close()
                return
            except OSError:
                if self.proc.poll() is not None:
                    break
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"prometheus did not start: {(workdir / 'prometheus.log').read_text()[-2000:]}")

    def query_range(self, expr: str, start: float, end: float, step: float = 1.0) -> list[Series]:
        """Evaluate `expr` over [start, end] (Unix seconds) through the HTTP API."""
        q = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
        reply = _get(f"{self.url}/api/v1/query_range?{q}")
        if reply["status"] != "success":
            raise RuntimeError(f"{expr}: {reply}")
        out = []
        for r in reply["data"]["result"]:
            t, v = zip(*r["values"], strict=True) if r["values"] else ((), ())
            out.append(Series(r["metric"], np.array(t, float), np.array([float(x) for x in v])))
        return out

    def rules(self) -> list[dict]:
        """Every loaded rule with its health, last error and (alerts) state."""
        return [r for g in _get(f"{self.url}/api/v1/rules")["data"]["groups"] for r in g["rules"]]

    def stop(self) -> None:
        """Terminate Prometheus (idempotent)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def _stream_worker(addresses: list[str], vocab: list[str], stop: threading.Event, seed: int) -> None:
    rng = random.Random(seed)
    ids = np.array([vocab.index(c) for c in TUNE], np.int64)
    while not stop.is_set():
        address = rng.choice(addresses)
        try:
            with Client(address) as client:
                # Some sessions are left open with a short idle TTL: the server expires them ("idle").
                abandon = rng.random() < 0.3
                session = client.session("default", idle_ttl_s=1.0 if abandon else None)
                chunks, lo = [], 0
                while lo < len(ids) and len(chunks) < rng.randint(3, 12):
                    n = rng.choice((1, 2, 4, 8, 16))
                    chunks.append(ids[lo : lo + n])
                    lo += n
                for _ in session.stream(chunks, last_only=True):
                    if stop.is_set():
                        break
                if not abandon:
                    session.close()
        except Exception:  # noqa: BLE001 - refused at the session limit (RESOURCE_EXHAUSTED): part of the load
            time.sleep(0.05)


def _error_worker(addresses: list[str], stop: threading.Event) -> None:
    while not stop.wait(0.3):
        for address in addresses:
            with Client(address) as client:
                for bad in (lambda: client.session("no_such_model"), lambda: client.get_model("default", 99)):
                    try:
                        bad()
                    except Exception:  # noqa: BLE001, S110 - the error is the point: it is counted by code
                        pass


def drive(addresses: list[str], seconds: float, workers: int = 4) -> None:
    """Run the mixed load for `seconds`, with a progress bar."""
    with Client(addresses[0]) as client:
        vocab = list(client.get_model("default").vocabulary)
    stop = threading.Event()
    threads = [
        threading.Thread(target=_stream_worker, args=(addresses, vocab, stop, i), daemon=True)
        for i in range(workers)
    ]
    threads.append(threading.Thread(target=_error_worker, args=(addresses, stop), daemon=True))
    for t in threads:
        t.start()
    for _ in tqdm(range(int(seconds)), desc="load", unit="s", leave=False):
        time.sleep(1)
    stop.set()
    for t in threads:
        t.join(10)


def panel_queries(dashboard: dict, rate_interval: str, model: str = ".*") -> list[tuple[dict, dict, str]]:
    """(panel, target, PromQL with Grafana's variables filled in) for every panel target."""
    out = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"].replace("$__rate_interval", rate_interval)
            expr = expr.replace("$namespace", ".*").replace("$model", model)
            out.append((panel, target, expr))
    return out


def run(seconds: float, workdir: Path) -> Preview:
    """Replicas + Prometheus + load; every panel's series and the rules' state."""
    dashboard = json.loads((MONITORING / "dashboard.json").read_text())
    repository = ROOT / "models" / "repository"
    ports = {"rnnserve-a": free_port(), "rnnserve-b": free_port()}
    replicas: list[Replica] = []
    prometheus = None
    try:
        for pod, port in ports.items():
            # A small session limit and a small session memory budget, so that some sessions are refused
            # (errors by code, admission refusals) and capacity and budget show.
            replicas.append(
                start_replica(
                    pod,
                    workdir,
                    repository,
                    metrics_port=port,
                    max_sessions=6,
                    state_budget_bytes=200_000,
                    sweep_interval_s=0.2,
                )
            )
        prometheus = Prometheus(workdir / "prometheus", ports)
        preview = Preview(start=time.time())
        time.sleep(2)  # a first scrape of the idle servers
        drive([r.address for r in replicas], seconds)
        time.sleep(3)  # idle sessions expire; the last scrapes and rule evaluations land
        preview.end = time.time()
        rate = "5s" if seconds < 30 else "10s"
        # The dashboard's model variable set to the model under load (the repository holds idle ones too).
        for panel, target, expr in panel_queries(dashboard, rate, model="default"):
            preview.panels[(panel["title"], target["refId"])] = prometheus.query_range(
                expr, preview.start, preview.end
            )
        preview.rules = prometheus.rules()
        return preview
    finally:
        if prometheus is not None:
            prometheus.stop()
        for r in replicas:
            r.stop()


def _legend(fmt: str, labels: dict[str, str]) -> str:
    import re

    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt)


def render(preview: Preview, out: Path) -> None:
    """Draw the panels at their gridPos (24 columns; rows of 1, panels of 8 units)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dashboard = json.loads((MONITORING / "dashboard.json").read_text())
    bottom = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in dashboard["panels"])
    unit_h = 0.34
    fig = plt.figure(figsize=(18, bottom * unit_h))
    scale = {"s": (1e3, "ms"), "bytes": (1 / 1024, "KiB")}
    for panel in dashboard["panels"]:
        g = panel["gridPos"]
        left, width = g["x"] / 24, g["w"] / 24
        top, height = 1 - g["y"] / bottom, g["h"] / bottom
        if panel["type"] == "row":
            fig.text(0.01, top - height / 2, panel["title"], fontsize=12, weight="bold", va="center")
            continue
        ax = fig.add_axes((left + 0.035, 1 - (g["y"] + g["h"]) / bottom + 0.025, width - 0.05, height - 0.06))
        unit = panel["fieldConfig"]["defaults"].get("unit", "short")
        factor, label = scale.get(unit, (1.0, {"ops": "/s", "reqps": "req/s"}.get(unit, "")))
        for target in panel["targets"]:
            for s in preview.panels.get((panel["title"], target["refId"]), []):
                finite = np.isfinite(s.values)
                if finite.any():
                    ax.plot(
                        s.times[finite] - preview.start,
                        s.values[finite] * factor,
                        label=_legend(target["legendFormat"], s.labels),
                        lw=1.2,
                    )
        ax.set_title(panel["title"], fontsize=9, loc="left")
        ax.set_ylabel(label, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=6, loc="upper left", ncol=2, framealpha=0.6)
    fig.text(
        0.99,
        0.003,
        "seconds since start; two replicas on loopback, real Prometheus, deploy/dashboard_preview.py",
        ha="right",
        fontsize=7,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)


def main() -> int:
    """Run the load, query every panel, draw docs/deploy/dashboard.png."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=90)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="dashboard-") as tmp:
        preview = run(args.seconds, Path(tmp))
    render(preview, args.out)
    empty = [k for k, v in preview.panels.items() if not v]
    bad = [r["name"] for r in preview.rules if r.get("health") != "ok"]
    print(
        f"wrote {args.out}; {len(preview.panels)} panel queries, empty: {empty or 'none'}; rule errors: {bad}"
    )
    return 1 if empty or bad else 0


if __name__ == "__main__":
    sys.exit(main())
