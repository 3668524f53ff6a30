"""Alert rules and Grafana dashboard (deploy/components/monitoring), checked with promtool and a live server.

- `promtool check rules` on the PrometheusRule's `spec` (a plain rule file) and `promtool test rules` with the
  unit tests in rules_test.yaml; each alert's firing case is shown to matter by disabling that alert, which
  must make the unit tests fail.
- Every dashboard query is valid PromQL (promtool parses it as a recording rule, Grafana variables filled in).
- Every metric the rules and the dashboard use, and every label they match or group on, is exported by a real
  server's /metrics after some traffic; the only other metrics are named in EXTERNAL, with their source.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import fixtures
import grpc
import numpy as np
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from service.client import Client
from tests.service.server_thread import ServerThread, make_settings

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "deploy" / "components" / "monitoring"
# Metrics used that the server does not export, with their source.
EXTERNAL = {
    "up": "Prometheus (one series per scraped target)",
    "kube_deployment_status_replicas_available": "kube-state-metrics",
}
# Labels Prometheus attaches when it scrapes a pod (PodMonitor), not the server.
TARGET_LABELS = {"namespace", "pod", "job", "instance", "container", "endpoint"}
KEYWORDS = {
    "and",
    "or",
    "unless",
    "bool",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "offset",
}
GRAFANA_VARS = {"$__rate_interval": "5m", "$namespace": ".*", "$model": ".*"}


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool is not installed (Debian package `prometheus`; `make system-deps` as root installs it)",
            pytrace=False,
        )
    return path


def rule_spec() -> dict:
    doc = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    assert doc["kind"] == "PrometheusRule" and doc["apiVersion"] == "monitoring.coreos.com/v1"
    return doc["spec"]


def dashboard() -> dict:
    return json.loads((MONITORING / "dashboard.json").read_text())


def dashboard_exprs(dash: dict) -> list[str]:
    out = []
    for panel in dash["panels"]:
        out += [t["expr"] for t in panel.get("targets", [])]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            found = re.fullmatch(r"label_values\((.*),\s*\w+\)", var["definition"])
            assert found, var["definition"]
            out.append(found.group(1))
    return out


def rule_exprs(spec: dict) -> list[str]:
    return [r["expr"] for g in spec["groups"] for r in g["rules"]]


def fill(expr: str) -> str:
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr!r}"
    return expr


def metrics_used(expr: str) -> dict[str, set[str]]:
    """Metric name -> label names it is matched or grouped on, from a PromQL expression."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    used: dict[str, set[str]] = {}
    grouping = set()
    for m in re.finditer(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", e):
        grouping |= {x.strip() for x in m.group(1).split(",") if x.strip()}
    e = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    matchers: dict[int, set[str]] = {}
    for m in re.finditer(r"\{([^}]*)\}", e):
        matchers[m.start()] = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", m.group(1)))
    e = re.sub(r"\[[^\]]*\]", " ", e)
    e = re.sub(r"\boffset\s+\w+", " ", e)
    bare = re.sub(r"\{[^}]*\}", lambda m: "{" + " " * (len(m.group(0)) - 2) + "}", e)
    for m in re.finditer(r"(?<![\w.$])[A-Za-z_:][\w:]*", bare):
        rest = bare[m.end() :].lstrip()
        if m.group(0) in KEYWORDS or rest.startswith("("):
            continue
        labels = set(grouping)
        if rest.startswith("{"):
            labels |= matchers.get(len(bare) - len(rest), set())
        used.setdefault(m.group(0), set()).update(labels)
    return used


# --- rules ----------------------------------------------------------------------------------------------


def _promtool_test(tmp_path: Path, spec: dict) -> subprocess.CompletedProcess:
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    shutil.copy(MONITORING / "rules_test.yaml", tmp_path / "rules_test.yaml")
    return subprocess.run(
        [promtool(), "test", "rules", "rules_test.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_promtool_check_rules(tmp_path):
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(rule_spec(), sort_keys=False))
    out = subprocess.run(
        [promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr
    alerts = [r["alert"] for r in rule_spec()["groups"][0]["rules"]]
    assert alerts and f"SUCCESS: {len(rule_exprs(rule_spec()))} rules found" in out.stdout


def test_promtool_unit_tests_pass(tmp_path):
    out = _promtool_test(tmp_path, rule_spec())
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_the_alerts_issue_asks_for_are_there():
    names = {r["alert"] for g in rule_spec()["groups"] for r in g["rules"]}
    assert {
        "RnnserveSessionsNearCapacity",  # capacity near budget
        "RnnserveStateNearBudget",
        "RnnserveEvictionBurst",
        "RnnserveP99LatencyHigh",
        "RnnserveErrorRatioHigh",
        "RnnserveNoReadyReplicas",
    } <= names


def test_every_alert_has_a_firing_unit_test(tmp_path):
    """Disabling any one alert (an expression that never fires) must fail the unit tests."""
    spec = rule_spec()
    for gi, group in enumerate(spec["groups"]):
        for ri, rule in enumerate(group["rules"]):
            broken = copy.deepcopy(spec)
            broken["groups"][gi]["rules"][ri]["expr"] = "vector(1) == 0"
            out = _promtool_test(tmp_path, broken)
            assert out.returncode != 0, f"the unit tests pass with {rule['alert']} disabled"
            assert rule["alert"] in out.stdout + out.stderr


def test_monitoring_is_rendered_in_prod():
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is not installed (see tests/deploy/test_manifests.py)", pytrace=False)
    out = subprocess.run(
        [kubectl, "kustomize", str(ROOT / "deploy" / "overlays" / "prod")], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    objects = [o for o in yaml.safe_load_all(out.stdout) if o]
    (rule,) = [o for o in objects if o["kind"] == "PrometheusRule"]
    assert rule["spec"] == rule_spec() and rule["metadata"]["namespace"] == "rnnserve"
    (cm,) = [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "rnnserve-dashboard"]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["rnnserve.json"]) == dashboard()


# --- dashboard ------------------------------------------------------------------------------------------


def test_dashboard_queries_are_valid_promql(tmp_path):
    exprs = dashboard_exprs(dashboard())
    rules = [{"record": f"dashboard:query_{i}", "expr": fill(e)} for i, e in enumerate(exprs)]
    path = tmp_path / "dashboard_rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = subprocess.run(
        [promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_dashboard_panels_cover_the_issue_and_fit_the_grid():
    dash = dashboard()
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    text = " ".join(t["expr"] for p in panels for t in p["targets"])
    for metric in (
        "rnnserve_steps_total",
        "rnnserve_request_seconds_bucket",
        "rnnserve_batch_size_bucket",
        "rnnserve_active_sessions",
        "rnnserve_sessions_ended_total",
        "rnnserve_state_bytes",
        "rnnserve_state_budget_bytes",
        "rnnserve_requests_total",
    ):
        assert metric in text, metric
    assert "sum by (model, reason)" in text and "sum by (code)" in text
    assert {v["name"] for v in dash["templating"]["list"]} == {"datasource", "namespace", "model"}
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for p in dash["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"panel {p['title']!r} overlaps another"
        cells |= mine


# --- against a live server ------------------------------------------------------------------------------


@dataclass
class Scrape:
    """One /metrics scrape: sample name -> label names, and (name, labels) -> value."""

    labels: dict[str, set[str]]
    values: dict[tuple[str, frozenset], float]

    def value(self, name: str, **labels: str) -> float:
        return self.values[(name, frozenset(labels.items()))]


@pytest.fixture(scope="module")
def live_metrics(tmp_path_factory) -> Scrape:
    """A real server's /metrics after a session with a step, a closed session and a failed call."""
    repo = tmp_path_factory.mktemp("monitoring_repo")
    fixtures.token_lstm(repo, "tiny_lstm", hidden=8)
    server = ServerThread(make_settings(repo, max_sessions=4))
    try:
        with Client(server.running.address) as client:
            with client.session("tiny_lstm") as s:
                s.step({"tokens": np.array([1, 2, 3], np.int64)})
            with pytest.raises(grpc.RpcError):
                client.session("no_such_model")
        url = f"http://127.0.0.1:{server.running.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as r:
            body = r.read().decode()
    finally:
        server.stop()
    scrape = Scrape({}, {})
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            scrape.labels.setdefault(sample.name, set()).update(sample.labels)
            scrape.values[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return scrape


def test_extraction_finds_names_labels_and_a_typo():
    used = metrics_used(
        'histogram_quantile(0.99, sum by (model, le) (rate(rnnserve_request_secs_bucket{model=~"$m"}[5m])))'
        " > 1e-3 and on (pod) up offset 5m"
    )
    # Grouping labels count for every metric of the expression (stricter than PromQL needs).
    assert used == {"rnnserve_request_secs_bucket": {"model", "le", "pod"}, "up": {"model", "le", "pod"}}


def test_every_metric_and_label_used_is_exported(live_metrics):
    used: dict[str, set[str]] = {}
    for expr in rule_exprs(rule_spec()) + [fill(e) for e in dashboard_exprs(dashboard())]:
        for name, labels in metrics_used(expr).items():
            used.setdefault(name, set()).update(labels)
    assert len(used) >= 12
    for name, labels in sorted(used.items()):
        if name in EXTERNAL:
            continue
        exported = live_metrics.labels.get(name)
        assert exported is not None, (
            f"{name} is used by the rules or the dashboard but the server does not export it"
        )
        missing = labels - exported - TARGET_LABELS
        assert not missing, f"{name} has no label(s) {sorted(missing)} (it has {sorted(exported)})"
    assert {"rnnserve_max_sessions", "rnnserve_state_budget_bytes"} <= used.keys()


def test_budget_gauges_hold_the_limits(live_metrics):
    """The capacity alerts divide by these: the session limits and the state bytes they imply."""
    assert live_metrics.value("rnnserve_max_sessions") == 4
    v = {"model": "tiny_lstm", "version": "1"}
    assert live_metrics.value("rnnserve_model_max_sessions", **v) == 4
    state_per_session = 2 * 8 * 4  # states h and c, (1 layer, hidden 8) float32
    assert live_metrics.value("rnnserve_state_budget_bytes", **v) == 4 * state_per_session
    assert live_metrics.value("rnnserve_state_bytes", **v) == 0  # the one session was closed
    assert live_metrics.value("rnnserve_sessions_ended_total", model="tiny_lstm", reason="closed") == 1
