"""Triton fidelity through tritonclient: Triton's answers in the same situations (docs/triton.md, "Fidelity").

Compared with Triton core's source: model_repository_manager.cc ("Request for unknown model: '<name>' is not
found"), model_lifecycle.cc ("'<name>' version <v> is not found", "'<name>' has no available versions"),
sequence_batch_scheduler.cc ("inference request for sequence <id> to model '<name>' must specify the START
flag on the first request of the sequence", after the reaper released an idle sequence), and Triton's
ModelMetadata (the versions that are READY) and ModelStatistics (one entry per version).
"""

from __future__ import annotations

import time

import fixtures
import numpy as np
import pytest
import tritonclient.grpc as tc
from kserve_harness import ServerThread
from tritonclient.utils import InferenceServerException

from service.config import Settings
from service.proto import rnnserve_pb2 as npb
from service.proto import rnnserve_pb2_grpc as npb_grpc

IDLE_S = 0.5


def _acc(value: int) -> tc.InferInput:
    x = tc.InferInput("x", [1, 1], "INT32")
    x.set_data_from_numpy(np.array([[value]], np.int32))
    return x


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("fidelity_repo")
    for v in (1, 3):
        fixtures.accumulator(root, "acc", v)  # latest: 1 (default) -> only 3 is served
        fixtures.accumulator(root, "acc_all", v)
    for name in ("acc", "acc_all"):
        fixtures.save(fixtures.state_passthrough(fixtures.token_lstm(root, "lstm_tmp")), root, name, 2)
    (root / "acc_all" / "config.yaml").write_text("version_policy: all\n")
    fixtures.save(fixtures.state_passthrough(root / "lstm_tmp/1/model.onnx"), root, "only_broken")
    fixtures.accumulator(root, "acc_idle")
    (root / "acc_idle" / "config.yaml").write_text(f"idle_ttl_s: {IDLE_S}\n")
    fixtures.accumulator(root, "rolling")
    return root


@pytest.fixture(scope="module")
def server(repo):
    srv = ServerThread(Settings(model_repository=repo, grpc_host="127.0.0.1", grpc_port=0, metrics_port=-1))
    yield srv
    srv.stop()


@pytest.fixture()
def client(server):
    with tc.InferenceServerClient(url=server.url) as c:
        yield c


def _error(call) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as exc:
        call()
    return exc.value


def test_model_metadata_lists_only_served_versions(client):
    assert client.get_model_metadata("acc").versions == ["3"]  # 1 on disk, not served; 2 refused
    assert client.get_model_metadata("acc_all").versions == ["1", "3"]
    assert client.get_model_metadata("acc_all", "1").versions == ["1", "3"]


def test_unknown_model_and_version_worded_as_triton(client):
    err = _error(lambda: client.get_model_metadata("nope"))
    assert err.message() == "Request for unknown model: 'nope' is not found"
    assert err.status() == "StatusCode.NOT_FOUND"
    err = _error(lambda: client.infer("nope", [_acc(1)]))
    assert err.message() == "Request for unknown model: 'nope' is not found"
    err = _error(lambda: client.get_model_config("acc", "7"))
    assert err.message().startswith("Request for unknown model: 'acc' version 7 is not found (model 'acc' ")
    assert "served versions: [3]" in err.message()  # and what is served instead
    err = _error(lambda: client.infer("acc", [_acc(1)], model_version="1"))  # on disk; its policy serves 3
    assert err.message().startswith("Request for unknown model: 'acc' version 1 is not found (")
    err = _error(lambda: client.infer("acc_all", [_acc(1)], model_version="2"))
    assert err.message().startswith("Request for unknown model: 'acc_all' version 2 is not found (")
    assert "refused at load: self-check failed" in err.message()
    err = _error(lambda: client.get_model_metadata("only_broken"))
    assert err.message().startswith("Request for unknown model: 'only_broken' has no available versions")
    err = _error(lambda: client.get_inference_statistics("nope"))
    assert err.message() == "Request for unknown model: 'nope' is not found"


def test_a_sequence_expired_while_idle_answers_as_triton(client):
    assert client.infer("acc_idle", [_acc(2)], sequence_id=77, sequence_start=True).as_numpy("y")[0, 0] == 2
    time.sleep(IDLE_S * 2 + 0.5)
    err = _error(lambda: client.infer("acc_idle", [_acc(2)], sequence_id=77))
    assert err.status() == "StatusCode.INVALID_ARGUMENT"
    triton = (
        "inference request for sequence 77 to model 'acc_idle' must specify the START flag on the first "
        "request of the sequence"
    )
    assert err.message().startswith(triton + " (it ended (idle)"), err.message()
    # Streaming answers the same, in the stream's error_message.
    import queue

    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        client.async_stream_infer("acc_idle", [_acc(1)], sequence_id=77)
        _, error = answers.get(timeout=30)
    finally:
        client.stop_stream()
    assert error is not None and str(error.message()).startswith(triton), error


def test_statistics_of_a_retired_version_stay(server, repo, client):
    for _ in range(2):
        client.infer("rolling", [_acc(1)])
    fixtures.accumulator(repo, "rolling", 2)  # version 2 replaces 1 (latest: 1): 1 is retired
    import grpc

    with grpc.insecure_channel(server.url) as ch:
        npb_grpc.RecurrentServiceStub(ch).ReloadRepository(npb.ReloadRepositoryRequest())
    assert client.get_model_metadata("rolling").versions == ["2"]
    client.infer("rolling", [_acc(1)])
    by_version = {s.version: s for s in client.get_inference_statistics("rolling").model_stats}
    assert set(by_version) == {"1", "2"}
    assert by_version["1"].inference_stats.success.count == 2
    assert by_version["2"].inference_stats.success.count == 1
    everything = {(s.name, s.version) for s in client.get_inference_statistics().model_stats}
    assert {("rolling", "1"), ("rolling", "2"), ("acc", "3"), ("acc_all", "1")} <= everything
    one = client.get_inference_statistics("rolling", "1").model_stats
    assert [(s.version, s.inference_stats.success.count) for s in one] == [("1", 2)]
