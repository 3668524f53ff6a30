"""The native API (rnnserve.v1.RecurrentService) over real channels against the real server and ONNX Runtime.

Every RPC; chunked streaming (Step and Stream) equals ONNX Runtime on the whole sequence;
interleaved sessions;
exactly-once retries; bad inputs give exact status codes and leave the session untouched; reflection; health;
request metrics.
"""

from __future__ import annotations

import threading
import time
import urllib.request
from pathlib import Path

import fixtures
import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from server_thread import ServerThread, make_settings

from service import wire
from service.proto import rnnserve_pb2 as pb
from service.proto import rnnserve_pb2_grpc as pb_grpc

ATOL = 1e-5
VOCAB = len(fixtures.DEFAULT_VOCAB)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("api_repo")
    fixtures.token_lstm(root, "tiny_lstm")
    fixtures.token_lstm(root, "tiny_lstm2", layers=2, hidden=6, seed=3)
    fixtures.numeric_gru(root, "tiny_gru")
    fixtures.accumulator(root, "accumulator")
    return root


@pytest.fixture(scope="module")
def server(repo):
    srv = ServerThread(make_settings(repo))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.address) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel):
    return pb_grpc.RecurrentServiceStub(channel)


def tokens(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, n).astype(np.int64)


def oracle(repo: Path, model: str, name: str, data: np.ndarray, states=None) -> dict[str, np.ndarray]:
    """ONNX Runtime run directly on the whole sequence (batch of 1), batch axis removed."""
    out = fixtures.run_whole(repo / model / "1" / "model.onnx", {name: data[None]}, states)
    return {k: v[0] for k, v in out.items()}


def cut(n: int, sizes: list[int]) -> list[slice]:
    bounds = np.cumsum([0, *sizes])
    assert bounds[-1] == n
    return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def create(stub, model: str = "tiny_lstm", **kw) -> pb.SessionInfo:
    return stub.CreateSession(pb.CreateSessionRequest(model=model, **kw))


def step(stub, sid: str, seq: int, name: str, data: np.ndarray, last_only: bool = False) -> pb.StepResponse:
    return stub.Step(
        pb.StepRequest(
            session_id=sid, seq=seq, inputs=[wire.array_to_tensor(name, data)], last_only=last_only
        )
    )


def outs(response) -> dict[str, np.ndarray]:
    return {t.name: wire.tensor_to_array(t) for t in response.outputs}


def code_of(fn) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value.code(), info.value.details()


# ---- models ------------------------------------------------------------------------------------------------


def test_list_and_get_model(stub):
    models = {m.name: m for m in stub.ListModels(pb.ListModelsRequest()).models}
    assert set(models) == {"tiny_lstm", "tiny_lstm2", "tiny_gru", "accumulator"}
    m = stub.GetModel(pb.GetModelRequest(name="tiny_lstm"))
    assert m.version == 1 and list(m.versions) == [1]
    assert [(t.name, t.dtype, list(t.shape)) for t in m.inputs] == [("tokens", pb.DATA_TYPE_INT64, [-1, -1])]
    assert [(t.name, t.dtype, list(t.shape)) for t in m.outputs] == [
        ("logits", pb.DATA_TYPE_FLOAT32, [-1, -1, VOCAB])
    ]
    assert {(s.name, tuple(s.shape)) for s in m.states} == {("h", (1, 8)), ("c", (1, 8))}
    assert m.time_axis and tuple(m.vocabulary) == fixtures.DEFAULT_VOCAB
    assert m.metadata["rnnserve.family"] == "lstm" and "token LSTM" in m.description
    acc = models["accumulator"]
    assert not acc.time_axis and not acc.vocabulary


def test_get_model_errors(stub):
    assert code_of(lambda: stub.GetModel(pb.GetModelRequest(name="nope")))[0] == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: stub.GetModel(pb.GetModelRequest(name="tiny_lstm", version=7)))[0] == (
        grpc.StatusCode.NOT_FOUND
    )
    code, msg = code_of(lambda: stub.GetModel(pb.GetModelRequest(name="tiny_lstm", version=-1)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "version" in msg
    code, msg = code_of(lambda: stub.GetModel(pb.GetModelRequest()))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "name is required" in msg


# ---- stepping equals ONNX Runtime on the whole sequence ----------------------------------------------------


@pytest.mark.parametrize("sizes", [[1, 5, 7, 10], [23], [1] * 23])
def test_step_chunks_equal_whole_sequence(stub, repo, sizes):
    data = tokens(23, seed=len(sizes))
    want = oracle(repo, "tiny_lstm", "tokens", data)["logits"]
    info = create(stub)
    assert info.last_seq == 0 and len(info.session_id) >= 22
    got = []
    for seq, sl in enumerate(cut(23, sizes), start=1):
        r = step(stub, info.session_id, seq, "tokens", data[sl])
        assert r.seq == seq and not r.cached
        got.append(outs(r)["logits"])
    np.testing.assert_allclose(np.concatenate(got), want, atol=ATOL)
    stub.Close(pb.SessionRequest(session_id=info.session_id))


def test_numeric_model_and_last_only(stub, repo):
    x = np.random.default_rng(5).normal(size=(12, 3)).astype(np.float32)
    want = oracle(repo, "tiny_gru", "x", x)["y"]
    sid = create(stub, "tiny_gru").session_id
    a = outs(step(stub, sid, 1, "x", x[:5]))["y"]
    b = outs(step(stub, sid, 2, "x", x[5:], last_only=True))["y"]
    assert a.shape == (5, 2) and b.shape == (1, 2)
    np.testing.assert_allclose(a, want[:5], atol=ATOL)
    np.testing.assert_allclose(b[0], want[-1], atol=ATOL)


def test_model_without_time_axis(stub):
    sid = create(stub, "accumulator").session_id
    totals = [
        outs(step(stub, sid, i, "x", np.array([v], np.int32)))["y"] for i, v in enumerate([3, 4, -2], 1)
    ]
    assert [int(t.reshape(-1)[0]) for t in totals] == [3, 7, 5]


def test_initial_state(stub, repo):
    rng = np.random.default_rng(9)
    h0 = rng.normal(size=(1, 8)).astype(np.float32)
    c0 = rng.normal(size=(1, 8)).astype(np.float32)
    data = tokens(9, seed=9)
    want = oracle(repo, "tiny_lstm", "tokens", data, {"h": h0[None], "c": c0[None]})["logits"]
    info = create(stub, initial_state=[wire.array_to_tensor("h", h0), wire.array_to_tensor("c", c0)])
    np.testing.assert_allclose(
        outs(step(stub, info.session_id, 1, "tokens", data))["logits"], want, atol=ATOL
    )
    code, msg = code_of(lambda: create(stub, initial_state=[wire.array_to_tensor("h", h0[0])]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, msg


def test_stream_equals_whole_and_closes_at_end(stub, repo):
    data = tokens(30, seed=11)
    want = oracle(repo, "tiny_lstm", "tokens", data)["logits"]
    slices = cut(30, [4, 1, 9, 16])

    def requests():
        yield pb.StreamRequest(open=pb.StreamOpen(model="tiny_lstm"))
        for seq, sl in enumerate(slices, 1):
            yield pb.StreamRequest(seq=seq, inputs=[wire.array_to_tensor("tokens", data[sl])])

    responses = list(stub.Stream(requests()))
    assert len(responses) == 1 + len(slices)
    sid = responses[0].session.session_id
    assert sid and responses[0].session.model == "tiny_lstm" and not responses[0].outputs
    assert [r.seq for r in responses[1:]] == [1, 2, 3, 4]
    np.testing.assert_allclose(np.concatenate([outs(r)["logits"] for r in responses[1:]]), want, atol=ATOL)
    code, msg = code_of(lambda: stub.DescribeSession(pb.SessionRequest(session_id=sid)))
    assert code == grpc.StatusCode.NOT_FOUND and "closed" in msg


def test_stream_keep_and_attach(stub, repo):
    data = tokens(20, seed=12)
    want = oracle(repo, "tiny_lstm", "tokens", data)["logits"]
    first = list(
        stub.Stream(
            iter(
                [
                    pb.StreamRequest(
                        open=pb.StreamOpen(model="tiny_lstm", keep=True),
                        seq=1,
                        inputs=[wire.array_to_tensor("tokens", data[:8])],
                    )
                ]
            )
        )
    )
    sid = first[0].session.session_id
    assert first[0].seq == 1 and len(first) == 1
    assert stub.DescribeSession(pb.SessionRequest(session_id=sid)).last_seq == 1
    second = list(
        stub.Stream(
            iter(
                [
                    pb.StreamRequest(open=pb.StreamOpen(session_id=sid, keep=True)),
                    pb.StreamRequest(seq=2, inputs=[wire.array_to_tensor("tokens", data[8:])]),
                ]
            )
        )
    )
    assert second[0].session.last_seq == 1
    np.testing.assert_allclose(
        np.concatenate([outs(first[0])["logits"], outs(second[1])["logits"]]), want, atol=ATOL
    )
    assert stub.DescribeSession(pb.SessionRequest(session_id=sid)).last_seq == 2


def test_stream_bad_chunk_ends_stream_and_leaves_kept_session_untouched(stub, repo):
    data = tokens(10, seed=13)
    want = oracle(repo, "tiny_lstm", "tokens", data)["logits"]
    bad = pb.Tensor(name="tokens", dtype=pb.DATA_TYPE_INT64, shape=[3], data=b"\0" * 7)
    responses = []
    with pytest.raises(grpc.RpcError) as err:
        for r in stub.Stream(
            iter(
                [
                    pb.StreamRequest(
                        open=pb.StreamOpen(model="tiny_lstm", keep=True),
                        seq=1,
                        inputs=[wire.array_to_tensor("tokens", data[:4])],
                    ),
                    pb.StreamRequest(seq=2, inputs=[bad]),
                ]
            )
        ):
            responses.append(r)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "expected" in err.value.details()
    sid = responses[0].session.session_id
    assert stub.DescribeSession(pb.SessionRequest(session_id=sid)).last_seq == 1
    rest = outs(step(stub, sid, 2, "tokens", data[4:]))["logits"]
    np.testing.assert_allclose(np.concatenate([outs(responses[0])["logits"], rest]), want, atol=ATOL)


@pytest.mark.parametrize("keep", [False, True])
def test_cancelled_stream_closes_its_session_unless_keep(stub, keep):
    gate = threading.Event()

    def requests():
        yield pb.StreamRequest(open=pb.StreamOpen(model="tiny_lstm", keep=keep))
        gate.wait(30)

    call = stub.Stream(requests())
    sid = next(call).session.session_id
    call.cancel()
    gate.set()
    deadline = time.monotonic() + 10
    closed = False
    while time.monotonic() < deadline and not closed:
        try:
            stub.DescribeSession(pb.SessionRequest(session_id=sid))
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.NOT_FOUND and "closed" in err.details()
            closed = True
        if not closed and keep:
            time.sleep(0.3)  # give a (wrong) close time to happen, then check once more
            stub.DescribeSession(pb.SessionRequest(session_id=sid))
            break
        time.sleep(0.02)
    assert closed is not keep


def test_stream_protocol_errors(stub):
    code, msg = code_of(lambda: list(stub.Stream(iter([pb.StreamRequest(seq=1)]))))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "open" in msg
    code, msg = code_of(lambda: list(stub.Stream(iter([pb.StreamRequest(open=pb.StreamOpen())]))))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "model" in msg
    code, _ = code_of(lambda: list(stub.Stream(iter([pb.StreamRequest(open=pb.StreamOpen(model="nope"))]))))
    assert code == grpc.StatusCode.NOT_FOUND


def test_interleaved_sessions_equal_each_alone(server, repo):
    """16 threads, each with its own session, step concurrently: batching must never mix state."""
    n_sessions, length = 16, 40
    datas = [tokens(length, seed=100 + i) for i in range(n_sessions)]
    wants = [oracle(repo, "tiny_lstm2", "tokens", d)["logits"] for d in datas]
    results: list[np.ndarray | None] = [None] * n_sessions
    errors: list[BaseException] = []
    barrier = threading.Barrier(n_sessions)

    def run(i: int) -> None:
        try:
            with grpc.insecure_channel(server.address) as ch:
                s = pb_grpc.RecurrentServiceStub(ch)
                sid = create(s, "tiny_lstm2").session_id
                sizes = [1 + (i + k) % 4 for k in range(length)]
                parts, pos, seq = [], 0, 0
                barrier.wait()
                while pos < length:
                    n = min(sizes[seq], length - pos)
                    seq += 1
                    parts.append(outs(step(s, sid, seq, "tokens", datas[i][pos : pos + n]))["logits"])
                    pos += n
                results[i] = np.concatenate(parts)
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n_sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    for got, want in zip(results, wants, strict=True):
        np.testing.assert_allclose(got, want, atol=ATOL)


# ---- exactly once ------------------------------------------------------------------------------------------


def test_retry_of_last_seq_is_cached_and_not_reapplied(stub, repo):
    data = tokens(15, seed=21)
    want = oracle(repo, "tiny_lstm", "tokens", data)["logits"]
    sid = create(stub).session_id
    a = step(stub, sid, 1, "tokens", data[:6])
    again = step(stub, sid, 1, "tokens", data[:6])
    assert again.cached and not a.cached and again.seq == 1
    np.testing.assert_array_equal(outs(again)["logits"], outs(a)["logits"])
    info = stub.DescribeSession(pb.SessionRequest(session_id=sid))
    assert info.last_seq == 1 and info.steps == 6
    b = step(stub, sid, 2, "tokens", data[6:])
    np.testing.assert_allclose(np.concatenate([outs(a)["logits"], outs(b)["logits"]]), want, atol=ATOL)
    stale_or_gap = (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.OUT_OF_RANGE)
    for bad_seq, codes in ((1, stale_or_gap), (4, stale_or_gap), (0, (grpc.StatusCode.INVALID_ARGUMENT,))):
        code, msg = code_of(lambda s=bad_seq: step(stub, sid, s, "tokens", data[:2]))
        assert code in codes and "expected seq 3" in msg, (bad_seq, code, msg)
    assert stub.DescribeSession(pb.SessionRequest(session_id=sid)).last_seq == 2


# ---- bad inputs: exact codes, session untouched ------------------------------------------------------------


def _bad_requests(sid: str) -> list[tuple[str, pb.StepRequest, grpc.StatusCode, str]]:
    good = wire.array_to_tensor("tokens", tokens(3))
    bad_dtype = pb.Tensor(name="tokens", dtype=99, shape=[3], data=good.data)
    short = pb.Tensor(name="tokens", dtype=pb.DATA_TYPE_INT64, shape=[3], data=good.data[:-1])
    floats = wire.array_to_tensor("tokens", np.zeros(3, np.float32))
    two_d = wire.array_to_tensor("tokens", np.zeros((3, 2), np.int64))
    unknown = wire.array_to_tensor("other", np.zeros(3, np.int64))
    empty = wire.array_to_tensor("tokens", np.zeros(0, np.int64))
    huge = wire.array_to_tensor("tokens", np.zeros(5000, np.int64))
    inv = grpc.StatusCode.INVALID_ARGUMENT
    return [
        ("bad dtype enum", pb.StepRequest(session_id=sid, seq=2, inputs=[bad_dtype]), inv, "expected one of"),
        ("byte length", pb.StepRequest(session_id=sid, seq=2, inputs=[short]), inv, "expected"),
        ("wrong dtype", pb.StepRequest(session_id=sid, seq=2, inputs=[floats]), inv, "int64"),
        ("wrong rank", pb.StepRequest(session_id=sid, seq=2, inputs=[two_d]), inv, "tokens"),
        ("unknown input", pb.StepRequest(session_id=sid, seq=2, inputs=[unknown]), inv, "tokens"),
        ("missing input", pb.StepRequest(session_id=sid, seq=2), inv, "tokens"),
        ("empty chunk", pb.StepRequest(session_id=sid, seq=2, inputs=[empty]), inv, ""),
        ("oversized", pb.StepRequest(session_id=sid, seq=2, inputs=[huge]), grpc.StatusCode.OUT_OF_RANGE, ""),
        ("no session", pb.StepRequest(seq=2, inputs=[good]), inv, "session_id"),
        (
            "unknown session",
            pb.StepRequest(session_id="x" * 22, seq=1, inputs=[good]),
            grpc.StatusCode.NOT_FOUND,
            "",
        ),
        ("duplicate", pb.StepRequest(session_id=sid, seq=2, inputs=[good, good]), inv, "twice"),
    ]


def test_bad_inputs_exact_codes_and_state_unchanged(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_repo")
    fixtures.token_lstm(root, "tiny_lstm")
    (root / "tiny_lstm" / "config.yaml").write_text("max_chunk_steps: 1000\n")
    srv = ServerThread(make_settings(root))
    try:
        with grpc.insecure_channel(srv.address) as ch:
            stub = pb_grpc.RecurrentServiceStub(ch)
            data = tokens(12, seed=31)
            want = oracle(root, "tiny_lstm", "tokens", data)["logits"]
            sid = create(stub).session_id
            first = outs(step(stub, sid, 1, "tokens", data[:5]))["logits"]
            blob = stub.GetState(pb.SessionRequest(session_id=sid)).blob
            for what, request, code, needle in _bad_requests(sid):
                got, msg = code_of(lambda r=request: stub.Step(r))
                assert got == code, (what, got, msg)
                assert needle in msg, (what, msg)
                assert msg and "internal" not in msg.lower(), (what, msg)
            info = stub.DescribeSession(pb.SessionRequest(session_id=sid))
            assert info.last_seq == 1 and info.steps == 5
            assert stub.GetState(pb.SessionRequest(session_id=sid)).blob == blob
            rest = outs(step(stub, sid, 2, "tokens", data[5:]))["logits"]
            np.testing.assert_allclose(np.concatenate([first, rest]), want, atol=ATOL)
    finally:
        srv.stop()


def test_out_of_vocabulary_token_id_is_invalid_argument(stub):
    sid = create(stub).session_id
    bad = wire.array_to_tensor("tokens", np.array([1, VOCAB + 5, 2], np.int64))
    code, msg = code_of(lambda: stub.Step(pb.StepRequest(session_id=sid, seq=1, inputs=[bad])))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, msg


def test_session_rpc_argument_errors(stub):
    inv, nf = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: stub.CreateSession(pb.CreateSessionRequest()))[0] == inv
    assert code_of(lambda: create(stub, idle_ttl_s=-1))[0] == inv
    assert code_of(lambda: create(stub, "nope"))[0] == nf
    for method in ("DescribeSession", "Close", "Reset", "GetState"):
        assert code_of(lambda m=method: getattr(stub, m)(pb.SessionRequest()))[0] == inv, method
        assert code_of(lambda m=method: getattr(stub, m)(pb.SessionRequest(session_id="nope")))[0] == nf, (
            method
        )
    sid = create(stub).session_id
    assert code_of(lambda: stub.SetState(pb.SetStateRequest(session_id=sid)))[0] == inv
    assert code_of(lambda: stub.SetState(pb.SetStateRequest(session_id=sid, blob=b"garbage")))[0] == inv


# ---- state, fork, reset, close -----------------------------------------------------------------------------


def test_get_set_state_fork_reset_close(stub, repo):
    data = tokens(20, seed=41)
    want = oracle(repo, "tiny_lstm", "tokens", data)["logits"]
    sid = create(stub).session_id
    head = outs(step(stub, sid, 1, "tokens", data[:8]))["logits"]
    blob = stub.GetState(pb.SessionRequest(session_id=sid)).blob
    fork = stub.Fork(pb.ForkRequest(session_id=sid))
    assert fork.session_id != sid and fork.last_seq == 0 and fork.model == "tiny_lstm"
    tail = outs(step(stub, sid, 2, "tokens", data[8:]))["logits"]
    np.testing.assert_allclose(np.concatenate([head, tail]), want, atol=ATOL)
    # The fork continues from the copy, independently of the source.
    np.testing.assert_allclose(
        outs(step(stub, fork.session_id, 1, "tokens", data[8:]))["logits"], tail, atol=ATOL
    )
    # SetState rewinds the source to the snapshot (state and seq).
    info = stub.SetState(pb.SetStateRequest(session_id=sid, blob=blob))
    assert info.last_seq == 1
    np.testing.assert_allclose(outs(step(stub, sid, 2, "tokens", data[8:]))["logits"], tail, atol=ATOL)
    # Reset: back to the initial state and seq 0.
    assert stub.Reset(pb.SessionRequest(session_id=sid)).last_seq == 0
    np.testing.assert_allclose(outs(step(stub, sid, 1, "tokens", data))["logits"], want, atol=ATOL)
    stub.Close(pb.SessionRequest(session_id=sid))
    code, msg = code_of(lambda: step(stub, sid, 2, "tokens", data[:1]))
    assert code == grpc.StatusCode.NOT_FOUND and "closed" in msg


# ---- multiplexed stream ------------------------------------------------------------------------------------


def test_stream_many_equals_per_session_steps(stub, repo):
    n, length, t = 6, 12, 3
    datas = np.stack([tokens(length, seed=200 + i) for i in range(n)])  # (N, L)
    wants = [oracle(repo, "tiny_lstm", "tokens", d)["logits"] for d in datas]
    sids = [create(stub).session_id for _ in range(n)]

    def requests():
        for k in range(length // t):
            yield pb.StepManyRequest(
                tag=k,
                session_ids=sids,
                seqs=[k + 1] * n,
                inputs=[wire.array_to_tensor("tokens", datas[:, k * t : (k + 1) * t])],
            )
        # One bad row (wrong seq) answers in-band; the others go on.
        yield pb.StepManyRequest(
            tag=99,
            session_ids=sids[:2],
            seqs=[length // t + 1, 1],
            inputs=[wire.array_to_tensor("tokens", datas[:2, :1])],
        )

    responses = list(stub.StreamMany(requests()))
    assert [r.tag for r in responses] == [0, 1, 2, 3, 99]
    got = np.concatenate([wire.tensor_to_array(r.outputs[0]) for r in responses[:-1]], axis=1)  # (N, L, V)
    for i in range(n):
        np.testing.assert_allclose(got[i], wants[i], atol=ATOL)
    last = responses[-1]
    assert list(last.codes)[0] == 0 and list(last.codes)[1] == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert "5" in last.messages[1]
    code, msg = code_of(lambda: list(stub.StreamMany(iter([pb.StepManyRequest(session_ids=sids, seqs=[1])]))))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "seqs" in msg


def test_stream_many_rows_that_do_not_stack_are_applied_and_fetchable(tmp_path_factory):
    root = tmp_path_factory.mktemp("many_repo")
    fixtures.token_lstm(root, "small")
    fixtures.token_lstm(root, "wide", vocab=(*fixtures.DEFAULT_VOCAB, "Q", "R"))
    srv = ServerThread(make_settings(root))
    try:
        with grpc.insecure_channel(srv.address) as ch:
            stub = pb_grpc.RecurrentServiceStub(ch)
            sids = [create(stub, "small").session_id, create(stub, "wide").session_id]
            data = tokens(6, seed=7).reshape(2, 3)
            request = pb.StepManyRequest(
                tag=1, session_ids=sids, seqs=[1, 1], inputs=[wire.array_to_tensor("tokens", data)]
            )
            (answer,) = list(stub.StreamMany(iter([request])))
            assert list(answer.codes) == [0, grpc.StatusCode.FAILED_PRECONDITION.value[0]]
            assert "Step(seq=1)" in answer.messages[1]
            got = wire.tensor_to_array(answer.outputs[0])
            assert got.shape == (2, 3, VOCAB) and not got[1].any()
            wide = step(stub, sids[1], 1, "tokens", data[1])
            assert wide.cached
            want = fixtures.run_whole(root / "wide" / "1" / "model.onnx", {"tokens": data[1:]})["logits"][0]
            np.testing.assert_allclose(outs(wide)["logits"], want, atol=ATOL)
    finally:
        srv.stop()


# ---- generation --------------------------------------------------------------------------------------------


def test_generate_fresh_and_on_session(stub):
    request = pb.GenerateRequest(model="tiny_lstm", prime_text="A:1\n", n_tokens=25, temperature=0.9, seed=3)
    first = list(stub.Generate(request))
    again = list(stub.Generate(request))
    assert len(first) == 25 and [r.token_id for r in first] == [r.token_id for r in again]
    assert all(r.text == fixtures.DEFAULT_VOCAB[r.token_id] for r in first)
    fresh_sid = first[0].session_id
    assert fresh_sid
    assert code_of(lambda: stub.DescribeSession(pb.SessionRequest(session_id=fresh_sid)))[0] == (
        grpc.StatusCode.NOT_FOUND
    )
    greedy = list(stub.Generate(pb.GenerateRequest(model="tiny_lstm", prime_ids=[1, 2, 3], n_tokens=5)))
    assert len(greedy) == 5
    # On an existing session: it keeps the session and advances its seq.
    sid = create(stub).session_id
    kept = list(stub.Generate(pb.GenerateRequest(session_id=sid, prime_text="ab", n_tokens=4, seed=1)))
    assert len(kept) == 4
    # The whole generation is one applied chunk: every token reports that chunk's seq.
    assert {r.seq for r in kept} == {1}
    assert stub.DescribeSession(pb.SessionRequest(session_id=sid)).last_seq == 1
    inv = grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: list(stub.Generate(pb.GenerateRequest(model="tiny_lstm", n_tokens=0))))[0] == inv
    assert code_of(lambda: list(stub.Generate(pb.GenerateRequest(n_tokens=3))))[0] == inv
    code, msg = code_of(
        lambda: list(stub.Generate(pb.GenerateRequest(model="tiny_lstm", prime_text="\u00e9", n_tokens=3)))
    )
    assert code == inv, msg
    code, _ = code_of(
        lambda: list(stub.Generate(pb.GenerateRequest(model="tiny_gru", prime_ids=[1], n_tokens=3)))
    )
    assert code in (grpc.StatusCode.FAILED_PRECONDITION, inv)


# ---- repository reload -------------------------------------------------------------------------------------


def test_reload_repository_pins_open_sessions(tmp_path_factory):
    root = tmp_path_factory.mktemp("reload_repo")
    fixtures.token_lstm(root, "m", version=1, seed=1)
    srv = ServerThread(make_settings(root))
    try:
        with grpc.insecure_channel(srv.address) as ch:
            stub = pb_grpc.RecurrentServiceStub(ch)
            old = create(stub, "m")
            fixtures.token_lstm(root, "m", version=2, seed=2)
            models = stub.ReloadRepository(pb.ReloadRepositoryRequest()).models
            assert [list(m.versions) for m in models if m.name == "m"] == [[1, 2]]
            assert create(stub, "m").version == 2
            assert old.version == 1
            fixtures.token_lstm(root, "newcomer")
            stub.ReloadRepository(pb.ReloadRepositoryRequest())
            health = health_pb2_grpc.HealthStub(ch)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # the health update is scheduled right after the reload
                try:
                    if health.Check(health_pb2.HealthCheckRequest(service="newcomer")).status == 1:
                        break
                except grpc.RpcError:
                    pass
                time.sleep(0.02)
            assert health.Check(health_pb2.HealthCheckRequest(service="newcomer")).status == (
                health_pb2.HealthCheckResponse.SERVING
            )
            data = tokens(5)
            got = outs(step(stub, old.session_id, 1, "tokens", data))["logits"]
            want = fixtures.run_whole(root / "m" / "1" / "model.onnx", {"tokens": data[None]})["logits"][0]
            np.testing.assert_allclose(got, want, atol=ATOL)
    finally:
        srv.stop()


# ---- reflection, health, metrics ---------------------------------------------------------------------------


def test_reflection_lists_every_service(channel):
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    response = next(
        stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    )
    names = {s.name for s in response.list_services_response.service}
    assert {
        "rnnserve.v1.RecurrentService",
        "grpc.health.v1.Health",
        "inference.GRPCInferenceService",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= names
    described = next(
        stub.ServerReflectionInfo(
            iter(
                [
                    reflection_pb2.ServerReflectionRequest(
                        file_containing_symbol="rnnserve.v1.RecurrentService"
                    )
                ]
            )
        )
    )
    assert described.file_descriptor_response.file_descriptor_proto


def test_health_overall_and_per_model(channel):
    health = health_pb2_grpc.HealthStub(channel)
    serving = health_pb2.HealthCheckResponse.SERVING
    for name in ("", "rnnserve.v1.RecurrentService", "tiny_lstm", "accumulator"):
        assert health.Check(health_pb2.HealthCheckRequest(service=name)).status == serving, name
    code, _ = code_of(lambda: health.Check(health_pb2.HealthCheckRequest(service="no_such_model")))
    assert code == grpc.StatusCode.NOT_FOUND


def test_request_metrics(server, stub):
    stub.ListModels(pb.ListModelsRequest())
    code_of(lambda: stub.GetModel(pb.GetModelRequest(name="nope")))
    text = urllib.request.urlopen(
        f"http://127.0.0.1:{server.running.metrics_port}/metrics", timeout=10
    ).read()
    text = text.decode()
    assert 'rnnserve_requests_total{code="OK",method="ListModels",protocol="native"}' in text
    assert 'rnnserve_requests_total{code="NOT_FOUND",method="GetModel",protocol="native"}' in text


def test_capacity_and_idle_expiry_statuses(tmp_path_factory):
    root = tmp_path_factory.mktemp("limits_repo")
    fixtures.token_lstm(root, "tiny_lstm")
    srv = ServerThread(make_settings(root, max_sessions=2, sweep_interval_s=0.05))
    try:
        with grpc.insecure_channel(srv.address) as ch:
            stub = pb_grpc.RecurrentServiceStub(ch)
            short = create(stub, idle_ttl_s=0.2).session_id
            create(stub)
            code, msg = code_of(lambda: create(stub))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "2" in msg, msg
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    stub.DescribeSession(pb.SessionRequest(session_id=short))
                except grpc.RpcError as err:
                    assert err.code() == grpc.StatusCode.NOT_FOUND and "idle" in err.details()
                    break
                time.sleep(0.05)
            else:
                pytest.fail("the idle session did not expire")
            create(stub)  # its slot is free again
    finally:
        srv.stop()


# ---- convert (pure) ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["?", "u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8", "f2", "f4", "f8"])
def test_convert_round_trips_every_dtype_little_endian(dtype):
    arr = (np.arange(12).reshape(3, 4) % 2).astype(dtype)
    t = wire.array_to_tensor("t", arr)
    assert t.data == arr.astype(np.dtype(dtype).newbyteorder("<")).tobytes() and list(t.shape) == [3, 4]
    back = wire.tensor_to_array(t)
    assert back.dtype == np.dtype(dtype) and np.array_equal(back, arr)
    big = wire.array_to_tensor("t", arr.astype(np.dtype(dtype).newbyteorder(">")))
    assert big.data == t.data and big.dtype == t.dtype


def test_convert_rejects_malformed_tensors():
    ok = wire.array_to_tensor("t", np.zeros((2, 3), np.float32))
    cases = [
        (pb.Tensor(name="t", dtype=0, shape=[2, 3], data=ok.data), "DATA_TYPE_FLOAT32"),
        (pb.Tensor(name="t", dtype=pb.DATA_TYPE_FLOAT32, shape=[2, 3], data=ok.data[:-4]), "prod([2, 3])"),
        (pb.Tensor(name="t", dtype=pb.DATA_TYPE_FLOAT32, shape=[-2, -3], data=ok.data), "negative"),
        (pb.Tensor(name="t", dtype=pb.DATA_TYPE_FLOAT32, shape=[1 << 30, 1 << 30], data=b""), "too large"),
    ]
    for tensor, needle in cases:
        with pytest.raises(wire.InvalidArgument) as err:
            wire.tensor_to_array(tensor)
        assert needle in err.value.message, err.value.message
    with pytest.raises(wire.InvalidArgument):
        wire.array_to_tensor("c", np.zeros(2, np.complex64))
