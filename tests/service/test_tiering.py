"""Idle-session tiering on real servers: spill to disk, resume on the next call, bit for bit; the disk budget;
DescribeSession's tier and time left; slab memory that comes back after a burst of sessions closes."""

from __future__ import annotations

import re
import time
import urllib.request

import fixtures
import grpc
import numpy as np
import psutil
import pytest
from server_thread import ServerProcess, ServerThread, make_settings

from service import wire
from service.client import Client
from service.proto import rnnserve_pb2 as pb
from service.proto import rnnserve_pb2_grpc as pb_grpc

MODEL = "tiny_lstm2"  # 2 layers: h and c state tensors of (2, 6) each
SPILL_AFTER = 0.2


@pytest.fixture(scope="module")
def spilling(model_repository):
    srv = ServerThread(make_settings(model_repository, spill_after_s=SPILL_AFTER, spill_batch=4))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def resident(model_repository):
    srv = ServerThread(make_settings(model_repository, spill_after_s=0))
    yield srv
    srv.stop()


def _wait_tier(client: Client, session_id: str, tier: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while (got := client.describe_session(session_id).tier) != tier:
        assert time.monotonic() < deadline, f"session {session_id} still {got!r}, expected {tier!r}"
        time.sleep(0.02)


def _metric(srv: ServerThread, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{srv.running.metrics_port}/metrics", timeout=5).read()
    found = re.search(rf"^{name} (\S+)$", text.decode(), re.M)
    return float(found.group(1)) if found else 0.0


def test_spill_and_resume_equal_a_session_that_never_left(spilling, resident):
    rng = np.random.default_rng(7)
    chunks = [rng.integers(0, 8, size=int(rng.integers(1, 6) if i % 2 else 1)) for i in range(8)]
    with Client(spilling.address) as c1, Client(resident.address) as c2:
        s1, s2 = c1.session(MODEL), c2.session(MODEL)
        for chunk in chunks:
            _wait_tier(c1, s1.id, "spilled")
            out1, out2 = s1.step(chunk), s2.step(chunk)
            assert out1.keys() == out2.keys()
            for name in out1:
                assert out1[name].dtype == out2[name].dtype and out1[name].tobytes() == out2[name].tobytes()
        assert c2.describe_session(s2.id).tier == "resident"
        # The cached answer of the last chunk survives a spill: a retry of the same seq gets it back.
        _wait_tier(c1, s1.id, "spilled")
        tensors = wire.arrays_to_tensors({"tokens": chunks[-1]})
        retry = c1.stub.Step(pb.StepRequest(session_id=s1.id, seq=s1.seq, inputs=tensors))
        assert retry.cached
        assert wire.tensors_to_arrays(retry.outputs)["logits"].tobytes() == out1["logits"].tobytes()
        info = c1.describe_session(s1.id)
        assert info.steps == sum(len(c) for c in chunks) and info.last_seq == len(chunks)
        s1.close()
        s2.close()
    assert _metric(spilling, "rnnserve_unspills_total") >= len(chunks)


def test_describe_reports_tier_and_time_left_without_resuming(spilling):
    with Client(spilling.address) as client:
        s = client.session(MODEL, idle_ttl_s=30)
        s.step(np.array([1, 2]))
        info = client.describe_session(s.id)
        assert info.tier == "resident" and 29 < info.time_left_s <= 30
        _wait_tier(client, s.id, "spilled")
        for _ in range(3):  # describing reads the record: the session stays on disk
            info = client.describe_session(s.id)
            assert info.tier == "spilled" and 25 < info.time_left_s < 30
            assert info.expires_at == pytest.approx(info.last_used + 30, abs=1e-3)
        s.step(np.array([3]))
        info = client.describe_session(s.id)
        assert info.tier == "resident" and info.time_left_s > 29 and info.steps == 3
        s.close()
        _wait_tier_gone = client.describe_session
        with pytest.raises(grpc.RpcError) as err:
            _wait_tier_gone(s.id)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and "closed" in err.value.details()


def test_closing_and_expiring_spilled_sessions(spilling):
    with Client(spilling.address) as client:
        closed = client.session(MODEL)
        expiring = client.session(MODEL, idle_ttl_s=1.0)
        for s in (closed, expiring):
            s.step(np.array([1]))
            _wait_tier(client, s.id, "spilled")
        closed.close()  # straight from disk: never loaded back
        time.sleep(1.2)
        for s, reason in ((closed, "closed"), (expiring, "idle")):
            with pytest.raises(grpc.RpcError) as err:
                client.describe_session(s.id)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            assert f"reason: {reason}" in err.value.details()


def test_a_session_with_a_step_in_flight_is_not_spilled(spilling):
    """Spill during a step: the spiller skips a busy session; its step lands, then it spills and resumes."""

    async def hold_and_spill(session_id: str) -> tuple[bool, str]:
        engine = spilling.running.engine
        manager = engine.session_manager
        async with manager.exclusive(session_id) as s:  # the session is busy, as during a step
            s.last_used -= 60  # idle for long by its clock
            tiering, now = manager.tiering, time.monotonic()
            moved = tiering.spill(tiering.candidates(now, 1000), now)
            busy_stays = manager.table.sessions.get(session_id) is s
        return busy_stays, engine.describe(session_id).tier if moved >= 0 else ""

    with Client(spilling.address) as client:
        s = client.session(MODEL)
        first = s.step(np.array([4, 5]))
        stays, tier = spilling.call(hold_and_spill(s.id))
        assert stays and tier == "resident"
        # A step racing the spiller: submitted while the spiller runs every 20 ms.
        outs = [s.step(np.array([i % 8])) for i in range(20)]
        _wait_tier(client, s.id, "spilled")
        again = s.step(np.array([1]))
        assert first["logits"].shape[-1] == again["logits"].shape[-1] and len(outs) == 20
        s.close()


def test_disk_budget_full_keeps_sessions_resident(model_repository):
    srv = ServerThread(
        make_settings(model_repository, spill_after_s=SPILL_AFTER, spill_max_bytes=3 * 1024, spill_batch=16)
    )
    try:
        with Client(srv.address) as client:
            sessions = [client.session(MODEL) for _ in range(12)]
            for s in sessions:
                s.step(np.array([1]))
            deadline = time.monotonic() + 10
            while _metric(srv, 'rnnserve_spill_refusals_total{reason="disk_full"}') == 0:
                assert time.monotonic() < deadline, "the spiller never hit its disk budget"
                time.sleep(0.05)
            tiers = [client.describe_session(s.id).tier for s in sessions]
            assert "spilled" in tiers and "resident" in tiers  # some fit the 3 KiB budget, the rest stayed
            assert _metric(srv, "rnnserve_spill_disk_bytes") <= 3 * 1024
            assert _metric(srv, "rnnserve_spilled_sessions") == tiers.count("spilled")
            for s in sessions:  # every session still works, wherever it sits
                s.step(np.array([2]))
                s.close()
    finally:
        srv.stop()


def test_slab_memory_comes_back_after_a_burst_closes(tmp_path):
    """A real server process: 20,000 sessions of a wide LSTM (4 KiB of state each), stepped, then closed."""
    repo = tmp_path / "repo"
    fixtures.token_lstm(repo, "wide", hidden=256, layers=2)
    srv = ServerProcess(repo, "--spill-after-s", "0")
    tokens = np.array([1, 2], dtype=np.int64)
    try:
        proc = psutil.Process(srv.proc.pid)
        with grpc.insecure_channel(srv.address) as ch:
            stub = pb_grpc.RecurrentServiceStub(ch)

            def burst(n: int) -> list[str]:
                ids = []
                for _ in range(n // 500):
                    new = pb.CreateSessionRequest(model="wide")
                    batch = [stub.CreateSession(new).session_id for _ in range(500)]
                    req = pb.StepManyRequest(
                        session_ids=batch,
                        seqs=[1] * len(batch),
                        inputs=wire.arrays_to_tensors({"tokens": np.tile(tokens, (len(batch), 1))}),
                    )
                    (resp,) = list(stub.StreamMany(iter([req])))
                    assert not any(resp.codes), resp.messages
                    ids += batch
                return ids

            for sid in burst(1000):  # warm-up: arenas, batch buffers, gRPC, the first slab block
                stub.Close(pb.SessionRequest(session_id=sid))
            rss0 = proc.memory_info().rss
            ids = burst(20_000)
            rss1 = proc.memory_info().rss
            for sid in ids:
                stub.Close(pb.SessionRequest(session_id=sid))
            # The slab's blocks go at once; what the sessions left for the collector goes once the live work
            # has stayed a quarter below its peak for a second: a full collection, then a heap trim.
            deadline = time.monotonic() + 5.0
            while (rss2 := proc.memory_info().rss) > rss0 * 1.2 and time.monotonic() < deadline:
                time.sleep(0.25)
    finally:
        srv.stop()
    grown = rss1 - rss0
    assert grown > 20_000 * 4096 * 0.9, (rss0, rss1)  # the burst really held its state in memory
    assert rss2 <= rss0 * 1.2, f"RSS {rss2 >> 20} MiB after close, {rss0 >> 20} MiB before the burst"


def test_store_mode_spill_drops_the_resident_copy_and_resumes_from_the_store(model_repository):
    """With a persistent store, spilling is dropping a saved session's resident copy; the store resumes it."""
    import asyncio

    from engine_harness import eventually, metric, run_engine

    from service.stores.base import InMemoryStore

    async def body(engine):
        info = await engine.create_session(MODEL)
        sid = info.session_id
        first = await engine.step(sid, 1, {"tokens": np.array([1, 2], np.int64)})
        await eventually(lambda: sid not in engine.sessions.sessions)
        assert metric(engine, "rnnserve_spills_total", {"tier": "store"}) >= 1
        assert not engine.session_manager.tiering.files  # nothing on local disk: the store holds it
        again = await engine.step(sid, 1, {"tokens": np.array([1, 2], np.int64)})  # a retry: cached answer
        assert again.cached and again.outputs["logits"].tobytes() == first.outputs["logits"].tobytes()
        nxt = await engine.step(sid, 2, {"tokens": np.array([3], np.int64)})
        await asyncio.sleep(0)
        return nxt.seq

    assert run_engine(model_repository, body, InMemoryStore(persistent=True), spill_after_s=0.1) == 2


def test_model_config_overrides_spill_after_s(tmp_path):
    from service.config import Settings
    from service.core.types import ContractError, ModelConfig

    settings = Settings(model_repository=tmp_path, spill_after_s=60)
    assert ModelConfig.from_settings(settings).spill_after_s == 60
    assert ModelConfig.from_settings(settings, {"spill_after_s": 0}).spill_after_s == 0
    assert ModelConfig.from_settings(settings, {"spill_after_s": 2.5}).spill_after_s == 2.5
    for bad in (-1, "soon", True):
        with pytest.raises(ContractError, match="spill_after_s must be a number of seconds"):
            ModelConfig.from_settings(settings, {"spill_after_s": bad})
