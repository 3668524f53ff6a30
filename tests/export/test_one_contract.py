"""One state contract: the exporter's checker and the server's repository agree on every model, good or bad.

Both run `service.core.intake.admit` (the server's contract reader and its load-time self-check), so the
set the checker passes (`Report.served`, exit code 0 or 2) is the set a repository scan serves.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import fixtures
import onnx
from onnx import TensorProto, helper

from export.contract import check_contract
from service.config import Settings
from service.core.registry import Repository

ROOT = Path(__file__).resolve().parents[2]
V = helper.make_tensor_value_info


def _model(name: str, inputs, outputs, nodes) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", fixtures.OPSET)])


def _string_input() -> onnx.ModelProto:
    """The accumulator plus a string input passed through: ONNX Runtime runs it; the server has no strings."""
    return _model(
        "string_input",
        [
            V("x", TensorProto.INT32, ["batch", 1]),
            V("tag", TensorProto.STRING, ["batch", 1]),
            V("state_in_acc", TensorProto.INT32, ["batch", 1]),
        ],
        [
            V("y", TensorProto.INT32, ["batch", 1]),
            V("tag_out", TensorProto.STRING, ["batch", 1]),
            V("state_out_acc", TensorProto.INT32, ["batch", 1]),
        ],
        [
            helper.make_node("Add", ["state_in_acc", "x"], ["state_out_acc"]),
            helper.make_node("Identity", ["state_out_acc"], ["y"]),
            helper.make_node("Identity", ["tag"], ["tag_out"]),
        ],
    )


def _no_data_output() -> onnx.ModelProto:
    """Only a state comes out: nothing to answer a request with."""
    return _model(
        "no_data_output",
        [V("x", TensorProto.INT32, ["batch", 1]), V("state_in_acc", TensorProto.INT32, ["batch", 1])],
        [V("state_out_acc", TensorProto.INT32, ["batch", 1])],
        [helper.make_node("Add", ["state_in_acc", "x"], ["state_out_acc"])],
    )


def _partly_timed() -> onnx.ModelProto:
    """x (B, time, 1) and bias (B, 1): one data input with a time axis, one without."""
    return _model(
        "partly_timed",
        [
            V("x", TensorProto.FLOAT, ["batch", "time", 1]),
            V("bias", TensorProto.FLOAT, ["batch", 1]),
            V("state_in_s", TensorProto.FLOAT, ["batch", 1]),
        ],
        [V("y", TensorProto.FLOAT, ["batch", "time", 1]), V("state_out_s", TensorProto.FLOAT, ["batch", 1])],
        [
            helper.make_node("Identity", ["x"], ["y"]),
            helper.make_node("Add", ["state_in_s", "bias"], ["state_out_s"]),
        ],
    )


def _repository(root: Path) -> dict[str, bool]:
    """Write the good and bad models; return name -> whether it should be served."""
    fixtures.token_lstm(root, "good_lstm")
    fixtures.numeric_gru(root, "good_gru")
    fixtures.accumulator(root, "good_accumulator")
    fixtures.dyna_sequence(root, "good_controls")  # control inputs, named in its config.yaml
    fixtures.save(_string_input(), root, "bad_string_input")
    fixtures.save(_no_data_output(), root, "bad_no_data_output")
    fixtures.save(_partly_timed(), root, "bad_partly_timed")
    fixtures.save(fixtures.state_passthrough(root / "good_lstm/1/model.onnx"), root, "bad_state_not_carried")
    fixtures.save(fixtures.normalised_over(root / "good_gru/1/model.onnx", 0), root, "bad_mixes_batch_rows")
    return {p.name: p.name.startswith("good") for p in root.iterdir()}


def test_checker_passes_exactly_what_the_server_serves(tmp_path):
    expected = _repository(tmp_path)
    repo = Repository(tmp_path, Settings(model_repository=tmp_path))
    repo.scan()
    served = {name: name in repo.served for name in expected}
    checked = {name: check_contract(tmp_path / name / "1" / "model.onnx").served for name in expected}
    assert served == expected
    assert checked == expected
    # The same one-line reason on both sides.
    reasons = {r.name: r.reason for r in repo.refusals()}
    for name in (n for n, good in expected.items() if not good):
        report = check_contract(tmp_path / name / "1" / "model.onnx")
        assert report.checks[0].detail == reasons[name], name
    assert "unsupported type tensor(string)" in reasons["bad_string_input"]
    assert "data output" in reasons["bad_no_data_output"]
    assert "time axis" in reasons["bad_partly_timed"]


def test_checker_cli_exit_codes(tmp_path):
    _repository(tmp_path)

    def run(name: str) -> subprocess.CompletedProcess:
        args = [sys.executable, "-m", "export.contract", str(tmp_path / name / "1" / "model.onnx")]
        return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)

    bad = run("bad_string_input")
    assert bad.returncode == 1 and "FAIL  served by rnnserve" in bad.stdout and "string" in bad.stdout
    assert run("good_accumulator").returncode == 0
    missing = subprocess.run(
        [sys.executable, "-m", "export.contract", str(tmp_path / "nope.onnx")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 1 and "no such file" in missing.stderr and "Traceback" not in missing.stderr
