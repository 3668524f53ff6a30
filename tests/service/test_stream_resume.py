"""Streams across replicas and dead peers: the client resumes by itself after "draining" and "moved".

Real server processes (`python -m service.server`) sharing a real redis-server, the real client library, and
one ONNX Runtime pass over every step as the oracle: a resumed stream loses and doubles nothing. A client
process that dies (SIGKILL) or stops answering (SIGSTOP: gRPC keepalive) while its stream is open releases
its session as documented (README, "Long-lived streams").
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import fixtures
import grpc
import numpy as np
import pytest
from server_thread import ServerThread, make_settings
from test_stream_lifecycle import MODEL, RawStream, sample, tokens, trailer, wait_for

from service.client import AsyncClient, Client
from service.proto import rnnserve_pb2 as pb
from service.proto import rnnserve_pb2_grpc as pb_grpc
from tests.deploy.redis_server import start_redis, stop_redis
from tests.deploy.replicas import start_replica

ROOT = Path(__file__).resolve().parents[2]
CUTS = [2, 5, 9, 14, 20, 27, 31, 36]  # 9 chunks of 40 steps


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("stream_resume")
    fixtures.token_lstm(root, MODEL)
    return root


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server.url
    stop_redis(server)


def replica(name: str, tmp_path: Path, repo: Path, redis_url: str, **settings: object):
    settings = {"store": "redis", "redis_url": redis_url, "lease_s": 1.5, "sweep_interval_s": 0.1, **settings}
    return start_replica(name, tmp_path, repo, **settings)


def one_pass(repo: Path, data: np.ndarray) -> np.ndarray:
    return fixtures.run_whole(repo / MODEL / "1" / "model.onnx", {"tokens": data[None]})["logits"][0]


def stream_with_fault(session, data: np.ndarray, at: int, fault) -> np.ndarray:
    """Stream `data` in chunks; before chunk `at`, run `fault` (the stream is open and idle then)."""

    def chunks():
        for i, chunk in enumerate(np.split(data, CUTS)):
            if i == at:
                fault()
            yield chunk

    return np.concatenate([out["logits"] for out in session.stream(chunks())])


def test_draining_is_told_and_the_client_resumes_on_another_replica(tmp_path, repo, redis_url):
    a = replica("a", tmp_path, repo, redis_url)
    b = replica("b", tmp_path, repo, redis_url)
    try:
        data = tokens(40, 5)
        with Client([a.address, b.address], backoff_s=0.02) as client:
            session = client.session(MODEL)

            def drain_a():
                a.terminate()
                a.process.wait(30)

            got = stream_with_fault(session, data, 3, drain_a)
            assert client.resumed == {"draining": 1}
            info = session.describe()  # now served by b
            assert (info.last_seq, info.steps) == (len(CUTS) + 1, len(data))
        np.testing.assert_allclose(got, one_pass(repo, data), atol=1e-5)
        assert "draining" in a.log_text()
    finally:
        a.stop()
        b.stop()


def test_draining_the_only_server_resumes_on_it_once_it_is_back(tmp_path, repo, redis_url):
    a = replica("a", tmp_path, repo, redis_url)
    back: list = []
    try:
        data = tokens(40, 6)
        with Client(a.address, backoff_s=0.02, resume_timeout_s=60) as client:
            session = client.session(MODEL)

            def restart_a():
                a.terminate()
                a.process.wait(30)
                # Back on the same port a little later: the client keeps reconnecting meanwhile.
                later = threading.Timer(
                    0.5, lambda: back.append(replica("a2", tmp_path, repo, redis_url, grpc_port=a.port))
                )
                later.start()

            got = stream_with_fault(session, data, 4, restart_a)
            assert client.resumed == {"draining": 1}
        np.testing.assert_allclose(got, one_pass(repo, data), atol=1e-5)
    finally:
        a.stop()
        for r in back:
            r.stop()


def test_moved_is_told_when_another_replica_takes_the_session_and_the_client_follows(
    tmp_path, repo, redis_url
):
    a = replica("a", tmp_path, repo, redis_url)
    b = replica("b", tmp_path, repo, redis_url)
    holder: list[RawStream] = []
    try:
        data = tokens(40, 7)
        with Client([a.address, b.address], backoff_s=0.02) as client, grpc.insecure_channel(b.address) as ch:
            session = client.session(MODEL)

            def take_over():
                os.kill(a.process.pid, signal.SIGSTOP)  # paused past its lease ...
                try:
                    time.sleep(1.6)
                    # ... while another client attaches on b with a stream of its own (b takes the lease).
                    opening = pb.StreamOpen(session_id=session.id, keep=True, lifecycle_events=True)
                    holder.append(RawStream(ch, opening))
                finally:
                    os.kill(a.process.pid, signal.SIGCONT)
                # a finds its lease taken, and tells its stream "moved" (it checks every third of a lease).
                wait_for(lambda: "moved" in a.log_text(), what="replica a to notice the move")

            got = stream_with_fault(session, data, 3, take_over)
            assert client.resumed == {"moved": 1}
            info = session.describe()
            assert (info.last_seq, info.steps) == (len(CUTS) + 1, len(data))
        np.testing.assert_allclose(got, one_pass(repo, data), atol=1e-5)
    finally:
        for h in holder:
            h.close()
        a.stop()
        b.stop()


def test_the_asyncio_client_and_the_multiplexer_resume_after_a_drain(tmp_path, repo, redis_url):
    a = replica("a", tmp_path, repo, redis_url)
    b = replica("b", tmp_path, repo, redis_url)
    c = replica("c", tmp_path, repo, redis_url)
    try:
        data = tokens(40, 8)

        async def stream_async() -> tuple[np.ndarray, dict[str, int]]:
            async with AsyncClient([a.address, b.address], backoff_s=0.02) as client:
                session = await client.session(MODEL)

                async def chunks():
                    for i, chunk in enumerate(np.split(data, CUTS)):
                        if i == 3:
                            a.terminate()
                            await asyncio.to_thread(a.process.wait, 30)
                        yield chunk

                got = [out["logits"] async for out in session.stream(chunks())]
                return np.concatenate(got), client.resumed

        got, resumed = asyncio.run(stream_async())
        assert resumed == {"draining": 1}
        np.testing.assert_allclose(got, one_pass(repo, data), atol=1e-5)

        # Two sessions stepped together over StreamMany on b; b drains midway; c takes over.
        rows = np.stack([tokens(12, 9), tokens(12, 10)])
        with Client([b.address, c.address], backoff_s=0.02) as client:
            sessions = [client.session(MODEL), client.session(MODEL)]
            outs = []
            with client.multiplexer() as mux:
                for t in range(0, 12, 2):
                    if t == 6:
                        b.terminate()
                        b.process.wait(30)
                    answers = mux.step([(s, rows[i, t : t + 2]) for i, s in enumerate(sessions)])
                    outs.append(np.stack([answer["logits"] for answer in answers]))
            assert client.resumed == {"draining": 1}
        np.testing.assert_allclose(np.concatenate(outs, axis=1)[0], one_pass(repo, rows[0]), atol=1e-5)
        np.testing.assert_allclose(np.concatenate(outs, axis=1)[1], one_pass(repo, rows[1]), atol=1e-5)
    finally:
        for r in (a, b, c):
            r.stop()


# -- dead peers ---------------------------------------------------------------------------------------------

PEER = """
import sys, time, grpc
from service.proto import rnnserve_pb2 as pb, rnnserve_pb2_grpc as pb_grpc
channel = grpc.insecure_channel(sys.argv[1])
opening = pb.StreamOpen(model=sys.argv[2], keep=sys.argv[3] == "keep", idle_ttl_s=float(sys.argv[4]))
def feed():
    yield pb.StreamRequest(open=opening)
    time.sleep(3600)
call = pb_grpc.RecurrentServiceStub(channel).Stream(feed())
print(next(call).session.session_id, flush=True)
time.sleep(3600)
"""


def peer(address: str, keep: bool, idle_ttl_s: float) -> tuple[subprocess.Popen, str]:
    args = [address, MODEL, "keep" if keep else "close", str(idle_ttl_s)]
    proc = subprocess.Popen(
        [sys.executable, "-c", PEER, *args], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    return proc, proc.stdout.readline().strip()


def gone_reason(stub, session_id: str) -> str | None:
    try:
        stub.DescribeSession(pb.SessionRequest(session_id=session_id), timeout=5)
    except grpc.RpcError as err:
        return trailer(err)
    return None


def test_a_killed_peer_ends_its_stream_and_the_session_it_opened(repo):
    server = ServerThread(make_settings(repo))
    proc = None
    try:
        proc, sid = peer(server.address, keep=False, idle_ttl_s=600)
        with grpc.insecure_channel(server.address) as ch:
            stub = pb_grpc.RecurrentServiceStub(ch)
            assert gone_reason(stub, sid) is None
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            wait_for(lambda: gone_reason(stub, sid) == "closed", what="the session to close")
        assert sample(server, "rnnserve_open_streams", method="Stream") == 0
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        server.stop()


def test_keepalive_ends_the_stream_of_a_peer_that_stopped_answering(repo):
    server = ServerThread(make_settings(repo, keepalive_time_s=0.5, keepalive_timeout_s=1.0))
    proc = None
    try:
        proc, sid = peer(server.address, keep=True, idle_ttl_s=1.0)
        with grpc.insecure_channel(server.address) as ch:
            stub = pb_grpc.RecurrentServiceStub(ch)
            time.sleep(2.5)  # silent, but it answers pings: the stream holds the session past its TTL
            assert gone_reason(stub, sid) is None
            proc.send_signal(signal.SIGSTOP)  # its socket stays open; nobody answers the pings any more
            stopped = time.monotonic()
            wait_for(lambda: sample(server, "rnnserve_open_streams", method="Stream") == 0, 20, "keepalive")
            noticed = time.monotonic() - stopped
            # The hold is gone with the stream: the kept session expires after its idle TTL.
            wait_for(lambda: gone_reason(stub, sid) == "idle", 10, "idle expiry")
        assert noticed < 10
    finally:
        if proc is not None:
            proc.kill()
            proc.wait(10)
        server.stop()
