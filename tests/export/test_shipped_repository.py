"""The model repository committed in git.

Every version follows the contract and passes the load-time self-check; the real server loads every model and
streams its served (newest) version chunked == one pass; each version is described by its metadata; the
results tables are the shipped models' own numbers; the catalog (with the total size the README states) is
current.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "service"))  # the service tests' server harness

from server_thread import ServerThread, make_settings  # noqa: E402

from export.catalog import render, total_bytes  # noqa: E402
from export.contract import check_contract, read_contract  # noqa: E402
from export.selfcheck import self_check  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
REPO = ROOT / "models" / "repository"
RESULTS = ROOT / "docs" / "results"
FAMILIES = ("rnn", "lstm", "peephole", "cifg", "gru", "attention")
SHIPPED = ["default", *(f"char_{f}" for f in FAMILIES), *(f"anomaly_{f}" for f in ("rnn", "lstm", "gru"))]
MAX_TOTAL_MIB = 16  # keeps a clone quick; the catalog states the actual size
VERSIONS = sorted(REPO.glob("*/[0-9]*/model.onnx"))


def _meta(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def test_every_variant_is_shipped():
    assert sorted(p.name for p in REPO.iterdir() if p.is_dir()) == sorted(SHIPPED)
    assert sorted(int(p.parent.name) for p in REPO.glob("default/*/model.onnx")) == [1, 2]
    assert total_bytes(REPO) <= MAX_TOTAL_MIB * 2**20


@pytest.mark.parametrize("path", VERSIONS, ids=[f"{p.parent.parent.name}/{p.parent.name}" for p in VERSIONS])
def test_shipped_version_follows_the_contract_and_self_check(path):
    report = check_contract(path)
    assert report.ok, report.format()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    verdict = self_check(sess, read_contract(onnx.load(str(path))))
    assert verdict.ok, verdict.reason
    assert (path.parent / "verification.txt").read_text().count("FAIL") == 0


@pytest.mark.parametrize("path", VERSIONS, ids=[f"{p.parent.parent.name}/{p.parent.name}" for p in VERSIONS])
def test_shipped_version_is_described(path):
    meta = _meta(path)
    name = path.parent.parent.name
    for key in (
        "rnnserve.family",
        "rnnserve.task",
        "rnnserve.description",
        "rnnserve.data",
        "rnnserve.metrics",
    ):
        assert meta.get(key), f"{name}: {key} missing"
    if name.startswith(("char_", "anomaly_")):
        assert meta["rnnserve.family"] == name.split("_", 1)[1]
    if meta["rnnserve.task"] == "token":
        vocab = json.loads(meta["rnnserve.vocabulary"])
        assert len(vocab) == json.loads(meta["rnnserve.config"])["vocab_size"]
    assert json.loads(meta["rnnserve.metrics"])


def test_results_tables_are_the_shipped_models():
    char = json.loads((RESULTS / "char_bpc.json").read_text())
    runs = {r["name"]: r for r in char["runs"]}
    assert set(runs) == {f"char_{f}" for f in FAMILIES}
    for name, run in runs.items():
        meta = _meta(REPO / name / "1" / "model.onnx")
        metrics, cfg = json.loads(meta["rnnserve.metrics"]), json.loads(meta["rnnserve.config"])
        assert math.isclose(metrics["val_bpc"], run["val_bpc"], abs_tol=5e-5), (
            name
        )  # metadata keeps 4 decimals
        assert cfg["hidden"] == char["budget"]["hidden"] and cfg["family"] == run["family"]
    anomaly = json.loads((RESULTS / "anomaly.json").read_text())
    for run in anomaly["runs"]:
        metrics = json.loads(_meta(REPO / run["name"] / "1" / "model.onnx")["rnnserve.metrics"])
        assert math.isclose(metrics["normal_test_mse"], run["normal_test_mse"], abs_tol=5e-6), run["name"]
        assert metrics["top_index"] == run["top_index"]


def test_catalog_is_current():
    shipped = (RESULTS / "repository.md").read_text()
    assert shipped == render(REPO, "models/repository"), (
        "run: python -m export.catalog --out docs/results/repository.md"
    )


@pytest.fixture(scope="module")
def server():
    srv = ServerThread(make_settings(REPO))
    yield srv
    srv.stop()


def test_server_loads_and_streams_every_shipped_model(server):
    from service.client import Client

    rng = np.random.default_rng(0)
    with Client(server.address) as client:
        listed = {m.name: m for m in client.list_models()}
        assert sorted(listed) == sorted(SHIPPED)
        for name in SHIPPED:
            model = listed[name]
            newest = max(int(p.parent.name) for p in REPO.glob(f"{name}/*/model.onnx"))
            assert model.version == newest
            data, out = model.inputs[0], model.outputs[0].name
            if model.vocabulary:
                x = rng.integers(0, len(model.vocabulary), 30).astype(np.int64)
            else:
                x = rng.standard_normal((30, *data.shape[2:])).astype(np.float32)
            with client.session(name) as whole, client.session(name) as chunked:
                ref = whole.step({data.name: x})[out]
                got = np.concatenate([chunked.step({data.name: c})[out] for c in np.split(x, [1, 9, 10])])
            assert np.abs(got - ref).max() <= 1e-5, name
