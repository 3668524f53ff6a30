"""Unit tests of the KServe v2 tensor / parameter conversion (pure functions, no server)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from tritonclient.grpc import InferInput, InferRequestedOutput, service_pb2
from tritonclient.grpc._utils import _get_inference_request
from tritonclient.utils import np_to_triton_dtype, triton_to_np_dtype

from service.errors import InvalidArgument
from service.server.kserve_convert import (
    WIRE_TYPES,
    decode_inputs,
    encode_outputs,
    parse_sequence,
    wants_typed_outputs,
    wire_type_of,
)


def _client_request(arrays, *, sequence_id=0, start=False, end=False, outputs=None):
    """A ModelInferRequest exactly as tritonclient.grpc builds it (raw_input_contents)."""
    inputs = []
    for name, array in arrays.items():
        inp = InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        inp.set_data_from_numpy(array)
        inputs.append(inp)
    return _get_inference_request("m", inputs, "", "", outputs, sequence_id, start, end, 0, None, None)


@pytest.mark.parametrize("wire", WIRE_TYPES, ids=lambda w: w.name)
def test_table_agrees_with_tritonclient(wire):
    assert np.dtype(triton_to_np_dtype(wire.name)) == wire.dtype.newbyteorder("=")
    assert np_to_triton_dtype(wire.dtype.newbyteorder("=")) == wire.name


@pytest.mark.parametrize("wire", WIRE_TYPES, ids=lambda w: w.name)
def test_raw_roundtrip_every_dtype(wire):
    rng = np.random.default_rng(0)
    array = (rng.integers(0, 2, (2, 3)) if wire.name == "BOOL" else rng.integers(0, 100, (2, 3))).astype(
        wire.dtype.newbyteorder("=")
    )
    req = _client_request({"a": array})
    got = decode_inputs(req)["a"]
    assert got.dtype == array.dtype and got.shape == (2, 3)
    np.testing.assert_array_equal(got, array)
    resp = service_pb2.ModelInferResponse()
    encode_outputs(resp, [("a", array)], typed=False)
    assert resp.outputs[0].datatype == wire.name
    back = np.frombuffer(resp.raw_output_contents[0], dtype=triton_to_np_dtype(wire.name)).reshape(2, 3)
    np.testing.assert_array_equal(back, array)


@pytest.mark.parametrize("wire", [w for w in WIRE_TYPES if w.contents_field], ids=lambda w: w.name)
def test_typed_contents_every_dtype(wire):
    array = np.array([[1, 0, 1], [0, 1, 1]]).astype(wire.dtype.newbyteorder("="))
    req = service_pb2.ModelInferRequest()
    tensor = req.inputs.add(name="a", datatype=wire.name, shape=[2, 3])
    getattr(tensor.contents, wire.contents_field).extend(array.ravel().tolist())
    got = decode_inputs(req)["a"]
    np.testing.assert_array_equal(got, array)
    assert got.dtype == array.dtype
    resp = service_pb2.ModelInferResponse()
    encode_outputs(resp, [("a", array)], typed=True)
    assert not resp.raw_output_contents
    assert list(getattr(resp.outputs[0].contents, wire.contents_field)) == array.ravel().tolist()


def test_fp16_falls_back_to_raw_for_all_outputs():
    resp = service_pb2.ModelInferResponse()
    encode_outputs(resp, [("a", np.ones(2, np.float32)), ("b", np.ones(2, np.float16))], typed=True)
    assert len(resp.raw_output_contents) == 2
    assert not resp.outputs[0].contents.fp32_contents


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda r: r.raw_input_contents.__setitem__(0, b"\x00" * 3), "needs 16"),
        (lambda r: r.inputs[0].__setattr__("datatype", "BF16"), "not supported"),
        (lambda r: r.inputs[0].__setattr__("datatype", "STRING"), "expected one of"),
        (lambda r: r.raw_input_contents.append(b"x"), "one entry per input"),
        (lambda r: r.inputs[0].contents.int64_contents.append(1), "both contents and raw"),
        (lambda r: (r.inputs[0].ClearField("shape"), r.inputs[0].shape.extend([-1, 2])), "negative"),
    ],
)
def test_bad_inputs_name_what_was_expected(mutate, needle):
    req = _client_request({"tokens": np.arange(2, dtype=np.int64).reshape(1, 2)})
    mutate(req)
    with pytest.raises(InvalidArgument, match=needle):
        decode_inputs(req)


def test_typed_contents_errors():
    req = service_pb2.ModelInferRequest()
    t = req.inputs.add(name="x", datatype="INT32", shape=[1, 2])
    t.contents.fp32_contents.extend([1.0, 2.0])
    with pytest.raises(InvalidArgument, match="contents.int_contents"):
        decode_inputs(req)
    t.contents.Clear()
    t.contents.int_contents.extend([1])
    with pytest.raises(InvalidArgument, match="needs 2"):
        decode_inputs(req)
    t.datatype = "INT8"
    t.contents.int_contents.append(300)
    with pytest.raises(InvalidArgument, match="INT8 range"):
        decode_inputs(req)


def test_duplicate_input_name():
    req = service_pb2.ModelInferRequest()
    for _ in range(2):
        req.inputs.add(name="x", datatype="INT32", shape=[0])
    with pytest.raises(InvalidArgument, match="appears twice"):
        decode_inputs(req)


def test_sequence_parameters_as_tritonclient_sends_them():
    arrays = {"tokens": np.zeros((1, 1), np.int64)}
    ctl = parse_sequence(_client_request(arrays, sequence_id=42, start=True).parameters)
    assert (ctl.sequence_id, ctl.start, ctl.end) == (42, True, False)
    ctl = parse_sequence(_client_request(arrays, sequence_id="abc", end=True).parameters)
    assert (ctl.sequence_id, ctl.start, ctl.end) == ("abc", False, True)
    assert parse_sequence(_client_request(arrays).parameters).sequence_id is None
    req = service_pb2.ModelInferRequest()
    req.parameters["sequence_id"].uint64_param = 2**63 + 5
    assert parse_sequence(req.parameters).sequence_id == 2**63 + 5
    req.parameters["sequence_id"].double_param = 1.5
    with pytest.raises(InvalidArgument, match="sequence_id"):
        parse_sequence(req.parameters)
    req = service_pb2.ModelInferRequest()
    req.parameters["sequence_start"].bool_param = True
    with pytest.raises(InvalidArgument, match="need a non-zero 'sequence_id'"):
        parse_sequence(req.parameters)
    req.parameters["sequence_id"].int64_param = 3
    req.parameters["sequence_end"].int64_param = 1
    with pytest.raises(InvalidArgument, match="bool_param"):
        parse_sequence(req.parameters)


def test_binary_data_convention():
    arrays = {"tokens": np.zeros((1, 1), np.int64)}
    assert not wants_typed_outputs(_client_request(arrays))
    assert not wants_typed_outputs(_client_request(arrays, outputs=[InferRequestedOutput("logits")]))
    req = _client_request(arrays, outputs=[InferRequestedOutput("logits")])
    req.outputs[0].parameters["binary_data"].bool_param = False
    assert wants_typed_outputs(req)
    req.parameters["binary_data_output"].bool_param = True
    assert not wants_typed_outputs(req)


def test_wire_type_of_unknown_dtype():
    with pytest.raises(InvalidArgument, match="no KServe datatype"):
        wire_type_of(np.dtype("complex64"))


def test_docs_dtype_table_matches_the_code():
    doc = (Path(__file__).resolve().parents[2] / "docs" / "triton.md").read_text()
    rows = re.findall(r"^\| ([A-Z0-9]+) \| (\w+) \| ([^|]+) \| (TYPE_\w+) \|$", doc, re.M)
    table = {name: (np.dtype(dtype), field.strip(), config) for name, dtype, field, config in rows}
    from tritonclient.grpc import model_config_pb2

    assert set(table) == {w.name for w in WIRE_TYPES}
    for w in WIRE_TYPES:
        dtype, field, config = table[w.name]
        assert dtype == w.dtype.newbyteorder("=")
        assert field == (w.contents_field or "(raw only)")
        assert model_config_pb2.DataType.Value(config) == w.config_type
