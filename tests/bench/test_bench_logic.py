"""The benchmark's own logic: reference model contract, histogram deltas, target verdicts (no servers)."""

from __future__ import annotations

import math

import numpy as np
import onnxruntime as ort

from tests.bench.loadgen import _split
from tests.bench.refmodel import RefModelConfig, write_reference_repository
from tests.bench.report import verdicts
from tests.bench.servers import BatchHistogram
from tests.bench.suite import REF_MODEL, LoadRow, Plan, SuiteResult


def test_reference_lstm_follows_the_state_contract_and_streams_exactly(tmp_path):
    cfg = RefModelConfig(features=8, hidden=16)
    path = write_reference_repository(tmp_path, cfg)
    assert path == tmp_path / "ref_lstm" / "1" / "model.onnx"
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ins = {i.name: i.shape for i in sess.get_inputs()}
    assert ins == {"x": ["batch", "time", 8], "state_in_h": ["batch", 2, 16], "state_in_c": ["batch", 2, 16]}
    assert [o.name for o in sess.get_outputs()] == ["y", "state_out_h", "state_out_c"]
    x = np.random.default_rng(1).standard_normal((3, 9, 8)).astype(np.float32)
    zero = np.zeros((3, 2, 16), np.float32)
    y, h, c = sess.run(None, {"x": x, "state_in_h": zero, "state_in_c": zero})
    y1, h1, c1 = sess.run(None, {"x": x[:, :4], "state_in_h": zero, "state_in_c": zero})
    y2, h2, c2 = sess.run(None, {"x": x[:, 4:], "state_in_h": h1, "state_in_c": c1})
    np.testing.assert_allclose(np.concatenate([y1, y2], axis=1), y, atol=1e-5)
    np.testing.assert_allclose(h2, h, atol=1e-5)
    assert not np.allclose(h, 0)
    assert cfg.state_bytes == 2 * 2 * 16 * 4


def test_batch_histogram_delta_mean_and_quantile():
    before = BatchHistogram(((1.0, 10.0), (32.0, 10.0), (64.0, 10.0), (math.inf, 10.0)), 10.0, 10.0)
    after = BatchHistogram(((1.0, 10.0), (32.0, 40.0), (64.0, 50.0), (math.inf, 50.0)), 10.0 + 1000.0, 50.0)
    d = after.minus(before)
    assert d.count == 40 and d.mean == 25.0
    assert d.quantile(0.5) == 32.0 and d.quantile(0.99) == 64.0


def test_split_spreads_streams_evenly():
    assert _split(10, 3) == [4, 3, 3] and sum(_split(512, 2)) == 512


def _row(system, sessions, steps, steps_per_s, streams=None, **kw):
    return LoadRow(
        REF_MODEL,
        system,
        streams or sessions,
        sessions,
        steps,
        steps_per_s,
        steps_per_s / steps,
        1.0,
        2.0,
        kw.pop("p99", 3.0),
        0.5,
        0.8,
        kw.pop("us", 100.0),
        **kw,
    )


def test_verdicts_compute_ratios_and_verdicts():
    plan = Plan.make(quick=True)
    res = SuiteResult(plan, {"mode": "quick", "cpus": 2, "load_average_1m_at_start": 0.1})
    res.loads = [
        _row("echo", 128, 1, 10_000.0),
        _row("service", 128, 1, 9_500.0),
        _row(
            "service",
            64,
            16,
            50_000.0,
            ceiling_steps_per_s=100_000.0,
            ceiling_steps_per_cpu_s=70_000.0,
            ceiling_batch=32,
            batch_mean=32.0,
        ),
        _row("service (paced, 50% of peak)", 128, 1, 4_000.0, rate_per_s=4_000.0, p99=4.0),
    ]
    res.positions = [
        {"model": REF_MODEL, "position": 1, "stream_ms": 0.5, "stateless_ms": 0.6, "ort_stateless_ms": 0.1},
        {
            "model": REF_MODEL,
            "position": 1000,
            "stream_ms": 0.54,
            "stateless_ms": 60.0,
            "ort_stateless_ms": 30.0,
        },
    ]
    res.memory = [
        {
            "state": "written",
            "sessions": 1000,
            "rss_per_session_bytes": 5000.0,
            "raw_state_bytes_per_session": 4096,
            "ratio": 5000 / 4096,
        }
    ]
    got = {v.target.split(" (")[0].split(":")[0]: v for v in verdicts(res)}
    one = got["one-step @128 streams"]
    assert one.ratio == 0.95 and one.met
    chunk = got["16-step chunks @64 sessions"]
    assert chunk.ratio == 0.5 and chunk.met is False
    assert got["latency flat in position"].met and math.isclose(got["latency flat in position"].ratio, 1.08)
    assert got["stateless recompute / streamed step @ pos 1000"].met is True
    assert got["idle memory @ 1,000 sessions / raw state bytes"].met is True
    assert got["p99 at half of peak, service"].met is True
