"""SessionInfo times on the wire are Unix seconds that agree with the client's own clock."""

from __future__ import annotations

import time

import numpy as np
import pytest
from server_thread import ServerThread, make_settings

from service.client import Client


@pytest.fixture(scope="module")
def server(model_repository):
    srv = ServerThread(make_settings(model_repository))
    yield srv
    srv.stop()


def test_session_times_match_the_client_clock(server):
    with Client(server.address) as client:
        before = time.time()
        with client.session("tiny_lstm", idle_ttl_s=120) as s:
            created = time.time()
            info = s.info
            assert before - 1 <= info.created_at <= created + 1
            assert before - 1 <= info.last_used <= created + 1
            assert info.expires_at == pytest.approx(info.last_used + 120, abs=1e-3)
            time.sleep(0.2)
            s.step(np.array([1, 2, 3]))
            stepped = time.time()
            info = client.describe_session(s.id)
            assert info.created_at < info.last_used <= stepped + 1
            assert info.last_used >= created + 0.1
            assert info.expires_at == pytest.approx(info.last_used + 120, abs=1e-3)
