"""TLS and mutual TLS on the gRPC port: real certificates and handshakes, refusals of what is not trusted."""

from __future__ import annotations

import asyncio
import urllib.request

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from certs import CA
from server_thread import ServerThread, make_settings

from service.client import AsyncClient, Client, Credentials
from service.client.cli import main as cli_main
from service.proto import rnnserve_pb2 as pb
from service.proto import rnnserve_pb2_grpc as pb_grpc


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    root = tmp_path_factory.mktemp("pki")
    ca = CA(root, "rnnserve-test-ca")
    other = CA(root, "stranger-ca")
    return {
        "ca": ca,
        "server": ca.issue("server", server=True),
        "client": ca.issue("client", server=False),
        "other": other,
        "stranger": other.issue("stranger", server=False),
        "impostor": other.issue("impostor-server", server=True),
    }


@pytest.fixture(scope="module")
def tls_server(model_repository, pki):
    srv = ServerThread(
        make_settings(model_repository, tls_cert_file=pki["server"].cert, tls_key_file=pki["server"].key)
    )
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def mtls_server(model_repository, pki):
    srv = ServerThread(
        make_settings(
            model_repository,
            tls_cert_file=pki["server"].cert,
            tls_key_file=pki["server"].key,
            tls_client_ca_file=pki["ca"].pem,
        )
    )
    yield srv
    srv.stop()


def _list_models(channel: grpc.Channel) -> list[str]:
    stub = pb_grpc.RecurrentServiceStub(channel)
    return [m.name for m in stub.ListModels(pb.ListModelsRequest(), timeout=5).models]


def _refused(channel: grpc.Channel) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        _list_models(channel)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value
    return err.value


def test_tls_client_connects_and_steps(tls_server, pki):
    creds = Credentials.from_files(ca=pki["ca"].pem)
    with Client(tls_server.address, credentials=creds) as client:
        assert "tiny_lstm" in [m.name for m in client.list_models()]
        with client.session("tiny_lstm") as s:
            out = s.step(np.array([1, 2, 3]))
            assert out["logits"].shape[0] == 3


def test_plaintext_client_is_refused_by_a_tls_port(tls_server):
    with grpc.insecure_channel(tls_server.address) as ch:
        _refused(ch)


def test_client_that_does_not_trust_the_server_ca_refuses(tls_server, pki):
    creds = grpc.ssl_channel_credentials(root_certificates=pki["other"].pem.read_bytes())
    with grpc.secure_channel(tls_server.address, creds) as ch:
        _refused(ch)


def test_metrics_port_stays_plain_http(tls_server):
    body = urllib.request.urlopen(
        f"http://127.0.0.1:{tls_server.running.metrics_port}/metrics", timeout=5
    ).read()
    assert b"rnnserve_" in body


def test_mtls_client_with_a_trusted_certificate_connects(mtls_server, pki):
    creds = Credentials.from_files(ca=pki["ca"].pem, cert=pki["client"].cert, key=pki["client"].key)
    with Client(mtls_server.address, credentials=creds) as client:
        with client.session("tiny_lstm") as s:
            assert s.step(np.array([4]))["logits"].shape[0] == 1


def test_mtls_refuses_a_client_without_a_certificate(mtls_server, pki):
    creds = grpc.ssl_channel_credentials(root_certificates=pki["ca"].pem.read_bytes())
    with grpc.secure_channel(mtls_server.address, creds) as ch:
        _refused(ch)


def test_mtls_refuses_a_client_certificate_from_another_ca(mtls_server, pki):
    creds = grpc.ssl_channel_credentials(
        root_certificates=pki["ca"].pem.read_bytes(),
        private_key=pki["stranger"].key.read_bytes(),
        certificate_chain=pki["stranger"].cert.read_bytes(),
    )
    with grpc.secure_channel(mtls_server.address, creds) as ch:
        _refused(ch)


def test_mtls_async_client_streams(mtls_server, pki):
    creds = Credentials.from_files(ca=pki["ca"].pem, cert=pki["client"].cert, key=pki["client"].key)

    async def run() -> list[int]:
        async with AsyncClient(mtls_server.address, credentials=creds) as client:
            async with await client.session("tiny_lstm") as s:
                outs = [o async for o in s.stream([np.array([1, 2]), np.array([3])])]
        return [o["logits"].shape[0] for o in outs]

    assert asyncio.run(run()) == [2, 1]


def test_mtls_kserve_with_tritonclient(mtls_server, pki):
    with tc.InferenceServerClient(
        mtls_server.address,
        ssl=True,
        root_certificates=str(pki["ca"].pem),
        private_key=str(pki["client"].key),
        certificate_chain=str(pki["client"].cert),
    ) as client:
        assert client.is_server_ready()
        x = tc.InferInput("tokens", [1, 3], "INT64")
        x.set_data_from_numpy(np.array([[1, 2, 3]], dtype=np.int64))
        result = client.infer("tiny_lstm", [x], sequence_id=7, sequence_start=True, sequence_end=True)
        assert result.as_numpy("logits").shape[:2] == (1, 3)
    with tc.InferenceServerClient(mtls_server.address, ssl=True, root_certificates=str(pki["ca"].pem)) as c:
        with pytest.raises(Exception, match="(?i)unavailable|handshake|ssl|connect"):
            c.is_server_live()


def test_cli_over_mtls(mtls_server, pki, capsys):
    args = ["--address", mtls_server.address, "--tls-ca", str(pki["ca"].pem)]
    args += ["--tls-cert", str(pki["client"].cert), "--tls-key", str(pki["client"].key), "models"]
    assert cli_main(args) == 0
    assert "tiny_lstm" in capsys.readouterr().out
    bad = ["--address", mtls_server.address, "--timeout", "3", "--tls-ca", str(pki["ca"].pem), "models"]
    assert cli_main(bad) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err


def test_health_only_port_answers_probes_in_plaintext(model_repository, pki):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    srv = ServerThread(
        make_settings(
            model_repository,
            tls_cert_file=pki["server"].cert,
            tls_key_file=pki["server"].key,
            tls_client_ca_file=pki["ca"].pem,
            health_port=0,
        )
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{srv.running.health_port}") as ch:
            health = health_pb2_grpc.HealthStub(ch)
            assert (
                health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                == health_pb2.HealthCheckResponse.SERVING
            )
            # Only health lives there: the API is not reachable without TLS.
            with pytest.raises(grpc.RpcError) as err:
                _list_models(ch)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        srv.call(srv.running.stop(0))
        with grpc.insecure_channel(f"127.0.0.1:{srv.running.health_port}") as ch:
            with pytest.raises(grpc.RpcError):
                health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2)
    finally:
        srv.stop()


def test_metrics_over_https_when_configured(model_repository, pki):
    import ssl

    srv = ServerThread(
        make_settings(
            model_repository,
            tls_cert_file=pki["server"].cert,
            tls_key_file=pki["server"].key,
            metrics_tls=True,
        )
    )
    try:
        url = f"127.0.0.1:{srv.running.metrics_port}/metrics"
        ctx = ssl.create_default_context(cafile=str(pki["ca"].pem))
        assert b"rnnserve_" in urllib.request.urlopen(f"https://{url}", context=ctx, timeout=5).read()
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://{url}", timeout=5).read()
    finally:
        srv.stop()


def test_credentials_from_the_environment(pki):
    env = {"RNNSERVE_API_KEY": "k-123", "RNNSERVE_TLS_CA": str(pki["ca"].pem)}
    creds = Credentials.from_env(env)
    assert creds.secure and creds.root_certificates == pki["ca"].pem.read_bytes()
    assert creds.metadata() == (("authorization", "Bearer k-123"),)
    assert not Credentials.from_env({}).secure and Credentials.from_env({}).metadata() == ()
    assert Credentials.from_env({"RNNSERVE_TLS": "1"}).secure
    with pytest.raises(ValueError, match="private key"):
        Credentials.from_files(cert=pki["client"].cert)
