"""Control inputs (config.yaml `control_inputs`, as Triton's sequence batcher): the server fills sequence
start, end, ready and the correlation id. A `simple_dyna_sequence`-style ONNX model (built with onnx.helper)
through the real server: tritonclient (unary and stream), the native API, ModelConfig, refusals."""

from __future__ import annotations

import queue
from functools import partial
from pathlib import Path

import fixtures
import numpy as np
import pytest
import tritonclient.grpc as tc
from server_thread import ServerThread, make_settings
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.utils import InferenceServerException

from service.client import Client
from service.config import Settings
from service.core.controls import ControlFiller, control_feeds
from service.core.registry import Repository
from service.core.selfcheck import probe_of_spec, self_check
from service.core.types import ControlSpec

VALUES = [11, 7, 5, 3, 2, 0, 1]  # Triton's example sequence clients send [start] + VALUES


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("controls")
    fixtures.dyna_sequence(root, "simple_dyna_sequence")
    fixtures.dyna_sequence(root, "simple_string_dyna_sequence", string_id="1002")
    fixtures.accumulator(root, "accumulator")
    return root


@pytest.fixture(scope="module")
def server(repo):
    srv = ServerThread(make_settings(repo))
    yield srv
    srv.stop()


@pytest.fixture()
def client(server):
    with tc.InferenceServerClient(url=server.address) as c:
        yield c


def _input(value: int) -> list[tc.InferInput]:
    inp = tc.InferInput("INPUT", [1, 1], "INT32")
    inp.set_data_from_numpy(np.full((1, 1), value, np.int32))
    return [inp]


def _expected(values: list[int], corrid: int) -> list[int]:
    """The dyna model: running sum from the start request; the end request adds the correlation id."""
    sums = list(np.cumsum(values))
    sums[-1] += corrid
    return [int(v) for v in sums]


def test_model_config_reports_control_inputs(client):
    config = client.get_model_config("simple_dyna_sequence").config
    controls = {c.name: c.control[0] for c in config.sequence_batching.control_input}
    kinds = mc.ModelSequenceBatching.Control
    assert {n: c.kind for n, c in controls.items()} == {
        "START": kinds.CONTROL_SEQUENCE_START,
        "END": kinds.CONTROL_SEQUENCE_END,
        "READY": kinds.CONTROL_SEQUENCE_READY,
        "CORRID": kinds.CONTROL_SEQUENCE_CORRID,
    }
    assert list(controls["START"].int32_false_true) == [0, 1]
    assert controls["CORRID"].data_type == mc.TYPE_UINT64
    assert [i.name for i in config.input] == ["INPUT"]  # control inputs are not data inputs
    assert [i.name for i in client.get_model_metadata("simple_dyna_sequence").inputs] == ["INPUT"]
    string_cfg = client.get_model_config("simple_string_dyna_sequence").config
    corrid = next(c for c in string_cfg.sequence_batching.control_input if c.name == "CORRID")
    assert corrid.control[0].data_type == mc.TYPE_STRING


def test_dyna_sequence_through_tritonclient(client):
    """Two interleaved sequences, as Triton's simple_grpc_sequence_sync_infer_client --dyna sends them."""
    seqs = {1000: [0, *VALUES], 1001: [100, *(-v for v in VALUES)]}
    got: dict[int, list[int]] = {k: [] for k in seqs}
    for i in range(len(VALUES) + 1):
        for sid, values in seqs.items():
            result = client.infer(
                "simple_dyna_sequence",
                _input(values[i]),
                sequence_id=sid,
                sequence_start=i == 0,
                sequence_end=i == len(values) - 1,
            )
            got[sid].append(int(result.as_numpy("OUTPUT")[0, 0]))
    for sid, values in seqs.items():
        assert got[sid] == _expected(values, sid)


def test_dyna_sequence_through_a_stream(client):
    replies: queue.Queue = queue.Queue()

    def callback(result, error) -> None:
        replies.put(error if error is not None else result)

    seqs = {2000: [5, *VALUES], 2001: [-3, *VALUES]}
    client.start_stream(callback=partial(callback))
    try:
        for i in range(len(VALUES) + 1):
            for sid, values in seqs.items():
                client.async_stream_infer(
                    "simple_dyna_sequence",
                    _input(values[i]),
                    request_id=f"{sid}_{i}",
                    sequence_id=sid,
                    sequence_start=i == 0,
                    sequence_end=i == len(values) - 1,
                )
        got: dict[int, list[int]] = {k: [] for k in seqs}
        for _ in range(2 * (len(VALUES) + 1)):
            item = replies.get(timeout=30)
            assert not isinstance(item, InferenceServerException), item
            got[int(item.get_response().id.split("_")[0])].append(int(item.as_numpy("OUTPUT")[0, 0]))
    finally:
        client.stop_stream()
    for sid, values in seqs.items():
        assert got[sid] == _expected(values, sid)


def test_string_correlation_ids(client):
    def run(model: str, sid: str) -> list[int]:
        out = []
        for i, v in enumerate([20, *VALUES]):
            result = client.infer(
                model, _input(v), sequence_id=sid, sequence_start=i == 0, sequence_end=i == len(VALUES)
            )
            out.append(int(result.as_numpy("OUTPUT")[0, 0]))
        return out

    values = [20, *VALUES]
    assert run("simple_string_dyna_sequence", "1002") == _expected(values, 1002)  # the model knows "1002"
    assert run("simple_string_dyna_sequence", "other") == _expected(values, 0)
    # A decimal string id for a uint64 control input.
    assert run("simple_dyna_sequence", "1003") == _expected(values, 1003)
    with pytest.raises(InferenceServerException, match="takes an integer correlation id") as err:
        run("simple_dyna_sequence", "not-a-number")
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"


def test_refusals_and_stateless_runs(client):
    start = tc.InferInput("START", [1, 1], "INT32")
    start.set_data_from_numpy(np.ones((1, 1), np.int32))
    filled = r"\['START'\] are control inputs, which the server fills"
    with pytest.raises(InferenceServerException, match=filled):
        client.infer("simple_dyna_sequence", [*_input(4), start], sequence_id=9, sequence_start=True)
    # Without a sequence id: one whole sequence (start and end, correlation id 0), a batch allowed.
    inp = tc.InferInput("INPUT", [3, 1], "INT32")
    inp.set_data_from_numpy(np.array([[4], [5], [6]], np.int32))
    result = client.infer("simple_dyna_sequence", [inp])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT"), [[4], [5], [6]])


def test_native_sessions_fill_start_on_the_first_chunk(server):
    with Client(server.address) as native:
        info = native.get_model("simple_dyna_sequence")
        assert [t.name for t in info.inputs] == ["INPUT"]
        with native.session("simple_dyna_sequence") as s:
            outs = [int(s.step({"INPUT": np.array([v], np.int32)})["OUTPUT"][0]) for v in (5, 3, 4)]
            assert outs == [5, 8, 12]  # start resets the sum on seq 1; a native session never ends
            s.reset()
            assert int(s.step({"INPUT": np.array([2], np.int32)})["OUTPUT"][0]) == 2


def test_timed_controls_mark_the_first_and_last_step():
    spec = ControlSpec("START", "CONTROL_SEQUENCE_START", np.dtype(np.float32), (1,), True, (0.0, 1.0))
    end = ControlSpec("END", "CONTROL_SEQUENCE_END", np.dtype(np.int64), (), True)
    corrid = ControlSpec("ID", "CONTROL_SEQUENCE_CORRID", np.dtype(np.int32), (), False)
    filler = ControlFiller((spec, end, corrid))
    np.testing.assert_array_equal(filler.row(spec, 3, True, False, 7), [[1.0], [0.0], [0.0]])
    np.testing.assert_array_equal(filler.row(spec, 3, False, False, 7), [[0.0], [0.0], [0.0]])
    np.testing.assert_array_equal(filler.row(end, 3, False, True, 7), [0, 0, 1])
    assert filler.row(corrid, 3, False, False, (1 << 32) + 7).item() == 7  # low-order 32 bits, as Triton


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("control_inputs: [{name: NOPE, kind: start}]\n", "control input 'NOPE' is not an input of"),
        ("control_inputs: [{name: x, kind: begin}]\n", "has kind 'begin'; expected one of"),
        ("control_inputs: [{name: x}]\n", "each control_inputs entry needs name and kind"),
        ("control_inputs: [{name: x, kind: end, false_true: [a, b]}]\n", "false_true must be two numbers"),
        ("control_inputs: [{name: x, kind: start}]\n", "a model needs at least one data input"),
    ],
)
def test_bad_control_configs_are_refused(tmp_path, config, message):
    fixtures.accumulator(tmp_path, "m")
    (tmp_path / "m" / "config.yaml").write_text(config)
    repo = Repository(tmp_path, Settings(model_repository=tmp_path))
    repo.scan()
    assert not repo.current and message in repo.refusals("m")[0].reason


@pytest.fixture(scope="module")
def timed_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("timed_controls")
    fixtures.timed_controls(root, "timed")
    srv = ServerThread(make_settings(root))
    yield srv
    srv.stop()


def test_timed_controls_through_both_apis(timed_server):
    """START marks step 0 of the sequence only, END its last step: any chunking gives one pass's outputs."""
    x = np.arange(1, 8, dtype=np.float32).reshape(7, 1)
    one_pass = x.copy()
    one_pass[0] += 100
    with Client(timed_server.address) as native:  # loaded at all: it passed the self-check with its controls
        with native.session("timed") as s:
            y = np.concatenate([s.step({"x": x[lo:hi]})["y"] for lo, hi in ((0, 1), (1, 4), (4, 7))])
    np.testing.assert_array_equal(y, one_pass)  # a native session never ends: no END
    with tc.InferenceServerClient(url=timed_server.address) as client:
        outs = []
        for i, (lo, hi) in enumerate(((0, 3), (3, 4), (4, 7))):
            inp = tc.InferInput("x", [1, hi - lo, 1], "FP32")
            inp.set_data_from_numpy(x[np.newaxis, lo:hi])
            result = client.infer("timed", [inp], sequence_id=5, sequence_start=i == 0, sequence_end=i == 2)
            outs.append(result.as_numpy("y")[0])
    want = one_pass.copy()
    want[-1] += 1000
    np.testing.assert_array_equal(np.concatenate(outs), want)


def test_selfcheck_feeds_controls_as_the_server_does(tmp_path):
    fixtures.timed_controls(tmp_path, "timed")
    repo = Repository(tmp_path, Settings(model_repository=tmp_path))
    repo.scan()
    mv = repo.get("timed")
    filler = ControlFiller(mv.spec.controls)

    def every_chunk_starts(batch: int, steps: int, start: bool) -> dict[str, np.ndarray]:
        return filler.batch(batch, steps, True, False, list(range(batch)))

    assert self_check(mv.runtime.session, probe_of_spec(mv.spec, control_feeds(mv.spec))).ok
    wrong = self_check(mv.runtime.session, probe_of_spec(mv.spec, every_chunk_starts))
    assert not wrong.ok and wrong.reason.startswith("outputs depend on the chunking: y differs by 100")
