"""Load-time self-check: good models pass; a model that does not carry its state, one that normalises over
time and one that mixes batch rows are refused with a one-line reason. Real ONNX Runtime sessions on real
ONNX graphs (the fixtures, edited with onnx.helper)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import fixtures
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from fixtures import normalised_over, state_passthrough
from fixtures import reroute as _reroute
from onnx import helper

from export.contract import read_contract
from export.selfcheck import Verdict, self_check


def _verdict(model: onnx.ModelProto, **kw) -> Verdict:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return self_check(sess, read_contract(model), **kw)


def _load(path: Path) -> onnx.ModelProto:
    return onnx.load(str(path))


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("selfcheck")
    fixtures.token_lstm(root, "lstm", layers=2, hidden=6, seed=3)
    fixtures.numeric_gru(root, "gru")
    fixtures.accumulator(root, "acc")
    return root


@pytest.mark.parametrize("name", ["lstm", "gru", "acc"])
def test_good_models_pass(repo, name):
    verdict = _verdict(_load(repo / name / "1" / "model.onnx"))
    assert verdict.ok, verdict.reason
    assert "\n" not in verdict.reason
    if name == "acc":
        assert verdict.reason.endswith("no time axis")
    else:
        assert verdict.reason.startswith("one pass == chunks [1, ") and "batch 1 == batch 3" in verdict.reason


def test_exported_user_module_passes():
    torch = pytest.importorskip("torch")
    from export.torch_module import export_module

    model = torch.nn.Sequential(
        torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.LSTM(5, 7, num_layers=2)
    ).eval()
    proto = export_module(model, check_forward_pass=False, progress=False).proto
    assert _verdict(proto).ok


def test_state_not_carried_is_refused(repo):
    verdict = _verdict(state_passthrough(repo / "lstm" / "1" / "model.onnx"))
    assert not verdict.ok
    assert verdict.reason.startswith("outputs depend on the chunking: logits differs by ")
    assert "between one pass of T=24 and chunks [1, " in verdict.reason and "\n" not in verdict.reason
    # The tolerance is what decides: a huge one lets the broken model through.
    assert _verdict(state_passthrough(repo / "lstm" / "1" / "model.onnx"), tol=1e9).ok


def test_normalising_over_time_is_refused(repo):
    verdict = _verdict(normalised_over(repo / "gru" / "1" / "model.onnx", axis=1))
    assert not verdict.ok and verdict.reason.startswith("outputs depend on the chunking: y differs by ")


def test_mixing_batch_rows_is_refused(repo):
    verdict = _verdict(normalised_over(repo / "gru" / "1" / "model.onnx", axis=0))
    assert not verdict.ok
    assert verdict.reason.startswith("batch rows are not independent: y of a row differs by ")


def test_contract_problem_and_runtime_failure_are_refused(repo):
    broken = _load(repo / "gru" / "1" / "model.onnx")
    broken.graph.output[1].name = "state_out_other"
    broken.graph.node[-1].output[0] = "state_out_other"
    verdict = _verdict(broken)
    assert not verdict.ok and verdict.reason.startswith("breaks the state contract: state 'h'")

    # A graph that loads but fails when run at batch 3: Reshape to a fixed batch of 1.
    shape = helper.make_node(
        "Constant", [], ["shape"], value=onnx.numpy_helper.from_array(np.array([1, 24, 2]))
    )
    model = _reroute(
        _load(repo / "gru" / "1" / "model.onnx"),
        "y",
        [shape, helper.make_node("Reshape", ["y_raw", "shape"], ["y"])],
    )
    verdict = _verdict(model)
    assert not verdict.ok and verdict.reason.startswith("run failed: ")
    assert "\n" not in verdict.reason


def test_selfcheck_and_catalog_import_no_torch():
    code = "import sys, export.selfcheck, export.catalog; sys.exit('torch' in sys.modules)"
    root = Path(__file__).resolve().parents[2]
    assert subprocess.run([sys.executable, "-c", code], cwd=root).returncode == 0
