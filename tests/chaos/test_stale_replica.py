"""The stale-replica fork, against real processes: a replica that served a session, lost its lease while idle,
and gets the session's traffic back after another replica advanced it, must not step its old resident copy.

Replica A serves seq 1..10, goes idle past its lease; B takes the session over and applies 11, 12; B goes idle
past its lease; traffic returns to A. The same for a KServe sequence (which must also fail over to B). The
checker replays every acknowledged output in ONNX Runtime: nothing lost, doubled, diverged or missing.
"""

from __future__ import annotations

import time
from pathlib import Path

import fixtures
import numpy as np
import pytest

from tests.chaos.checker import Reference, check
from tests.chaos.cluster import ChaosRedis, Cluster
from tests.chaos.drivers import MODEL, KServeDriver, NativeDriver, Router, Stats

pytestmark = pytest.mark.slow

LEASE_S = 1.0


class FixedRouter(Router):
    """Sends every request to replica `target`."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.target = 0

    def pick(self, *, move: bool = False):
        return self.cluster.channels[self.target]


@pytest.fixture
def cluster(tmp_path: Path, model_repository: Path):
    rs = ChaosRedis(tmp_path / "redis")
    rs.start()
    c = Cluster(tmp_path, model_repository, rs, 2, lease_s=LEASE_S)
    try:
        c.start_all()
        yield c
    finally:
        c.stop_all()
        rs.stop()


def run_stale_scenario(cluster: Cluster):
    """A: 10 steps; idle past the lease; B: 2 steps; idle past the lease; A: 3 steps. Returns the counts."""
    router = FixedRouter(cluster)
    stats = Stats()
    vocab = len(fixtures.DEFAULT_VOCAB)
    native = NativeDriver(
        "native",
        router,
        np.random.default_rng(1),
        vocab,
        chunk_t=3,
        call_timeout_s=10,
        give_up_s=10,
        stats=stats,
    )
    ids = iter(range(1000, 2000))
    kserve = KServeDriver(
        "kserve",
        router,
        np.random.default_rng(2),
        vocab,
        chunk_t=3,
        call_timeout_s=10,
        give_up_s=10,
        stats=stats,
        sequence_ids=lambda: next(ids),
    )
    for target, steps in ((0, 11), (1, 2), (0, 3)):
        router.target = target
        for _ in range(steps):
            native.step()
            kserve.step()
        time.sleep(LEASE_S * 1.6)
    native.finish()
    logs = [native.log, *kserve.logs]
    return check(Reference(cluster.repository / MODEL / "1" / "model.onnx"), logs), logs


def test_a_stale_replica_never_forks_a_session(cluster):
    counts, logs = run_stale_scenario(cluster)
    print(counts.summary(), *counts.faults, *(f"{lg.name}: {len(lg.events)} events" for lg in logs), sep="\n")
    assert counts.clean, counts.faults
    assert counts.steps_checked == 15 + 16  # native: a create, then 15 steps; kserve: a start and 15 steps
    # A revalidated its resident copies on retaking the leases and reloaded both from the store.
    assert cluster.replicas[0].log_text().count("reloading") == 2
