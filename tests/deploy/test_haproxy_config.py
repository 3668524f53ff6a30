"""The HAProxy component (the default front proxy): the file the tests run is the file Kubernetes gets.

`deploy/components/haproxy/haproxy.cfg` reaches the pods through a kustomize configMapGenerator; this
checks that the rendered ConfigMap holds it byte for byte, that HAProxy itself accepts it as the pod runs it
(no variables set), that its only variables are addresses (the ones tests/deploy/proxy.py sets), and that it
agrees with the code and the manifests: hashed header, upstream Service and port, slots for every replica the
HPA may start, ports and probe path, stream timeouts, the image's HAProxy release. The health check's raw
HTTP/2 bytes are decoded frame by frame. tests/deploy/test_proxy_routing.py then runs the same file in front
of real replicas.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2
from hpack import Decoder
from hyperframe.frame import DataFrame, Frame, HeadersFrame, SettingsFrame

from service.client import AFFINITY_HEADER
from service.config import Settings
from tests.deploy.proxy import HAPROXY_CFG, haproxy_env, need
from tests.deploy.test_manifests import Rendered, render, selects

AFFINITY_LUA = HAPROXY_CFG.parent / "affinity.lua"
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


@pytest.fixture(scope="module")
def prod() -> Rendered:
    return render("prod")


@pytest.fixture(scope="module")
def cfg() -> str:
    return HAPROXY_CFG.read_text()


def directives(cfg: str, section: str, defined: frozenset[str] = frozenset()) -> list[str]:
    """The lines of one section (`backend rnnserve`, `frontend grpc`, ...), comments and blanks dropped.

    `.if defined(NAME)` / `.else` / `.endif` blocks are resolved as HAProxy does with the variables `defined`
    set (none: as the tests run the file in cleartext; `{"RNNSERVE_TLS_DIR"}`: as the TLS pods run it).
    """
    out: list[str] = []
    inside = False
    active: list[bool] = []
    for raw in cfg.splitlines():
        line = raw.split("#", 1)[0].rstrip() if not raw.lstrip().startswith("tcp-check") else raw.rstrip()
        if not line.strip():
            continue
        cond = line.strip()
        if cond.startswith(".if "):
            name = re.fullmatch(r"\.if defined\(([A-Z_]+)\)", cond)
            assert name, cond
            active.append(name.group(1) in defined)
            continue
        if cond == ".else":
            active[-1] = not active[-1]
            continue
        if cond == ".endif":
            active.pop()
            continue
        if not all(active):
            continue
        if not line.startswith((" ", "\t")):
            inside = line.strip() == section
            continue
        if inside:
            out.append(line.strip())
    assert out, f"no section {section!r}"
    return out


def one(lines: list[str], keyword: str) -> str:
    found = [x for x in lines if x.split()[0] == keyword]
    assert len(found) == 1, f"{keyword}: {found}"
    return found[0]


def default(value: str) -> str:
    """The Kubernetes value of a `"${NAME-default}"` argument."""
    m = re.fullmatch(r'"\$\{[A-Z_]+-([^}]*)\}"', value)
    assert m, value
    return m.group(1)


def seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+)(ms|s|m|h)?", value)
    assert m, value
    return int(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 0.001}[m.group(2)]


def haproxy_pod(prod: Rendered) -> dict:
    return prod.one("Deployment", "rnnserve-haproxy")["spec"]["template"]["spec"]


def test_the_configmap_ships_the_tested_file_unchanged(prod: Rendered, cfg: str):
    pod = haproxy_pod(prod)
    (container,) = pod["containers"]
    path = Path(container["args"][container["args"].index("-f") + 1])
    (mount,) = [m for m in container["volumeMounts"] if Path(m["mountPath"]) == path.parent]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    data = prod.one("ConfigMap", volume["configMap"]["name"])["data"]
    assert data[path.name] == cfg
    assert data[AFFINITY_LUA.name] == AFFINITY_LUA.read_text()
    # affinity.lua is loaded by a path relative to the working directory: the mount, as in the tests.
    assert container["workingDir"] == str(path.parent)
    # The pod sets no variable but, at most, the upstream (an overlay in another namespace): every other
    # templated address takes its Kubernetes default.
    env = {e["name"]: e.get("value") for e in container.get("env", []) if e["name"].startswith("RNNSERVE_")}
    assert set(env) <= {"RNNSERVE_UPSTREAM", "RNNSERVE_TLS_DIR"}, env
    if "RNNSERVE_TLS_DIR" in env:  # deploy/components/tls: the Secret, its key named as HAProxy expects
        (tls,) = [m for m in container["volumeMounts"] if m["mountPath"] == env["RNNSERVE_TLS_DIR"]]
        (volume,) = [v for v in pod["volumes"] if v["name"] == tls["name"]]
        items = {i["key"]: i["path"] for i in volume["secret"]["items"]}
        assert items == {"tls.crt": "tls.crt", "tls.key": "tls.crt.key", "ca.crt": "ca.crt"}
        assert (
            tls.get("readOnly") is True
            and pod["securityContext"]["fsGroup"] == container["securityContext"]["runAsGroup"]
        ), "the key (mode 0440) is readable by HAProxy's group"


def test_haproxy_accepts_the_file_as_the_pod_and_as_the_tests_run_it(tmp_path: Path):
    binary = need("haproxy", "haproxy")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RNNSERVE_")}
    tested = {**clean, **haproxy_env(8001, "127.0.0.1:53", 18080, 18081)}
    for env in (clean, tested):
        out = subprocess.run(
            [binary, "-c", "-f", str(HAPROXY_CFG)],
            cwd=HAPROXY_CFG.parent,
            env=env,
            capture_output=True,
            text=True,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        assert "[WARNING]" not in out.stdout + out.stderr, out.stdout + out.stderr
    broken = tmp_path / "broken.cfg"
    broken.write_text(HAPROXY_CFG.read_text().replace("balance roundrobin", "balance roundrobbin"))
    run = subprocess.run(
        [binary, "-c", "-f", str(broken)], cwd=HAPROXY_CFG.parent, env=clean, capture_output=True
    )
    assert run.returncode != 0


def test_only_addresses_are_templated(cfg: str):
    cfg = "\n".join(line for line in cfg.splitlines() if not line.lstrip().startswith("#"))
    names = set(re.findall(r"\$\{([A-Z_]+)", cfg)) | set(re.findall(r"defined\(([A-Z_]+)\)", cfg))
    # Addresses, and the directory of the TLS Secret (deploy/components/tls sets it; unset = cleartext).
    assert names == set(haproxy_env(1, "127.0.0.1:1", 2, 3)) | {"RNNSERVE_TLS_DIR"}, names
    assert names == {
        "RNNSERVE_UPSTREAM",
        "RNNSERVE_NAMESERVER",
        "RNNSERVE_PROXY_BIND",
        "RNNSERVE_PROBES_BIND",
        "RNNSERVE_TLS_DIR",
    }


def test_sessions_are_routed_by_the_client_affinity_header(cfg: str):
    backend = directives(cfg, "backend rnnserve")
    # The Lua fetch names the server; calls without a key are balanced round robin.
    assert one(backend, "balance") == "balance roundrobin"
    assert "http-request set-var(txn.replica) lua.rnnserve_replica" in backend
    assert one(backend, "use-server") == "use-server %[var(txn.replica)] if { var(txn.replica) -m found }"
    assert one(directives(cfg, "global"), "lua-load-per-thread").split()[1] == AFFINITY_LUA.name
    lua = AFFINITY_LUA.read_text()
    assert f'local HEADER = "{AFFINITY_HEADER}"' in lua
    assert 'local BACKEND = "rnnserve"' in lua and 'register_fetches("rnnserve_replica"' in lua
    server = one(backend, "default-server").split()
    assert "proto" in server and server[server.index("proto") + 1] == "h2", "gRPC needs HTTP/2 to the pods"
    assert one(directives(cfg, "frontend grpc"), "bind").split()[-2:] == ["proto", "h2"]


def test_upstream_is_every_pod_of_the_headless_service(prod: Rendered, cfg: str):
    backend = directives(cfg, "backend rnnserve")
    _, prefix, slots, upstream = one(backend, "server-template").split()
    headless = prod.one("Service", "rnnserve-headless")
    (container,) = haproxy_pod(prod)["containers"]
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    assert env.get("RNNSERVE_UPSTREAM", default(upstream)) == (
        f"rnnserve-headless.{headless['metadata']['namespace']}.svc.cluster.local:{Settings().grpc_port}"
    )
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"] is False
    hpa = prod.one("HorizontalPodAutoscaler", "rnnserve")["spec"]
    assert int(slots) >= hpa["maxReplicas"], "one slot per pod the HPA may start"
    server = one(backend, "default-server").split()
    assert "resolvers" in server and "check" in server
    assert "on-marked-down" in server and server[server.index("on-marked-down") + 1] == "shutdown-sessions"


def test_ports_probe_and_image_agree_with_the_manifests(prod: Rendered, cfg: str):
    (container,) = haproxy_pod(prod)["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    grpc_bind = default(one(directives(cfg, "frontend grpc"), "bind").split()[1])
    probes = directives(cfg, "frontend probes")
    assert grpc_bind == f":{ports['grpc']}"
    assert default(one(probes, "bind").split()[1]) == f":{ports['probes']}"
    probe = container["readinessProbe"]["httpGet"]
    assert probe["port"] == "probes" and one(probes, "monitor-uri").split()[1] == probe["path"]
    svc = prod.one("Service", "rnnserve-haproxy")
    (port,) = svc["spec"]["ports"]
    tls = any(e["name"] == "RNNSERVE_TLS_DIR" for e in container.get("env", []))
    assert port["targetPort"] == "grpc" and port.get("appProtocol") == (None if tls else "kubernetes.io/h2c")
    assert selects(
        svc["spec"]["selector"],
        prod.one("Deployment", "rnnserve-haproxy")["spec"]["template"]["metadata"]["labels"],
    )
    # The image runs the release the tests run.
    version = subprocess.run([need("haproxy", "haproxy"), "-v"], capture_output=True, text=True).stdout
    release = re.search(r"version (\d+\.\d+\.\d+)", version).group(1)
    assert container["image"] == f"haproxy:{release}"


def test_idle_streams_outlive_an_idle_session(cfg: str):
    defaults = directives(cfg, "defaults")
    ttl = Settings.model_fields["idle_ttl_s"].default
    for name in ("client", "server"):
        (line,) = [x for x in defaults if x.split()[:2] == ["timeout", name]]
        assert seconds(line.split()[2]) >= ttl, line


def test_the_health_check_is_a_grpc_health_call_decoded_frame_by_frame(cfg: str):
    backend = directives(cfg, "backend rnnserve")
    assert one(backend, "option").split()[1] == "tcp-check"
    (send,) = [x for x in backend if x.startswith("tcp-check send-binary")]
    raw = bytes.fromhex(send.split()[2])
    assert raw.startswith(H2_PREFACE)
    frames = []
    rest = raw[len(H2_PREFACE) :]
    while rest:
        frame, length = Frame.parse_frame_header(rest[:9])
        frame.parse_body(memoryview(rest[9 : 9 + length]))
        frames.append(frame)
        rest = rest[9 + length :]
    settings, headers, data = frames
    assert isinstance(settings, SettingsFrame) and not settings.settings
    assert isinstance(headers, HeadersFrame) and headers.stream_id == 1 and "END_HEADERS" in headers.flags
    assert dict(Decoder().decode(headers.data)) == {
        ":method": "POST",
        ":scheme": "http",
        ":path": "/grpc.health.v1.Health/Check",
        ":authority": "rnnserve",
        "content-type": "application/grpc",
        "te": "trailers",
    }
    assert isinstance(data, DataFrame) and data.stream_id == 1 and "END_STREAM" in data.flags

    def grpc_message(payload: bytes) -> bytes:
        return b"\x00" + len(payload).to_bytes(4, "big") + payload

    # The request is the overall status (service ""), as the kubelet asks; the check passes only on SERVING.
    assert bytes(data.data) == grpc_message(health_pb2.HealthCheckRequest(service="").SerializeToString())
    serving = health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)
    expect = [x for x in backend if x.startswith("tcp-check expect")]
    assert expect == [f"tcp-check expect binary {grpc_message(serving.SerializeToString()).hex()}"]


def test_haproxy_may_reach_the_servers_and_dns_only(prod: Rendered):
    policy = prod.one("NetworkPolicy", "rnnserve-haproxy")["spec"]
    pods = prod.one("Deployment", "rnnserve-haproxy")["spec"]["template"]["metadata"]["labels"]
    server_pods = prod.one("Deployment", "rnnserve")["spec"]["template"]["metadata"]["labels"]
    assert selects(policy["podSelector"]["matchLabels"], pods)
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    ports = {}
    for rule in policy["egress"]:
        to_servers = any(
            selects(p.get("podSelector", {}).get("matchLabels", {}), server_pods) for p in rule["to"]
        )
        ports["servers" if to_servers else "other"] = {p["port"] for p in rule["ports"]}
    assert ports == {"servers": {Settings().grpc_port}, "other": {53}}


TLS = frozenset({"RNNSERVE_TLS_DIR"})


def test_with_tls_the_proxy_speaks_tls_both_ways(cfg: str):
    """As the prod pods run it (RNNSERVE_TLS_DIR set): TLS to clients, mutual TLS to the servers, checks too.

    tests/deploy/test_proxy_tls.py runs exactly this against a real server with mutual TLS."""
    bind = one(directives(cfg, "frontend grpc", TLS), "bind").split()
    assert bind[2:] == ["ssl", "crt", '"${RNNSERVE_TLS_DIR}/tls.crt"', "alpn", "h2"], bind
    backend = directives(cfg, "backend rnnserve", TLS)
    server = one(backend, "default-server").split()
    for word, value in [
        ("verify", "required"),
        ("ca-file", '"${RNNSERVE_TLS_DIR}/ca.crt"'),
        ("crt", '"${RNNSERVE_TLS_DIR}/tls.crt"'),
        ("alpn", "h2"),
        ("verifyhost", "rnnserve-headless.rnnserve.svc.cluster.local"),
    ]:
        assert server[server.index(word) + 1] == value, word
    assert "ssl" in server
    assert [x for x in backend if x.startswith("tcp-check connect")] == ["tcp-check connect ssl alpn h2"]
    # Everything else is the same file in both modes.
    plain = directives(cfg, "backend rnnserve")
    assert [x for x in backend if not x.startswith(("default-server", "tcp-check connect"))] == [
        x for x in plain if not x.startswith(("default-server", "tcp-check connect"))
    ]
