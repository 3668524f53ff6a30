"""Engine-level tests: real ONNX Runtime on tiny fixture models, no server."""

from __future__ import annotations

import asyncio
import shutil

import fixtures
import numpy as np
import pytest
from engine_harness import eventually, metric, run_engine

from service.core.engine import Engine
from service.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    ResourceExhausted,
    Unavailable,
)
from service.stores import snapshot

RNG = np.random.default_rng(7)


def tokens(n: int, vocab: int = 39) -> np.ndarray:
    return RNG.integers(0, vocab, n).astype(np.int64)


def oracle(repo, model: str, version: int, name: str, seq: np.ndarray, **states) -> np.ndarray:
    """ONNX Runtime directly on the whole sequence (batch of one), the test oracle."""
    out = fixtures.run_whole(repo / model / str(version) / "model.onnx", {name: seq[None]}, states or None)
    return next(v for k, v in out.items() if not k.startswith("state_out_"))[0]


def cut(n: int, pieces: int) -> list[int]:
    points = sorted(RNG.choice(np.arange(1, n), pieces - 1, replace=False).tolist())
    return [0, *points, n]


@pytest.mark.parametrize("model", ["tiny_lstm", "tiny_lstm2"])
def test_chunked_stream_equals_whole_sequence_token(model_repository, model):
    seq = tokens(50)
    want = oracle(model_repository, model, 1, "tokens", seq)

    async def body(engine: Engine):
        sid = (await engine.create_session(model)).session_id
        bounds = cut(len(seq), 7)
        outs = []
        for i, (a, b) in enumerate(zip(bounds, bounds[1:], strict=False), start=1):
            r = await engine.step(sid, i, {"tokens": seq[a:b]})
            assert r.seq == i and not r.cached
            outs.append(r.outputs["logits"])
        return np.concatenate(outs)

    got = run_engine(model_repository, body)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_chunked_stream_equals_whole_sequence_numeric(model_repository):
    x = RNG.normal(size=(40, 3)).astype(np.float32)
    want = oracle(model_repository, "tiny_gru", 1, "x", x)

    async def body(engine: Engine):
        sid = (await engine.create_session("tiny_gru")).session_id
        outs = [(await engine.step(sid, i + 1, {"x": x[i : i + 1]})).outputs["y"] for i in range(10)]
        outs.append((await engine.step(sid, 11, {"x": x[10:]})).outputs["y"])
        return np.concatenate(outs)

    np.testing.assert_allclose(run_engine(model_repository, body), want, atol=1e-5)


def test_model_without_time_axis_accumulates(model_repository):
    async def body(engine: Engine):
        spec = engine.get_model("accumulator")
        assert not spec.time_axis and [s.name for s in spec.states] == ["acc"]
        sid = (await engine.create_session("accumulator")).session_id
        ys = [
            int((await engine.step(sid, i, {"x": np.array([i], np.int32)})).outputs["y"][0])
            for i in range(1, 6)
        ]
        return ys

    assert run_engine(model_repository, body) == [1, 3, 6, 10, 15]


def test_initial_state_from_metadata(tmp_path):
    init_c = RNG.normal(size=(1, 8)).astype(np.float32)
    fixtures.token_lstm(tmp_path, "init", initial_c=init_c)
    seq = tokens(9)
    want = oracle(tmp_path, "init", 1, "tokens", seq, c=init_c[None])
    zero = oracle(tmp_path, "init", 1, "tokens", seq)
    assert not np.allclose(want, zero)

    async def body(engine: Engine):
        sid = (await engine.create_session("init")).session_id
        a = (await engine.step(sid, 1, {"tokens": seq[:4]})).outputs["logits"]
        b = (await engine.step(sid, 2, {"tokens": seq[4:]})).outputs["logits"]
        await engine.reset(sid)  # reset goes back to the declared initial state, not zeros
        again = (await engine.step(sid, 1, {"tokens": seq})).outputs["logits"]
        stateless = await engine.infer_stateless("init", None, {"tokens": seq[None]})
        return np.concatenate([a, b]), again, stateless["logits"][0]

    got, again, stateless = run_engine(tmp_path, body)
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(again, want, atol=1e-5)
    np.testing.assert_allclose(stateless, want, atol=1e-5)


def test_concurrent_interleaved_sessions_equal_each_alone(model_repository):
    """Many sessions, chunks of different lengths in the same batch windows: batching never mixes state."""
    n_sessions, n_chunks = 24, 6
    streams = [tokens(int(RNG.integers(n_chunks, 40))) for _ in range(n_sessions)]
    plans = [cut(len(s), n_chunks) for s in streams]
    wants = [oracle(model_repository, "tiny_lstm2", 1, "tokens", s) for s in streams]

    async def body(engine: Engine):
        async def one(i: int):
            sid = (await engine.create_session("tiny_lstm2")).session_id
            outs = []
            for k, (a, b) in enumerate(zip(plans[i], plans[i][1:], strict=False), start=1):
                outs.append((await engine.step(sid, k, {"tokens": streams[i][a:b]})).outputs["logits"])
                await asyncio.sleep(0)
            return np.concatenate(outs)

        got = await asyncio.gather(*(one(i) for i in range(n_sessions)))
        labels = {"model": "tiny_lstm2", "version": "1"}
        batches = metric(engine, "rnnserve_batch_size_count", labels)
        sessions_in_batches = metric(engine, "rnnserve_batch_size_sum", labels)
        return got, batches, sessions_in_batches

    got, batches, total = run_engine(model_repository, body)
    for g, w in zip(got, wants, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-5)
    assert total == n_sessions * n_chunks
    assert batches < total  # some runs really carried several sessions


def test_batches_group_equal_shapes_only(model_repository):
    """Requests of several chunk lengths queued together are run as exact groups (no padding)."""

    async def body(engine: Engine):
        sids = [(await engine.create_session("tiny_lstm")).session_id for _ in range(12)]
        lengths = [1, 3, 5] * 4
        seqs = [tokens(t) for t in lengths]
        results = await asyncio.gather(
            *(engine.step(s, 1, {"tokens": q}) for s, q in zip(sids, seqs, strict=True))
        )
        for q, r in zip(seqs, results, strict=True):
            assert r.outputs["logits"].shape == (len(q), 39)
            np.testing.assert_allclose(
                r.outputs["logits"], oracle(model_repository, "tiny_lstm", 1, "tokens", q), atol=1e-5
            )

    run_engine(model_repository, body)


def test_exactly_once_retry_and_seq_errors(model_repository):
    seq = tokens(12)
    want = oracle(model_repository, "tiny_lstm", 1, "tokens", seq)

    async def body(engine: Engine):
        sid = (await engine.create_session("tiny_lstm")).session_id
        first = await engine.step(sid, 1, {"tokens": seq[:5]})
        retry = await engine.step(sid, 1, {"tokens": seq[:5]})
        assert retry.cached and retry.seq == 1
        np.testing.assert_array_equal(retry.outputs["logits"], first.outputs["logits"])
        last = await engine.step(sid, 1, {"tokens": seq[:5]}, last_only=True)
        assert last.outputs["logits"].shape == (1, 39)
        with pytest.raises(FailedPrecondition, match="expected seq 2"):
            await engine.step(sid, 3, {"tokens": seq[5:]})
        second = await engine.step(sid, 2, {"tokens": seq[5:]})
        with pytest.raises(FailedPrecondition, match="expected seq 3"):
            await engine.step(sid, 1, {"tokens": seq[:5]})
        with pytest.raises(InvalidArgument, match="expected seq 3"):
            await engine.step(sid, 0, {"tokens": seq[:5]})
        assert engine.describe(sid).last_seq == 2 and engine.describe(sid).steps == 12
        return np.concatenate([first.outputs["logits"], second.outputs["logits"]])

    np.testing.assert_allclose(run_engine(model_repository, body), want, atol=1e-5)


def test_bad_inputs_are_typed_and_leave_state_unchanged(model_repository):
    x = RNG.normal(size=(6, 3)).astype(np.float32)
    want = oracle(model_repository, "tiny_gru", 1, "x", x)

    async def body(engine: Engine):
        sid = (await engine.create_session("tiny_gru")).session_id
        a = (await engine.step(sid, 1, {"x": x[:3]})).outputs["y"]
        bad = [
            ({"z": x[3:]}, InvalidArgument, "expected x"),
            ({"x": x[3:], "extra": x[3:]}, InvalidArgument, "unexpected"),
            ({"x": x[3:].astype(np.float64)}, InvalidArgument, "expected float32"),
            ({"x": x[3:, :2]}, InvalidArgument, r"expected \(T, 3\)"),
            ({"x": x[3]}, InvalidArgument, "shape"),
            ({"x": np.zeros((0, 3), np.float32)}, InvalidArgument, "at least one step"),
            ({"x": np.full((2, 3), np.nan, np.float32)}, InvalidArgument, "finite"),
            ({"x": np.zeros((5000, 3), np.float32)}, OutOfRange, "max_chunk_steps"),
            ({"x": x[3:], "state_in_h": np.zeros((1, 6), np.float32)}, InvalidArgument, "server holds"),
        ]
        for inputs, exc, msg in bad:
            with pytest.raises(exc, match=msg):
                await engine.step(sid, 2, inputs)
        with pytest.raises(NotFound, match="unknown session"):
            await engine.step("nope", 1, {"x": x})
        with pytest.raises(NotFound, match="unknown model"):
            await engine.create_session("missing")
        with pytest.raises(NotFound, match="version 7"):
            await engine.create_session("tiny_gru", 7)
        with pytest.raises(OutOfRange, match="maximum"):
            await engine.create_session("tiny_gru", idle_ttl_s=10**9)
        with pytest.raises(InvalidArgument, match="shape"):
            await engine.create_session("tiny_gru", initial_state={"h": np.zeros((2, 6), np.float32)})
        assert engine.describe(sid).last_seq == 1
        b = (await engine.step(sid, 2, {"x": x[3:]})).outputs["y"]
        return np.concatenate([a, b])

    np.testing.assert_allclose(run_engine(model_repository, body), want, atol=1e-5)


def test_idle_ttl_and_lifetime_expiry_name_the_reason(model_repository):
    async def body(engine: Engine):
        short = (await engine.create_session("accumulator", idle_ttl_s=0.2)).session_id
        long = (await engine.create_session("accumulator", idle_ttl_s=60)).session_id
        await eventually(lambda: short not in engine.sessions.sessions)
        with pytest.raises(NotFound, match="reason: idle"):
            await engine.step(short, 1, {"x": np.array([1], np.int32)})
        assert long in engine.sessions.sessions
        assert (
            metric(engine, "rnnserve_sessions_ended_total", {"model": "accumulator", "reason": "idle"}) == 1
        )

    run_engine(model_repository, body)

    async def lifetime(engine: Engine):
        sid = (await engine.create_session("accumulator", idle_ttl_s=60)).session_id
        n = 0
        while sid in engine.sessions.sessions:  # an active session still ends at max_lifetime_s
            n += 1
            await engine.step(sid, n, {"x": np.array([1], np.int32)})
            await asyncio.sleep(0.02)
        with pytest.raises(NotFound, match="reason: lifetime") as err:
            engine.describe(sid)
        assert err.value.reason == "lifetime"

    run_engine(model_repository, lifetime, max_lifetime_s=0.3)


def test_capacity_refuse_and_evict(model_repository):
    async def refuse(engine: Engine):
        await engine.create_session("accumulator")
        await engine.create_session("tiny_gru")
        with pytest.raises(ResourceExhausted, match="max_sessions"):
            await engine.create_session("accumulator")

    run_engine(model_repository, refuse, max_sessions=2)

    async def evict(engine: Engine):
        a = (await engine.create_session("accumulator")).session_id
        b = (await engine.create_session("accumulator")).session_id
        await engine.step(a, 1, {"x": np.array([1], np.int32)})  # a is now the most recently used
        c = (await engine.create_session("accumulator")).session_id
        with pytest.raises(NotFound, match="reason: capacity") as err:
            await engine.step(b, 1, {"x": np.array([1], np.int32)})
        assert err.value.reason == "capacity"
        assert {a, c} <= set(engine.sessions.sessions)

    run_engine(model_repository, evict, max_sessions=2, evict_on_capacity=True)


def test_per_model_capacity_from_config_yaml(tmp_path):
    fixtures.accumulator(tmp_path, "acc")
    fixtures.accumulator(tmp_path, "other")
    (tmp_path / "acc" / "config.yaml").write_text("max_sessions: 1\nidle_ttl_s: 5\ndescription: capped\n")

    async def body(engine: Engine):
        spec = engine.get_model("acc")
        assert spec.config.max_sessions == 1 and spec.config.idle_ttl_s == 5 and spec.description == "capped"
        info = await engine.create_session("acc")
        assert info.idle_ttl_s == 5
        with pytest.raises(ResourceExhausted, match="'acc' at capacity"):
            await engine.create_session("acc")
        await engine.create_session("other")  # other models are unaffected
        await engine.close(info.session_id)
        await engine.create_session("acc")

    run_engine(tmp_path, body)


def test_version_pinning_across_reload_and_unload(tmp_path):
    fixtures.token_lstm(tmp_path, "m", 1, seed=1)
    seq = tokens(10)
    want_v1 = oracle(tmp_path, "m", 1, "tokens", seq)

    async def body(engine: Engine):
        old = (await engine.create_session("m")).session_id
        a = (await engine.step(old, 1, {"tokens": seq[:4]})).outputs["logits"]
        fixtures.token_lstm(tmp_path, "m", 2, seed=2)
        change = engine.reload()
        assert [mv.spec.version for mv in change.loaded] == [2]
        assert engine.get_model("m").version == 2 and engine.get_model("m").versions == (1, 2)
        new = await engine.create_session("m")
        assert new.version == 2 and engine.describe(old).version == 1
        b = (await engine.step(old, 2, {"tokens": seq[4:]})).outputs["logits"]
        v2 = (await engine.step(new.session_id, 1, {"tokens": seq})).outputs["logits"]
        assert len(engine.repository.loaded()) == 2
        assert metric(engine, "rnnserve_model_versions_loaded") == 2
        await engine.close(old)
        await eventually(lambda: len(engine.repository.loaded()) == 1)
        assert engine.repository.loaded()[0].spec.version == 2
        want_v2 = oracle(tmp_path, "m", 2, "tokens", seq)
        shutil.rmtree(tmp_path / "m")
        engine.reload()  # a removed model takes no new sessions; its open session keeps working
        with pytest.raises(NotFound):
            await engine.create_session("m")
        await engine.step(new.session_id, 2, {"tokens": seq[:1]})
        return np.concatenate([a, b]), v2, want_v2

    got_v1, got_v2, want_v2 = run_engine(tmp_path, body)
    np.testing.assert_allclose(got_v1, want_v1, atol=1e-5)
    np.testing.assert_allclose(got_v2, want_v2, atol=1e-5)
    assert not np.allclose(got_v1, got_v2)


def test_snapshot_round_trip_and_tamper_detection(model_repository):
    seq = tokens(20)

    async def body(engine: Engine):
        sid = (await engine.create_session("tiny_lstm")).session_id
        await engine.step(sid, 1, {"tokens": seq[:8]})
        blob = await engine.get_state(sid)
        after = (await engine.step(sid, 2, {"tokens": seq[8:]})).outputs["logits"]
        info = await engine.set_state(sid, blob)
        assert info.last_seq == 1
        cached = await engine.step(sid, 1, {"tokens": seq[:8]})  # the snapshot carries the cached result too
        assert cached.cached
        again = (await engine.step(sid, 2, {"tokens": seq[8:]})).outputs["logits"]
        np.testing.assert_array_equal(after, again)
        other = (await engine.create_session("tiny_lstm")).session_id
        await engine.set_state(other, blob)  # restore into another session of the same model version
        np.testing.assert_array_equal(
            (await engine.step(other, 2, {"tokens": seq[8:]})).outputs["logits"], after
        )
        tampered = bytearray(blob)
        tampered[-40] ^= 0x01
        for bad, msg in [(bytes(tampered), "integrity"), (b"junk" * 20, "magic"), (blob[:10], "too short")]:
            with pytest.raises(InvalidArgument, match=msg):
                await engine.set_state(sid, bad)
        gru = (await engine.create_session("tiny_gru")).session_id
        with pytest.raises(InvalidArgument, match="is for model 'tiny_lstm'"):
            await engine.set_state(gru, blob)
        return blob

    blob = run_engine(model_repository, body)

    async def keyed(engine: Engine):
        sid = (await engine.create_session("tiny_lstm")).session_id
        with pytest.raises(InvalidArgument, match="integrity"):
            await engine.set_state(sid, blob)  # signed with the first server's own random key
        signed = await engine.get_state(sid)
        # A blob anyone can make (plain SHA-256) is refused (allow_unsigned_state is off by default).
        raw = snapshot.encode(snapshot.decode(signed, b"secret"), None)
        with pytest.raises(InvalidArgument, match="not signed with this server's key"):
            await engine.set_state(sid, raw)
        await engine.set_state(sid, signed)
        return signed

    signed = run_engine(model_repository, keyed, state_hmac_key="secret")

    async def other_key(engine: Engine):
        sid = (await engine.create_session("tiny_lstm")).session_id
        with pytest.raises(InvalidArgument, match="integrity"):
            await engine.set_state(sid, signed)

    run_engine(model_repository, other_key, state_hmac_key="another secret")


def test_raw_state_import_only_when_allowed_and_forged_fields_are_refused(model_repository):
    async def body(engine: Engine):
        sid = (await engine.create_session("tiny_lstm")).session_id
        await engine.step(sid, 1, {"tokens": tokens(4)})
        rec = snapshot.decode(await engine.get_state(sid), b"k")
        await engine.set_state(sid, snapshot.encode(rec, None))  # a raw (unsigned) import: allowed here
        for field, value, msg in [
            ("last_seq", 2**64, "last_seq"),
            ("last_seq", -3, "last_seq"),
            ("last_outputs", {"logits": np.zeros((2, 7), np.float32)}, "caches output 'logits'"),
            ("last_outputs", {"nope": np.zeros((2, 39), np.float32)}, "caches outputs"),
        ]:
            forged = snapshot.decode(snapshot.encode(rec, None))
            setattr(forged, field, value)
            with pytest.raises(InvalidArgument, match=msg):
                await engine.set_state(sid, snapshot.encode(forged, None))
        assert engine.describe(sid).last_seq == 1  # nothing was applied

    run_engine(model_repository, body, state_hmac_key="k", allow_unsigned_state=True)


def test_fork_is_independent_and_reset_restarts(model_repository):
    seq = tokens(16)
    want = oracle(model_repository, "tiny_lstm", 1, "tokens", seq)

    async def body(engine: Engine):
        sid = (await engine.create_session("tiny_lstm")).session_id
        await engine.step(sid, 1, {"tokens": seq[:6]})
        child = await engine.fork(sid)
        assert child.last_seq == 0 and child.session_id != sid
        # advance the parent on a different continuation; the child must not see it
        await engine.step(sid, 2, {"tokens": tokens(5)})
        child_out = (await engine.step(child.session_id, 1, {"tokens": seq[6:]})).outputs["logits"]
        np.testing.assert_allclose(child_out, want[6:], atol=1e-5)
        info = await engine.reset(sid)
        assert info.last_seq == 0
        fresh = (await engine.step(sid, 1, {"tokens": seq})).outputs["logits"]
        np.testing.assert_allclose(fresh, want, atol=1e-5)
        await engine.close(sid)
        await engine.close(sid)  # closing twice is harmless
        with pytest.raises(NotFound, match="reason: closed"):
            await engine.step(sid, 2, {"tokens": seq})

    run_engine(model_repository, body)


def test_cancelled_step_keeps_seq_and_state_consistent(model_repository):
    seq = tokens(12)
    want = oracle(model_repository, "tiny_lstm", 1, "tokens", seq)

    async def body(engine: Engine):
        sid = (await engine.create_session("tiny_lstm")).session_id
        first = (await engine.step(sid, 1, {"tokens": seq[:4]})).outputs["logits"]
        task = asyncio.ensure_future(engine.step(sid, 2, {"tokens": seq[4:8]}))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # Either the step never ran (seq 2 is still next) or it ran fully (seq 2 is cached): never half.
        r = await engine.step(sid, 2, {"tokens": seq[4:8]})
        third = (await engine.step(sid, 3, {"tokens": seq[8:]})).outputs["logits"]
        return np.concatenate([first, r.outputs["logits"], third])

    np.testing.assert_allclose(run_engine(model_repository, body), want, atol=1e-5)


def test_generate_on_fresh_and_existing_sessions(model_repository):
    async def body(engine: Engine):
        vocab = engine.get_model("tiny_lstm").vocabulary
        fresh = [t async for t in engine.generate(model="tiny_lstm", prime_text="A:1", n=12, seed=3)]
        same = [t async for t in engine.generate(model="tiny_lstm", prime_text="A:1", n=12, seed=3)]
        assert fresh == same and len(fresh) == 12 and all(vocab[t.token_id] == t.text for t in fresh)
        assert len(engine.sessions) == 0  # the throwaway sessions are gone
        greedy = [
            t.token_id async for t in engine.generate(model="tiny_lstm", prime_ids=[1, 2], n=5, temperature=0)
        ]
        sid = (await engine.create_session("tiny_lstm")).session_id
        gen = [
            t.token_id
            async for t in engine.generate(session_id=sid, seq=1, prime_ids=[1, 2], n=5, temperature=0)
        ]
        assert gen == greedy
        replay = [
            t.token_id
            async for t in engine.generate(session_id=sid, seq=1, prime_ids=[1, 2], n=5, temperature=0)
        ]
        assert replay == gen and engine.describe(sid).last_seq == 1
        # the state consumed the prime and every generated token: continuing equals one pass over all of them
        nxt = (await engine.step(sid, 2, {"tokens": np.array([4], np.int64)})).outputs["logits"]
        whole = oracle(model_repository, "tiny_lstm", 1, "tokens", np.array([1, 2, *gen, 4], np.int64))
        np.testing.assert_allclose(nxt[-1], whole[-1], atol=1e-5)
        with pytest.raises(InvalidArgument, match="'X'"):
            async for _ in engine.generate(model="tiny_lstm", prime_text="XA", n=2):
                pass
        with pytest.raises(FailedPrecondition, match="not a token model"):
            async for _ in engine.generate(model="tiny_gru", prime_ids=[1], n=2):
                pass
        with pytest.raises(FailedPrecondition, match="expected seq 3"):
            async for _ in engine.generate(session_id=sid, seq=5, prime_ids=[1], n=2):
                pass
        top1 = [
            t.token_id
            async for t in engine.generate(model="tiny_lstm", prime_ids=[1, 2], n=5, top_k=1, seed=9)
        ]
        assert top1 == greedy  # top-1 sampling is greedy

    run_engine(model_repository, body)


def test_cancelled_generation_rolls_back(model_repository):
    async def body(engine: Engine):
        sid = (await engine.create_session("tiny_lstm")).session_id
        await engine.step(sid, 1, {"tokens": np.array([3, 4], np.int64)})
        before = await engine.get_state(sid)
        agen = engine.generate(session_id=sid, seq=2, prime_ids=[5], n=50)
        await agen.__anext__()
        await agen.aclose()
        assert engine.describe(sid).last_seq == 1
        # state is back where it was: a snapshot now equals the one before (same seq, same rows)
        assert await engine.get_state(sid) == before

    run_engine(model_repository, body)


def test_drain_refuses_new_sessions(model_repository):
    async def body(engine: Engine):
        sid = (await engine.create_session("accumulator")).session_id
        pending = asyncio.ensure_future(engine.step(sid, 1, {"x": np.array([2], np.int32)}))
        await asyncio.sleep(0)  # the step is inside the engine now, as an RPC in progress would be
        await engine.drain()
        assert int((await pending).outputs["y"][0]) == 2
        with pytest.raises(Unavailable, match="draining"):
            await engine.create_session("accumulator")

    run_engine(model_repository, body)


def test_stateless_inference_validates(model_repository):
    x = RNG.normal(size=(3, 5, 3)).astype(np.float32)

    async def body(engine: Engine):
        out = await engine.infer_stateless("tiny_gru", None, {"x": x})
        assert set(out) == {"y"} and out["y"].shape == (3, 5, 2)
        with pytest.raises(InvalidArgument, match="dtype"):
            await engine.infer_stateless("tiny_gru", None, {"x": x.astype(np.float64)})
        return out["y"]

    y = run_engine(model_repository, body)
    for i in range(3):
        np.testing.assert_allclose(y[i], oracle(model_repository, "tiny_gru", 1, "x", x[i]), atol=1e-5)


def test_metrics_are_recorded(model_repository):
    async def body(engine: Engine):
        sid = (await engine.create_session("tiny_lstm")).session_id
        await engine.step(sid, 1, {"tokens": tokens(4)})
        labels = {"model": "tiny_lstm", "version": "1"}
        assert metric(engine, "rnnserve_steps_total", labels) == 4
        assert metric(engine, "rnnserve_active_sessions", labels) == 1
        assert metric(engine, "rnnserve_state_bytes", labels) == engine.get_model("tiny_lstm").state_bytes
        assert metric(engine, "rnnserve_request_seconds_count", labels) == 1
        assert metric(engine, "rnnserve_queue_seconds_count", labels) == 1
        assert metric(engine, "rnnserve_compute_seconds_count", labels) == 1
        assert (
            metric(engine, "rnnserve_sessions_opened_total", {"model": "tiny_lstm", "protocol": "native"})
            == 1
        )
        assert metric(engine, "rnnserve_model_versions_loaded") == 4
        await engine.close(sid)
        assert metric(engine, "rnnserve_active_sessions", labels) == 0
        assert (
            metric(engine, "rnnserve_sessions_ended_total", {"model": "tiny_lstm", "reason": "closed"}) == 1
        )

    run_engine(model_repository, body)


def test_out_of_vocabulary_ids_are_refused_and_never_poison_a_batch(model_repository):
    async def body(engine: Engine):
        sids = [(await engine.create_session("tiny_lstm")).session_id for _ in range(4)]
        for bad in (np.array([1, 39], np.int64), np.array([-1], np.int64)):
            with pytest.raises(InvalidArgument, match="expected 0 <= id < 39"):
                await engine.step(sids[0], 1, {"tokens": bad})
        seqs = [tokens(3) for _ in sids]
        results = await asyncio.gather(
            *(engine.step(s, 1, {"tokens": q}) for s, q in zip(sids, seqs, strict=True))
        )
        for q, r in zip(seqs, results, strict=True):
            np.testing.assert_allclose(
                r.outputs["logits"], oracle(model_repository, "tiny_lstm", 1, "tokens", q), atol=1e-5
            )

    run_engine(model_repository, body)


def test_step_many_equals_single_steps_and_isolates_errors(model_repository):
    from service.core.engine import StepCall

    streams = [tokens(12) for _ in range(6)]
    wants = [oracle(model_repository, "tiny_lstm", 1, "tokens", q) for q in streams]

    async def body(engine: Engine):
        sids = [(await engine.create_session("tiny_lstm")).session_id for _ in streams]
        outs: list[list[np.ndarray]] = [[] for _ in streams]
        for k in range(4):  # 4 multiplexed calls of 3-step chunks; one session appears twice in the last one
            calls = [
                StepCall(sid, k + 1, {"tokens": q[3 * k : 3 * k + 3]})
                for sid, q in zip(sids, streams, strict=True)
            ]
            if k == 3:
                calls.append(StepCall(sids[0], 4, {"tokens": streams[0][9:]}))  # a retry: cached
                calls.append(StepCall(sids[1], 9, {"tokens": streams[1][:1]}))  # wrong seq: its own error
                calls.append(StepCall("gone", 1, {"tokens": streams[1][:1]}))
            results = await engine.step_many(calls)
            for i in range(len(streams)):
                outs[i].append(results[i].outputs["logits"])
            if k == 3:
                assert results[6].cached
                np.testing.assert_array_equal(results[6].outputs["logits"], results[0].outputs["logits"])
                assert isinstance(results[7], FailedPrecondition) and "expected seq 5" in results[7].message
                assert isinstance(results[8], NotFound)
        return [np.concatenate(o) for o in outs]

    for got, want in zip(run_engine(model_repository, body), wants, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)
