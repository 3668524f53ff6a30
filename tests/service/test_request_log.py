"""Structured request log (service/server/request_log.py) from a real server: one line per unary call and per
stream end, with method, model, version, session id prefix, status, duration and steps; JSON or logfmt;
sampling (errors always logged) and off."""

from __future__ import annotations

import json
import logging

import fixtures
import grpc
import numpy as np
import pytest
from server_thread import ServerThread, make_settings

from service import wire
from service.client import Client
from service.proto import rnnserve_pb2 as pb
from service.proto import rnnserve_pb2_grpc as pb_grpc
from service.server.request_log import RequestLog

LOGGER = "rnnserve.requests"


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("request_log_repo")
    fixtures.token_lstm(root, "tiny_lstm")
    return root


def _lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


def test_json_lines_for_unary_calls_streams_and_errors(repo, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    srv = ServerThread(make_settings(repo))
    try:
        with Client(srv.address) as client:
            session = client.session("tiny_lstm")
            session.step({"tokens": np.arange(5, dtype=np.int64)})
            outs = list(session.stream({"tokens": np.arange(4, dtype=np.int64)} for _ in range(3)))
            assert len(outs) == 3
            with pytest.raises(grpc.RpcError):
                client.session("no_such_model")
            sid = session.id
            session.close()
        with grpc.insecure_channel(srv.address) as ch:  # a bidi stream that opens its own session
            stub = pb_grpc.RecurrentServiceStub(ch)
            tokens = wire.array_to_tensor("tokens", np.arange(2, dtype=np.int64))
            opened = list(
                stub.Stream(
                    iter([pb.StreamRequest(open=pb.StreamOpen(model="tiny_lstm"), seq=1, inputs=[tokens])])
                )
            )
    finally:
        srv.stop()
    entries = [json.loads(line) for line in _lines(caplog)]
    by_method = {}
    for e in entries:
        assert set(e) >= {"method", "model", "version", "session", "status", "ms", "steps"}, e
        by_method.setdefault(e["method"].rsplit("/", 1)[1], []).append(e)
    step = by_method["Step"][0]
    assert step["session"] == sid[:8] and step["status"] == "OK" and step["steps"] == 5 and step["ms"] > 0
    create_ok = [e for e in by_method["CreateSession"] if e["status"] == "OK"][0]
    assert create_ok["model"] == "tiny_lstm"
    refused = [e for e in by_method["CreateSession"] if e["status"] != "OK"][0]
    assert refused == {**refused, "model": "no_such_model", "status": "NOT_FOUND"}
    streams = by_method["Stream"]
    attached = [e for e in streams if e["session"] == sid[:8]][
        0
    ]  # the client's stream re-attaches its session
    assert attached["steps"] == 12 and attached["messages"] == 4 and attached["model"] == "tiny_lstm"
    own = [e for e in streams if e["session"] != sid[:8]][0]  # the session it opened, named by the handler
    assert own["model"] == "tiny_lstm" and own["version"] == 1 and len(own["session"]) == 8
    assert own["session"] == opened[0].session.session_id[:8] and own["steps"] == 2
    assert not [e for e in entries if "Health" in e["method"] or "reflection" in e["method"]]


def test_logfmt_sampling_and_off(repo, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    srv = ServerThread(make_settings(repo, request_log="logfmt", request_log_sample=0.0))
    try:
        with Client(srv.address) as client:
            client.list_models()  # OK and not sampled: no line
            with pytest.raises(grpc.RpcError):
                client.get_model("nope")  # an error: always logged
    finally:
        srv.stop()
    lines = _lines(caplog)
    assert len(lines) == 1, lines
    assert lines[0].startswith("method=rnnserve.v1.RecurrentService/GetModel model=nope ")
    assert " status=NOT_FOUND " in lines[0]
    assert RequestLog("logfmt").format({"a": "x y", "b": ""}) == 'a="x y" b=""'
    assert not RequestLog("off").enabled
    with pytest.raises(ValueError, match="json, logfmt or off"):
        RequestLog("xml")
