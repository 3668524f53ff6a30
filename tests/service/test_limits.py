"""Bounded work per request, against the real server: every limit refuses with a typed status naming it; long
stateless requests run in slices and still equal one ONNX Runtime pass; hostile shapes, ids, versions and
echoes get short INVALID_ARGUMENTs, never INTERNAL or RESOURCE_EXHAUSTED."""

from __future__ import annotations

from pathlib import Path

import fixtures
import grpc
import numpy as np
import pytest
from kserve_harness import ServerThread
from tritonclient.grpc import service_pb2 as kpb
from tritonclient.grpc import service_pb2_grpc as kpb_grpc

from service import wire
from service.config import Settings
from service.proto import rnnserve_pb2 as pb
from service.proto import rnnserve_pb2_grpc as pb_grpc

VOCAB = len(fixtures.DEFAULT_VOCAB)
RESPONSE_BYTES = 64 * VOCAB * 4  # a 64-step chunk's logits fit exactly


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("limits_repo")
    fixtures.token_lstm(root, "tiny_lstm")
    return root


@pytest.fixture(scope="module")
def server(repo):
    settings = Settings(
        model_repository=repo,
        grpc_host="127.0.0.1",
        grpc_port=0,
        metrics_port=-1,
        max_request_steps=2000,
        max_rows_per_message=8,
        max_cached_response_bytes=RESPONSE_BYTES,
        max_id_length=64,
        slice_steps=21,
        trim_after_steps=100,
    )
    srv = ServerThread(settings)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.url) as ch:
        yield ch


def _infer(tokens: np.ndarray, **params) -> kpb.ModelInferRequest:
    req = kpb.ModelInferRequest(model_name="tiny_lstm", model_version=params.pop("version", ""))
    for k, v in params.items():
        if isinstance(v, str):
            req.parameters[k].string_param = v
        elif isinstance(v, bool):
            req.parameters[k].bool_param = v
        else:
            req.parameters[k].int64_param = v
    t = req.inputs.add()
    t.name, t.datatype = "tokens", "INT64"
    t.shape.extend(tokens.shape)
    req.raw_input_contents.append(tokens.astype("<i8").tobytes())
    return req


def _status(call, *args) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, timeout=30)
    return info.value


def test_stateless_request_over_batch_x_steps_is_refused_naming_the_limit(channel):
    stub = kpb_grpc.GRPCInferenceServiceStub(channel)
    err = _status(stub.ModelInfer, _infer(np.zeros((4, 501), np.int64)))
    assert err.code() == grpc.StatusCode.OUT_OF_RANGE
    assert "max_request_steps is 2000" in err.details() and "batch 4 x 501" in err.details()


def test_long_stateless_request_runs_in_slices_and_equals_one_ort_pass(channel, repo):
    tokens = np.random.default_rng(3).integers(0, VOCAB, (3, 50), dtype=np.int64)  # 8 slices of 7 steps
    resp = kpb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(_infer(tokens), timeout=30)
    got = np.frombuffer(resp.raw_output_contents[0], "<f4").reshape(list(resp.outputs[0].shape))
    want = fixtures.run_whole(repo / "tiny_lstm" / "1" / "model.onnx", {"tokens": tokens})["logits"]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def _session(channel) -> str:
    stub = pb_grpc.RecurrentServiceStub(channel)
    return stub.CreateSession(pb.CreateSessionRequest(model="tiny_lstm"), timeout=30).session_id


def test_chunk_whose_response_would_exceed_the_cached_response_limit_is_refused(channel):
    stub = pb_grpc.RecurrentServiceStub(channel)
    sid = _session(channel)
    ok = pb.StepRequest(
        session_id=sid, seq=1, inputs=[wire.array_to_tensor("tokens", np.zeros(64, np.int64))]
    )
    assert stub.Step(ok, timeout=30).seq == 1
    big = pb.StepRequest(
        session_id=sid, seq=2, inputs=[wire.array_to_tensor("tokens", np.zeros(65, np.int64))]
    )
    err = _status(stub.Step, big)
    assert err.code() == grpc.StatusCode.OUT_OF_RANGE
    assert (
        f"max_cached_response_bytes ({RESPONSE_BYTES}" in err.details()
        and "at most 64 steps" in err.details()
    )


def _many(stub, request: pb.StepManyRequest) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        list(stub.StreamMany(iter([request]), timeout=30))
    return info.value


def test_stepmany_message_over_the_row_limit_is_refused(channel):
    stub = pb_grpc.RecurrentServiceStub(channel)
    ids = [_session(channel) for _ in range(9)]
    tokens = wire.array_to_tensor("tokens", np.zeros((9, 2), np.int64))
    err = _many(stub, pb.StepManyRequest(session_ids=ids, seqs=[1] * 9, inputs=[tokens]))
    assert err.code() == grpc.StatusCode.OUT_OF_RANGE and "max_rows_per_message is 8" in err.details()
    # within the limit, the same sessions step
    ok = pb.StepManyRequest(
        session_ids=ids[:8], seqs=[1] * 8, inputs=[wire.array_to_tensor("tokens", np.zeros((8, 2), np.int64))]
    )
    (resp,) = list(stub.StreamMany(iter([ok]), timeout=30))
    assert list(resp.codes) == [0] * 8


def test_overlong_ids_are_refused_without_being_echoed(channel):
    stub = pb_grpc.RecurrentServiceStub(channel)
    long_id = "x" * 1_000_000
    err = _status(stub.DescribeSession, pb.SessionRequest(session_id=long_id))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_id_length (64)" in err.details() and len(err.details()) < 300
    kstub = kpb_grpc.GRPCInferenceServiceStub(channel)
    err = _status(
        kstub.ModelInfer, _infer(np.zeros((1, 3), np.int64), sequence_id="s" * 65, sequence_start=True)
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_id_length (64)" in err.details()


def test_an_error_that_echoes_a_huge_input_is_cut_to_a_short_message(channel):
    stub = pb_grpc.RecurrentServiceStub(channel)
    err = _status(stub.CreateSession, pb.CreateSessionRequest(model="m" * 1_000_000))
    assert err.code() == grpc.StatusCode.NOT_FOUND  # not RESOURCE_EXHAUSTED from an oversize trailer
    assert len(err.details()) <= 1000 and "cut" in err.details()


@pytest.mark.parametrize("shape", [[0, 2**62], [2**62, 0], [1, 2**40, 0]])
def test_absurd_shapes_are_invalid_argument(channel, shape):
    kstub = kpb_grpc.GRPCInferenceServiceStub(channel)
    req = kpb.ModelInferRequest(model_name="tiny_lstm")
    t = req.inputs.add()
    t.name, t.datatype = "tokens", "INT64"
    t.shape.extend(shape)
    req.raw_input_contents.append(b"")
    err = _status(kstub.ModelInfer, req)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    stub = pb_grpc.RecurrentServiceStub(channel)
    sid = _session(channel)
    tensor = pb.Tensor(name="tokens", dtype=wire.enum_of(np.int64), shape=shape, data=b"")
    err = _status(stub.Step, pb.StepRequest(session_id=sid, seq=1, inputs=[tensor]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()


@pytest.mark.parametrize("version", ["\u0661", "\uff11", "1\u0662"])
def test_non_ascii_digit_versions_are_invalid_argument(channel, version):
    kstub = kpb_grpc.GRPCInferenceServiceStub(channel)
    err = _status(kstub.ModelInfer, _infer(np.zeros((1, 3), np.int64), version=version))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "positive integer" in err.details()


def test_the_readme_limits_table_is_generated_from_the_settings():
    from tests.bench.burst import limits_table

    root = Path(__file__).resolve().parents[2]
    assert (root / "docs" / "results" / "limits.md").read_text() == limits_table(), (
        "docs/results/limits.md is stale: python -m tests.bench.burst --limits-only"
    )


def test_sliced_requests_run_on_a_burst_thread_of_lower_cpu_priority(channel):
    """The slices' thread is `burst_nice` (default 10) nicer than the server: busy cores serve steps first."""
    import os
    import sys
    import threading

    if not sys.platform.startswith("linux"):
        pytest.skip("per-thread niceness is Linux only")
    tokens = np.zeros((2, 40), np.int64)  # 4 slices of 10 steps: runs on the burst thread
    kpb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(_infer(tokens), timeout=30)
    burst = [t for t in threading.enumerate() if t.name.startswith("ort-burst")]
    assert burst, [t.name for t in threading.enumerate()]
    base = os.getpriority(os.PRIO_PROCESS, threading.main_thread().native_id)
    assert os.getpriority(os.PRIO_PROCESS, burst[0].native_id) == min(19, base + Settings().burst_nice)


def test_a_cancelled_sliced_request_stops_at_the_next_slice(repo):
    """Slices run in one call on the burst thread; a cancelled request runs no slice after the cancel."""
    import threading

    from service.core import limits
    from service.core.contract import describe
    from service.core.intake import read_config
    from service.core.runtime import Runtime

    path = repo / "tiny_lstm" / "1" / "model.onnx"
    cancelled = threading.Event()

    class CancelAfterFirst(Runtime):
        __slots__ = ("calls",)

        def run(self, feeds):
            self.calls += 1
            cancelled.set()  # the client goes away while the first slice runs
            return super().run(feeds)

    runtime = CancelAfterFirst(path)
    runtime.calls = 0
    spec = describe(runtime, "tiny_lstm", 1, read_config(repo / "tiny_lstm", Settings()))
    feeds = {"tokens": np.zeros((1, 50), np.int64)}
    for st in spec.states:
        feeds["state_in_" + st.name] = np.zeros((1, *st.shape), st.dtype)
    with pytest.raises(limits._Cancelled):
        limits._run_slices(runtime, spec, feeds, 50, 7, cancelled)
    assert runtime.calls == 1
