"""Server lifecycle: graceful SIGTERM on a real `python -m service.server` process; in-process start/stop."""

from __future__ import annotations

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
from grpc_health.v1 import health_pb2, health_pb2_grpc
from server_thread import ServerProcess, ServerThread, make_settings

from service import wire
from service.proto import rnnserve_pb2 as pb
from service.proto import rnnserve_pb2_grpc as pb_grpc

GRACE_S = 15.0
LONG_T = 4000
GENERATE_N = 3000


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lifecycle_repo")
    fixtures.token_lstm(root, "tiny_lstm")
    # Big enough that one long chunk is still computing when SIGTERM arrives.
    fixtures.token_lstm(root, "big", hidden=256, layers=2, seed=7)
    return root


def test_sigterm_drains_in_flight_and_ends_streams(repo):
    srv = ServerProcess(repo, "--drain-grace-s", str(GRACE_S))
    try:
        with grpc.insecure_channel(srv.address) as ch:
            stub = pb_grpc.RecurrentServiceStub(ch)
            health = health_pb2_grpc.HealthStub(ch)
            statuses: list[int] = []
            watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
            watcher = threading.Thread(
                target=lambda: [statuses.append(r.status) for r in _safe(watch)], daemon=True
            )
            watcher.start()

            # An idle bidi stream that must end with UNAVAILABLE "server draining; reconnect".
            requests: list[pb.StreamRequest] = [
                pb.StreamRequest(open=pb.StreamOpen(model="tiny_lstm", keep=True))
            ]
            gate = threading.Event()

            def feed():
                yield from requests
                gate.wait(60)

            stream = stub.Stream(feed())
            opened = next(stream)
            assert opened.session.session_id

            # A long step in flight when the signal arrives.
            sid = stub.CreateSession(pb.CreateSessionRequest(model="big")).session_id
            data = np.random.default_rng(0).integers(0, len(fixtures.DEFAULT_VOCAB), LONG_T).astype(np.int64)
            future = stub.Step.future(
                pb.StepRequest(
                    session_id=sid, seq=1, inputs=[wire.array_to_tensor("tokens", data)], last_only=True
                ),
                timeout=120,
            )
            # A long generation whose first token proves it is in flight when the signal arrives.
            generation = stub.Generate(
                pb.GenerateRequest(model="big", prime_text="AB", n_tokens=GENERATE_N, seed=1), timeout=120
            )
            tokens = [next(generation)]
            signalled = time.monotonic()
            srv.proc.send_signal(signal.SIGTERM)

            tokens += list(generation)  # the in-flight generation runs to its end
            assert len(tokens) == GENERATE_N
            response = future.result(timeout=120)  # the in-flight step finishes, with the right answer
            want = fixtures.run_whole(repo / "big" / "1" / "model.onnx", {"tokens": data[None]})["logits"][
                0, -1
            ]
            np.testing.assert_allclose(wire.tensor_to_array(response.outputs[0])[0], want, atol=1e-4)

            with pytest.raises(grpc.RpcError) as err:
                next(stream)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "draining" in err.value.details() and "reconnect" in err.value.details()
            gate.set()

            code = srv.proc.wait(timeout=GRACE_S + 10)
            assert code == 0, "".join(srv.lines)
            assert time.monotonic() - signalled < GRACE_S + 5
            watcher.join(10)
            assert statuses[0] == health_pb2.HealthCheckResponse.SERVING
            assert health_pb2.HealthCheckResponse.NOT_SERVING in statuses, statuses
            with pytest.raises(grpc.RpcError) as err:
                stub.ListModels(pb.ListModelsRequest(), timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert any("draining" in line for line in srv.lines)
    finally:
        srv.stop()


def _safe(iterator):
    try:
        yield from iterator
    except grpc.RpcError:
        return


def test_start_binds_free_ports_and_stop_is_idempotent(repo):
    srv = ServerThread(make_settings(repo))
    try:
        running = srv.running
        assert running.port > 0 and running.metrics_port and running.metrics_port > 0
        assert {s.name for s in running.engine.list_models()} == {"tiny_lstm", "big"}
        with grpc.insecure_channel(srv.address) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            assert health.Check(health_pb2.HealthCheckRequest(service="big")).status == (
                health_pb2.HealthCheckResponse.SERVING
            )
        srv.call(running.stop(0))
        srv.call(running.stop(0))  # second stop: no error
        assert not running.is_serving()
    finally:
        srv.stop()


def test_new_work_refused_while_draining_but_health_answers(repo):
    srv = ServerThread(make_settings(repo))
    try:
        srv.running.streams.drain()
        with grpc.insecure_channel(srv.address) as ch:
            stub = pb_grpc.RecurrentServiceStub(ch)
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Stream(iter([pb.StreamRequest(open=pb.StreamOpen(model="tiny_lstm"))])))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "draining" in err.value.details()
            srv.running.interceptor.draining = True
            with pytest.raises(grpc.RpcError) as err:
                stub.CreateSession(pb.CreateSessionRequest(model="tiny_lstm"))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "reconnect" in err.value.details()
            health = health_pb2_grpc.HealthStub(ch)
            assert health.Check(health_pb2.HealthCheckRequest(service="")).status == (
                health_pb2.HealthCheckResponse.SERVING
            )
    finally:
        srv.stop()


def test_health_follows_models_the_repository_watcher_loads(tmp_path):
    root = tmp_path / "repo"
    fixtures.token_lstm(root, "first")
    srv = ServerThread(make_settings(root, repository_poll_s=0.1))
    try:
        with grpc.insecure_channel(srv.address) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            request = health_pb2.HealthCheckRequest(service="second")
            with pytest.raises(grpc.RpcError) as err:
                health.Check(request)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            fixtures.token_lstm(root, "second")
            deadline = time.monotonic() + 20
            status = None
            while time.monotonic() < deadline:
                try:
                    status = health.Check(request).status
                except grpc.RpcError:
                    status = None
                if status == health_pb2.HealthCheckResponse.SERVING:
                    break
                time.sleep(0.05)
            assert status == health_pb2.HealthCheckResponse.SERVING
    finally:
        srv.stop()


def test_port_in_use_exits_with_a_message(repo):
    first = ServerProcess(repo)
    try:
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "service.server",
                "--model-repository",
                str(repo),
                "--grpc-host",
                "127.0.0.1",
                "--grpc-port",
                str(first.port),
                "--metrics-port",
                "-1",
            ],
            cwd=Path(__file__).resolve().parents[2],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode != 0, out.stderr[-2000:]
        # One line, before any model is loaded, saying which port and how to choose another.
        assert out.stderr.strip().splitlines() == [
            f"rnnserve: gRPC port {first.port} on 127.0.0.1 is already in use; choose another with "
            "--grpc-port / RNNSERVE_GRPC_PORT (or stop the process that holds it)"
        ], out.stderr[-2000:]
    finally:
        first.stop()
