"""`service.client` against the real server: sessions as objects, streaming, state, failover and retry.

Transport faults are real: a loopback TCP proxy between client and server cuts every connection on demand, and
a second address that nothing listens on makes the client fail over.
"""

from __future__ import annotations

import socket
from pathlib import Path

import fixtures
import grpc
import numpy as np
import pytest
from server_thread import CuttableProxy, ServerThread, make_settings

from service.client import Client, RowError

ATOL = 1e-5
VOCAB = len(fixtures.DEFAULT_VOCAB)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("client_repo")
    fixtures.token_lstm(root, "tiny_lstm")
    fixtures.numeric_gru(root, "tiny_gru")
    return root


@pytest.fixture(scope="module")
def server(repo):
    srv = ServerThread(make_settings(repo))
    yield srv
    srv.stop()


@pytest.fixture()
def client(server):
    with Client(server.address, timeout=20) as c:
        yield c


def tokens(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, n).astype(np.int64)


def oracle(repo: Path, model: str, name: str, data: np.ndarray) -> dict[str, np.ndarray]:
    out = fixtures.run_whole(repo / model / "1" / "model.onnx", {name: data[None]})
    return {k: v[0] for k, v in out.items()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_models(client):
    names = {m.name for m in client.list_models()}
    assert names == {"tiny_lstm", "tiny_gru"}
    m = client.get_model("tiny_lstm")
    assert m.inputs[0].name == "tokens" and m.inputs[0].dtype == np.int64 and m.vocabulary


def test_session_step_and_stream_equal_whole_sequence(client, repo):
    data = tokens(40, seed=1)
    want = oracle(repo, "tiny_lstm", "tokens", data)["logits"]
    with client.session("tiny_lstm") as s:
        head = s.step(data[:7])["logits"]
        assert s.seq == 1
        rest = [out["logits"] for out in s.stream([data[7:8], data[8:20], data[20:40]])]
        assert s.seq == 4
        np.testing.assert_allclose(np.concatenate([head, *rest]), want, atol=ATOL)
        assert s.describe().steps == 40
        sid = s.id
    with pytest.raises(grpc.RpcError) as err:
        client.describe_session(sid)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_numeric_inputs_are_cast_to_the_model_dtype(client, repo):
    x = np.random.default_rng(2).normal(size=(9, 3))  # float64 in; the model takes float32
    want = oracle(repo, "tiny_gru", "x", x.astype(np.float32))["y"]
    with client.session("tiny_gru") as s:
        np.testing.assert_allclose(s.step(x.tolist())["y"], want, atol=ATOL)


def test_state_fork_reset(client, repo):
    data = tokens(16, seed=3)
    want = oracle(repo, "tiny_lstm", "tokens", data)["logits"]
    with client.session("tiny_lstm") as s:
        s.step(data[:6])
        blob = s.state()
        with s.fork() as f:
            tail = s.step(data[6:])["logits"]
            np.testing.assert_allclose(f.step(data[6:])["logits"], tail, atol=ATOL)
        assert s.set_state(blob).last_seq == 1 and s.seq == 1
        np.testing.assert_allclose(s.step(data[6:])["logits"], tail, atol=ATOL)
        s.reset()
        assert s.seq == 0
        np.testing.assert_allclose(s.step(data)["logits"], want, atol=ATOL)


def test_attach_resumes_from_server_seq(client):
    with client.session("tiny_lstm") as s:
        s.step(tokens(3))
        other = client.attach(s.id)
        assert other.seq == 1
        other.step(tokens(2))
        assert client.describe_session(s.id).last_seq == 2


def test_generate(client):
    pieces = list(client.generate("tiny_lstm", prime="A:1", n=30, temperature=0.7, seed=5))
    assert len(pieces) == 30 and all(p in fixtures.DEFAULT_VOCAB for p in pieces)
    assert pieces == list(client.generate("tiny_lstm", prime="A:1", n=30, temperature=0.7, seed=5))


def test_retry_after_connection_reset_is_exactly_once(server, repo):
    """Cut the TCP connections between chunks and mid-stream: every chunk still applies exactly once."""
    data = tokens(30, seed=4)
    want = oracle(repo, "tiny_lstm", "tokens", data)["logits"]
    proxy = CuttableProxy(server.running.port)
    try:
        with Client(f"127.0.0.1:{proxy.port}", timeout=10, backoff_s=0.01) as c:
            s = c.session("tiny_lstm")
            got = [s.step(data[:5])["logits"]]
            proxy.cut()
            got.append(s.step(data[5:10])["logits"])

            def chunks():
                yield data[10:15]
                proxy.cut()  # breaks the open stream before the next chunk goes out
                yield data[15:22]
                yield data[22:30]

            got += [out["logits"] for out in s.stream(chunks())]
            np.testing.assert_allclose(np.concatenate(got), want, atol=ATOL)
            info = s.describe()
            assert info.last_seq == 5 and info.steps == 30
            assert c.failovers >= 1
            s.close()
    finally:
        proxy.close()


def test_failover_to_next_address(server, repo):
    data = tokens(10, seed=6)
    want = oracle(repo, "tiny_lstm", "tokens", data)["logits"]
    dead = f"127.0.0.1:{free_port()}"
    with Client([dead, server.address], timeout=5, backoff_s=0.01) as c:
        with c.session("tiny_lstm") as s:
            assert c.address == server.address
            np.testing.assert_allclose(s.step(data)["logits"], want, atol=ATOL)


def test_errors_surface_with_status(client):
    with pytest.raises(grpc.RpcError) as err:
        client.session("no_such_model")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with client.session("tiny_lstm") as s:
        with pytest.raises(grpc.RpcError) as err:
            s.step(np.zeros((2, 2), np.int64))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert s.seq == 0
        s.step(tokens(2))
        assert s.seq == 1


def test_generate_resumes_after_connection_reset(server):
    n = 1500
    with Client(server.address) as c:
        want = list(c.generate("tiny_lstm", prime="AB", n=n, temperature=1.0, seed=11))
    proxy = CuttableProxy(server.running.port)
    try:
        with Client(f"127.0.0.1:{proxy.port}", timeout=20, backoff_s=0.01) as c:
            got = []
            for piece in c.generate("tiny_lstm", prime="AB", n=n, temperature=1.0, seed=11):
                got.append(piece)
                if len(got) == 5:
                    proxy.cut()
            assert got == want
            assert c.failovers >= 1
    finally:
        proxy.close()


def test_multiplexer_steps_many_sessions_exactly_once(server, repo):
    n, length = 5, 12
    datas = [tokens(length, seed=40 + i) for i in range(n)]
    wants = [oracle(repo, "tiny_lstm", "tokens", d)["logits"] for d in datas]
    proxy = CuttableProxy(server.running.port)
    try:
        with Client(f"127.0.0.1:{proxy.port}", timeout=10, backoff_s=0.01) as c:
            sessions = [c.session("tiny_lstm") for _ in range(n)]
            got: list[list[np.ndarray]] = [[] for _ in range(n)]
            with c.multiplexer() as mux:
                for k in range(0, length, 3):
                    if k == 6:
                        proxy.cut()
                    for i, out in enumerate(
                        mux.step([(s, d[k : k + 3]) for s, d in zip(sessions, datas, strict=True)])
                    ):
                        assert isinstance(out, dict), out
                        got[i].append(out["logits"])
                # A bad row (a seq gap) answers in-band; the others still apply.
                sessions[0].seq += 5
                mixed = mux.step([(s, d[:1]) for s, d in zip(sessions, datas, strict=True)])
                sessions[0].seq -= 5
            assert isinstance(mixed[0], RowError) and "expected seq" in mixed[0].message, mixed[0]
            assert mixed[0].code in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.OUT_OF_RANGE)
            assert all(isinstance(r, dict) for r in mixed[1:])
            for i in range(n):
                np.testing.assert_allclose(np.concatenate(got[i]), wants[i], atol=ATOL)
            assert [s.describe().steps for s in sessions] == [length] + [length + 1] * (n - 1)
            assert c.failovers >= 1
    finally:
        proxy.close()
