"""The open-streams benchmark's quick mode end to end (real server, real echo, client processes; well under a
minute), and its report logic on a hand-made result."""

from __future__ import annotations

import json

from tests.bench import streams, streams_report


def test_quick_run_writes_the_table_the_plot_and_sane_figures(tmp_path):
    assert streams.main(["--quick", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "streams.json").read_text())
    assert (tmp_path / "streams.png").stat().st_size > 10_000
    text = (tmp_path / "streams.md").read_text()
    assert "| open streams |" in text and "| target |" in text
    assert not any(r["errors"] for r in data["rows"]), [r["first_error"] for r in data["rows"]]
    paced = [r for r in data["rows"] if r["rate"] > 0]
    assert {r["open_streams"] for r in paced} == {64, 200}
    for r in data["rows"]:
        assert r["steps_per_s"] > 0 and 0 < r["p50_ms"] <= r["p99_ms"] <= r["max_ms"]
        assert r["server_cpu_us_per_step"] > 0
    assert data["rss"]["200"] > data["rss"]["before"] and "after" in data["rss"]
    assert data["echo_rss"]["200"] > data["echo_rss"]["before"]
    assert data["state_bytes"] > 0
    floor = data["floor"]  # echo CPU per message, raw ORT CPU per step: what the CPU ratio is held against
    assert floor["saturation_mean_batch"] >= 1
    for key in ("echo_paced_cpu_us", "echo_saturation_cpu_us", "ort_batch1_cpu_us", "ort_saturation_cpu_us"):
        assert floor[key] > 0, key
    assert any(name.startswith("(floor)") for name, *_ in streams_report.targets(data))


def _row(open_streams, rate, p99, cpu, windows=2):
    return {
        "open_streams": open_streams, "active_streams": open_streams, "rate": rate,
        "steps_per_s": rate or 5000.0, "p50_ms": p99 / 4, "p99_ms": p99, "max_ms": p99 * 2,
        "server_cpu_us_per_step": cpu, "client_cores": 0.1,
        "longest_loop_lag_ms": 20.0, "longest_gc_pause_ms": 5.0, "full_collections": 1.0,
        "window_p99_ms": [p99] * windows, "errors": 0, "first_error": "",
    }  # fmt: skip


def test_targets_compare_many_streams_with_64_and_paced_cpu_with_saturation():
    mib = 1 << 20
    data = {
        "env": {
            "plan": {"rates": [1000.0], "seconds": 20.0, "long_s": 0.0},
            "cpus": 2,
            "load_average_start": 1.0,
        },
        "model": "m",
        "state_bytes": 1024,
        "rss": {"before": 100 * mib, "64": 101 * mib, "20000": 400 * mib, "after": 130 * mib},
        "echo_rss": {"before": 40 * mib, "64": 41 * mib, "20000": 200 * mib, "after": 50 * mib},
        "rows": [_row(64, 1000.0, 10.0, 300.0), _row(64, 0.0, 30.0, 100.0), _row(20000, 1000.0, 25.0, 140.0)],
    }
    verdicts = {name.split(":")[0].split(" over")[0]: met for name, _, _, met in streams_report.targets(data)}
    assert verdicts["p99 at 1,000 steps/s"] is False  # 25 ms vs 10 ms: 2.5x
    cpu = [met for name, _, _, met in streams_report.targets(data) if name.startswith("server CPU")]
    assert cpu == [False, True]  # 300 vs 100 us (paced over 64); 140 vs 100 us (20,000 idle streams)
    assert verdicts["RSS after every stream closed / before they opened"] is False  # 1.3x
    assert not any(name.startswith("(floor)") for name, *_ in streams_report.targets(data))  # not measured
    data["floor"] = {
        "saturation_mean_batch": 20.0, "echo_paced_cpu_us": 80.0, "echo_saturation_cpu_us": 40.0,
        "ort_batch1_cpu_us": 200.0, "ort_saturation_cpu_us": 20.0,
    }  # fmt: skip
    (name, measured, _, met), = [t for t in streams_report.targets(data) if t[0].startswith("(floor)")]
    assert met is False and "280 vs 60 us (4.67x)" in measured and "batch 20" in measured
    text = streams_report.render(data)
    assert "| 20,000 |" in text and "**missed**" in text
