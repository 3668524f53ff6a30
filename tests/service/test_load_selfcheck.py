"""Load-time self-check through the real server: broken models are refused with a one-line reason, the rest
serve. Real gRPC (native API, KServe, health) and real ONNX Runtime on hand-edited fixture graphs."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import fixtures
import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from server_thread import ServerThread, make_settings
from tritonclient.grpc import service_pb2 as kpb
from tritonclient.grpc import service_pb2_grpc as kpb_grpc

from service.client import Client
from service.config import Settings
from service.core.registry import Repository
from service.proto import rnnserve_pb2 as pb
from service.proto import rnnserve_pb2_grpc as pb_grpc

CHUNKING = "self-check failed: outputs depend on the chunking: "


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("selfcheck_repo")
    src = tmp_path_factory.mktemp("selfcheck_src")
    lstm = fixtures.token_lstm(src, "lstm")
    gru = fixtures.numeric_gru(src, "gru")
    fixtures.numeric_gru(root, "tiny_gru")
    fixtures.accumulator(root, "accumulator")
    fixtures.save(fixtures.state_passthrough(lstm), root, "stateless_lstm")  # state_out = state_in
    fixtures.save(fixtures.normalised_over(gru, axis=1), root, "time_norm")  # normalises over time
    # Opted out, or a tolerance that lets anything through: served although broken.
    fixtures.save(fixtures.normalised_over(gru, axis=1), root, "unchecked")
    (root / "unchecked" / "config.yaml").write_text("self_check: false\n")
    fixtures.save(fixtures.state_passthrough(lstm), root, "tolerant")
    (root / "tolerant" / "config.yaml").write_text("self_check_tolerance: 1.0e+9\n")
    # A broken newest version: the older valid one keeps serving.
    fixtures.numeric_gru(root, "fallback", version=1)
    fixtures.save(fixtures.normalised_over(gru, axis=1), root, "fallback", version=2)
    return root


@pytest.fixture(scope="module")
def server(repo):
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(level=logging.INFO)
    logger = logging.getLogger("service.core.registry")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    srv = ServerThread(make_settings(repo))
    srv.records = records
    yield srv
    srv.stop()
    logger.removeHandler(handler)
    logger.setLevel(old_level)


SERVED = {"tiny_gru", "accumulator", "unchecked", "tolerant", "fallback"}
REFUSED = {("stateless_lstm", 1), ("time_norm", 1), ("fallback", 2)}


def test_broken_models_are_refused_and_the_rest_serve(server):
    with Client(server.address) as client:
        assert {m.name for m in client.list_models()} == SERVED
        assert client.get_model("fallback").version == 1
        with client.session("tiny_gru") as s:  # a good model streams
            y = s.step({"x": np.ones((4, 3), np.float32)})["y"]
            assert y.shape[0] == 4 and np.isfinite(y).all()
    messages = [r.getMessage() for r in server.records if r.levelno == logging.ERROR]
    for name, version in REFUSED:
        line = next(m for m in messages if m.startswith(f"model {name} version {version} not served"))
        assert CHUNKING in line and "\n" not in line


def test_reload_answer_says_why_in_one_line(server):
    with grpc.insecure_channel(server.address) as channel:
        reply = pb_grpc.RecurrentServiceStub(channel).ReloadRepository(pb.ReloadRepositoryRequest())
    assert {m.name for m in reply.models} == SERVED
    refused = {(r.name, r.version): r.reason for r in reply.refused}
    assert set(refused) == REFUSED
    for reason in refused.values():
        assert reason.startswith(CHUNKING) and "\n" not in reason
    assert "state is not carried" in refused[("stateless_lstm", 1)]


def test_health_per_model_and_not_found_reason(server):
    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)

        def status(name: str) -> int:
            return health.Check(health_pb2.HealthCheckRequest(service=name)).status

        for name in SERVED:
            assert status(name) == health_pb2.HealthCheckResponse.SERVING
        for name in ("stateless_lstm", "time_norm"):
            assert status(name) == health_pb2.HealthCheckResponse.NOT_SERVING
        native = pb_grpc.RecurrentServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            native.CreateSession(pb.CreateSessionRequest(model="time_norm"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert "version 1 was refused at load: " + CHUNKING + "y differs by" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            native.GetModel(pb.GetModelRequest(name="fallback", version=2))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert "version 2 is not served" in err.value.details() and CHUNKING in err.value.details()
        index = kpb_grpc.GRPCInferenceServiceStub(channel).RepositoryIndex(kpb.RepositoryIndexRequest())
    unavailable = {(m.name, int(m.version)): m.reason for m in index.models if m.state == "UNAVAILABLE"}
    assert set(unavailable) == REFUSED and all(r.startswith(CHUNKING) for r in unavailable.values())


def test_a_fixed_version_is_served_after_reload(repo, server):
    fixtures.numeric_gru(repo, "time_norm", version=1)  # the broken file is replaced by a good one
    with Client(server.address) as client:
        client.reload()
        assert client.get_model("time_norm").version == 1
    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        got = health.Check(health_pb2.HealthCheckRequest(service="time_norm")).status
        assert got == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("self_check: maybe\n", "self_check must be true or false"),
        ("self_check_tolerance: -1\n", "self_check_tolerance must be a positive number"),
    ],
)
def test_bad_self_check_settings_are_refused(tmp_path, config, message):
    fixtures.accumulator(tmp_path, "m")
    (tmp_path / "m" / "config.yaml").write_text(config)
    repo = Repository(tmp_path, Settings(model_repository=tmp_path))
    repo.scan()
    assert not repo.current and message in repo.refusals()[0].reason


def test_a_broken_model_dropped_into_a_watched_repository(tmp_path):
    fixtures.accumulator(tmp_path, "accumulator")
    src = fixtures.numeric_gru(tmp_path / ".src", "gru")  # a dot directory is not a model
    srv = ServerThread(make_settings(tmp_path, repository_poll_s=0.1))
    try:
        fixtures.save(fixtures.normalised_over(src, axis=1), tmp_path, "late")
        with grpc.insecure_channel(srv.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 10
            status = None
            while time.monotonic() < deadline:
                try:
                    status = health.Check(health_pb2.HealthCheckRequest(service="late")).status
                except grpc.RpcError:  # NOT_FOUND until the watcher has seen the model
                    status = None
                if status == health_pb2.HealthCheckResponse.NOT_SERVING:
                    break
                time.sleep(0.05)
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            got = health.Check(health_pb2.HealthCheckRequest(service="accumulator")).status
            assert got == health_pb2.HealthCheckResponse.SERVING
    finally:
        srv.stop()
