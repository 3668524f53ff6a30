"""Version policy per model (config.yaml `version_policy`, as Triton's): newest N, all, specific versions.

Repository scans on real ONNX Runtime loads, then the real server: version 1 of a model addressed while
version 2 is the newest, on the native API (CreateSession version) and through tritonclient (model_version),
each answer compared with ONNX Runtime run directly on that version's file.
"""

from __future__ import annotations

import re
from pathlib import Path

import fixtures
import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from server_thread import ServerThread, make_settings
from tritonclient.utils import InferenceServerException

from service.client import Client
from service.config import Settings
from service.core.registry import Repository
from service.errors import NotFound
from service.proto import rnnserve_pb2 as pb
from service.proto import rnnserve_pb2_grpc as pb_grpc


def _repo(root: Path, name: str, versions: list[int], policy: str | None) -> Path:
    for v in versions:
        fixtures.numeric_gru(root, name, v, seed=v)
    if policy is not None:
        (root / name / "config.yaml").write_text(f"version_policy: {policy}\n")
    return root


def _served(repo: Repository, name: str) -> list[int]:
    return sorted(repo.served.get(name, {}))


@pytest.mark.parametrize(
    ("policy", "served"),
    [
        (None, [3]),
        ("{latest: 2}", [2, 3]),
        ("{latest: {num_versions: 5}}", [1, 2, 3]),
        ("all", [1, 2, 3]),
        ("{all: {}}", [1, 2, 3]),
        ("{specific: [1, 3]}", [1, 3]),
        ("{specific: {versions: [2, 9]}}", [2]),
    ],
)
def test_policies_pick_versions(tmp_path, policy, served):
    repo = Repository(_repo(tmp_path, "m", [1, 2, 3], policy), Settings(model_repository=tmp_path))
    change = repo.scan()
    assert _served(repo, "m") == served
    assert sorted(mv.spec.version for mv in change.loaded) == served
    assert repo.get("m").spec.version == max(served)  # no version asked: the newest served one
    for v in served:
        assert repo.get("m", v).spec.version == v
    for v in sorted({1, 2, 3} - set(served)):
        expected = f"version {v} is not served; served versions: {served}"
        with pytest.raises(NotFound, match=re.escape(expected)):
            repo.get("m", v)


def test_latest_n_counts_valid_versions_only(tmp_path):
    _repo(tmp_path, "m", [1, 2], "{latest: 2}")
    (tmp_path / "m/3").mkdir()
    (tmp_path / "m/3/model.onnx").write_bytes(b"broken")
    repo = Repository(tmp_path, Settings(model_repository=tmp_path))
    repo.scan()
    assert _served(repo, "m") == [1, 2] and [r.version for r in repo.refusals("m")] == [3]


def test_policy_change_retires_and_loads_on_rescan(tmp_path):
    _repo(tmp_path, "m", [1, 2, 3], "all")
    repo = Repository(tmp_path, Settings(model_repository=tmp_path))
    repo.scan()
    pinned = repo.get("m", 1)
    repo.acquire(pinned)  # an open session on version 1
    (tmp_path / "m/config.yaml").write_text("version_policy: {specific: [2]}\n")
    change = repo.scan()
    assert _served(repo, "m") == [2] and repo.get("m").spec.version == 2
    assert sorted(mv.spec.version for mv in change.retired) == [1, 3]
    assert [mv.spec.version for mv in change.unload] == [3]  # version 1 waits for its session
    assert repo.release(pinned) and pinned not in repo.loaded()


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        ("newest", "version_policy must be 'all', {latest: N} or {specific: [v, ...]}"),
        ("{latest: 0}", "version_policy.latest must be a positive integer"),
        ("{specific: []}", "version_policy.specific needs a list of versions"),
        ("{specific: [1, -2]}", "version_policy.specific must be a positive integer"),
    ],
)
def test_bad_policies_are_refused(tmp_path, policy, message):
    repo = Repository(_repo(tmp_path, "m", [1], policy), Settings(model_repository=tmp_path))
    repo.scan()
    assert not repo.current and message in repo.refusals("m")[0].reason


# ---------------------------------------------------------------------------------- through the server


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("version_policy")
    _repo(root, "both", [1, 2], "all")  # version 1 addressable while 2 is the newest
    _repo(root, "newest", [1, 2], None)  # today's default: newest only
    return root


@pytest.fixture(scope="module")
def server(repo):
    srv = ServerThread(make_settings(repo))
    yield srv
    srv.stop()


def _oracle(repo: Path, name: str, version: int, x: np.ndarray) -> np.ndarray:
    return fixtures.run_whole(repo / name / str(version) / "model.onnx", {"x": x[np.newaxis]})["y"][0]


X = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)


def test_native_sessions_address_each_served_version(repo, server):
    with Client(server.address) as client:
        for version, want in ((1, 1), (2, 2), (None, 2)):
            with client.session("both", version=version) as s:
                assert s.describe().version == want
                y = np.concatenate([s.step({"x": X[:2]})["y"], s.step({"x": X[2:]})["y"]])
            np.testing.assert_allclose(y, _oracle(repo, "both", want, X), atol=1e-5)
        assert not np.allclose(_oracle(repo, "both", 1, X), _oracle(repo, "both", 2, X))
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.RecurrentServiceStub(channel)
        for name, version, served in (("both", 3, "[1, 2]"), ("newest", 1, "[2]")):
            with pytest.raises(grpc.RpcError) as err:
                stub.CreateSession(pb.CreateSessionRequest(model=name, version=version))
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            assert f"version {version} is not served; served versions: {served}" in err.value.details()


def test_kserve_model_version(repo, server):
    with tc.InferenceServerClient(url=f"127.0.0.1:{server.running.port}") as client:
        assert client.is_model_ready("both", "1") and client.is_model_ready("both", "2")
        assert not client.is_model_ready("newest", "1") and client.is_model_ready("newest", "2")
        policy = client.get_model_config("both").config.version_policy
        assert policy.WhichOneof("policy_choice") == "all"
        latest = client.get_model_config("newest").config.version_policy.latest.num_versions
        assert latest == 1
        index = {(m.name, m.version, m.state) for m in client.get_model_repository_index().models}
        assert {("both", "1", "READY"), ("both", "2", "READY"), ("newest", "2", "READY")} == index
        for version in ("1", "2", ""):
            outs = []
            for i, (lo, hi) in enumerate(((0, 2), (2, 5))):
                inp = tc.InferInput("x", [1, hi - lo, 3], "FP32")
                inp.set_data_from_numpy(X[np.newaxis, lo:hi])
                result = client.infer(
                    "both",
                    [inp],
                    model_version=version,
                    sequence_id=7,
                    sequence_start=i == 0,
                    sequence_end=i == 1,
                )
                assert result.get_response().model_version == (version or "2")
                outs.append(result.as_numpy("y")[0])
            want = _oracle(repo, "both", int(version or 2), X)
            np.testing.assert_allclose(np.concatenate(outs), want, atol=1e-5)
        inp = tc.InferInput("x", [1, 2, 3], "FP32")
        inp.set_data_from_numpy(X[np.newaxis, :2])
        with pytest.raises(InferenceServerException, match="version 1 is not served"):
            client.infer("newest", [inp], model_version="1")
