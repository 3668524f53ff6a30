"""API keys, tenants and ownership over real gRPC: every RPC of both APIs, across tenants.

Another tenant's session must look exactly like an id that never existed (same code, same message), on every
RPC; health and reflection stay open; admin RPCs need the admin role; state blobs stay with their tenant.
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from server_thread import ServerThread, make_settings

from service import wire
from service.client import Client, Credentials
from service.proto import rnnserve_pb2 as pb
from service.proto import rnnserve_pb2_grpc as pb_grpc
from service.server.auth import key_hash, parse_keys
from service.server.auth import main as auth_main

KEYS = {name: secrets.token_urlsafe(32) for name in ("alice", "bob", "root")}


def keys_file(directory: Path) -> Path:
    entries = [
        {"id": "alice-1", "sha256": key_hash(KEYS["alice"]), "tenant": "alice", "role": "user"},
        {"id": "bob-1", "sha256": key_hash(KEYS["bob"]), "tenant": "bob", "role": "user"},
        {"id": "ops", "sha256": key_hash(KEYS["root"]), "tenant": "ops", "role": "admin"},
    ]
    path = directory / "keys.yaml"
    path.write_text(yaml.safe_dump({"keys": entries}))
    return path


@pytest.fixture(scope="module")
def server(model_repository, tmp_path_factory):
    path = keys_file(tmp_path_factory.mktemp("keys"))
    srv = ServerThread(make_settings(model_repository, auth="api_keys", api_keys_file=path))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.address) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel):
    return pb_grpc.RecurrentServiceStub(channel)


def md(who: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {KEYS[who]}"),)


def err_of(fn) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        fn()
    return err.value


def tokens(*ids: int) -> list[pb.Tensor]:
    return wire.arrays_to_tensors({"tokens": np.array(ids, dtype=np.int64)})


def test_calls_without_a_valid_key_are_unauthenticated(stub, channel, server):
    for metadata, word in [
        ((), "needs an API key"),
        ((("authorization", "Basic abc"),), "malformed"),
        ((("authorization", "Bearer " + secrets.token_urlsafe(32)),), "unknown API key"),
    ]:
        e = err_of(lambda m=metadata: stub.ListModels(pb.ListModelsRequest(), metadata=m))
        assert e.code() == grpc.StatusCode.UNAUTHENTICATED and word in e.details()
        e = err_of(lambda m=metadata: list(stub.Stream(iter([pb.StreamRequest()]), metadata=m)))
        assert e.code() == grpc.StatusCode.UNAUTHENTICATED
    with tc.InferenceServerClient(server.address) as kc:
        with pytest.raises(Exception, match="UNAUTHENTICATED|needs an API key"):
            kc.is_server_ready()
        assert kc.is_server_ready(headers={"authorization": f"Bearer {KEYS['bob']}"})
    body = (
        __import__("urllib.request")
        .request.urlopen(f"http://127.0.0.1:{server.running.metrics_port}/metrics", timeout=5)
        .read()
    )
    assert b'rnnserve_auth_failures_total{reason="missing"}' in body


def test_health_and_reflection_stay_open(channel):
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING


def test_reload_needs_the_admin_role(stub):
    e = err_of(lambda: stub.ReloadRepository(pb.ReloadRepositoryRequest(), metadata=md("alice")))
    assert e.code() == grpc.StatusCode.PERMISSION_DENIED and "admin role" in e.details()
    assert stub.ReloadRepository(pb.ReloadRepositoryRequest(), metadata=md("root")).models


def _same_as_unknown(call, sid: str) -> None:
    """`call(session_id)` by bob on alice's `sid` fails exactly as on an id that never existed."""
    ghost = secrets.token_urlsafe(16)
    theirs, unknown = err_of(lambda: call(sid)), err_of(lambda: call(ghost))
    assert theirs.code() == unknown.code() == grpc.StatusCode.NOT_FOUND, (theirs, unknown)
    assert theirs.details().replace(sid, "<id>") == unknown.details().replace(ghost, "<id>")


def test_another_tenants_session_does_not_exist_for_every_rpc(stub):
    a = md("alice")
    sid = stub.CreateSession(pb.CreateSessionRequest(model="tiny_lstm"), metadata=a).session_id
    first = stub.Step(pb.StepRequest(session_id=sid, seq=1, inputs=tokens(1, 2)), metadata=a)
    blob = stub.GetState(pb.SessionRequest(session_id=sid), metadata=a).blob
    b = md("bob")
    mine = stub.CreateSession(pb.CreateSessionRequest(model="tiny_lstm"), metadata=b).session_id
    own_blob = stub.GetState(pb.SessionRequest(session_id=mine), metadata=b).blob
    calls = {
        "Step": lambda s: stub.Step(pb.StepRequest(session_id=s, seq=2, inputs=tokens(3)), metadata=b),
        "Step retry": lambda s: stub.Step(
            pb.StepRequest(session_id=s, seq=1, inputs=tokens(1, 2)), metadata=b
        ),
        "GetState": lambda s: stub.GetState(pb.SessionRequest(session_id=s), metadata=b),
        "SetState": lambda s: stub.SetState(pb.SetStateRequest(session_id=s, blob=own_blob), metadata=b),
        "Fork": lambda s: stub.Fork(pb.ForkRequest(session_id=s), metadata=b),
        "Reset": lambda s: stub.Reset(pb.SessionRequest(session_id=s), metadata=b),
        "Close": lambda s: stub.Close(pb.SessionRequest(session_id=s), metadata=b),
        "DescribeSession": lambda s: stub.DescribeSession(pb.SessionRequest(session_id=s), metadata=b),
        "Generate": lambda s: list(
            stub.Generate(pb.GenerateRequest(session_id=s, prime_ids=[1], n_tokens=2), metadata=b)
        ),
        "Stream attach": lambda s: list(
            stub.Stream(
                iter(
                    [pb.StreamRequest(open=pb.StreamOpen(session_id=s, keep=True), seq=2, inputs=tokens(3))]
                ),
                metadata=b,
            )
        ),
    }
    for name, call in calls.items():
        try:
            _same_as_unknown(call, sid)
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from exc
    # StreamMany: the foreign row fails in-band exactly like an unknown id; bob's own row is applied.
    ghost = secrets.token_urlsafe(16)
    req = pb.StepManyRequest(
        session_ids=[sid, mine, ghost],
        seqs=[2, 1, 1],
        inputs=wire.arrays_to_tensors({"tokens": np.array([[5], [5], [5]], dtype=np.int64)}),
    )
    (resp,) = list(stub.StreamMany(iter([req]), metadata=b))
    assert resp.codes[0] == resp.codes[2] == grpc.StatusCode.NOT_FOUND.value[0] and resp.codes[1] == 0
    assert resp.messages[0].replace(sid, "<id>") == resp.messages[2].replace(ghost, "<id>")
    # Alice's session was not touched by any of it: same seq, same cached answer, same state.
    info = stub.DescribeSession(pb.SessionRequest(session_id=sid), metadata=a)
    assert info.last_seq == 1
    again = stub.Step(pb.StepRequest(session_id=sid, seq=1, inputs=tokens(1, 2)), metadata=a)
    assert again.cached and again.outputs == first.outputs
    assert stub.GetState(pb.SessionRequest(session_id=sid), metadata=a).blob == blob
    # A state blob is bound to its tenant: bob cannot import alice's into his own session.
    e = err_of(lambda: stub.SetState(pb.SetStateRequest(session_id=mine, blob=blob), metadata=b))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "another tenant" in e.details()
    assert stub.SetState(pb.SetStateRequest(session_id=sid, blob=blob), metadata=a).last_seq == 1


def test_closed_sessions_are_no_oracle_either(stub):
    a, b = md("alice"), md("bob")
    sid = stub.CreateSession(pb.CreateSessionRequest(model="tiny_lstm"), metadata=a).session_id
    stub.Close(pb.SessionRequest(session_id=sid), metadata=a)
    stub.Close(pb.SessionRequest(session_id=sid), metadata=a)  # closing twice is fine for the owner
    _same_as_unknown(lambda s: stub.Close(pb.SessionRequest(session_id=s), metadata=b), sid)
    _same_as_unknown(lambda s: stub.DescribeSession(pb.SessionRequest(session_id=s), metadata=b), sid)
    e = err_of(lambda: stub.DescribeSession(pb.SessionRequest(session_id=sid), metadata=a))
    assert "reason: closed" in e.details()


def test_kserve_sequences_belong_to_their_tenant(server):
    def infer(who, ids, **flags):
        x = tc.InferInput("tokens", [1, len(ids)], "INT64")
        x.set_data_from_numpy(np.array([ids], dtype=np.int64))
        return kc.infer(
            "tiny_lstm", [x], sequence_id=4242, headers={"authorization": f"Bearer {KEYS[who]}"}, **flags
        ).as_numpy("logits")

    with tc.InferenceServerClient(server.address) as kc:
        a1 = infer("alice", [1, 2], sequence_start=True)
        # Bob's request on the same sequence id is told the sequence is not active (as for an unused id) ...
        with pytest.raises(Exception, match="not active") as theirs:
            infer("bob", [3])
        with pytest.raises(Exception, match="not active") as unused:
            x = tc.InferInput("tokens", [1, 1], "INT64")
            x.set_data_from_numpy(np.array([[3]], dtype=np.int64))
            kc.infer(
                "tiny_lstm", [x], sequence_id=999_999, headers={"authorization": f"Bearer {KEYS['bob']}"}
            )
        assert str(theirs.value).replace("4242", "N") == str(unused.value).replace("999999", "N")
        # ... and his own sequence with that id is his: it neither restarts nor sees alice's.
        b1 = infer("bob", [1, 2], sequence_start=True)
        np.testing.assert_array_equal(a1, b1)  # both from the initial state
        a2 = infer("alice", [3], sequence_end=True)
        b2 = infer("bob", [7], sequence_end=True)
        assert not np.array_equal(a2, b2)
    with Client(server.address, credentials=Credentials(api_key=KEYS["alice"])) as client:
        with client.session("tiny_lstm") as s:
            s.step(np.array([1, 2]))
            np.testing.assert_allclose(s.step(np.array([3]))["logits"][-1], a2[0, -1], rtol=1e-5)


def test_async_and_sync_clients_send_the_key(server):
    import asyncio

    from service.client import AsyncClient

    creds = Credentials(api_key=KEYS["alice"])

    async def run():
        async with AsyncClient(server.address, credentials=creds) as client:
            async with await client.session("tiny_lstm") as s:
                outs = [o async for o in s.stream([np.array([1]), np.array([2, 3])])]
                return [o["logits"].shape[0] for o in outs]

    assert asyncio.run(run()) == [1, 2]
    with Client(server.address, credentials=creds) as client:
        assert [p for p in client.generate("tiny_lstm", prime="ab", n=3, seed=1)]


def test_keys_file_validation_and_new_key(capsys, tmp_path):
    with pytest.raises(ValueError, match="64 hex digits"):
        parse_keys("keys: [{sha256: abc, tenant: t}]")
    with pytest.raises(ValueError, match="role must be"):
        parse_keys(f"keys: [{{sha256: {'a' * 64}, tenant: t, role: god}}]")
    assert auth_main(["new-key", "--tenant", "acme", "--role", "admin"]) == 0
    out = capsys.readouterr()
    key = out.err.strip().splitlines()[-1]
    parsed = parse_keys(yaml.safe_dump({"keys": yaml.safe_load(out.out)}))
    assert parsed.principals[key_hash(key)].tenant == "acme"
    assert key not in out.out  # only the hash is written to the file


def test_cli_sends_the_api_key(server, capsys, monkeypatch):
    from service.client.cli import main as cli_main

    monkeypatch.delenv("RNNSERVE_API_KEY", raising=False)
    assert cli_main(["--address", server.address, f"--api-key={KEYS['alice']}", "models"]) == 0
    assert "tiny_lstm" in capsys.readouterr().out
    assert cli_main(["--address", server.address, "models"]) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err


def test_kserve_stream_sequences_belong_to_their_tenant(channel):
    from tritonclient.grpc import service_pb2 as kpb
    from tritonclient.grpc import service_pb2_grpc as kpb_grpc

    stub = kpb_grpc.GRPCInferenceServiceStub(channel)

    def request(ids, sequence_id, **flags):
        req = kpb.ModelInferRequest(model_name="tiny_lstm")
        req.parameters["sequence_id"].int64_param = sequence_id
        for k, v in flags.items():
            req.parameters[k].bool_param = v
        req.inputs.add(name="tokens", datatype="INT64", shape=[1, len(ids)])
        req.raw_input_contents.append(np.array(ids, dtype=np.int64).tobytes())
        return req

    def stream(who, reqs):
        return [r.error_message for r in stub.ModelStreamInfer(iter(reqs), metadata=md(who))]

    assert stream("alice", [request([1, 2], 515, sequence_start=True)]) == [""]
    theirs = stream("bob", [request([3], 515)])[0]
    unused = stream("bob", [request([3], 516)])[0]
    assert "not active" in theirs and theirs.replace("515", "N") == unused.replace("516", "N")
    assert stream("alice", [request([3], 515, sequence_end=True)]) == [""]  # alice's sequence went on


def test_an_open_server_says_so_loudly_and_binds_loopback(model_repository, tmp_path):
    from server_thread import ServerProcess

    from service.config import Settings

    assert Settings().grpc_host == "127.0.0.1"  # auth none: loopback unless told otherwise
    keys = keys_file(tmp_path)
    assert Settings(auth="api_keys", api_keys_file=keys).grpc_host == "0.0.0.0"
    open_srv = ServerProcess(model_repository)
    try:
        deadline = time.monotonic() + 10
        while (
            not any("authentication is OFF" in line for line in open_srv.lines)
            and time.monotonic() < deadline
        ):
            time.sleep(0.05)
        assert any("authentication is OFF" in line for line in open_srv.lines), open_srv.lines
    finally:
        open_srv.stop()
    secured = ServerProcess(model_repository, "--auth", "api_keys", "--api-keys-file", str(keys))
    try:
        deadline = time.monotonic() + 10
        while not any("rnnserve security:" in line for line in secured.lines) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert any("API keys from" in line for line in secured.lines), secured.lines
        assert not any("authentication is OFF" in line for line in secured.lines)
    finally:
        secured.stop()
