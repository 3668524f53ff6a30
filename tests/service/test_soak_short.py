"""The soak driver itself, on a few thousand cycles (make soak runs a million)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests import soak  # noqa: E402


def test_soak_driver_counts_cycles_and_reads_rss(tmp_path):
    result = soak.run(cycles=1500, workers=8, sample_every=500, warmup=500, max_seconds=120)
    assert result["cycles"] == 1500 and result["failures"] == 0
    assert [c for c, _ in result["samples"]] == [0, 500, 1000, 1500]
    assert result["rss_start_bytes"] > 0 and result["rss_end_bytes"] > 0
    soak.write(result, tmp_path)
    assert json.loads((tmp_path / "soak.json").read_text())["cycles"] == 1500
    assert "| 1,500 |" in (tmp_path / "soak.md").read_text() and (tmp_path / "soak.png").stat().st_size > 0
