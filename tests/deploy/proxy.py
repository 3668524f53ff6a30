"""The shipped HAProxy front proxy as a real process, with a real DNS server standing in for the cluster's.

In Kubernetes, `deploy/components/haproxy/haproxy.cfg` finds the server pods by resolving the headless Service
`rnnserve-headless.rnnserve.svc.cluster.local` (one A record per ready pod) through the cluster DNS. Here the
same file runs unchanged: `ClusterDNS` is a dnsmasq that answers that very name with one loopback address per
replica (127.0.0.2, 127.0.0.3, ...: the replicas share one port, as pods do), and `start_haproxy` sets only
the address variables the file declares (upstream port, nameserver, listening ports). Adding or removing a
replica is rewriting the host list and sending dnsmasq SIGHUP, which is what an endpoint change does to the
cluster DNS.

`RoutingRecorder` is a client interceptor that reads the `x-rnnserve-replica` trailing metadata of every call
(`service.server.interceptors.REPLICA_HEADER`): each call's serving replica, seen from the client.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.client import AFFINITY_HEADER, Client, affinity_metadata
from service.proto import rnnserve_pb2_grpc as pb_grpc
from service.server.interceptors import REPLICA_HEADER

ROOT = Path(__file__).resolve().parents[2]
HAPROXY_CFG = ROOT / "deploy" / "components" / "haproxy" / "haproxy.cfg"
# The name the shipped configuration resolves by default (the headless Service in namespace rnnserve).
HEADLESS = "rnnserve-headless.rnnserve.svc.cluster.local"


def need(binary: str, package: str) -> str:
    """Path of `binary`; fails (never skips) when it is missing."""
    path = shutil.which(binary)
    if path is None:
        pytest.fail(
            f"{binary} is not installed (Debian package `{package}`; `make system-deps` and .ci/run "
            "install it)",
            pytrace=False,
        )
    return path


def free_port(host: str = "0.0.0.0") -> int:
    """A TCP port free on every address (binding the wildcard proves no one holds it anywhere)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout_s:g} s")
        time.sleep(poll_s)


@dataclass
class ClusterDNS:
    """dnsmasq answering HEADLESS with the given addresses (and nothing else)."""

    workdir: Path
    addresses: list[str] = field(default_factory=list)
    port: int = 0
    process: subprocess.Popen | None = None

    @property
    def hosts(self) -> Path:
        return self.workdir / "headless.hosts"

    @property
    def nameserver(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> ClusterDNS:
        binary = need("dnsmasq", "dnsmasq-base")
        self._write()
        for _attempt in range(5):
            self.port = free_udp_port()
            log = (self.workdir / "dnsmasq.log").open("w")
            self.process = subprocess.Popen(
                [
                    binary,
                    "--keep-in-foreground",
                    "--conf-file=/dev/null",
                    "--no-resolv",
                    "--no-hosts",
                    "--no-poll",
                    f"--addn-hosts={self.hosts}",
                    "--listen-address=127.0.0.1",
                    "--bind-interfaces",
                    f"--port={self.port}",
                    "--pid-file=",
                    "--user=root",
                    "--local-ttl=0",
                    "--cache-size=0",
                    "--log-facility=-",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            log.close()
            time.sleep(0.2)
            if self.process.poll() is None:
                return self
        raise RuntimeError(f"dnsmasq did not start:\n{(self.workdir / 'dnsmasq.log').read_text()}")

    def _write(self) -> None:
        tmp = self.hosts.with_suffix(".tmp")
        tmp.write_text("".join(f"{a} {HEADLESS}\n" for a in self.addresses))
        tmp.replace(self.hosts)

    def set(self, addresses: Iterable[str]) -> None:
        """Answer with exactly these addresses from now on (an endpoint change)."""
        self.addresses = list(addresses)
        self._write()
        if self.process is not None:
            self.process.send_signal(signal.SIGHUP)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(5)


@dataclass
class HAProxy:
    """A running haproxy with the shipped configuration."""

    process: subprocess.Popen
    port: int
    probes_port: int
    log: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def haproxy_env(upstream_port: int, nameserver: str, port: int, probes_port: int) -> dict[str, str]:
    """The address variables haproxy.cfg declares (every other line of the file is used as shipped)."""
    return {
        "RNNSERVE_UPSTREAM": f"{HEADLESS}:{upstream_port}",
        "RNNSERVE_NAMESERVER": nameserver,
        "RNNSERVE_PROXY_BIND": f"127.0.0.1:{port}",
        "RNNSERVE_PROBES_BIND": f"127.0.0.1:{probes_port}",
    }


def start_haproxy(
    workdir: Path,
    upstream_port: int,
    dns: ClusterDNS,
    name: str = "haproxy",
    config: Path = HAPROXY_CFG,
    extra_env: dict[str, str] | None = None,
) -> HAProxy:
    """Run `haproxy -db -f deploy/components/haproxy/haproxy.cfg` (or a variant, for comparisons only) in the
    component's directory, as the pod does; wait until its probe port answers."""
    binary = need("haproxy", "haproxy")
    import os
    import urllib.request

    for _attempt in range(5):
        port, probes = free_port(), free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("RNNSERVE_")}
        env.update(haproxy_env(upstream_port, dns.nameserver, port, probes))
        env.update(extra_env or {})  # e.g. RNNSERVE_TLS_DIR, as deploy/components/tls sets it
        log = workdir / f"{name}.log"
        out = log.open("w")
        proc = subprocess.Popen(
            [binary, "-db", "-f", str(config)],
            cwd=HAPROXY_CFG.parent,  # as the pod runs it (workingDir: the ConfigMap mount)
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        out.close()
        proxy = HAProxy(proc, port, probes, log)

        def ready(proxy: HAProxy = proxy) -> bool:
            if proxy.process.poll() is not None:
                return True
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{proxy.probes_port}/ready", timeout=1) as r:
                    return r.status == 200
            except OSError:
                return False

        wait_for(ready, 10, "haproxy readiness")
        if proc.poll() is None:
            return proxy
        if "cannot bind" not in proxy.log_text().lower():
            raise RuntimeError(f"haproxy exited with {proc.returncode}:\n{proxy.log_text()}")
    raise RuntimeError("could not start haproxy on free loopback ports")


def replica_of(trailing: Any) -> str | None:
    """The replica named in a call's trailing metadata (None: the reply did not come from a server)."""
    for key, value in trailing or ():
        if key == REPLICA_HEADER:
            return value
    return None


def key_of(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key == AFFINITY_HEADER:
            return value
    return None


@dataclass(frozen=True)
class Call:
    """One finished call as the client saw it."""

    method: str
    key: str | None
    replica: str | None  # from the trailing metadata
    code: str


class RoutingRecorder(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
):
    """Records (method, affinity key, serving replica, status) of every call made through it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.calls: list[Call] = []

    def _record(self, details: Any, call: Any) -> None:
        try:
            code = call.code()
            trailing = call.trailing_metadata()
        except Exception:  # noqa: BLE001 - a call torn down before it finished has no status to read
            code, trailing = None, None
        entry = Call(
            details.method.rsplit("/", 1)[-1],
            key_of(details.metadata),
            replica_of(trailing),
            code.name if code is not None else "NONE",
        )
        with self._lock:
            self.calls.append(entry)

    def _done(self, details: Any, call: Any) -> Any:
        call.add_done_callback(lambda c: self._record(details, c))
        return call

    def intercept_unary_unary(self, continuation, client_call_details, request):  # noqa: D102
        outcome = continuation(client_call_details, request)
        self._record(client_call_details, outcome)
        return outcome

    def intercept_unary_stream(self, continuation, client_call_details, request):  # noqa: D102
        return self._done(client_call_details, continuation(client_call_details, request))

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):  # noqa: D102
        return self._done(client_call_details, continuation(client_call_details, request_iterator))

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):  # noqa: D102
        return self._done(client_call_details, continuation(client_call_details, request_iterator))

    def take(self) -> list[Call]:
        """The calls recorded since the last take."""
        with self._lock:
            calls, self.calls = self.calls, []
        return calls

    @staticmethod
    def by_key(calls: Iterable[Call]) -> dict[str, list[Call]]:
        out: dict[str, list[Call]] = defaultdict(list)
        for c in calls:
            if c.key is not None:
                out[c.key].append(c)
        return out


class ObservedClient(Client):
    """The library's `Client`, every call (retries and failovers too) going through a `RoutingRecorder`."""

    def __init__(self, *args: Any, recorder: RoutingRecorder, **kwargs: Any) -> None:
        self.recorder = recorder
        super().__init__(*args, **kwargs)

    def _connect(self) -> None:
        super()._connect()
        self.stub = pb_grpc.RecurrentServiceStub(grpc.intercept_channel(self._channel, self.recorder))


def route_probe(channel: grpc.Channel, key: str, timeout: float = 5) -> str | None:
    """The replica a health check routed by `key` reaches (the reply's trailing metadata)."""
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        _, call = stub.Check.with_call(
            health_pb2.HealthCheckRequest(), metadata=affinity_metadata(key), timeout=timeout
        )
    except grpc.RpcError:
        return None
    return replica_of(call.trailing_metadata())


def ring(channel: grpc.Channel, keys: Iterable[str]) -> dict[str, str | None]:
    """key -> replica, as the proxy routes it now."""
    return {k: route_probe(channel, k) for k in keys}


def wait_until_routed_to(
    channel: grpc.Channel, replicas: set[str], timeout_s: float = 20, probes: int = 48
) -> None:
    """Wait until the proxy's ring holds exactly `replicas` (seen through `probes` keys)."""
    keys = [f"probe-{i}" for i in range(probes)]

    def settled() -> bool:
        return set(ring(channel, keys).values()) == replicas

    wait_for(settled, timeout_s, f"routing to exactly {sorted(replicas)}", poll_s=0.2)
