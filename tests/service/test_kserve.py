"""KServe v2 / Triton protocol against the real server, driven by the unmodified `tritonclient.grpc` client.

The server is started through `service.server.start` on 127.0.0.1:0 in a background event loop (tritonclient
is a blocking client); results are compared with ONNX Runtime run directly on each whole sequence.
"""

from __future__ import annotations

import asyncio
import json
import queue
import re
import threading
import time
from pathlib import Path

import fixtures
import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.grpc.aio as atc
from kserve_harness import ServerThread
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from service.config import Settings

SHORT_TTL_S = 0.6
INITIAL_C = np.linspace(-1, 1, 8, dtype=np.float32).reshape(1, 8)  # a declared initial cell state (L=1, H=8)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("kserve_repo")
    fixtures.token_lstm(root, "tiny_lstm")
    fixtures.token_lstm(root, "tiny_lstm2", layers=2, hidden=6, seed=3)
    fixtures.numeric_gru(root, "tiny_gru")
    fixtures.accumulator(root, "accumulator")
    fixtures.token_lstm(root, "lstm_init", initial_c=INITIAL_C)
    fixtures.accumulator(root, "acc_short")
    (root / "acc_short" / "config.yaml").write_text(f"idle_ttl_s: {SHORT_TTL_S}\n")
    return root


@pytest.fixture(scope="module")
def server(repo):
    settings = Settings(
        model_repository=repo, grpc_host="127.0.0.1", grpc_port=0, metrics_port=-1, sweep_interval_s=0.1
    )
    srv = ServerThread(settings)
    yield srv
    srv.stop()


@pytest.fixture()
def client(server):
    with tc.InferenceServerClient(url=server.url) as c:
        yield c


def _tokens(array: np.ndarray) -> tc.InferInput:
    inp = tc.InferInput("tokens", list(array.shape), "INT64")
    inp.set_data_from_numpy(array)
    return inp


def _acc(value: int, datatype: str = "INT32") -> tc.InferInput:
    inp = tc.InferInput("x", [1, 1], datatype)
    inp.set_data_from_numpy(np.array([[value]], dtype=np.int32 if datatype == "INT32" else np.float32))
    return inp


def _status(excinfo) -> str:
    return excinfo.value.status()


# -------------------------------------------------------------------------------------------- metadata


def test_readiness_and_server_metadata(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("tiny_lstm")
    assert client.is_model_ready("tiny_lstm", "1")
    assert not client.is_model_ready("no_such_model")
    meta = client.get_server_metadata()
    assert meta.name == "rnnserve"
    assert "sequence" in meta.extensions and "model_configuration" in meta.extensions


def test_model_metadata_hides_state(client):
    meta = client.get_model_metadata("tiny_lstm")
    assert meta.name == "tiny_lstm" and list(meta.versions) == ["1"] and meta.platform == "onnxruntime_onnx"
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("tokens", "INT64", [-1, -1])]
    vocab = len(fixtures.DEFAULT_VOCAB)
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [
        ("logits", "FP32", [-1, -1, vocab])
    ]
    acc = client.get_model_metadata("accumulator")
    assert [(t.name, t.datatype, list(t.shape)) for t in acc.inputs] == [("x", "INT32", [-1, 1])]
    assert [t.name for t in acc.outputs] == ["y"]


def test_model_config_as_triton_describes_implicit_state(client):
    cfg = client.get_model_config("tiny_lstm2").config
    assert cfg.name == "tiny_lstm2" and cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size >= 1
    assert [(i.name, i.data_type, list(i.dims)) for i in cfg.input] == [
        ("tokens", tc.model_config_pb2.TYPE_INT64, [-1])
    ]
    assert [(o.name, list(o.dims)) for o in cfg.output] == [("logits", [-1, len(fixtures.DEFAULT_VOCAB)])]
    states = {(s.input_name, s.output_name, tuple(s.dims)) for s in cfg.sequence_batching.state}
    assert states == {("state_in_h", "state_out_h", (2, 6)), ("state_in_c", "state_out_c", (2, 6))}
    assert cfg.sequence_batching.max_sequence_idle_microseconds > 0
    assert json.loads(cfg.parameters["rnnserve.vocabulary"].string_value) == list(fixtures.DEFAULT_VOCAB)
    init = {
        s.input_name: list(s.initial_state)
        for s in client.get_model_config("lstm_init").config.sequence_batching.state
    }
    assert init["state_in_h"][0].zero_data and init["state_in_c"] == []  # c declares its own initial state
    short = client.get_model_config("acc_short").config
    assert short.sequence_batching.max_sequence_idle_microseconds == int(SHORT_TTL_S * 1e6)
    assert short.sequence_batching.state[0].data_type == tc.model_config_pb2.TYPE_INT32


def test_repository_index_and_statistics(client):
    names = {m["name"] for m in client.get_model_repository_index(as_json=True)["models"]}
    assert {"tiny_lstm", "tiny_lstm2", "tiny_gru", "accumulator"} <= names
    before = client.get_inference_statistics("tiny_gru").model_stats[0]
    x = tc.InferInput("x", [2, 3, 3], "FP32")
    x.set_data_from_numpy(np.ones((2, 3, 3), np.float32))
    client.infer("tiny_gru", [x])
    after = client.get_inference_statistics("tiny_gru").model_stats[0]
    assert after.inference_count == before.inference_count + 2
    assert after.execution_count == before.execution_count + 1
    assert after.inference_stats.success.count == before.inference_stats.success.count + 1


# ------------------------------------------------------------------------------------------- sequences


def _chunks(rng, length: int) -> list[tuple[int, int]]:
    cuts = sorted(rng.choice(np.arange(1, length), size=3, replace=False).tolist())
    bounds = [0, *cuts, length]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def _interleaved_plan(seed: int, ids: list):
    """Per sequence: a token stream and its chunking; returns the round-robin order of (id, chunk index)."""
    rng = np.random.default_rng(seed)
    vocab = len(fixtures.DEFAULT_VOCAB)
    streams = {sid: rng.integers(0, vocab, size=int(rng.integers(8, 20))).astype(np.int64) for sid in ids}
    chunks = {sid: _chunks(rng, len(streams[sid])) for sid in ids}
    order = [(sid, k) for k in range(4) for sid in ids]
    return streams, chunks, order


@pytest.mark.parametrize("model", ["tiny_lstm", "tiny_lstm2"])
def test_unary_interleaved_sequences_equal_ort(client, repo, model):
    ids = [11, 12, "session-a", 2**40]
    streams, chunks, order = _interleaved_plan(5, ids)
    got: dict = {sid: [] for sid in ids}
    for sid, k in order:
        lo, hi = chunks[sid][k]
        result = client.infer(
            model,
            [_tokens(streams[sid][None, lo:hi])],
            sequence_id=sid,
            sequence_start=k == 0,
            sequence_end=k == 3,
        )
        logits = result.as_numpy("logits")
        assert logits.shape == (1, hi - lo, len(fixtures.DEFAULT_VOCAB))
        got[sid].append(logits[0])
    for sid in ids:
        want = fixtures.run_whole(repo / model / "1" / "model.onnx", {"tokens": streams[sid][None]})[
            "logits"
        ][0]
        np.testing.assert_allclose(np.concatenate(got[sid]), want, atol=1e-5, rtol=0)


def test_stream_interleaved_sequences_equal_ort_and_survive_errors(client, repo):
    ids = [21, "s-22", 23]
    streams, chunks, order = _interleaved_plan(7, ids)
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        for n, (sid, k) in enumerate(order):
            lo, hi = chunks[sid][k]
            client.async_stream_infer(
                "tiny_lstm",
                [_tokens(streams[sid][None, lo:hi])],
                request_id=f"{sid}:{k}",
                sequence_id=sid,
                sequence_start=k == 0,
                sequence_end=k == 3,
            )
            if n == 4:  # an error in the middle: a sequence that was never started
                client.async_stream_infer(
                    "tiny_lstm", [_tokens(streams[sid][None, :2])], request_id="bad", sequence_id=999
                )
        replies = [results.get(timeout=30) for _ in range(len(order) + 1)]
    finally:
        client.stop_stream()
    errors = [e for r, e in replies if e is not None]
    assert len(errors) == 1 and "sequence_start" in errors[0].message()
    got: dict = {sid: [] for sid in ids}
    for result, error in replies:
        if error is not None:
            continue
        sid_text, k = result.get_response().id.split(":")
        sid = next(s for s in ids if str(s) == sid_text)
        got[sid].append((int(k), result.as_numpy("logits")[0]))
    for sid in ids:
        ks = [k for k, _ in got[sid]]
        assert ks == sorted(ks) == [0, 1, 2, 3]  # one sequence's replies arrive in order
        want = fixtures.run_whole(repo / "tiny_lstm" / "1" / "model.onnx", {"tokens": streams[sid][None]})
        np.testing.assert_allclose(
            np.concatenate([a for _, a in got[sid]]), want["logits"][0], atol=1e-5, rtol=0
        )


def test_stream_error_message_carries_request_id(server):
    """Raw stub: a failing request on the stream answers with error_message and its id; the stream goes on."""

    def requests():
        bad = service_pb2.ModelInferRequest(model_name="nope", id="r1")
        yield bad
        good = service_pb2.ModelInferRequest(model_name="accumulator", id="r2")
        good.parameters["sequence_id"].int64_param = 77
        good.parameters["sequence_start"].bool_param = True
        good.parameters["sequence_end"].bool_param = True
        tensor = good.inputs.add(name="x", datatype="INT32", shape=[1, 1])
        tensor.contents.int_contents.append(5)
        yield good

    with grpc.insecure_channel(server.url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        replies = list(stub.ModelStreamInfer(requests(), timeout=30))
    assert len(replies) == 2
    by_id = {r.infer_response.id: r for r in replies}
    assert by_id["r1"].error_message == "Request for unknown model: 'nope' is not found"
    assert by_id["r2"].error_message == ""
    assert np.frombuffer(by_id["r2"].infer_response.raw_output_contents[0], np.int32).tolist() == [5]


def test_stateless_batch_without_sequence_id(client, repo):
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, len(fixtures.DEFAULT_VOCAB), size=(3, 9)).astype(np.int64)
    got = client.infer("tiny_lstm", [_tokens(tokens)]).as_numpy("logits")
    want = fixtures.run_whole(repo / "tiny_lstm" / "1" / "model.onnx", {"tokens": tokens})["logits"]
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    # Twice from the initial state: the same answer (no state carried).
    np.testing.assert_allclose(
        client.infer("tiny_lstm", [_tokens(tokens)]).as_numpy("logits"), got, rtol=0, atol=0
    )


def test_accumulator_raw_and_typed_contents(client, server):
    """A user's own int32 stateful model: raw (tritonclient) and typed contents (raw stub) interleave."""
    seq = "acc-typed"
    assert client.infer("accumulator", [_acc(3)], sequence_id=seq, sequence_start=True).as_numpy(
        "y"
    ).tolist() == [[3]]
    with grpc.insecure_channel(server.url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        req = service_pb2.ModelInferRequest(model_name="accumulator")
        req.parameters["sequence_id"].string_param = seq
        tensor = req.inputs.add(name="x", datatype="INT32", shape=[1, 1])
        tensor.contents.int_contents.append(4)
        out = req.outputs.add(name="y")
        out.parameters["binary_data"].bool_param = False
        reply = stub.ModelInfer(req, timeout=30)
    assert not reply.raw_output_contents
    assert reply.outputs[0].datatype == "INT32" and list(reply.outputs[0].shape) == [1, 1]
    assert list(reply.outputs[0].contents.int_contents) == [7]
    result = client.infer("accumulator", [_acc(-10)], sequence_id=seq, sequence_end=True)
    assert result.as_numpy("y").dtype == np.int32 and result.as_numpy("y").tolist() == [[-3]]
    with pytest.raises(InferenceServerException, match="sequence_start") as exc:
        client.infer("accumulator", [_acc(1)], sequence_id=seq)  # ended: unknown again
    assert _status(exc) == "StatusCode.INVALID_ARGUMENT" and "ended by sequence_end" in exc.value.message()


def test_sequence_start_restarts_a_live_sequence(client):
    assert (
        client.infer("accumulator", [_acc(5)], sequence_id=31, sequence_start=True).as_numpy("y")[0, 0] == 5
    )
    assert client.infer("accumulator", [_acc(5)], sequence_id=31).as_numpy("y")[0, 0] == 10
    assert (
        client.infer("accumulator", [_acc(1)], sequence_id=31, sequence_start=True).as_numpy("y")[0, 0] == 1
    )
    # int 31 and string "31" are different sequences, as in Triton.
    assert (
        client.infer("accumulator", [_acc(2)], sequence_id="31", sequence_start=True).as_numpy("y")[0, 0] == 2
    )
    assert client.infer("accumulator", [_acc(1)], sequence_id=31, sequence_end=True).as_numpy("y")[0, 0] == 2
    # A sequence without sequence_id on a stateful model: one run from the initial state.
    assert client.infer("accumulator", [_acc(9)]).as_numpy("y")[0, 0] == 9


def test_one_sequence_from_many_threads_applies_each_step_once(server):
    """Concurrent unary requests of one sequence: every step applies exactly once (per-sequence lock)."""
    with tc.InferenceServerClient(url=server.url) as c:
        c.infer("accumulator", [_acc(0)], sequence_id=41, sequence_start=True)

    def worker() -> None:
        with tc.InferenceServerClient(url=server.url) as c:
            for _ in range(10):
                c.infer("accumulator", [_acc(1)], sequence_id=41)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    with tc.InferenceServerClient(url=server.url) as c:
        assert c.infer("accumulator", [_acc(0)], sequence_id=41, sequence_end=True).as_numpy("y")[0, 0] == 40


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("call", "status", "needle"),
    [
        (lambda c: c.infer("nope", [_acc(1)]), "NOT_FOUND", "Request for unknown model: 'nope' is not found"),
        (
            lambda c: c.infer("accumulator", [_acc(1)], sequence_id=404),
            "INVALID_ARGUMENT",
            "must specify the START flag on the first request of the sequence (it is not active",
        ),
        (
            lambda c: c.infer("accumulator", [_acc(1, "FP32")]),
            "INVALID_ARGUMENT",
            "has datatype INT32, got FP32",
        ),
        (
            lambda c: c.infer("tiny_lstm", [_tokens(np.zeros((1, 2, 1), np.int64))]),
            "INVALID_ARGUMENT",
            "has shape [-1, -1]",
        ),
        (
            lambda c: c.infer(
                "tiny_lstm", [_tokens(np.zeros((2, 3), np.int64))], sequence_id=5, sequence_start=True
            ),
            "INVALID_ARGUMENT",
            "batch dimension must be 1",
        ),
        (
            lambda c: c.infer("accumulator", [_acc(1)], model_version="7"),
            "NOT_FOUND",
            "version 7",
        ),
        (
            lambda c: c.infer("accumulator", [_acc(1)], model_version="x"),
            "INVALID_ARGUMENT",
            "positive integer",
        ),
        (
            lambda c: c.infer("accumulator", [_acc(1)], outputs=[tc.InferRequestedOutput("state_out_acc")]),
            "INVALID_ARGUMENT",
            "state is implicit",
        ),
        (lambda c: c.infer("tiny_lstm", []), "INVALID_ARGUMENT", "needs input 'tokens'"),
        (
            lambda c: c.infer("tiny_lstm", [_tokens(np.array([[0, 10_000]], np.int64))]),
            "INVALID_ARGUMENT",
            "outside the vocabulary",
        ),
    ],
    ids=[
        "unknown-model",
        "unknown-sequence",
        "dtype",
        "shape",
        "batch-with-seq",
        "version",
        "bad-version",
        "state-output",
        "missing-input",
        "token-range",
    ],
)
def test_errors_are_typed_statuses_that_say_what_was_expected(client, call, status, needle):
    with pytest.raises(InferenceServerException) as exc:
        call(client)
    assert _status(exc) == f"StatusCode.{status}"
    assert needle in exc.value.message()


def test_expired_sequence_names_the_reason(client):
    assert client.infer("acc_short", [_acc(2)], sequence_id=51, sequence_start=True).as_numpy("y")[0, 0] == 2
    time.sleep(SHORT_TTL_S * 2 + 0.5)
    with pytest.raises(InferenceServerException) as exc:
        client.infer("acc_short", [_acc(2)], sequence_id=51)
    message = exc.value.message()
    # As Triton answers a sequence its batcher released after max_sequence_idle_microseconds.
    assert _status(exc) == "StatusCode.INVALID_ARGUMENT"
    assert message.startswith(
        "inference request for sequence 51 to model 'acc_short' must specify the START flag on the first "
        "request of the sequence (it ended (idle)"
    ), message
    # Restarting works after expiry.
    assert client.infer("acc_short", [_acc(3)], sequence_id=51, sequence_start=True).as_numpy("y")[0, 0] == 3


def test_shared_metrics_carry_the_kserve_protocol_label(client, server):
    from prometheus_client import generate_latest

    client.infer("accumulator", [_acc(1)], sequence_id="metrics", sequence_start=True, sequence_end=True)
    client.is_server_live()
    text = generate_latest(server.registry).decode()
    assert 'rnnserve_sessions_opened_total{model="accumulator",protocol="kserve"}' in text
    assert re.search(
        r'rnnserve_requests_total\{code="OK",method="ModelInfer",protocol="kserve"\} [1-9]', text
    )
    assert re.search(
        r'rnnserve_requests_total\{code="OK",method="ServerLive",protocol="kserve"\} [1-9]', text
    )
    assert re.search(r'rnnserve_steps_total\{model="accumulator",version="1"\} [1-9]', text)


def test_declared_initial_state_is_used_by_sequences_and_stateless_runs(client, repo):
    tokens = np.array([[3, 1, 4, 1, 5, 9, 2, 6]], np.int64)
    model = repo / "lstm_init" / "1" / "model.onnx"
    want = fixtures.run_whole(model, {"tokens": tokens}, {"c": INITIAL_C[None]})["logits"]
    zero = fixtures.run_whole(model, {"tokens": tokens})["logits"]
    assert not np.allclose(want, zero, atol=1e-3)  # the declared state matters for this input
    stateless = client.infer("lstm_init", [_tokens(tokens)]).as_numpy("logits")
    np.testing.assert_allclose(stateless, want, atol=1e-5, rtol=0)
    head = client.infer("lstm_init", [_tokens(tokens[:, :5])], sequence_id=61, sequence_start=True)
    tail = client.infer("lstm_init", [_tokens(tokens[:, 5:])], sequence_id=61, sequence_end=True)
    got = np.concatenate([head.as_numpy("logits"), tail.as_numpy("logits")], axis=1)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_live_sequence_stays_on_its_version_when_a_new_one_loads(tmp_path):
    repo = tmp_path / "repo"
    fixtures.token_lstm(repo, "m", version=1, seed=1)
    srv = ServerThread(Settings(model_repository=repo, grpc_host="127.0.0.1", grpc_port=0, metrics_port=-1))
    try:
        with tc.InferenceServerClient(url=srv.url) as c:
            tokens = np.array([[1, 2, 3, 4, 5, 6]], np.int64)
            head = c.infer("m", [_tokens(tokens[:, :3])], sequence_id=1, sequence_start=True)
            assert head.get_response().model_version == "1"
            fixtures.token_lstm(repo, "m", version=2, seed=2)

            async def reload():
                srv.running.engine.reload()

            srv.call(reload())
            assert c.get_model_metadata("m").versions == ["1", "2"]
            tail = c.infer("m", [_tokens(tokens[:, 3:])], sequence_id=1, sequence_end=True)
            assert tail.get_response().model_version == "1"
            got = np.concatenate([head.as_numpy("logits"), tail.as_numpy("logits")], axis=1)
            v1 = fixtures.run_whole(repo / "m" / "1" / "model.onnx", {"tokens": tokens})["logits"]
            np.testing.assert_allclose(got, v1, atol=1e-5, rtol=0)
            fresh = c.infer("m", [_tokens(tokens)], sequence_id=2, sequence_start=True, sequence_end=True)
            assert fresh.get_response().model_version == "2"
            v2 = fixtures.run_whole(repo / "m" / "2" / "model.onnx", {"tokens": tokens})["logits"]
            np.testing.assert_allclose(fresh.as_numpy("logits"), v2, atol=1e-5, rtol=0)
    finally:
        srv.stop()


def test_stream_final_response_flag(client):
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        client.async_stream_infer("accumulator", [_acc(4)], request_id="f", enable_empty_final_response=True)
        result, error = results.get(timeout=30)
    finally:
        client.stop_stream()
    assert error is None and result.as_numpy("y").tolist() == [[4]]
    assert result.get_response().parameters["triton_final_response"].bool_param


def test_client_cancelling_mid_step_never_desynchronises_the_sequence(client, repo):
    """A request whose client gives up (deadline) applied fully or not at all; the next one is right."""
    rng = np.random.default_rng(11)
    vocab = len(fixtures.DEFAULT_VOCAB)
    prefix = rng.integers(0, vocab, size=(1, 4)).astype(np.int64)
    long_chunk = rng.integers(0, vocab, size=(1, 4096)).astype(np.int64)  # max_chunk_steps
    last = rng.integers(0, vocab, size=(1, 3)).astype(np.int64)
    client.infer("tiny_lstm", [_tokens(prefix)], sequence_id=71, sequence_start=True)
    with pytest.raises(InferenceServerException) as exc:
        # A deadline far below the time the chunk takes, even on a fast idle machine (where a batch that
        # leaves nothing waiting runs on the loop, with no thread hand-off): below any loopback round trip.
        client.infer("tiny_lstm", [_tokens(long_chunk)], sequence_id=71, client_timeout=0.0001)
    assert "DEADLINE_EXCEEDED" in exc.value.status()
    time.sleep(0.5)  # let a step that did reach the engine finish
    got = client.infer("tiny_lstm", [_tokens(last)], sequence_id=71, sequence_end=True).as_numpy("logits")[0]
    model = repo / "tiny_lstm" / "1" / "model.onnx"
    applied = fixtures.run_whole(model, {"tokens": np.concatenate([prefix, long_chunk, last], 1)})["logits"][
        0, -3:
    ]
    skipped = fixtures.run_whole(model, {"tokens": np.concatenate([prefix, last], 1)})["logits"][0, -3:]
    assert got.shape == (3, vocab)
    assert np.allclose(got, applied, atol=1e-5) or np.allclose(got, skipped, atol=1e-5)


def test_stream_many_sequences_one_step_each_request(client, repo):
    """20 sequences, one character per request, all pipelined on one stream: each equals ORT on the whole."""
    rng = np.random.default_rng(13)
    vocab = len(fixtures.DEFAULT_VOCAB)
    streams = {sid: rng.integers(0, vocab, size=12).astype(np.int64) for sid in range(100, 120)}
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        for t in range(12):
            for sid, toks in streams.items():
                client.async_stream_infer(
                    "tiny_lstm2",
                    [_tokens(toks[None, t : t + 1])],
                    request_id=f"{sid}:{t}",
                    sequence_id=sid,
                    sequence_start=t == 0,
                    sequence_end=t == 11,
                )
        replies = [results.get(timeout=60) for _ in range(12 * len(streams))]
    finally:
        client.stop_stream()
    assert [e for _, e in replies if e is not None] == []
    got: dict[int, list] = {sid: [] for sid in streams}
    for result, _ in replies:
        sid, t = map(int, result.get_response().id.split(":"))
        got[sid].append((t, result.as_numpy("logits")[0, 0]))
    model = repo / "tiny_lstm2" / "1" / "model.onnx"
    for sid, toks in streams.items():
        assert [t for t, _ in got[sid]] == list(range(12))  # written in request order
        want = fixtures.run_whole(model, {"tokens": toks[None]})["logits"][0]
        np.testing.assert_allclose(np.stack([a for _, a in got[sid]]), want, atol=1e-5, rtol=0)


def test_asyncio_client_stream_infer(server):
    """tritonclient.grpc.aio (the asyncio client): unary infer and stream_infer over the accumulator."""

    def acc_input(value: int) -> atc.InferInput:
        inp = atc.InferInput("x", [1, 1], "INT32")
        inp.set_data_from_numpy(np.array([[value]], np.int32))
        return inp

    async def main() -> tuple[list[int], list[int]]:
        async with atc.InferenceServerClient(url=server.url) as c:
            assert await c.is_model_ready("accumulator")
            unary = []
            for i, v in enumerate([2, 3, 4]):
                r = await c.infer("accumulator", [acc_input(v)], sequence_id="aio-u", sequence_start=i == 0)
                unary.append(int(r.as_numpy("y")[0, 0]))

            async def requests():
                for i, v in enumerate([5, 6, 7]):
                    yield {
                        "model_name": "accumulator",
                        "inputs": [acc_input(v)],
                        "request_id": str(i),
                        "sequence_id": 808,
                        "sequence_start": i == 0,
                        "sequence_end": i == 2,
                    }

            streamed = []
            async for result, error in c.stream_infer(requests()):
                assert error is None, error
                streamed.append(int(result.as_numpy("y")[0, 0]))
                if len(streamed) == 3:
                    break
            return unary, streamed

    unary, streamed = asyncio.run(main())
    assert unary == [2, 5, 9]
    assert streamed == [5, 11, 18]
