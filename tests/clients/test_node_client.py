"""The Node.js client (clients/node/stream.js, @grpc/grpc-js) against the real server and the Python client.

The server serves the committed default model; the Node client streams a text in chunks over `Stream` and
prints, after each chunk, the last step's logits and the most likely next character. The Python client
(service.client) streams the same chunks over its own session: both must print the same characters and the
same logits. The Node client reaches the server through a loopback gRPC proxy that forwards every call and
records its metadata, to show that the session's calls carry the affinity header a consistent-hash proxy
(HAProxy or Envoy, deploy/components/) routes on.

Needs `node` and `npm` (Debian's nodejs/npm; `make system-deps` installs them when missing). The first run
installs the locked dependencies with `npm ci` (npm registry); later runs reuse clients/node/node_modules.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest

from service.client import AFFINITY_HEADER, Client
from tests.service.server_thread import ServerThread, make_settings

ROOT = Path(__file__).resolve().parents[2]
NODE_DIR = ROOT / "clients" / "node"
TEXT = "X:1\nT:The Kesh\nM:6/8\nK:G\n|:GAG GAB|ABA ABd|"
CHUNK = 5


class RecordingProxy(grpc.GenericRpcHandler):
    """A loopback gRPC proxy: forwards every call (raw bytes) to `upstream`; records method and metadata."""

    def __init__(self, upstream: str) -> None:
        self.channel = grpc.insecure_channel(upstream)
        self.calls: list[tuple[str, dict[str, str]]] = []
        self.server = grpc.server(futures.ThreadPoolExecutor(4), handlers=[self])
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def service(self, handler_call_details):  # type: ignore[no-untyped-def]
        method = handler_call_details.method
        metadata = dict(handler_call_details.invocation_metadata)
        self.calls.append((method, metadata))
        forward = [
            (k, v) for k, v in metadata.items() if not k.startswith((":", "grpc-")) and k != "user-agent"
        ]

        # Cardinality is not on the wire: a stream-stream handler carries unary and streaming calls alike.
        def relay(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
            upstream = self.channel.stream_stream(method)(requests, metadata=forward)
            try:
                yield from upstream
            except grpc.RpcError as err:
                context.abort(err.code(), err.details())

        return grpc.stream_stream_rpc_method_handler(relay)

    def close(self) -> None:
        self.server.stop(0)
        self.channel.close()


def _node() -> tuple[str, str]:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.fail(
            "node/npm not installed: `make system-deps` (as root) installs Debian's nodejs and npm",
            pytrace=False,
        )
    return node, npm


@pytest.fixture(scope="module")
def node() -> str:
    node, npm = _node()
    installed = NODE_DIR / "node_modules" / ".package-lock.json"
    lock = NODE_DIR / "package-lock.json"
    if not installed.exists() or installed.stat().st_mtime < lock.stat().st_mtime:
        out = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, capture_output=True, text=True, timeout=600
        )
        assert out.returncode == 0, f"npm ci failed:\n{out.stdout}\n{out.stderr}"
    return node


@pytest.fixture(scope="module")
def server():
    srv = ServerThread(make_settings(ROOT / "models" / "repository"))
    proxy = RecordingProxy(srv.running.address)
    yield srv, proxy
    proxy.close()
    srv.stop()


def _run_node(node: str, address: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [node, "stream.js", "--address", address, *args],
        cwd=NODE_DIR,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_node_client_equals_python_client(node, server):
    srv, proxy = server
    out = _run_node(
        node, f"127.0.0.1:{proxy.port}", "--model", "default", "--text", TEXT, "--chunk", str(CHUNK)
    )
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    chunks_out, summary = lines[:-1], lines[-1]
    assert summary["steps"] == len(TEXT)

    with Client(srv.running.address) as client:
        vocab = list(client.get_model("default").vocabulary)
        ids = np.array([vocab.index(ch) for ch in TEXT], np.int64)
        chunks = [ids[i : i + CHUNK] for i in range(0, len(ids), CHUNK)]
        with client.session("default") as session:
            python = [out["logits"][-1] for out in session.stream(chunks, last_only=True)]

    assert len(chunks_out) == len(python) == len(chunks)
    for i, (js, py) in enumerate(zip(chunks_out, python, strict=True)):
        assert js["seq"] == i + 1 and js["steps"] == min((i + 1) * CHUNK, len(TEXT))
        np.testing.assert_allclose(np.array(js["logits"], np.float32), py, rtol=0, atol=1e-6)
        assert js["top"] == vocab[int(np.argmax(py))] and js["top_id"] == int(np.argmax(py))
    print("node client, top next characters:", "".join(c["top"] for c in chunks_out).encode("unicode_escape"))


def test_node_client_sends_the_affinity_header(node, server):
    _srv, proxy = server
    proxy.calls.clear()
    out = _run_node(node, f"127.0.0.1:{proxy.port}", "--text", "X:1\n", "--chunk", "2")
    assert out.returncode == 0, out.stderr
    methods = {m.rsplit("/", 1)[-1]: md for m, md in proxy.calls}
    assert set(methods) == {"GetModel", "Stream"}
    key = methods["Stream"].get(AFFINITY_HEADER)
    assert key and re.fullmatch(r"[A-Za-z0-9_-]{16}", key), methods["Stream"]
    # Not session-bound: no routing key (as in the Python client).
    assert AFFINITY_HEADER not in methods["GetModel"]
    # A fresh key per session.
    proxy.calls.clear()
    assert _run_node(node, f"127.0.0.1:{proxy.port}", "--text", "X:1\n").returncode == 0
    (other,) = [md[AFFINITY_HEADER] for m, md in proxy.calls if m.endswith("/Stream")]
    assert other != key


def test_node_client_reports_typed_errors(node, server):
    srv, _proxy = server
    out = _run_node(node, srv.running.address, "--model", "no_such_model")
    assert out.returncode == 1
    assert out.stderr.startswith("error: NOT_FOUND: unknown model 'no_such_model'")
