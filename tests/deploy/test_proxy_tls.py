"""The shipped HAProxy configuration with TLS on (deploy/components/tls): real processes, real handshakes.

One server replica with mutual TLS and API keys behind dnsmasq (the cluster DNS) and HAProxy running
`deploy/components/haproxy/haproxy.cfg` with `RNNSERVE_TLS_DIR` set, as the prod pods run it: the client
speaks TLS to the proxy with its API key, the proxy mutual TLS to the server (its health checks too). A
plaintext client and a client that does not trust the CA are refused by the proxy; the server refuses anyone
without a client certificate from the CA, so only the proxy reaches it.
"""

from __future__ import annotations

import secrets
import shutil
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml

from service.client import Client, Credentials
from service.proto import rnnserve_pb2 as pb
from service.proto import rnnserve_pb2_grpc as pb_grpc
from service.server.auth import key_hash
from tests.deploy.proxy import HEADLESS, ClusterDNS, free_port, start_haproxy
from tests.deploy.replicas import start_replica

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "service"))
from certs import CA  # noqa: E402


@pytest.fixture(scope="module")
def stack(tmp_path_factory, model_repository):
    work = tmp_path_factory.mktemp("proxy-tls")
    ca, other = CA(work / "pki", "rnnserve-ca"), CA(work / "pki", "stranger-ca")
    cert = ca.issue("rnnserve", server=True, names=(HEADLESS,), client_too=True)
    tls_dir = work / "tls"  # the Secret as the pods mount it: tls.crt, tls.crt.key (HAProxy), ca.crt
    tls_dir.mkdir()
    shutil.copy(cert.cert, tls_dir / "tls.crt")
    shutil.copy(cert.key, tls_dir / "tls.crt.key")
    shutil.copy(ca.pem, tls_dir / "ca.crt")
    key = secrets.token_urlsafe(32)
    keys = work / "keys.yaml"
    keys.write_text(yaml.safe_dump({"keys": [{"sha256": key_hash(key), "tenant": "t", "role": "user"}]}))
    port = free_port()
    replica = start_replica(
        "tls-0",
        work,
        model_repository,
        grpc_host="127.0.0.2",
        grpc_port=port,
        auth="api_keys",
        api_keys_file=keys,
        tls_cert_file=tls_dir / "tls.crt",
        tls_key_file=tls_dir / "tls.crt.key",
        tls_client_ca_file=tls_dir / "ca.crt",
    )
    dns = ClusterDNS(work, ["127.0.0.2"]).start()
    proxy = start_haproxy(work, port, dns, extra_env={"RNNSERVE_TLS_DIR": str(tls_dir)})
    yield {"proxy": proxy, "replica": replica, "port": port, "ca": ca, "other": other, "key": key}
    proxy.stop()
    replica.stop()
    dns.process.kill()


def test_client_reaches_the_server_through_the_tls_proxy(stack):
    address = f"127.0.0.1:{stack['proxy'].port}"
    creds = Credentials.from_files(api_key=stack["key"], ca=stack["ca"].pem)
    with Client(address, credentials=creds, max_attempts=20, backoff_s=0.2) as client:
        with client.session("tiny_lstm") as s:  # the proxy's health check must have passed: TLS both ways
            assert s.step(np.array([1, 2, 3]))["logits"].shape[0] == 3


def test_proxy_refuses_plaintext_and_untrusting_clients(stack):
    address = f"127.0.0.1:{stack['proxy'].port}"
    with grpc.insecure_channel(address) as ch:
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.RecurrentServiceStub(ch).ListModels(pb.ListModelsRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    creds = grpc.ssl_channel_credentials(root_certificates=stack["other"].pem.read_bytes())
    with grpc.secure_channel(address, creds) as ch:
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.RecurrentServiceStub(ch).ListModels(pb.ListModelsRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_the_server_accepts_only_the_proxys_certificate(stack):
    address = f"127.0.0.2:{stack['port']}"
    creds = grpc.ssl_channel_credentials(root_certificates=stack["ca"].pem.read_bytes())  # no client cert
    options = [("grpc.ssl_target_name_override", HEADLESS)]
    with grpc.secure_channel(address, creds, options=options) as ch:
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.RecurrentServiceStub(ch).ListModels(pb.ListModelsRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
