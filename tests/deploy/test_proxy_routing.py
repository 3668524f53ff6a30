"""Session affinity through the real front proxy (short run; `make proxy-check` runs the full one).

Real processes only: redis-server, three then four server replicas, dnsmasq as the cluster DNS and HAProxy
with the shipped `deploy/components/haproxy/haproxy.cfg`. See tests/deploy/routing.py for the phases.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.deploy import routing
from tests.deploy.redis_server import RedisServer

pytestmark = pytest.mark.slow


def test_sessions_keep_their_replica_and_move_only_when_theirs_goes(
    tmp_path: Path, model_repository: Path, clean_redis: RedisServer
):
    report = routing.run(tmp_path, model_repository, clean_redis, routing.SHORT)
    n = report.scale["sessions"]
    # Phase 1: affinity (asserted call by call inside) and spread over the three replicas.
    assert report.sessions_on_one_replica == n and report.calls_checked >= 3 * n
    assert report.kserve_sequences_on_one_replica == report.scale["sequences"]
    assert set(report.sessions_per_replica) == set(report.replicas_before)
    assert report.spread_max_over_min < 3, report.sessions_per_replica
    # Phase 3: a fourth replica takes only sessions for itself, about a quarter of them.
    assert report.scale_out_moved_elsewhere == 0
    assert 0.05 < report.scale_out_moved_fraction < 0.5, report.scale_out_moved_fraction
    # Phases 4 and 5: only the lost replica's sessions move; a drain is invisible to clients.
    assert report.kill_victim_sessions > 0 and report.kill_moved_others == 0
    assert report.drain_victim_sessions > 0 and report.drain_moved_others == 0
    assert report.drain_client_errors == 0 and report.drain_exit_code == 0
    # A second proxy started after all that routes every key as the first one does.
    assert report.proxies_disagree_fraction == 0
    # Every session's outputs equal one ONNX Runtime pass over its whole history.
    assert report.max_abs_diff <= 1e-5
    for kind in ("unary", "stream"):
        assert report.latency_ms[f"{kind} proxy"]["n"] == report.scale["latency_pairs"]
