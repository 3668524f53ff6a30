"""Repository scanning and state-contract validation (real ONNX Runtime, hand-built tiny graphs)."""

from __future__ import annotations

import base64
import io

import fixtures
import numpy as np
import onnx
from onnx import TensorProto, helper

from service.config import Settings
from service.core.registry import Repository


def identity_model(path, state_in, state_out, data=("x", TensorProto.FLOAT, ["batch", "time", 2]), meta=None):
    """x -> y (Identity); state_in -> state_out (Identity or Cast): enough to exercise the contract checks."""
    nodes = [helper.make_node("Identity", [data[0]], ["y"])]
    inputs = [helper.make_tensor_value_info(*data)]
    outputs = [helper.make_tensor_value_info("y", data[1], data[2])]
    if state_in:
        inputs.append(helper.make_tensor_value_info(*state_in))
    if state_out:
        outputs.append(helper.make_tensor_value_info(*state_out))
    if state_in and state_out:
        if state_in[1] == state_out[1]:
            nodes.append(helper.make_node("Identity", [state_in[0]], [state_out[0]]))
        else:
            nodes.append(helper.make_node("Cast", [state_in[0]], [state_out[0]], to=state_out[1]))
    elif state_out:
        nodes.append(helper.make_node("Identity", [data[0]], [state_out[0]]))
    graph = helper.make_graph(nodes, "g", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    for k, v in (meta or {}).items():
        e = model.metadata_props.add()
        e.key, e.value = k, v
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)


def npy_b64(arr):
    buf = io.BytesIO()
    np.save(buf, arr)
    return base64.b64encode(buf.getvalue()).decode()


def test_bad_models_are_skipped_with_reasons(tmp_path):
    fixtures.accumulator(tmp_path, "good")
    h = ["batch", 1, 4]
    identity_model(
        tmp_path / "dtype/1/model.onnx",
        ("state_in_h", TensorProto.FLOAT, h),
        ("state_out_h", TensorProto.DOUBLE, h),
    )
    identity_model(tmp_path / "unpaired/1/model.onnx", ("state_in_h", TensorProto.FLOAT, h), None)
    identity_model(
        tmp_path / "dynamic/1/model.onnx",
        ("state_in_h", TensorProto.FLOAT, ["batch", "n", 4]),
        ("state_out_h", TensorProto.FLOAT, ["batch", "n", 4]),
    )
    identity_model(
        tmp_path / "static_batch/1/model.onnx",
        ("state_in_h", TensorProto.FLOAT, [1, 1, 4]),
        ("state_out_h", TensorProto.FLOAT, [1, 1, 4]),
    )
    identity_model(
        tmp_path / "init_shape/1/model.onnx",
        ("state_in_h", TensorProto.FLOAT, h),
        ("state_out_h", TensorProto.FLOAT, h),
        meta={"rnnserve.initial_state.h": npy_b64(np.zeros((2, 4), np.float32))},
    )
    identity_model(
        tmp_path / "vocab/1/model.onnx",
        ("state_in_h", TensorProto.FLOAT, h),
        ("state_out_h", TensorProto.FLOAT, h),
        meta={"rnnserve.vocabulary": "{not json"},
    )
    (tmp_path / "garbage/1").mkdir(parents=True)
    (tmp_path / "garbage/1/model.onnx").write_bytes(b"not an onnx file")
    fixtures.accumulator(tmp_path, "badcfg")
    (tmp_path / "badcfg/config.yaml").write_text("max_batch: 3\n")

    repo = Repository(tmp_path, Settings(model_repository=tmp_path))
    change = repo.scan()
    assert [mv.spec.name for mv in change.loaded] == ["good"]
    reasons = {p.parts[-3]: r for p, r in repo.problems.items()}
    assert "dtype" in reasons["dtype"] and "differs" in reasons["dtype"]
    assert "has no output 'state_out_h'" in reasons["unpaired"]
    assert "must be static" in reasons["dynamic"]
    assert "batch" in reasons["static_batch"]
    assert "expected (1, 4)" in reasons["init_shape"]
    assert "not JSON" in reasons["vocab"]
    assert "garbage" in reasons
    assert "unknown keys ['max_batch']" in reasons["badcfg"]
    assert repo.scan() == type(change)()  # failed files are not retried until they change


def test_spec_describes_the_contract(model_repository):
    repo = Repository(model_repository, Settings(model_repository=model_repository))
    repo.scan()
    lstm = repo.get("tiny_lstm2").spec
    assert [s.name for s in lstm.states] == ["h", "c"] and lstm.states[0].shape == (2, 6)
    assert lstm.time_axis and lstm.inputs[0].name == "tokens" and lstm.inputs[0].dtype == np.int64
    assert lstm.outputs[0].shape == (None, None, 39) and lstm.outputs[0].time_axis
    assert lstm.vocabulary is not None and len(lstm.vocabulary) == 39
    assert lstm.metadata["rnnserve.family"] == "lstm" and lstm.state_bytes == 2 * 2 * 6 * 4
    acc = repo.get("accumulator").spec
    assert not acc.time_axis and acc.states[0].dtype == np.int32 and acc.vocabulary is None


def test_newest_valid_version_wins(tmp_path):
    fixtures.accumulator(tmp_path, "m", 1)
    fixtures.accumulator(tmp_path, "m", 3)
    (tmp_path / "m/5").mkdir()
    (tmp_path / "m/5/model.onnx").write_bytes(b"broken")
    repo = Repository(tmp_path, Settings(model_repository=tmp_path))
    repo.scan()
    assert repo.get("m").spec.version == 3 and repo.get("m").spec.versions == (1, 3, 5)
    fixtures.accumulator(tmp_path, "m", 5)  # the broken version is fixed: it is picked up
    change = repo.scan()
    assert [mv.spec.version for mv in change.loaded] == [5]
    assert [mv.spec.version for mv in change.unload] == [3]  # nothing pinned it: unload at once


def test_a_refused_version_is_retried(tmp_path, caplog):
    """A poll retries a refused file once it or its config.yaml changed; a ReloadRepository always does."""
    fixtures.accumulator(tmp_path, "acc")
    (tmp_path / "acc" / "config.yaml").write_text("max_batch_size: 0\n")  # invalid: refused
    repo = Repository(tmp_path, Settings(model_repository=tmp_path))
    repo.scan()
    assert "acc" not in repo.served and "max_batch_size" in repo.refusals()[0].reason
    caplog.clear()
    repo.scan()  # a poll, nothing changed: not reloaded, not logged again
    assert not [r for r in caplog.records if "not served" in r.getMessage()]
    repo.scan(retry=True)  # ReloadRepository: tried again (and refused again)
    assert [r for r in caplog.records if "not served" in r.getMessage()]
    # Fixing config.yaml alone (model.onnx untouched, same mtime) is enough for the next poll.
    (tmp_path / "acc" / "config.yaml").write_text("max_batch_size: 8\n")
    repo.scan()
    assert "acc" in repo.served and repo.refusals() == []
