"""The torch-free contract check on users' own models (tests/fixtures.py) and on broken ones."""

from __future__ import annotations

import base64
import io
import subprocess
import sys
from pathlib import Path

import fixtures
import numpy as np
import onnx
from onnx import TensorProto, helper

from export.contract import check_contract, initial_states, read_contract

ROOT = Path(__file__).resolve().parents[2]


def test_fixture_models_follow_the_contract(model_repository):
    for name in ("tiny_lstm", "tiny_lstm2", "tiny_gru", "accumulator"):
        report = check_contract(model_repository / name / "1" / "model.onnx")
        assert report.ok, f"{name}\n{report.format()}"
    spec = read_contract(onnx.load(str(model_repository / "accumulator" / "1" / "model.onnx")))
    assert not spec.time_axis and [s.name for s in spec.states] == ["acc"]


def test_declared_initial_state_is_used(tmp_path):
    c0 = np.full((1, 8), 0.25, np.float32)
    path = fixtures.token_lstm(tmp_path, "init", initial_c=c0)
    spec = read_contract(onnx.load(str(path)))
    assert np.array_equal(initial_states(spec, 2)["c"], np.broadcast_to(c0, (2, 1, 8)))
    assert check_contract(path).ok


def _accumulator(
    state_out_shape=("batch", 1),
    out_dtype=TensorProto.INT32,
    batch="batch",
    pair=True,
    initial: np.ndarray | None = None,
) -> onnx.ModelProto:
    """x (B, 1) + state -> y; variants break one rule of the contract each."""
    nodes = [
        helper.make_node("Add", ["state_in_acc", "x"], ["sum"]),
        helper.make_node("Cast", ["sum"], ["state_out_acc" if pair else "state_out_other"], to=out_dtype),
        helper.make_node("Identity", ["sum"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "acc",
        [
            helper.make_tensor_value_info("x", TensorProto.INT32, [batch, 1]),
            helper.make_tensor_value_info("state_in_acc", TensorProto.INT32, ["batch", 1]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.INT32, [batch, 1]),
            helper.make_tensor_value_info(
                "state_out_acc" if pair else "state_out_other", out_dtype, list(state_out_shape)
            ),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if initial is not None:
        buf = io.BytesIO()
        np.save(buf, initial)
        entry = model.metadata_props.add()
        entry.key, entry.value = "rnnserve.initial_state.acc", base64.b64encode(buf.getvalue()).decode()
    return model


def test_good_accumulator_passes():
    assert check_contract(_accumulator()).ok


def test_structural_violations_are_named():
    cases = {
        "dtype": _accumulator(out_dtype=TensorProto.INT64),
        "static": _accumulator(batch=4),
        "has no output": _accumulator(pair=False),
        "initial state": _accumulator(initial=np.zeros((3,), np.int32)),
    }
    for needle, model in cases.items():
        report = check_contract(model)
        assert not report.ok, needle
        assert not report.served and needle in report.checks[0].detail, (needle, report.checks[0].detail)


def test_declared_shape_mismatch_is_served_but_fails_the_stricter_check():
    # ONNX Runtime reports the shape it infers, so the server serves this model (its output really is (B, 1));
    # the exporter's own structure check reads the declared (B, 2) and fails it: exit 2, not 1.
    report = check_contract(_accumulator(state_out_shape=("batch", 2)))
    assert report.served and not report.ok
    assert "shape" in report.failures()[0].detail


def test_contract_cli_is_torch_free(model_repository):
    code = (
        "import sys; from export.contract import main; rc = main([sys.argv[1]]); "
        "assert 'torch' not in sys.modules; sys.exit(rc)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(model_repository / "tiny_gru" / "1" / "model.onnx")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "streaming invariance" in out.stdout
