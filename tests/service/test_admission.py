"""Admission control in bytes: the shared memory budget and tenant quotas refuse before memory runs out."""

from __future__ import annotations

import os
import re
import time
import urllib.request
from pathlib import Path

import fixtures
import grpc
import numpy as np
import psutil
import pytest
from engine_harness import run_engine
from server_thread import ServerProcess

from service import wire
from service.core.admission import SESSION_OVERHEAD_BYTES, Quota, memory_limit_bytes
from service.core.sessions import output_row_bytes
from service.core.tenancy import CALLER, Principal
from service.errors import ResourceExhausted
from service.proto import rnnserve_pb2 as pb
from service.proto import rnnserve_pb2_grpc as pb_grpc

T = np.array([1, 2, 3, 4], dtype=np.int64)


def _charge(engine, model: str, steps: int) -> int:
    mv = engine.models.get(model, None)
    return SESSION_OVERHEAD_BYTES + mv.slab.row_bytes + steps * output_row_bytes(mv.spec)


def test_budget_refuses_new_sessions_and_longer_chunks(model_repository):
    async def body(engine):
        one = _charge(engine, "tiny_lstm", 1)
        admission = engine.session_manager.admission
        long_sid = (await engine.create_session("tiny_lstm")).session_id
        await engine.step(long_sid, 1, {"tokens": np.arange(40, dtype=np.int64) % 39})
        blob = await engine.get_state(long_sid)  # carries 40 steps of cached outputs
        await engine.close(long_sid)
        assert admission.used == 0
        admission.budget = 3 * one + one // 2  # room for three fresh sessions
        target = (await engine.create_session("tiny_lstm")).session_id
        with pytest.raises(ResourceExhausted, match="session memory budget exhausted"):
            await engine.set_state(target, blob)  # importing 40 cached steps does not fit
        assert engine.describe(target).last_seq == 0
        await engine.close(target)
        sids = [(await engine.create_session("tiny_lstm")).session_id for _ in range(3)]
        with pytest.raises(
            ResourceExhausted, match=r"session memory budget exhausted: .* \(budget: state_budget"
        ):
            await engine.create_session("tiny_lstm")
        assert admission.used == 3 * one
        # A 40-step chunk caches 40 steps of outputs: more than the room left -> refused, not applied.
        with pytest.raises(ResourceExhausted, match="cached outputs"):
            await engine.step(sids[0], 1, {"tokens": np.arange(40, dtype=np.int64) % 39})
        assert engine.describe(sids[0]).last_seq == 0
        await engine.step(sids[0], 1, {"tokens": T[:1]})  # a 1-step chunk is covered by the opening charge
        await engine.close(sids[1])
        assert admission.used == 2 * one
        await engine.create_session("tiny_lstm")  # room again
        with pytest.raises(ResourceExhausted):
            await engine.fork(sids[0])  # a fork is a new session too
        return engine.metrics

    metrics = run_engine(model_repository, body, state_budget_bytes=10**9)
    assert metrics.admission_refusals.labels("budget")._value.get() == 4


def test_tenant_quotas_sessions_bytes_and_rate(model_repository):
    async def body(engine):
        admission = engine.session_manager.admission
        one = _charge(engine, "tiny_lstm", 1)
        admission.set_quotas({"small": Quota(max_state_bytes=2 * one), "slow": Quota(max_steps_per_s=20)})
        CALLER.set(Principal("counted"))  # the settings' default quota: 2 sessions
        for _ in range(2):
            await engine.create_session("tiny_lstm")
        with pytest.raises(ResourceExhausted, match=r"tenant 'counted' has 2 open sessions.*max_sessions 2"):
            await engine.create_session("tiny_lstm")
        CALLER.set(Principal("small"))
        await engine.create_session("tiny_lstm")
        await engine.create_session("tiny_lstm")
        with pytest.raises(ResourceExhausted, match="max_state_bytes"):
            await engine.create_session("tiny_lstm")
        CALLER.set(Principal("slow"))  # 20 timesteps per second, one second of burst
        sid = (await engine.create_session("tiny_lstm")).session_id
        applied, start = 0, time.monotonic()
        with pytest.raises(ResourceExhausted, match="max_steps_per_s 20"):
            for seq in range(1, 100):
                await engine.step(sid, seq, {"tokens": T})
                applied += len(T)
        assert 20 <= applied <= 24 + 20 * (time.monotonic() - start)
        return engine.metrics

    metrics = run_engine(model_repository, body, tenant_max_sessions=2)
    for reason in ("tenant_sessions", "tenant_bytes", "tenant_rate"):
        assert metrics.admission_refusals.labels(reason)._value.get() == 1


def test_default_budget_is_a_fraction_of_the_memory_limit(model_repository):
    async def body(engine):
        return engine.session_manager.admission

    admission = run_engine(model_repository, body, state_budget_fraction=0.25)
    limit, source = memory_limit_bytes()
    assert admission.budget == int(limit * 0.25) and source in admission.source


BIG_VOCAB = tuple(chr(0x4E00 + i) for i in range(2048))


def test_server_refuses_before_memory_runs_out(tmp_path):
    """Create and step sessions (4-step chunks of a 2048-token model: ~36 KB each) until the server refuses;
    its RSS must stay under the budget plus a fixed overhead."""
    repo = tmp_path / "repo"
    fixtures.token_lstm(repo, "wide", vocab=BIG_VOCAB, hidden=256)
    budget = 48 * 1024 * 1024
    overhead = 64 * 1024 * 1024  # interpreter arenas, ORT buffers of a 64-row batch, partly used slab block
    srv = ServerProcess(repo, "--state-budget-bytes", str(budget))
    try:
        proc = psutil.Process(srv.proc.pid)
        with grpc.insecure_channel(srv.address) as ch:
            stub = pb_grpc.RecurrentServiceStub(ch)
            warm = stub.CreateSession(pb.CreateSessionRequest(model="wide")).session_id
            stub.Step(pb.StepRequest(session_id=warm, seq=1, inputs=wire.arrays_to_tensors({"tokens": T})))
            stub.Close(pb.SessionRequest(session_id=warm))
            rss0 = proc.memory_info().rss
            opened, refused = 0, None
            while refused is None and opened < 100_000:
                batch = []
                for _ in range(64):
                    try:
                        batch.append(stub.CreateSession(pb.CreateSessionRequest(model="wide")).session_id)
                    except grpc.RpcError as err:
                        refused = err
                        break
                if not batch:
                    break
                tokens = np.tile(T, (len(batch), 1))
                req = pb.StepManyRequest(
                    session_ids=batch,
                    seqs=[1] * len(batch),
                    inputs=wire.arrays_to_tensors({"tokens": tokens}),
                )
                (resp,) = list(stub.StreamMany(iter([req])))
                opened += len(batch)
                if any(resp.codes):
                    code = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
                    assert set(resp.codes) <= {0, code}, resp.messages
                    refused = refused or next(m for m in resp.messages if m)
            rss1 = proc.memory_info().rss
            metrics = (
                urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=5)
                .read()
                .decode()
            )
    finally:
        srv.stop()
    assert refused is not None, "the server never refused"
    text = refused if isinstance(refused, str) else refused.details()
    assert "session memory budget exhausted" in text and str(budget) in text
    used = float(re.search(r"^rnnserve_session_memory_used_bytes (\S+)$", metrics, re.M).group(1))
    assert used > 0.9 * budget  # the budget was really used up, not refused early
    assert re.search(r'^rnnserve_admission_refusals_total\{reason="budget"\} [1-9]', metrics, re.M)
    growth = rss1 - rss0
    line = (
        f"Budget {budget / 2**20:.0f} MiB (`--state-budget-bytes`): {opened:,} sessions of a "
        f"{len(BIG_VOCAB):,}-token LSTM opened and stepped ({len(T)}-step chunks) until the server refused "
        "with RESOURCE_EXHAUSTED; "
        f"{used / 2**20:.1f} MiB charged; server RSS {rss0 / 2**20:.0f} -> {rss1 / 2**20:.0f} MiB "
        f"(+{growth / 2**20:.1f} MiB; the test's bound: budget + {overhead / 2**20:.0f} MiB). "
        "Generated by `tests/service/test_admission.py` (`make fuzz` refreshes it).\n"
    )
    print("\n" + line)
    if os.environ.get("RNNSERVE_BUDGET_REPORT"):
        Path(os.environ["RNNSERVE_BUDGET_REPORT"]).write_text(line)
    assert growth <= budget + overhead
