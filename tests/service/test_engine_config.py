"""Settings: file < environment < flags, generated flags, validation; and the repository watcher."""

from __future__ import annotations

import asyncio

import fixtures
import numpy as np
import pytest
from engine_harness import run_engine

from service.config import Settings, load_settings
from service.core.engine import Engine


def test_precedence_flags_over_env_over_file(tmp_path, monkeypatch):
    cfg = tmp_path / "server.yaml"
    cfg.write_text("grpc_port: 9100\nmetrics_port: 9101\nmax_batch_size: 32\nidle_ttl_s: 5\n")
    for key in list(__import__("os").environ):
        if key.startswith("RNNSERVE_"):
            monkeypatch.delenv(key)
    s = load_settings(["--config", str(cfg)])
    assert (s.grpc_port, s.metrics_port, s.max_batch_size, s.idle_ttl_s) == (9100, 9101, 32, 5)
    monkeypatch.setenv("RNNSERVE_GRPC_PORT", "9200")
    monkeypatch.setenv("RNNSERVE_MAX_BATCH_SIZE", "16")
    s = load_settings(["--config", str(cfg), "--max-batch-size", "8", "--evict-on-capacity"])
    assert (s.grpc_port, s.metrics_port, s.max_batch_size, s.evict_on_capacity) == (9200, 9101, 8, True)
    monkeypatch.setenv("RNNSERVE_CONFIG", str(cfg))
    assert load_settings([]).metrics_port == 9101  # the file can come from the environment too


def test_defaults_follow_triton_and_bad_values_exit(tmp_path, monkeypatch):
    for key in list(__import__("os").environ):
        if key.startswith("RNNSERVE_"):
            monkeypatch.delenv(key)
    s = Settings()
    assert (s.grpc_port, s.metrics_port, s.store, s.store_flush_every) == (8001, 8002, "memory", 1)
    assert all(f.description for f in Settings.model_fields.values())
    with pytest.raises(SystemExit, match="max_batch_size"):
        load_settings(["--max-batch-size", "0"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("no_such_setting: 1\n")
    with pytest.raises(SystemExit, match="no_such_setting"):
        load_settings(["--config", str(bad)])


def test_watcher_serves_a_new_version_to_new_sessions_only(tmp_path):
    fixtures.accumulator(tmp_path, "acc", 1)

    async def body(engine: Engine):
        old = await engine.create_session("acc")
        fixtures.accumulator(tmp_path, "acc", 2)
        for _ in range(500):
            if engine.get_model("acc").version == 2:
                break
            await asyncio.sleep(0.02)
        new = await engine.create_session("acc")
        assert (old.version, new.version) == (1, 2)
        r = await engine.step(old.session_id, 1, {"x": np.array([4], np.int32)})
        assert int(r.outputs["y"][0]) == 4

    run_engine(tmp_path, body, repository_poll_s=0.05)
