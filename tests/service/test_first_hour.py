"""What a new user meets first: client input types, default port, metric names, make help and make clean."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import fixtures
import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from server_thread import ServerThread, make_settings

from service.client import Client, parse_addresses
from service.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]


def test_client_refuses_float_token_ids_and_keeps_safe_casts(tmp_path):
    fixtures.token_lstm(tmp_path, "tiny_lstm")
    fixtures.numeric_gru(tmp_path, "tiny_gru")
    srv = ServerThread(make_settings(tmp_path))
    try:
        with Client(srv.address) as client, client.session("tiny_lstm") as s:
            with pytest.raises(
                TypeError, match="'tokens' of model 'tiny_lstm' takes int64 values; got float64"
            ):
                s.step({"tokens": np.array([1.0, 2.7])})  # would have been truncated to 1, 2
            assert s.describe().last_seq == 0  # nothing was sent
            ints = s.step({"tokens": np.array([1, 2], dtype=np.int32)})  # int32 -> int64: widening, fine
            assert ints["logits"].shape[0] == 2
            with client.session("tiny_gru") as g:  # float64 -> float32 for a float model: fine
                assert g.step({"x": np.zeros((3, 3))})["y"].shape == (3, 2)
    finally:
        srv.stop()


def test_an_address_without_a_port_dials_the_servers_default_port(tmp_path, monkeypatch):
    monkeypatch.delenv("RNNSERVE_ADDRESS", raising=False)
    assert parse_addresses("localhost") == ["localhost:8001"]
    assert parse_addresses("a, b:9000,[::1]") == ["a:8001", "b:9000", "[::1]:8001"]
    assert parse_addresses("dns:///rnnserve-headless.ns.svc") == ["dns:///rnnserve-headless.ns.svc:8001"]
    assert parse_addresses(None) == ["localhost:8001"]
    assert Client("localhost").address == "localhost:8001"


def test_no_metric_name_ends_in_created_created():
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.sessions_created.labels("m", "native").inc()
    names = {line.split("{")[0].split(" ")[0] for line in generate_latest(registry).decode().splitlines()}
    names.discard("#")
    assert "rnnserve_sessions_opened_total" in names
    assert not [n for n in names if n.endswith("_created_created")]


def _make(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["make", "-s", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_make_help_lists_every_target_and_clean_has_a_rule():
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][a-z-]*):(?!=)", makefile, re.M)) - {"help"}
    phony = set(re.search(r"^\.PHONY:(.*)$", makefile, re.M).group(1).split())
    assert phony - {"help"} <= targets, f"phony targets without a rule: {phony - targets}"
    shown = set(re.findall(r"^make ([a-z][a-z-]*)", _make("help").stdout, re.M))
    assert targets - shown == set(), f"make help does not list: {targets - shown}"
    dry = _make("-n", "clean")
    assert (
        dry.returncode == 0
        and "service/proto/*_pb2.py" in dry.stdout
        and ".venv" not in dry.stdout.replace("-path ./.venv -prune", "")
    )
