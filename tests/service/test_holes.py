"""Smaller holes, each closed: attach never closes another client's session, a seq retried with other inputs
is refused, a KServe sequence start that fails validation starts nothing, the step counter survives failover,
and a KServe stream buffers replies for a slow reader within a byte budget."""

from __future__ import annotations

import asyncio
from pathlib import Path

import fixtures
import grpc
import numpy as np
import pytest
from engine_harness import run_engine, settings
from kserve_harness import ServerThread
from prometheus_client import CollectorRegistry
from tritonclient.grpc import service_pb2 as kpb
from tritonclient.grpc import service_pb2_grpc as kpb_grpc

from service import wire
from service.config import Settings
from service.core.engine import Engine
from service.core.limits import ByteBudget
from service.errors import FailedPrecondition
from service.proto import rnnserve_pb2 as pb
from service.proto import rnnserve_pb2_grpc as pb_grpc
from service.stores.base import InMemoryStore


def tokens(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, len(fixtures.DEFAULT_VOCAB), n).astype(np.int64)


def test_a_retry_with_other_inputs_is_refused_not_answered_with_someone_elses_output(model_repository):
    async def body(engine: Engine):
        sid = (await engine.create_session("tiny_lstm")).session_id
        mine = (await engine.step(sid, 1, {"tokens": tokens(5, 1)})).outputs["logits"]
        again = await engine.step(sid, 1, {"tokens": tokens(5, 1)})  # the same chunk retried: cached answer
        assert again.cached
        np.testing.assert_array_equal(again.outputs["logits"], mine)
        with pytest.raises(FailedPrecondition, match="already applied with other inputs"):
            await engine.step(sid, 1, {"tokens": tokens(5, 2)})  # the loser of a race on seq 1
        with pytest.raises(FailedPrecondition, match="already applied with other inputs"):
            await engine.step(sid, 1, {"tokens": tokens(4, 1)})

    run_engine(model_repository, body)


def test_retry_check_and_step_counter_survive_failover(model_repository):
    async def main():
        store = InMemoryStore(persistent=True)
        a = Engine(settings(model_repository, replica_id="a"), registry=CollectorRegistry(), store=store)
        b = Engine(settings(model_repository, replica_id="b"), registry=CollectorRegistry(), store=store)
        await a.start()
        await b.start()
        try:
            sid = (await a.create_session("tiny_lstm")).session_id
            await a.step(sid, 1, {"tokens": tokens(5, 1)})
            await a.step(sid, 2, {"tokens": tokens(3, 2)})
            await a.stop()  # hands the session over
            assert (await b.attach(sid)).steps == 8  # counted across the move
            with pytest.raises(FailedPrecondition, match="other inputs"):
                await b.step(sid, 2, {"tokens": tokens(3, 3)})
            assert (await b.step(sid, 2, {"tokens": tokens(3, 2)})).cached
            await b.step(sid, 3, {"tokens": tokens(2, 4)})
            assert b.describe(sid).steps == 10
        finally:
            await a.stop()
            await b.stop()

    asyncio.run(main())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo: Path = tmp_path_factory.mktemp("holes_repo")
    fixtures.token_lstm(repo, "tiny_lstm")
    srv = ServerThread(
        Settings(
            model_repository=repo,
            grpc_host="127.0.0.1",
            grpc_port=0,
            metrics_port=-1,
            max_stream_buffer_bytes=1024,
        )
    )
    yield srv
    srv.stop()


def test_attach_with_keep_false_never_closes_the_owners_session(server):
    with grpc.insecure_channel(server.url) as ch:
        stub = pb_grpc.RecurrentServiceStub(ch)
        sid = stub.CreateSession(pb.CreateSessionRequest(model="tiny_lstm"), timeout=10).session_id
        chunk = [wire.array_to_tensor("tokens", tokens(3))]
        opening = pb.StreamRequest(open=pb.StreamOpen(session_id=sid, keep=False), seq=1, inputs=chunk)
        (reply,) = list(stub.Stream(iter([opening]), timeout=10))
        assert reply.seq == 1
        # The owner carries on: the attached stream's end did not close the session.
        info = stub.DescribeSession(pb.SessionRequest(session_id=sid), timeout=10)
        assert info.last_seq == 1
        # A stream that opened its own session still closes it (keep=false).
        own = pb.StreamRequest(open=pb.StreamOpen(model="tiny_lstm"))
        (first,) = list(stub.Stream(iter([own]), timeout=10))
        with pytest.raises(grpc.RpcError) as err:
            stub.DescribeSession(pb.SessionRequest(session_id=first.session.session_id), timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and "closed" in err.value.details()


def _infer(sequence_id: int, toks: np.ndarray, start: bool = False, rid: str = "") -> kpb.ModelInferRequest:
    req = kpb.ModelInferRequest(model_name="tiny_lstm", id=rid)
    req.parameters["sequence_id"].int64_param = sequence_id
    if start:
        req.parameters["sequence_start"].bool_param = True
    t = req.inputs.add()
    t.name, t.datatype = "tokens", "INT64"
    t.shape.extend([1, len(toks)])
    req.raw_input_contents.append(toks.astype("<i8").tobytes())
    return req


def test_a_sequence_start_that_fails_validation_starts_nothing(server):
    with grpc.insecure_channel(server.url) as ch:
        stub = kpb_grpc.GRPCInferenceServiceStub(ch)
        bad = _infer(77, np.array([999], np.int64), start=True)  # a token id outside the vocabulary
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(bad, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(_infer(77, tokens(2)), timeout=10)  # not started: a continuation is refused
        assert "not active" in err.value.details()


def test_stream_replies_wait_for_a_slow_reader_within_the_byte_budget_and_stay_in_order(server):
    # Each reply (3 steps x 39 logits x 4 bytes, plus framing) is about 500 bytes: a 1024-byte budget holds 2.
    with grpc.insecure_channel(server.url) as ch:
        stub = kpb_grpc.GRPCInferenceServiceStub(ch)
        requests = [_infer(500 + i % 3, tokens(3, i), start=i < 3, rid=str(i)) for i in range(30)]
        replies = stub.ModelStreamInfer(iter(requests), timeout=30)
        got = []
        for reply in replies:
            got.append(reply.infer_response.id)
            assert not reply.error_message, reply.error_message
            if len(got) == 30:
                break
        assert sorted(got, key=int) == [str(i) for i in range(30)]
        for k in range(3):  # within one sequence, replies keep request order
            mine = [int(i) for i in got if int(i) % 3 == k]
            assert mine == sorted(mine)


def test_byte_budget_holds_takers_until_bytes_are_given_back():
    async def main():
        budget = ByteBudget(100)
        await budget.take(60)
        waiting = asyncio.ensure_future(budget.take(60))
        await asyncio.sleep(0.01)
        assert not waiting.done() and budget.used == 60
        await budget.give(60)
        await asyncio.wait_for(waiting, 1)
        assert budget.used == 60
        await budget.give(60)
        await budget.take(500)  # larger than the whole budget: goes when nothing else is held
        assert budget.used == 500

    asyncio.run(main())
