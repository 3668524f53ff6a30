"""A stream is told why it ends, an open stream keeps its session, stream limits refuse with a typed status.

Real servers on loopback (`service.server.start`), real clients (generated stubs, `service.client.Client`,
tritonclient), real ONNX Runtime. Small TTLs and lifetimes through the settings keep the tests short. The
replica scenarios (drain and move with a shared Redis store, a dead peer) are in
tests/service/test_stream_resume.py.
"""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path

import fixtures
import grpc
import numpy as np
import pytest
from server_thread import ServerThread, make_settings

from service import wire
from service.client import Client, SessionEnded
from service.proto import rnnserve_pb2 as pb
from service.proto import rnnserve_pb2_grpc as pb_grpc

END = "x-rnnserve-end-reason"
MODEL = "tiny_lstm"


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("stream_lifecycle")
    fixtures.token_lstm(root, MODEL)
    return root


class RawStream:
    """A native Stream driven message by message from the test (a generated stub, no client library)."""

    def __init__(self, channel: grpc.Channel, opening: pb.StreamOpen) -> None:
        self.requests: queue.SimpleQueue = queue.SimpleQueue()
        self.requests.put(pb.StreamRequest(open=opening))

        def feed():
            while (item := self.requests.get()) is not None:
                yield item

        self.call = pb_grpc.RecurrentServiceStub(channel).Stream(feed())
        self.opened = next(self.call)

    def send(self, seq: int, tokens: np.ndarray) -> pb.StreamResponse:
        self.requests.put(pb.StreamRequest(seq=seq, inputs=[wire.array_to_tensor("tokens", tokens)]))
        return next(self.call)

    def close(self) -> None:
        self.requests.put(None)


def trailer(err: grpc.RpcError) -> str | None:
    return dict(err.trailing_metadata() or ()).get(END)


def sample(server: ServerThread, name: str, **labels: str) -> float:
    return server.registry.get_sample_value(name, labels) or 0.0


def tokens(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, len(fixtures.DEFAULT_VOCAB), n).astype(np.int64)


def wait_for(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def told(stream: RawStream, reason: int, status: grpc.StatusCode, name: str) -> pb.StreamEnd:
    """The stream's final message names `reason`; then it ends with `status` and the reason trailer."""
    final = next(stream.call)
    assert final.HasField("ended") and final.ended.reason == reason, final
    with pytest.raises(grpc.RpcError) as err:
        next(stream.call)
    assert err.value.code() == status
    assert trailer(err.value) == name
    stream.close()
    return final.ended


def test_a_silent_stream_keeps_its_session_past_its_idle_ttl_and_the_ttl_counts_from_its_end(repo):
    server = ServerThread(make_settings(repo))
    try:
        with grpc.insecure_channel(server.address) as ch:
            stub = pb_grpc.RecurrentServiceStub(ch)
            opening = pb.StreamOpen(model=MODEL, idle_ttl_s=0.4, keep=True, lifecycle_events=True)
            stream = RawStream(ch, opening)
            sid = stream.opened.session.session_id
            assert stream.send(1, tokens(3)).seq == 1
            time.sleep(1.5)  # silent for almost 4 idle TTLs, with the expiry sweep every 0.1 s
            info = stub.DescribeSession(pb.SessionRequest(session_id=sid))
            assert info.last_seq == 1
            assert stream.send(2, tokens(2, 1)).seq == 2  # the same session goes on
            stream.close()
            wait_for(lambda: sample(server, "rnnserve_open_streams", method="Stream") == 0, what="stream end")
            assert stub.DescribeSession(pb.SessionRequest(session_id=sid)).last_seq == 2  # kept, not closed
            time.sleep(1.0)  # now nothing holds it: the idle TTL runs from the stream's end
            with pytest.raises(grpc.RpcError) as err:
                stub.DescribeSession(pb.SessionRequest(session_id=sid))
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            assert trailer(err.value) == "idle"  # unary calls name the reason in the trailer too
        assert sample(server, "rnnserve_streams_ended_total", method="Stream", reason="client") == 1
    finally:
        server.stop()


def test_idle_expiry_is_told_when_streams_do_not_hold_sessions(repo):
    server = ServerThread(make_settings(repo, stream_holds_sessions=False))
    try:
        with grpc.insecure_channel(server.address) as ch:
            stream = RawStream(ch, pb.StreamOpen(model=MODEL, idle_ttl_s=0.3, lifecycle_events=True))
            sid = stream.opened.session.session_id
            stream.send(1, tokens(2))
            ended = told(stream, pb.END_REASON_IDLE, grpc.StatusCode.NOT_FOUND, "idle")
            assert ended.session_id == sid and not ended.resumable and "idle" in ended.message

        # The client library: a silent pause between chunks, then SessionEnded with the reason.
        def chunks():
            yield tokens(2)
            time.sleep(1.0)
            yield tokens(2, 1)

        with Client(server.address) as client:
            session = client.session(MODEL, idle_ttl_s=0.3)
            got = []
            with pytest.raises(SessionEnded) as err:
                for out in session.stream(chunks()):
                    got.append(out)
            assert len(got) == 1 and err.value.reason == "idle" and err.value.session_id == session.id
            assert err.value.code() == grpc.StatusCode.NOT_FOUND and not err.value.resumable
            with pytest.raises(SessionEnded) as err:  # a unary call on the gone session: the same type
                session.step(tokens(1))
            assert err.value.reason == "idle"
        assert sample(server, "rnnserve_streams_ended_total", method="Stream", reason="idle") == 2
    finally:
        server.stop()


def test_lifetime_is_told_on_an_open_stream(repo):
    server = ServerThread(make_settings(repo, max_lifetime_s=1.0))
    try:
        with grpc.insecure_channel(server.address) as ch:
            stream = RawStream(ch, pb.StreamOpen(model=MODEL, keep=True, lifecycle_events=True))
            stream.send(1, tokens(2))
            started = time.monotonic()
            ended = told(stream, pb.END_REASON_LIFETIME, grpc.StatusCode.NOT_FOUND, "lifetime")
            assert time.monotonic() - started < 5 and "lifetime" in ended.message
    finally:
        server.stop()


def test_eviction_for_capacity_is_told_on_an_open_stream(repo):
    server = ServerThread(make_settings(repo, max_sessions=2, evict_on_capacity=True))
    try:
        with grpc.insecure_channel(server.address) as ch:
            stub = pb_grpc.RecurrentServiceStub(ch)
            stream = RawStream(ch, pb.StreamOpen(model=MODEL, keep=True, lifecycle_events=True))
            stream.send(1, tokens(2))
            time.sleep(0.05)
            stub.CreateSession(pb.CreateSessionRequest(model=MODEL))
            stub.CreateSession(pb.CreateSessionRequest(model=MODEL))  # full: the least recently used goes
            told(stream, pb.END_REASON_CAPACITY, grpc.StatusCode.NOT_FOUND, "capacity")
        assert sample(server, "rnnserve_sessions_ended_total", model=MODEL, reason="capacity") == 1
    finally:
        server.stop()


def test_a_close_from_elsewhere_is_told_and_old_clients_get_only_the_trailer(repo):
    server = ServerThread(make_settings(repo))
    try:
        with grpc.insecure_channel(server.address) as ch:
            stub = pb_grpc.RecurrentServiceStub(ch)
            stream = RawStream(ch, pb.StreamOpen(model=MODEL, keep=True, lifecycle_events=True))
            stub.Close(pb.SessionRequest(session_id=stream.opened.session.session_id))
            told(stream, pb.END_REASON_CLOSED, grpc.StatusCode.NOT_FOUND, "closed")

            # Without lifecycle_events no extra message: the answers stay one per request.
            old = RawStream(ch, pb.StreamOpen(model=MODEL, keep=True))
            stub.Close(pb.SessionRequest(session_id=old.opened.session.session_id))
            with pytest.raises(grpc.RpcError) as err:
                next(old.call)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND and trailer(err.value) == "closed"
            old.close()
    finally:
        server.stop()


def test_stream_limits_refuse_with_resource_exhausted_naming_the_setting(repo):
    server = ServerThread(make_settings(repo, max_streams_per_connection=2, max_open_streams=3))
    # Channels to one address share one connection unless each has its own subchannel pool.
    own = [("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.insecure_channel(server.address, options=own) for _ in range(3)]
    streams = []
    try:
        streams += [RawStream(channels[0], pb.StreamOpen(model=MODEL)) for _ in range(2)]
        with pytest.raises(grpc.RpcError) as err:
            RawStream(channels[0], pb.StreamOpen(model=MODEL))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_streams_per_connection 2" in err.value.details()
        # Another connection may open more, up to the total; StreamMany counts too.
        feed: queue.SimpleQueue = queue.SimpleQueue()
        feed.put(pb.StepManyRequest(tag=1))
        many = pb_grpc.RecurrentServiceStub(channels[1]).StreamMany(iter(feed.get, None))
        assert next(many).tag == 1
        with pytest.raises(grpc.RpcError) as err:
            RawStream(channels[2], pb.StreamOpen(model=MODEL))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_open_streams 3" in err.value.details()
        assert sample(server, "rnnserve_stream_refusals_total", limit="max_streams_per_connection") == 1
        assert sample(server, "rnnserve_stream_refusals_total", limit="max_open_streams") == 1
        for s in streams:
            s.close()
        feed.put(None)
        list(many)
        # Room again once they end.
        wait_for(lambda: server.running.streams.open_count == 0, what="streams to end")
        again = RawStream(channels[2], pb.StreamOpen(model=MODEL))
        again.close()
    finally:
        for ch in channels:
            ch.close()
        server.stop()


def test_a_drain_is_told_to_native_and_kserve_streams(repo):
    import tritonclient.grpc as grpcclient

    server = ServerThread(make_settings(repo))
    results: list = []
    stopper = threading.Thread(target=server.stop, args=(5,))
    try:
        with grpc.insecure_channel(server.address) as ch:
            stream = RawStream(ch, pb.StreamOpen(model=MODEL, keep=True, lifecycle_events=True))
            stream.send(1, tokens(2))
            many = queue.SimpleQueue()
            many.put(pb.StepManyRequest(tag=1, lifecycle_events=True))
            many_call = pb_grpc.RecurrentServiceStub(ch).StreamMany(iter(many.get, None))
            assert next(many_call).tag == 1

            triton = grpcclient.InferenceServerClient(server.address)
            triton.start_stream(callback=lambda result, error: results.append((result, error)))
            inp = grpcclient.InferInput("tokens", [1, 2], "INT64")
            inp.set_data_from_numpy(tokens(2)[None])
            triton.async_stream_infer(MODEL, [inp], sequence_id=7, sequence_start=True)
            wait_for(lambda: len(results) == 1, what="the KServe answer")

            stopper.start()
            ended = told(stream, pb.END_REASON_DRAINING, grpc.StatusCode.UNAVAILABLE, "draining")
            assert ended.resumable and "reconnect" in ended.message
            final = next(many_call)
            assert final.ended.reason == pb.END_REASON_DRAINING and final.ended.resumable
            with pytest.raises(grpc.RpcError) as err:
                next(many_call)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE and trailer(err.value) == "draining"
            many.put(None)
            wait_for(lambda: len(results) >= 2, what="the KServe stream's end")
            stopper.join(30)
            triton.stop_stream()
            triton.close()
    finally:
        if not stopper.is_alive() and stopper.ident is None:  # never started: stop here
            server.stop()
    assert results[0][1] is None  # the request was answered before the drain
    errors = [str(e) for _, e in results[1:] if e is not None]
    assert any("draining" in e and END in e for e in errors), errors  # Triton's callback got the reason


def test_the_readme_settings_table_is_generated_from_the_settings():
    import importlib.util

    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("stream_settings", root / "tests" / "stream_settings.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (root / "docs" / "results" / "streams.md").read_text() == module.table(), (
        "docs/results/streams.md is stale: python tests/stream_settings.py, then make readme"
    )
