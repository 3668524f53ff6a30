"""Worker processes behind one port (`--workers 2`): any session through any worker, restarts, one /metrics.

A real `python -m service.server --workers 2` (supervisor + two worker processes sharing the port through
SO_REUSEPORT). Calls are forced onto a given worker by dialling its Unix socket (the socket paths are read
from the workers' command lines), so a session created on one worker is stepped through the other; outputs are
compared with one ONNX Runtime pass over the whole sequence. With redis-server as the shared store, the worker
that owns a streaming session is SIGKILLed mid-stream: the supervisor starts a replacement, the client
re-attaches through the shared port, and no acknowledged step is lost or applied twice; while the worker is
down (the supervisor is held with SIGSTOP meanwhile) the other worker reports the server NOT_SERVING.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import fixtures
import grpc
import numpy as np
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2 as kpb
from tritonclient.grpc import service_pb2_grpc as kpb_grpc

from service import wire
from service.proto import rnnserve_pb2 as pb
from service.proto import rnnserve_pb2_grpc as pb_grpc
from service.server.interceptors import REPLICA_HEADER
from service.server.routing import owner_of
from service.server.supervisor import default_workers
from tests.deploy.redis_server import start_redis, stop_redis
from tests.service.server_thread import ServerProcess

VOCAB = len(fixtures.DEFAULT_VOCAB)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("workers_repo")
    fixtures.token_lstm(root, "tiny_lstm")
    return Path(root)


def workers_of(server: ServerProcess) -> dict[int, tuple[int, Path]]:
    """{worker index: (pid, Unix socket)} from the live worker processes' command lines."""
    found = {}
    for child in psutil.Process(server.proc.pid).children():
        cmd = child.cmdline()
        if "service.server.worker" in cmd:
            at = cmd.index("service.server.worker")
            k, run_dir = int(cmd[at + 1]), Path(cmd[at + 3])
            found[k] = (child.pid, run_dir / f"w{k}.sock")
    return found


@pytest.fixture(scope="module")
def server(repo) -> Iterator[ServerProcess]:
    srv = ServerProcess(repo, "--workers", "2")
    yield srv
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(timeout=60) == 0
    srv.stop()


def tokens(rng: np.random.Generator, t: int) -> np.ndarray:
    return rng.integers(0, VOCAB, size=(1, t), dtype=np.int64)


def replica(call) -> str:
    return dict(call.trailing_metadata() or ())[REPLICA_HEADER]


def test_default_workers_follow_the_cgroup_quota(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert default_workers(tmp_path) == min(2, len(os.sched_getaffinity(0)))
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert default_workers(tmp_path) == len(os.sched_getaffinity(0))
    assert default_workers(tmp_path / "absent") == len(os.sched_getaffinity(0))
    assert owner_of("w1.abc", 2) == 1 and owner_of("w0.x", 2) == 0
    assert owner_of("w7.abc", 2) == owner_of("w7.abc", 2) in (0, 1)  # unknown worker: a stable hash


def test_session_created_on_one_worker_steps_through_the_other(server, repo):
    workers = workers_of(server)
    assert sorted(workers) == [0, 1]
    rng = np.random.default_rng(1)
    chunks = [tokens(rng, t) for t in (3, 1, 4, 2, 5)]
    with (
        grpc.insecure_channel(f"unix:{workers[0][1]}") as w0,
        grpc.insecure_channel(f"unix:{workers[1][1]}") as w1,
        grpc.insecure_channel(server.address) as tcp,
    ):
        s0, s1, st = (pb_grpc.RecurrentServiceStub(c) for c in (w0, w1, tcp))
        sid = s0.CreateSession(pb.CreateSessionRequest(model="tiny_lstm"), timeout=10).session_id
        other = s1.CreateSession(pb.CreateSessionRequest(model="tiny_lstm"), timeout=10).session_id
        assert sid.startswith("w0.") and other.startswith("w1.")
        outs = []
        # 1. unary Step through worker 1: forwarded to worker 0, whose replica id comes back
        answer, call = s1.Step.with_call(
            pb.StepRequest(session_id=sid, seq=1, inputs=[wire.array_to_tensor("tokens", chunks[0][0])]),
            timeout=10,
        )
        assert replica(call).endswith("-w0")
        outs.append(wire.tensors_to_arrays(answer.outputs)["logits"])
        # 2. through the shared port, whichever worker takes the connection
        answer = st.Step(
            pb.StepRequest(session_id=sid, seq=2, inputs=[wire.array_to_tensor("tokens", chunks[1][0])]),
            timeout=10,
        )
        outs.append(wire.tensors_to_arrays(answer.outputs)["logits"])
        # 3. a Stream attaching through worker 1 (piped to worker 0)
        stream = s1.Stream(
            iter(
                [
                    pb.StreamRequest(open=pb.StreamOpen(session_id=sid, keep=True)),
                    pb.StreamRequest(seq=3, inputs=[wire.array_to_tensor("tokens", chunks[2][0])]),
                ]
            ),
            timeout=10,
        )
        replies = list(stream)
        assert replies[0].session.session_id == sid
        outs.append(wire.tensors_to_arrays(replies[1].outputs)["logits"])
        # 4. StreamMany through worker 1 with rows of both workers: split by owner, merged in order
        both = np.concatenate([chunks[3], chunks[3][:, ::-1]])
        many = s1.StreamMany(
            iter(
                [
                    pb.StepManyRequest(
                        tag=9,
                        session_ids=[sid, other],
                        seqs=[4, 1],
                        inputs=[wire.array_to_tensor("tokens", both)],
                    )
                ]
            ),
            timeout=10,
        )
        (merged,) = list(many)
        assert merged.tag == 9 and list(merged.codes) == [0, 0]
        logits = wire.tensors_to_arrays(merged.outputs)["logits"]
        outs.append(logits[0])
        # 5. a retried Step through worker 1 answers from worker 0's cache, applying nothing
        answer = s1.Step(
            pb.StepRequest(session_id=sid, seq=5, inputs=[wire.array_to_tensor("tokens", chunks[4][0])]),
            timeout=10,
        )
        again = s1.Step(
            pb.StepRequest(session_id=sid, seq=5, inputs=[wire.array_to_tensor("tokens", chunks[4][0])]),
            timeout=10,
        )
        assert again.cached
        outs.append(wire.tensors_to_arrays(answer.outputs)["logits"])
        info = s1.DescribeSession(pb.SessionRequest(session_id=sid), timeout=10)
        assert info.steps == sum(c.shape[1] for c in chunks)
        # a typed error from the owner comes back unchanged through the forwarder
        with pytest.raises(grpc.RpcError) as err:
            s1.Step(pb.StepRequest(session_id="w0.nosuchsession", seq=1), timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    model = repo / "tiny_lstm" / "1" / "model.onnx"
    want = fixtures.run_whole(model, {"tokens": np.concatenate(chunks, axis=1)})["logits"][0]
    np.testing.assert_allclose(np.concatenate(outs), want, rtol=1e-5, atol=1e-5)
    other_want = fixtures.run_whole(model, {"tokens": chunks[3][:, ::-1]})["logits"][0]
    np.testing.assert_allclose(logits[1], other_want, rtol=1e-5, atol=1e-5)


def _kserve(model: str, seq: int, chunk: np.ndarray, *, start: bool, end: bool) -> kpb.ModelInferRequest:
    request = kpb.ModelInferRequest(
        model_name=model,
        id=f"{seq}",
        inputs=[
            kpb.ModelInferRequest.InferInputTensor(name="tokens", datatype="INT64", shape=list(chunk.shape))
        ],
        raw_input_contents=[chunk.tobytes()],
    )
    request.parameters["sequence_id"].int64_param = seq
    request.parameters["sequence_start"].bool_param = start
    request.parameters["sequence_end"].bool_param = end
    return request


def _logits(reply: kpb.ModelInferResponse) -> np.ndarray:
    at = [o.name for o in reply.outputs].index("logits")
    shape = tuple(reply.outputs[at].shape)
    return np.frombuffer(reply.raw_output_contents[at], dtype=np.float32).reshape(shape)[0]


def test_kserve_sequences_over_several_channels(server, repo):
    rng = np.random.default_rng(2)
    n_seq, n_steps = 8, 4
    chunks = {s: [tokens(rng, 2) for _ in range(n_steps)] for s in range(1, n_seq + 1)}
    got: dict[int, list[np.ndarray]] = {s: [] for s in chunks}
    served_by: set[str] = set()
    # A sequence belongs to the worker its START reached: two channels on each worker's own socket make sure
    # that both own some, two on the shared port land wherever the kernel puts them.
    workers = workers_of(server)
    channels = [
        grpc.insecure_channel(address)
        for address in (server.address, f"unix:{workers[0][1]}", f"unix:{workers[1][1]}", server.address)
    ]
    try:
        stubs = [kpb_grpc.GRPCInferenceServiceStub(c) for c in channels]
        for step in range(n_steps):
            for s in chunks:  # each step of a sequence over another channel
                stub = stubs[(s + step) % len(stubs)]
                request = _kserve("tiny_lstm", s, chunks[s][step], start=step == 0, end=step == n_steps - 1)
                reply, call = stub.ModelInfer.with_call(request, timeout=10)
                served_by.add(replica(call))
                got[s].append(_logits(reply))
        # one stream carrying several sequences at once, started on it: served by the worker it reached
        stream_chunks = {s: [tokens(rng, 3) for _ in range(3)] for s in (101, 102, 103, 104)}
        requests = [
            _kserve("tiny_lstm", s, stream_chunks[s][i], start=i == 0, end=i == 2)
            for i in range(3)
            for s in stream_chunks
        ]
        replies = list(stubs[1].ModelStreamInfer(iter(requests), timeout=20))
        assert len(replies) == len(requests) and not any(r.error_message for r in replies)
    finally:
        for c in channels:
            c.close()
    assert {r.rsplit("-", 1)[1] for r in served_by} == {"w0", "w1"}  # the sequences live on both workers
    model = repo / "tiny_lstm" / "1" / "model.onnx"
    for s, parts in chunks.items():
        want = fixtures.run_whole(model, {"tokens": np.concatenate(parts, axis=1)})["logits"][0]
        np.testing.assert_allclose(np.concatenate(got[s]), want, rtol=1e-5, atol=1e-5)
    by_seq: dict[int, list[np.ndarray]] = {s: [] for s in stream_chunks}
    for reply in replies:  # replies of one sequence come in order; the request id names the sequence
        by_seq[int(reply.infer_response.id)].append(_logits(reply.infer_response))
    for s, parts in stream_chunks.items():
        want = fixtures.run_whole(model, {"tokens": np.concatenate(parts, axis=1)})["logits"][0]
        np.testing.assert_allclose(np.concatenate(by_seq[s]), want, rtol=1e-5, atol=1e-5)


def _metrics(server: ServerProcess) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as answer:
        return answer.read().decode()


def _value(text: str, pattern: str, default: float | None = None) -> float:
    found = re.search(rf"^{pattern} ([0-9.e+-]+)$", text, re.M)
    if found is None and default is not None:
        return default
    assert found, pattern
    return float(found.group(1))


def test_one_metrics_endpoint_sums_the_workers(server):
    workers = workers_of(server)
    before = _value(
        _metrics(server), r'rnnserve_sessions_opened_total\{model="tiny_lstm",protocol="native"\}', 0.0
    )
    for k in (0, 1):
        with grpc.insecure_channel(f"unix:{workers[k][1]}") as ch:
            stub = pb_grpc.RecurrentServiceStub(ch)
            for _ in range(3):
                stub.CreateSession(pb.CreateSessionRequest(model="tiny_lstm"), timeout=10)
    text = _metrics(server)
    after = _value(text, r'rnnserve_sessions_opened_total\{model="tiny_lstm",protocol="native"\}')
    assert after - before == 6
    assert _value(text, "rnnserve_workers") == 2
    assert _value(text, r'rnnserve_worker_up\{worker="1"\}') == 1
    with grpc.insecure_channel(server.address) as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert status.status == health_pb2.HealthCheckResponse.SERVING


def _step_stream(
    stub, sid: str, first_seq: int, chunks: list[np.ndarray], outs: dict[int, np.ndarray], kill=None
):
    """Step chunks first_seq.. one at a time on a Stream attached to `sid`; `kill()` runs after answer 1."""
    answered: queue.Queue[int] = queue.Queue()

    def requests() -> Iterator[pb.StreamRequest]:
        yield pb.StreamRequest(open=pb.StreamOpen(session_id=sid, keep=True))
        answered.get(timeout=30)
        for i, c in enumerate(chunks):
            yield pb.StreamRequest(seq=first_seq + i, inputs=[wire.array_to_tensor("tokens", c[0])])
            answered.get(timeout=30)  # lock-step: the next chunk only once this one is answered

    for reply in stub.Stream(requests(), timeout=30):
        if reply.seq:
            outs[reply.seq] = wire.tensors_to_arrays(reply.outputs)["logits"]
            if kill is not None:
                kill()
                kill = None
                time.sleep(0.2)  # the owner is gone before the next chunk goes out
        answered.put(reply.seq)


def _overall_health(socket_path: Path, want: int, within_s: float) -> bool:
    """Poll a worker's overall health ("") until it is `want`; False if it never is within `within_s`."""
    deadline = time.monotonic() + within_s
    with grpc.insecure_channel(f"unix:{socket_path}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            if stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status == want:
                return True
            time.sleep(0.1)
    return False


def test_sigkill_of_the_owner_mid_stream_loses_no_step(repo, tmp_path):
    (tmp_path / "redis").mkdir()
    redis = start_redis(tmp_path / "redis")
    server = ServerProcess(
        repo, "--workers", "2", "--store", "redis", "--redis-url", redis.url, "--lease-s", "60"
    )
    try:
        workers = workers_of(server)
        rng = np.random.default_rng(3)
        chunks = [tokens(rng, 2) for _ in range(12)]
        outs: dict[int, np.ndarray] = {}
        with grpc.insecure_channel(f"unix:{workers[1][1]}") as w1:
            sid = (
                pb_grpc.RecurrentServiceStub(w1)
                .CreateSession(pb.CreateSessionRequest(model="tiny_lstm"), timeout=10)
                .session_id
            )
        owner = owner_of(sid, 2)
        victim = workers[owner][0]
        killed = []

        def kill() -> None:
            os.kill(server.proc.pid, signal.SIGSTOP)  # no replacement yet: the health check sees the gap
            os.kill(victim, signal.SIGKILL)
            killed.append(time.monotonic())

        # Through the other worker's socket: the stream is piped to the owner, which dies after one answer.
        with grpc.insecure_channel(f"unix:{workers[1 - owner][1]}") as ch:
            with pytest.raises(grpc.RpcError) as err:
                _step_stream(pb_grpc.RecurrentServiceStub(ch), sid, 1, chunks, outs, kill=kill)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert killed and 1 in outs, err.value.details()
        # While a worker is down the whole server reports NOT_SERVING (its sessions cannot be served) ...
        survivor = workers[1 - owner][1]
        assert _overall_health(survivor, want=health_pb2.HealthCheckResponse.NOT_SERVING, within_s=15)
        os.kill(server.proc.pid, signal.SIGCONT)
        # Re-attach through the shared port until the replacement serves; resume after the last answer seen.
        deadline = time.monotonic() + 60
        while len(outs) < len(chunks):
            done = max(outs)
            try:
                with grpc.insecure_channel(server.address) as tcp:
                    _step_stream(pb_grpc.RecurrentServiceStub(tcp), sid, done + 1, chunks[done:], outs)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
                assert time.monotonic() < deadline, "the replacement worker never served the session"
                time.sleep(0.2)
        replacement = workers_of(server)[owner][0]
        assert replacement != victim
        # ... and SERVING again once the supervisor's replacement serves.
        assert _overall_health(survivor, want=health_pb2.HealthCheckResponse.SERVING, within_s=15)
        with grpc.insecure_channel(server.address) as tcp:
            info = pb_grpc.RecurrentServiceStub(tcp).DescribeSession(
                pb.SessionRequest(session_id=sid), timeout=10
            )
        assert info.steps == sum(c.shape[1] for c in chunks)  # nothing lost, nothing applied twice
        text = _metrics(server)
        assert _value(text, rf'rnnserve_worker_restarts_total\{{worker="{owner}"\}}') == 1
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(timeout=60)
        server.stop()
        stop_redis(redis)
    model = repo / "tiny_lstm" / "1" / "model.onnx"
    want = fixtures.run_whole(model, {"tokens": np.concatenate(chunks, axis=1)})["logits"][0]
    np.testing.assert_allclose(np.concatenate([outs[s] for s in sorted(outs)]), want, rtol=1e-5, atol=1e-5)
