"""KServe sequences with several workers: a sequence belongs to the worker that received its START.

A real `python -m service.server --workers 2`; calls are put on a given worker by dialling its Unix socket
(as a client whose connection the kernel gave to that worker). Each served call's `x-rnnserve-replica` trailer
names the worker that served it, and every output is compared with one ONNX Runtime pass over the sequence:
the owner is found by a worker that only sees a later step (from another channel), a restart of the sequence
on the other worker moves it there (the old owner never answers from its old copy), an END then the same id
started on the other worker, a `ModelStreamInfer` that carries both sequences it owns and sequences owned by
the other worker, and the owner SIGKILLed: without a shared store the sequence is gone (and the replacement
does not claim it), with Redis the replacement continues it with no step lost or applied twice.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import fixtures
import grpc
import numpy as np
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2_grpc as kpb_grpc

from service.server.interceptors import REPLICA_HEADER
from tests.deploy.redis_server import start_redis, stop_redis
from tests.service.server_thread import ServerProcess
from tests.service.test_workers import _kserve, _logits, _metrics, _value, tokens, workers_of

MODEL = "tiny_lstm"


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("workers_sequences_repo")
    fixtures.token_lstm(root, MODEL)
    return Path(root)


@pytest.fixture(scope="module")
def server(repo) -> Iterator[ServerProcess]:
    srv = ServerProcess(repo, "--workers", "2")
    yield srv
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(timeout=60) == 0
    srv.stop()


def _want(repo: Path, chunks: list[np.ndarray]) -> np.ndarray:
    model = repo / MODEL / "1" / "model.onnx"
    return fixtures.run_whole(model, {"tokens": np.concatenate(chunks, axis=1)})["logits"][0]


class Channels:
    """Stubs on worker 0's socket, worker 1's socket and the shared port; `infer` names who served."""

    def __init__(self, server: ServerProcess) -> None:
        workers = workers_of(server)
        self._channels = [
            grpc.insecure_channel(f"unix:{workers[0][1]}"),
            grpc.insecure_channel(f"unix:{workers[1][1]}"),
            grpc.insecure_channel(server.address),
        ]
        self.stubs = [kpb_grpc.GRPCInferenceServiceStub(c) for c in self._channels]

    def infer(
        self, via: int, seq: int | str, chunk: np.ndarray, *, start: bool = False, end: bool = False
    ) -> tuple[np.ndarray, str]:
        request = _kserve(MODEL, 0, chunk, start=start, end=end)
        request.id = str(seq)
        if isinstance(seq, str):
            request.parameters["sequence_id"].string_param = seq
        else:
            request.parameters["sequence_id"].int64_param = seq
        reply, call = self.stubs[via].ModelInfer.with_call(request, timeout=20)
        return _logits(reply), dict(call.trailing_metadata())[REPLICA_HEADER].rsplit("-", 1)[1]

    def refused(self, via: int, seq: int | str, chunk: np.ndarray) -> tuple[grpc.RpcError, str]:
        with pytest.raises(grpc.RpcError) as err:
            self.infer(via, seq, chunk)
        trailers = dict(err.value.trailing_metadata() or ())
        return err.value, trailers.get(REPLICA_HEADER, "-?").rsplit("-", 1)[1]

    def close(self) -> None:
        for c in self._channels:
            c.close()


W0, W1, TCP = 0, 1, 2


@pytest.mark.parametrize("seq", [501, "sequence-501"])
def test_the_start_decides_the_owner_and_every_channel_finds_it(server, repo, seq):
    rng = np.random.default_rng(5)
    ch = Channels(server)
    try:
        first = [tokens(rng, 2) for _ in range(4)]
        outs, served = [], []
        for via, chunk, start in ((W0, first[0], True), (W1, first[1], False), (TCP, first[2], False)):
            out, by = ch.infer(via, seq, chunk, start=start)  # later steps learn the owner from the table
            outs.append(out)
            served.append(by)
        assert served == ["w0", "w0", "w0"]
        np.testing.assert_allclose(np.concatenate(outs), _want(repo, first[:3]), rtol=1e-5, atol=1e-5)

        # Restarted through worker 1 (no END): worker 1 owns it now; worker 0 never answers from its old copy.
        second = [tokens(rng, 3) for _ in range(3)]
        outs, served = [], []
        for via, chunk, start in ((W1, second[0], True), (W0, second[1], False), (W1, second[2], False)):
            out, by = ch.infer(via, seq, chunk, start=start)
            outs.append(out)
            served.append(by)
        assert served == ["w1", "w1", "w1"]
        np.testing.assert_allclose(np.concatenate(outs), _want(repo, second), rtol=1e-5, atol=1e-5)

        # END through worker 0 (served by the owner, worker 1); then no worker has it, not even worker 0's
        # stale first incarnation.
        _out, by = ch.infer(W0, seq, first[3], end=True)
        assert by == "w1"
        for via in (W0, W1):
            err, _by = ch.refused(via, seq, first[3])
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "must specify the START flag" in err.details()

        # The same id started again, this time on worker 0.
        third = [tokens(rng, 1) for _ in range(3)]
        outs, served = [], []
        for via, chunk, start, end in ((W0, third[0], True, False), (W1, third[1], False, False),
                                       (TCP, third[2], False, True)):  # fmt: skip
            out, by = ch.infer(via, seq, chunk, start=start, end=end)
            outs.append(out)
            served.append(by)
        assert served == ["w0", "w0", "w0"]
        np.testing.assert_allclose(np.concatenate(outs), _want(repo, third), rtol=1e-5, atol=1e-5)
    finally:
        ch.close()


def test_a_stream_serves_its_own_sequences_and_forwards_the_others(server, repo):
    rng = np.random.default_rng(6)
    ch = Channels(server)
    try:
        # 601 and 602 start on worker 0; the stream on worker 1 continues them, starts 603 itself, and
        # restarts 601 halfway (its replies must still come in order: the old route answers first).
        chunks: dict[tuple[int, int], list[np.ndarray]] = {}
        got: dict[tuple[int, int], list[np.ndarray]] = {}
        for s in (601, 602):
            chunks[(s, 1)] = [tokens(rng, 2)]
            got[(s, 1)] = [ch.infer(W0, s, chunks[(s, 1)][0], start=True)[0]]
        plan = []  # (sequence, incarnation, start, end)
        for i in range(4):
            plan += [(601, 1, False, False), (602, 1, False, i == 3), (603, 1, i == 0, i == 3)]
        plan += [(601, 2, True, False), (601, 2, False, False), (601, 2, False, True)]
        requests = []
        for s, inc, start, end in plan:
            chunk = tokens(rng, 2)
            chunks.setdefault((s, inc), []).append(chunk)
            request = _kserve(MODEL, s, chunk, start=start, end=end)
            request.id = f"{s}/{inc}"
            requests.append(request)
        replies = list(ch.stubs[W1].ModelStreamInfer(iter(requests), timeout=30))
        assert len(replies) == len(requests)
        assert not [r.error_message for r in replies if r.error_message]
        order = []
        for reply in replies:
            s, inc = (int(x) for x in reply.infer_response.id.split("/"))
            got.setdefault((s, inc), []).append(_logits(reply.infer_response))
            order.append((s, inc))
        assert [o for o in order if o[0] == 601] == [(601, 1)] * 4 + [(601, 2)] * 3
        for key, parts in chunks.items():
            np.testing.assert_allclose(np.concatenate(got[key]), _want(repo, parts), rtol=1e-5, atol=1e-5)
        # Exactly the 8 requests of sequences owned by worker 0 went there; the other 10 were served in place.
        forwarded = _value(_metrics(server), r'rnnserve_forwarded_total\{method="ModelStreamInfer"\}')
        assert forwarded == 8
    finally:
        ch.close()


def _replaced(server: ServerProcess, k: int, old_pid: int, within_s: float = 60) -> None:
    """Wait until worker k's replacement serves on its socket."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            found = workers_of(server).get(k)
        except psutil.Error:  # the killed worker is a zombie until the supervisor reaps it
            found = None
        if found is not None and found[0] != old_pid and found[1].exists():
            with grpc.insecure_channel(f"unix:{found[1]}") as c:
                try:
                    health_pb2_grpc.HealthStub(c).Check(
                        health_pb2.HealthCheckRequest(service=""), timeout=2, wait_for_ready=True
                    )
                    return
                except grpc.RpcError:
                    pass
        time.sleep(0.2)
    raise AssertionError(f"worker {k} was not replaced within {within_s:g}s")


@pytest.mark.parametrize("store", ["memory", "redis"])
def test_the_owner_killed(repo, tmp_path, store):
    redis = None
    extra: tuple[str, ...] = ()
    if store == "redis":
        (tmp_path / "redis").mkdir()
        redis = start_redis(tmp_path / "redis")
        extra = ("--store", "redis", "--redis-url", redis.url, "--lease-s", "60")
    server = ServerProcess(repo, "--workers", "2", *extra)
    rng = np.random.default_rng(7)
    chunks = [tokens(rng, 2) for _ in range(5)]
    outs = []
    try:
        ch = Channels(server)
        try:
            for via, chunk, start in ((W0, chunks[0], True), (W1, chunks[1], False), (W1, chunks[2], False)):
                out, by = ch.infer(via, 701, chunk, start=start)
                assert by == "w0"
                outs.append(out)
        finally:
            ch.close()
        victim = workers_of(server)[0][0]
        os.kill(victim, signal.SIGKILL)
        _replaced(server, 0, victim)
        ch = Channels(server)
        try:
            if store == "memory":
                # The sequence died with its owner; the replacement forgot it, so worker 1 answers at once.
                err, by = ch.refused(W1, 701, chunks[3])
                assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and by == "w1", err.details()
                assert "must specify the START flag" in err.details()
                return
            # With the shared store the replacement (same replica id, its predecessor's leases) continues it.
            for via, chunk, end in ((W1, chunks[3], False), (TCP, chunks[4], True)):
                out, by = ch.infer(via, 701, chunk, end=end)
                assert by == "w0"
                outs.append(out)
        finally:
            ch.close()
    finally:
        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(timeout=60)
        server.stop()
        if redis is not None:
            stop_redis(redis)
    np.testing.assert_allclose(np.concatenate(outs), _want(repo, chunks), rtol=1e-5, atol=1e-5)
