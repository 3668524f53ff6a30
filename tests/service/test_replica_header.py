"""Every reply names the replica that served it: trailing metadata `x-rnnserve-replica: <replica id>`.

The real server (`service.server.start`) with `replica_id` set; native unary and streaming calls, KServe unary
and streaming calls, and calls that fail, all read their trailing metadata through a real channel.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import fixtures
import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as kpb
from tritonclient.grpc import service_pb2_grpc as kpb_grpc

from service import wire
from service.proto import rnnserve_pb2 as pb
from service.proto import rnnserve_pb2_grpc as pb_grpc
from service.server.interceptors import REPLICA_HEADER
from tests.service.server_thread import ServerThread, make_settings

REPLICA = "replica-under-test-7"


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[ServerThread]:
    root = tmp_path_factory.mktemp("replica_repo")
    fixtures.token_lstm(root, "tiny_lstm")
    srv = ServerThread(make_settings(Path(root), replica_id=REPLICA))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def channel(server: ServerThread) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address) as ch:
        yield ch


def replica_of(trailing: tuple[tuple[str, str], ...] | None) -> list[str]:
    return [v for k, v in (trailing or ()) if k == REPLICA_HEADER]


def tokens(n: int) -> pb.Tensor:
    return wire.array_to_tensor("tokens", np.arange(n, dtype=np.int64) % len(fixtures.DEFAULT_VOCAB))


def test_native_unary_and_stream_replies_name_the_replica(channel):
    stub = pb_grpc.RecurrentServiceStub(channel)
    created, call = stub.CreateSession.with_call(pb.CreateSessionRequest(model="tiny_lstm"), timeout=10)
    assert replica_of(call.trailing_metadata()) == [REPLICA]
    sid = created.session_id
    _, call = stub.Step.with_call(pb.StepRequest(session_id=sid, seq=1, inputs=[tokens(3)]), timeout=10)
    assert replica_of(call.trailing_metadata()) == [REPLICA]
    messages = [
        pb.StreamRequest(open=pb.StreamOpen(session_id=sid)),
        *(pb.StreamRequest(seq=s, inputs=[tokens(2)]) for s in (2, 3)),
    ]
    stream = stub.Stream(iter(messages), timeout=10)
    assert [r.seq for r in stream] == [0, 2, 3]
    assert replica_of(stream.trailing_metadata()) == [REPLICA]


def test_error_replies_name_the_replica(channel):
    stub = pb_grpc.RecurrentServiceStub(channel)
    with pytest.raises(grpc.RpcError) as err:
        stub.Step(pb.StepRequest(session_id="no-such-session", seq=1, inputs=[tokens(1)]), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert replica_of(err.value.trailing_metadata()) == [REPLICA]


def test_kserve_unary_and_stream_replies_name_the_replica(channel):
    stub = kpb_grpc.GRPCInferenceServiceStub(channel)
    data = np.arange(3, dtype=np.int64)[None, :]
    request = kpb.ModelInferRequest(
        model_name="tiny_lstm",
        inputs=[kpb.ModelInferRequest.InferInputTensor(name="tokens", datatype="INT64", shape=[1, 3])],
        raw_input_contents=[data.tobytes()],
    )
    request.parameters["sequence_id"].int64_param = 5
    request.parameters["sequence_start"].bool_param = True
    _, call = stub.ModelInfer.with_call(request, timeout=10)
    assert replica_of(call.trailing_metadata()) == [REPLICA]
    request.parameters["sequence_start"].bool_param = False
    stream = stub.ModelStreamInfer(iter([request, request]), timeout=10)
    replies = list(stream)
    assert len(replies) == 2 and not any(r.error_message for r in replies)
    assert replica_of(stream.trailing_metadata()) == [REPLICA]
    _, call = stub.ServerLive.with_call(kpb.ServerLiveRequest(), timeout=10)
    assert replica_of(call.trailing_metadata()) == [REPLICA]
