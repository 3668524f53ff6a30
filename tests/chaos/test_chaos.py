"""The short chaos run (seeded, about a minute): three replicas, Redis with AOF, every kind of fault.

The full run is `make chaos` (python -m tests.chaos): at least 1,000 faults, reported in the README.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.chaos.run import ChaosConfig, run_chaos

pytestmark = pytest.mark.slow


# Part of `make test` (`make chaos-short` runs it alone; RNNSERVE_CHAOS_SEED=N another schedule). It once
# reported an acknowledged step missing in some runs: replicas answered from resident copies they could not
# vouch for (docs/DESIGN.md 4.1, "Reads"; tests/service/test_fencing_reads.py). Do not loosen the assertions.
def test_short_chaos_run_loses_doubles_and_diverges_nothing(tmp_path: Path):
    cfg = short_config(int(os.environ.get("RNNSERVE_CHAOS_SEED", "7")))
    result = run_chaos(tmp_path, cfg)
    summary = result.to_json()
    print(summary)
    assert result.faults_injected >= 15, summary
    assert {"kill", "pause", "redis_kill", "redis_term"} & set(result.faults) >= {"kill", "pause"}, summary
    assert result.counts.steps_checked >= 40, summary
    assert result.counts.clean, "\n".join(result.evidence) + "\n" + str(summary)


def short_config(seed: int) -> ChaosConfig:
    """The short run's shape (`RNNSERVE_CHAOS_SEED` picks the seed; the schedule follows from it)."""
    return ChaosConfig(
        seed=seed,
        native_sessions=6,
        kserve_sequences=4,
        client_threads=4,
        target_faults=10_000,  # bounded by time here
        max_duration_s=35.0,  # replicas take seconds to start on a loaded machine
        min_acks=80,  # ... and then fewer steps get through: go on (at most 100 s more) until these are in
        min_faults=20,
        extra_s=100.0,
        replica_gap_s=(0.4, 1.0),
        redis_gap_s=(4.0, 6.0),
        give_up_s=20.0,
        progress=False,
    )
