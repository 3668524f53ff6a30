"""The dashboard and the alert rules on a real Prometheus that scrapes two real replicas under a short load.

deploy/dashboard_preview.py starts both replicas, Prometheus (Debian's `prometheus`, with the PrometheusRule's
rules loaded) and the load; here it runs for a few seconds. Every panel query of the dashboard must return
data, and Prometheus must have evaluated every alert rule without error on the servers' real series. (Which
alerts fire is covered by the promtool unit tests in test_monitoring.py.)
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _preview_module():
    spec = importlib.util.spec_from_file_location(
        "dashboard_preview", ROOT / "deploy" / "dashboard_preview.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["dashboard_preview"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def preview(tmp_path_factory):
    if shutil.which("prometheus") is None:
        pytest.fail(
            "prometheus is not installed (Debian package `prometheus`; make system-deps)", pytrace=False
        )
    module = _preview_module()
    result = module.run(8, tmp_path_factory.mktemp("dashboard"))
    return module, result


def test_every_panel_query_shows_data(preview):
    module, result = preview
    assert len(result.panels) >= 15
    empty = []
    for (title, ref), series in result.panels.items():
        if not any(np.isfinite(s.values).any() for s in series):
            empty.append(f"{title} [{ref}]")
    assert not empty, f"panels without data from a live server: {empty}"
    # The series carry what the legends and variables use.
    steps = result.panels[("Steps/s", "A")]
    # The load steps the default model; every other served model shows as a series too (at zero).
    stepped = {s.labels.get("model") for s in steps if np.nanmax(s.values, initial=0) > 0}
    assert stepped == {"default"}
    ended = {s.labels["reason"] for s in result.panels[("Sessions ended by reason", "A")]}
    assert "closed" in ended


def test_every_alert_rule_evaluates_on_real_series(preview):
    _module, result = preview
    alerts = [r for r in result.rules if r["type"] == "alerting"]
    assert len(alerts) >= 7
    bad = {r["name"]: r.get("lastError") for r in alerts if r["health"] != "ok"}
    assert not bad, bad
    # Two replicas up: the "no scraped target" alert is quiet.
    (down,) = [r for r in alerts if r["name"] == "RnnserveTargetsDown"]
    assert down["state"] == "inactive"


def test_render_draws_every_panel(preview, tmp_path):
    module, result = preview
    out = tmp_path / "dashboard.png"
    module.render(result, out)
    assert out.stat().st_size > 50_000
