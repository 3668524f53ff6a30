"""Sessions survive a replica: two real server processes share a real redis-server.

A client streams a long token sequence; the replica that serves it is SIGKILLed (a crashed pod) or
SIGTERMed (a drained pod) mid-stream; the client resumes on the other replica. The whole output sequence
must equal one uninterrupted ONNX Runtime pass over the whole sequence: a lost step or a step applied twice
would change the recurrent state and every output after it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from service import wire
from service.client import Client
from service.proto import rnnserve_pb2 as pb
from service.proto import rnnserve_pb2_grpc as pb_grpc
from service.stores.redis import RedisStore
from tests.deploy.redis_server import RedisServer, free_port
from tests.deploy.replicas import Replica, start_replica

pytestmark = pytest.mark.slow

MODEL = "tiny_lstm"
CHUNKS, CHUNK_T = 120, 3
FAIL_AT = 40  # the failure is injected while chunks FAIL_AT .. FAIL_AT + 5 are in flight
LEASE_S = 1.0
LONG_LEASE_S = 30.0
DRAIN_GRACE_S = 5.0


def reference_logits(repository: Path, tokens: np.ndarray) -> np.ndarray:
    """One uninterrupted ONNX Runtime pass over the whole sequence, from the zero state."""
    sess = ort.InferenceSession(
        str(repository / MODEL / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    feeds: dict[str, np.ndarray] = {"tokens": tokens[None, :]}
    for i in sess.get_inputs():
        if i.name.startswith("state_in_"):
            feeds[i.name] = np.zeros([1, *i.shape[1:]], dtype=np.float32)
    (logits,) = sess.run(["logits"], feeds)
    return logits[0]


@pytest.fixture(scope="module")
def tokens(model_repository: Path) -> np.ndarray:
    vocab = reference_logits(model_repository, np.zeros(1, dtype=np.int64)).shape[-1]
    return np.random.default_rng(7).integers(0, vocab, size=CHUNKS * CHUNK_T, dtype=np.int64)


@pytest.fixture
def pair(
    request, tmp_path: Path, model_repository: Path, clean_redis: RedisServer
) -> Iterator[tuple[Replica, Replica]]:
    """Replicas `a` and `b` on the shared store, flushing every step, with a short lease (or settings given
    through indirect parametrization)."""
    common: dict[str, object] = dict(
        store="redis",
        redis_url=clean_redis.url,
        store_flush_every=1,
        lease_s=LEASE_S,
        drain_grace_s=DRAIN_GRACE_S,
    )
    common.update(getattr(request, "param", {}))
    a = start_replica("a", tmp_path, model_repository, **common)
    try:
        b = start_replica("b", tmp_path, model_repository, **common)
    except Exception:
        a.stop()
        raise
    yield a, b
    for r in (a, b):
        r.stop()


def stream_with_failure(
    addresses: list[str], tokens: np.ndarray, fail, jitter_s: float = 0.0
) -> tuple[list[np.ndarray], int]:
    """Stream every chunk through one session (opened on the first replica); `fail()` it from another thread.

    The failure lands `jitter_s` after chunk FAIL_AT is handed to the client, while the stream keeps flowing,
    so it can hit a replica between steps, inside a step, or after a step was saved but before its reply.
    Returns the outputs in order and how many answers the client had when the failure was injected.
    """
    outputs: list[np.ndarray] = []
    injected = threading.Event()
    seen_at_failure: list[int] = []

    def inject() -> None:
        time.sleep(jitter_s)
        seen_at_failure.append(len(outputs))
        fail()
        injected.set()

    def chunks() -> Iterator[np.ndarray]:
        for i in range(CHUNKS):
            if i == FAIL_AT:
                threading.Thread(target=inject, daemon=True).start()
            if i == FAIL_AT + 5:
                assert injected.wait(30), "failure injection did not finish"
            yield tokens[i * CHUNK_T : (i + 1) * CHUNK_T]

    # The library defaults: after a SIGKILL, `b` waits (within the call) for the dead owner's lease to lapse.
    with Client(addresses) as client:
        session = client.session(MODEL)
        for out in session.stream(chunks()):
            outputs.append(out["logits"])
        assert session.seq == CHUNKS
        info = session.describe()
        assert info.last_seq == CHUNKS
    return outputs, seen_at_failure[0]


def assert_exact_history(outputs: list[np.ndarray], expected: np.ndarray) -> None:
    assert len(outputs) == CHUNKS, f"{len(outputs)} answers for {CHUNKS} chunks"
    got = np.concatenate(outputs, axis=0)
    assert got.shape == expected.shape
    # A lost or duplicated step shifts the state: every later output would differ by far more than this.
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def stored_session(redis: RedisServer) -> tuple[int, str]:
    keys = redis.client().keys("rnnserve:*:rec")
    assert len(keys) == 1
    rec = redis.client().hgetall(keys[0])
    return int(rec[b"seq"]), rec[b"owner"].decode()


@pytest.mark.parametrize(
    ("routing", "jitter_s"),
    [("address-list", 0.0), ("address-list", 0.004), ("address-list", 0.011), ("one-target", 0.004)],
)
def test_sigkill_of_the_serving_replica_loses_and_repeats_nothing(
    pair, tokens, model_repository, clean_redis, routing, jitter_s
):
    """`address-list`: the client's own failover list. `one-target`: one gRPC target that resolves to every
    replica (as `dns:///rnnserve-headless...` does in the cluster), pinned by gRPC's pick_first policy."""
    a, b = pair
    addresses = [a.address, b.address] if routing == "address-list" else [f"ipv4:{a.address},{b.address}"]
    outputs, at = stream_with_failure(addresses, tokens, a.kill, jitter_s)
    assert a.process.returncode == -9 and at < CHUNKS
    assert_exact_history(outputs, reference_logits(model_repository, tokens))
    assert stored_session(clean_redis) == (CHUNKS, "b")


@pytest.mark.parametrize(
    "pair",
    [{"lease_s": LONG_LEASE_S}, {"lease_s": LONG_LEASE_S, "store_flush_every": 7}],
    indirect=True,
    ids=["flush-every-step", "flush-every-7"],
)
def test_sigterm_drains_hands_over_and_exits_cleanly(request, pair, tokens, model_repository, clean_redis):
    """With a long lease: the handover is immediate only because the draining replica released its leases.
    With store_flush_every=7 nothing is lost either: the drain flushes the unsaved steps."""
    a, b = pair
    drain_took: list[float] = []
    started = time.monotonic()

    def drain() -> None:
        t0 = time.monotonic()
        a.terminate()
        a.process.wait(30)
        drain_took.append(time.monotonic() - t0)

    outputs, at = stream_with_failure([a.address, b.address], tokens, drain)
    assert a.process.returncode == 0, a.log_text()
    # The kubelet SIGKILLs after terminationGracePeriodSeconds, which the manifests set above drain_grace_s:
    # that only protects the drain if the server really finishes within drain_grace_s.
    assert drain_took[0] < DRAIN_GRACE_S + 2, f"drain took {drain_took[0]:.1f} s"
    assert time.monotonic() - started < LONG_LEASE_S / 2, (
        "b waited for the lease to lapse: it was not released"
    )
    assert at < CHUNKS
    assert_exact_history(outputs, reference_logits(model_repository, tokens))
    flush_every = request.node.callspec.params["pair"].get("store_flush_every", 1)
    seq, owner = stored_session(clean_redis)
    # b, still serving, may not have flushed its last < N steps yet.
    assert owner == "b" and 0 <= CHUNKS - seq < flush_every
    assert "draining" in a.log_text()


def _step(
    stub: pb_grpc.RecurrentServiceStub, session_id: str, seq: int, chunk: np.ndarray
) -> pb.StepResponse:
    request = pb.StepRequest(
        session_id=session_id, seq=seq, inputs=[wire.array_to_tensor("tokens", chunk)]
    )
    return stub.Step(request, timeout=10)


@pytest.mark.parametrize("pair", [{"lease_s": 2.0}], indirect=True)
def test_two_replicas_never_advance_one_session(pair, tokens, model_repository, clean_redis):
    """`a` keeps stepping a session while `b` is asked to step it too: `b` waits up to one lease for the
    lease to lapse, but `a` renews it with every step, so `b` refuses and `a`'s history stays intact."""
    a, b = pair
    answers: list[pb.StepResponse] = []
    b_done = threading.Event()
    errors: list[BaseException] = []
    with grpc.insecure_channel(a.address) as ca, grpc.insecure_channel(b.address) as cb:
        stub_a, stub_b = pb_grpc.RecurrentServiceStub(ca), pb_grpc.RecurrentServiceStub(cb)
        sid = stub_a.CreateSession(pb.CreateSessionRequest(model=MODEL), timeout=10).session_id

        def owner() -> None:
            try:
                extra = 3
                while extra and len(answers) < CHUNKS:
                    seq = len(answers) + 1
                    answers.append(_step(stub_a, sid, seq, tokens[(seq - 1) * CHUNK_T : seq * CHUNK_T]))
                    time.sleep(0.02)
                    extra -= b_done.is_set()
            except BaseException as exc:
                errors.append(exc)

        stepping = threading.Thread(target=owner)
        stepping.start()
        while not answers:
            time.sleep(0.01)
        with pytest.raises(grpc.RpcError) as refused:
            _step(stub_b, sid, 2, tokens[CHUNK_T : 2 * CHUNK_T])
        b_done.set()
        stepping.join(60)
    assert not errors, errors[0]
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value
    assert "owned by another live replica" in refused.value.details()
    n = len(answers)
    assert [r.seq for r in answers] == list(range(1, n + 1)) and n > 3
    got = np.concatenate([wire.tensor_to_array(r.outputs[0], "output") for r in answers])
    np.testing.assert_allclose(
        got, reference_logits(model_repository, tokens[: n * CHUNK_T]), rtol=0, atol=1e-5
    )
    assert stored_session(clean_redis) == (n, "a")


def test_a_retry_whose_reply_was_lost_is_answered_from_the_store(pair, tokens, clean_redis):
    """store_flush_every=1 persists before replying: the dead owner's last reply is kept, not re-run."""
    a, b = pair
    with grpc.insecure_channel(a.address) as ca, grpc.insecure_channel(b.address) as cb:
        stub_a, stub_b = pb_grpc.RecurrentServiceStub(ca), pb_grpc.RecurrentServiceStub(cb)
        sid = stub_a.CreateSession(pb.CreateSessionRequest(model=MODEL), timeout=10).session_id
        _step(stub_a, sid, 1, tokens[:CHUNK_T])
        answered = _step(stub_a, sid, 2, tokens[CHUNK_T : 2 * CHUNK_T])
        a.kill()  # the client "never saw" seq 2's reply and retries it elsewhere
        deadline = time.monotonic() + 10 * LEASE_S
        while True:
            try:
                retried = _step(stub_b, sid, 2, tokens[CHUNK_T : 2 * CHUNK_T])
                break
            except grpc.RpcError as err:  # the dead owner's lease has not lapsed yet
                if err.code() not in (grpc.StatusCode.ABORTED, grpc.StatusCode.UNAVAILABLE):
                    raise
                assert time.monotonic() < deadline, f"b never took over: {err.details()}"
                time.sleep(0.1)
        assert retried.seq == 2
        assert retried.cached, "the retried seq was applied again instead of answered from the stored reply"
        want = wire.tensor_to_array(answered.outputs[0], "output")
        np.testing.assert_array_equal(wire.tensor_to_array(retried.outputs[0], "output"), want)
        # ... and the history goes on from there.
        assert _step(stub_b, sid, 3, tokens[2 * CHUNK_T : 3 * CHUNK_T]).seq == 3


def test_in_memory_default_needs_no_redis(tmp_path, model_repository, tokens):
    """store=memory (the default) starts and serves with no Redis reachable anywhere."""
    nowhere = f"redis://127.0.0.1:{free_port()}/0"
    replica = start_replica("solo", tmp_path, model_repository, store="memory", redis_url=nowhere)
    try:
        with Client(replica.address) as client, client.session(MODEL) as session:
            outs = [session.step(tokens[i * CHUNK_T : (i + 1) * CHUNK_T])["logits"] for i in range(10)]
        expected = reference_logits(model_repository, tokens[: 10 * CHUNK_T])
        np.testing.assert_allclose(np.concatenate(outs), expected, rtol=0, atol=1e-5)
        # The serving process never loads torch (the image has none).
        assert "libtorch" not in replica.mapped_files()
    finally:
        replica.stop()


def test_redis_store_refuses_to_start_against_an_unreachable_redis(tmp_path, model_repository):
    """store=redis with a wrong URL fails fast at start-up with a clear message, not at the first step."""
    nowhere = f"redis://127.0.0.1:{free_port()}/0"
    with pytest.raises(RuntimeError, match="unreachable"):
        start_replica("lost", tmp_path, model_repository, store="redis", redis_url=nowhere)


def test_store_is_shared_by_both_replicas(pair, clean_redis):
    """Sanity: each replica's session lands in the one store (both processes really use Redis)."""
    a, b = pair

    async def holders(ids: list[str]) -> list[str | None]:
        store = RedisStore(clean_redis.url)
        try:
            return [await store.lease_holder(i) for i in ids]
        finally:
            await store.close()

    import asyncio

    ids = []
    for replica in (a, b):
        with grpc.insecure_channel(replica.address) as ch:
            stub = pb_grpc.RecurrentServiceStub(ch)
            sid = stub.CreateSession(pb.CreateSessionRequest(model=MODEL), timeout=10).session_id
            _step(stub, sid, 1, np.array([1, 2, 3], dtype=np.int64))
            ids.append(sid)
    assert asyncio.run(holders(ids)) == ["a", "b"]


def test_flush_every_n_loses_at_most_n_minus_1_steps_and_says_so(
    tmp_path, model_repository, tokens, clean_redis
):
    """store_flush_every=N: a crashed owner's last < N steps are gone; the survivor names the expected seq."""
    n = 5
    common = dict(store="redis", redis_url=clean_redis.url, store_flush_every=n, lease_s=LEASE_S)
    a = start_replica("a", tmp_path, model_repository, **common)
    b = start_replica("b", tmp_path, model_repository, **common)
    try:
        with grpc.insecure_channel(a.address) as ca, grpc.insecure_channel(b.address) as cb:
            stub_a, stub_b = pb_grpc.RecurrentServiceStub(ca), pb_grpc.RecurrentServiceStub(cb)
            sid = stub_a.CreateSession(pb.CreateSessionRequest(model=MODEL), timeout=10).session_id
            for seq in range(1, 13):
                _step(stub_a, sid, seq, tokens[(seq - 1) * CHUNK_T : seq * CHUNK_T])
            a.kill()
            deadline = time.monotonic() + 10 * LEASE_S
            while True:
                try:
                    info = stub_b.DescribeSession(pb.SessionRequest(session_id=sid), timeout=10)
                    break
                except grpc.RpcError as err:
                    if err.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
            assert info.last_seq == 10, "the last flush was after seq 10"
            assert 12 - info.last_seq < n
            with pytest.raises(grpc.RpcError) as err:
                _step(stub_b, sid, 13, tokens[12 * CHUNK_T : 13 * CHUNK_T])
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "expected seq 11" in err.value.details()
    finally:
        a.stop()
        b.stop()


def test_many_concurrent_sessions_survive_a_crash(pair, model_repository, clean_redis):
    """Six sessions stream at once (batched together); half start on `a`, half on `b`; `a` is SIGKILLed."""
    a, b = pair
    n_sessions, n_chunks = 6, 40
    rng = np.random.default_rng(11)
    vocab = reference_logits(model_repository, np.zeros(1, dtype=np.int64)).shape[-1]
    seqs = [rng.integers(0, vocab, size=n_chunks * CHUNK_T, dtype=np.int64) for _ in range(n_sessions)]
    results: dict[int, list[np.ndarray]] = {}
    errors: list[BaseException] = []
    halfway = threading.Barrier(n_sessions + 1)

    def run(i: int) -> None:
        order = [a.address, b.address] if i % 2 == 0 else [b.address, a.address]
        try:
            with Client(order) as client:
                session = client.session(MODEL)
                outs = []
                for k in range(n_chunks):
                    if k == n_chunks // 2:
                        halfway.wait(30)
                    outs.append(session.step(seqs[i][k * CHUNK_T : (k + 1) * CHUNK_T])["logits"])
                results[i] = outs
        except BaseException as exc:  # reported below with the replica logs
            errors.append(exc)
            halfway.abort()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n_sessions)]
    for t in threads:
        t.start()
    halfway.wait(30)
    a.kill()
    for t in threads:
        t.join(120)
    assert not errors, f"{errors[0]!r}\n--- b:\n{b.log_text()[-3000:]}"
    for i in range(n_sessions):
        expected = reference_logits(model_repository, seqs[i])
        np.testing.assert_allclose(np.concatenate(results[i]), expected, rtol=0, atol=1e-5)
    assert "resumed session" in b.log_text()
