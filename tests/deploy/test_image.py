"""The serving image, built here (deploy/local_image.py: debootstrap base + buildah) and run.

No docker engine runs here and `podman run` cannot (no cgroups), so the image's filesystem is run with
`buildah from` + `buildah run --isolation chroot`: the image's root, user, environment and working directory,
the host's network. The server is started with the image's ENTRYPOINT and ENV (plus loopback/free-port flags,
as a pod's `args` would add), and checked from outside: uid 10001, health SERVING, predictions equal to ONNX
Runtime run on the host, no torch anywhere in the image, no file written outside the declared volumes (the
Deployment's volumeMounts: the root filesystem is read-only there), a clean exit on SIGTERM, the image's size.

The first run debootstraps the base (1-2 min) and installs the serving dependencies from PyPI; later runs
reuse the cached base and buildah's layer cache. With RNNSERVE_IMAGE_REPORT=1 (`make image-check`) the
figures are written to docs/deploy/image.md, which the README includes.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import dockerfile
import grpc
import numpy as np
import onnx
import onnxruntime as ort
import psutil
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
REPORT = ROOT / "docs" / "deploy" / "image.md"
TAG = "localhost/rnnserve:check"
# The image is the whole serving stack; torch alone would add ~800 MB. Generous, but it catches that.
MAX_IMAGE_BYTES = 800e6
# The module fixture builds the image: a cold build (debootstrap + pip) takes minutes on a loaded machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


def _tools() -> None:
    missing = [t for t in ("buildah", "podman", "debootstrap") if shutil.which(t) is None]
    if missing:
        pytest.fail(
            f"{' '.join(missing)} not installed: the image cannot be built. `make system-deps` (as root) "
            "installs them; .ci/run does too.",
            pytrace=False,
        )


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    _tools()
    out = tmp_path_factory.mktemp("image") / "build.json"
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "deploy" / "local_image.py"), "--tag", TAG, "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert proc.returncode == 0, f"image build failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    info = json.loads(out.read_text())
    info["started"] = started
    os.environ["CONTAINERS_CONF"] = info["containers_conf"]
    return info


def _buildah(*args: str, **kw) -> str:  # type: ignore[no-untyped-def]
    return subprocess.run(["buildah", *args], check=True, capture_output=True, text=True, **kw).stdout.strip()


@pytest.fixture(scope="module")
def config(built) -> dict:
    """The image's OCI config (User, Env, Entrypoint, WorkingDir)."""
    return json.loads(_buildah("inspect", "--type", "image", TAG))["OCIv1"]["config"]


def _dockerfile_runtime() -> dict:
    """The runtime stage's ENV, USER, WORKDIR and ENTRYPOINT, from the Dockerfile itself."""
    env: dict[str, str] = {}
    out: dict = {"env": env}
    for c in dockerfile.parse_file(str(ROOT / "deploy" / "Dockerfile")):
        if c.cmd == "FROM":
            env.clear()
        elif c.cmd == "ENV":
            env.update(zip(c.value[::2], c.value[1::2], strict=True))
        elif c.cmd in ("USER", "WORKDIR"):
            out[c.cmd.lower()] = c.value[0]
        elif c.cmd == "ENTRYPOINT":
            out["entrypoint"] = list(c.value)
    return out


def _volume_mounts() -> list[str]:
    """Writable paths the Deployment declares (its volumeMounts; the root filesystem is read-only there)."""
    deployment = yaml.safe_load((ROOT / "deploy" / "base" / "deployment.yaml").read_text())
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    return [m["mountPath"] for m in container["volumeMounts"]]


def _upperdir(merged: str) -> Path:
    """The overlay upper directory of a mounted container: every file the container writes lands there."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == merged:
            opts = line.split(" - ", 1)[1]
            found = re.search(r"upperdir=([^,]+)", opts)
            assert found, opts
            return Path(found.group(1))
    raise AssertionError(f"{merged} is not mounted")


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            out["/" + str(p.relative_to(root))] = (st.st_mtime_ns, st.st_size)
    return out


class ImageServer:
    """`buildah run` of the image's entrypoint in a fresh working container; the server is found by pid."""

    def __init__(self, config: dict) -> None:
        self.container = _buildah("from", "--quiet", TAG)
        self.merged = _buildah("mount", self.container)
        self.upper = _upperdir(self.merged)
        # Let the runtime create its mount points first, so that only the server's own writes differ later;
        # what a second empty run changes again (a mount point directory's mtime) is the runtime's, not ours.
        _buildah("run", "--isolation", "chroot", self.container, "--", "true")
        first = _tree(self.upper)
        _buildah("run", "--isolation", "chroot", self.container, "--", "true")
        self.before = _tree(self.upper)
        self.runtime_touched = {
            p for p in first.keys() | self.before.keys() if first.get(p) != self.before.get(p)
        }
        cmd = [
            "buildah",
            "run",
            "--isolation",
            "chroot",
            "--user",
            config["User"],
            self.container,
            "--",
            *config["Entrypoint"],
            "--grpc-host",
            "127.0.0.1",
            "--grpc-port",
            "0",
            "--metrics-port",
            "0",
        ]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        assert self.proc.stdout is not None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.lines.append(line)
            found = re.search(r"gRPC 127\.0\.0\.1:(\d+) \| metrics http://127\.0\.0\.1:(\d+)/metrics", line)
            if found:
                self.address = f"127.0.0.1:{found.group(1)}"
                self.metrics_port = int(found.group(2))
                threading.Thread(target=self._drain, daemon=True).start()
                break
        else:
            self.proc.kill()
        if not hasattr(self, "address"):
            raise AssertionError("the image's server did not start:\n" + "".join(self.lines))
        self.pid = self._server_pid()

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def _server_pid(self) -> int:
        for child in psutil.Process(self.proc.pid).children(recursive=True):
            # buildah's chroot helpers carry the same arguments; the server is the python process.
            if child.name().startswith("python") and "service.server" in child.cmdline():
                return child.pid
        raise AssertionError("no server process under buildah run")

    def stop(self) -> int:
        """SIGTERM the server (as the kubelet would) and return buildah run's exit status."""
        if self.proc.poll() is None:
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def remove(self) -> None:
        self.stop()
        subprocess.run(["buildah", "umount", self.container], check=False, capture_output=True)
        subprocess.run(["buildah", "rm", self.container], check=False, capture_output=True)


@pytest.fixture(scope="module")
def server(config):
    srv = ImageServer(config)
    yield srv
    srv.remove()


def test_image_config_is_the_dockerfiles(config):
    want = _dockerfile_runtime()
    assert config["Entrypoint"] == want["entrypoint"] == ["python", "-m", "service.server"]
    assert config["User"] == want["user"] == "10001:10001"
    assert config["WorkingDir"] == want["workdir"]
    env = dict(e.split("=", 1) for e in config["Env"])
    for key, value in want["env"].items():
        expected = value.replace("$PATH", "")
        assert env[key].startswith(expected) if key == "PATH" else env[key] == value, key


def test_server_runs_as_uid_10001_with_the_image_entrypoint_and_env(server, config):
    proc = psutil.Process(server.pid)
    assert proc.uids().real == proc.uids().effective == 10001
    assert proc.gids().real == proc.gids().effective == 10001
    root = os.readlink(f"/proc/{server.pid}/root")
    assert os.readlink(f"/proc/{server.pid}/cwd") == root + config["WorkingDir"]
    # `python` is found on the image's PATH: the venv the build stage made.
    assert proc.cmdline()[0] == "/opt/venv/bin/python"
    assert proc.cmdline()[1:3] == config["Entrypoint"][1:]
    environ = dict(
        kv.split("=", 1) for kv in Path(f"/proc/{server.pid}/environ").read_text().split("\0") if "=" in kv
    )
    for kv in config["Env"]:
        key, value = kv.split("=", 1)
        assert environ[key] == value, key
    assert "RNNSERVE_MODEL_REPOSITORY=/app/models/repository" in config["Env"]


def test_health_is_serving(server):
    with grpc.insecure_channel(server.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def _reference(model_path: Path, tokens: np.ndarray) -> np.ndarray:
    """One ONNX Runtime pass on the host over the whole stream, from the model's declared initial state."""
    model = onnx.load(model_path)
    meta = {p.key: p.value for p in model.metadata_props}
    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    feeds: dict[str, np.ndarray] = {"tokens": tokens[None, :]}
    for inp in sess.get_inputs():
        if not inp.name.startswith("state_in_"):
            continue
        name = inp.name.removeprefix("state_in_")
        blob = meta.get(f"rnnserve.initial_state.{name}")
        dtype = np.float32 if "float" in inp.type else np.int64
        if blob is not None:
            init = np.load(io.BytesIO(base64.b64decode(blob)))
        else:
            init = np.zeros([int(d) for d in inp.shape[1:]], dtype)
        feeds[inp.name] = init[None].astype(dtype)
    return sess.run(["logits"], feeds)[0][0]


def test_streamed_prediction_equals_onnxruntime_on_the_host(server):
    from service.client import Client

    repo = ROOT / "models" / "repository" / "default"
    newest = max(int(p.name) for p in repo.iterdir() if p.name.isdigit())
    with Client(server.address) as client:
        info = client.get_model("default")
        assert info.version == newest
        vocab = list(info.vocabulary)
        text = "X:1\nT:The Kesh\nM:6/8\nK:G\n|:GAG GAB|ABA ABd|"
        tokens = np.array([vocab.index(ch) for ch in text], np.int64)
        got = []
        with client.session("default") as session:
            lo = 0
            for n in (1, 7, 16, len(tokens) - 24):
                got.append(session.step({"tokens": tokens[lo : lo + n]})["logits"])
                lo += n
    want = _reference(repo / str(newest) / "model.onnx", tokens)
    np.testing.assert_allclose(np.concatenate(got), want, rtol=1e-4, atol=1e-4)
    assert vocab[int(np.argmax(want[-1]))] == vocab[int(np.argmax(np.concatenate(got)[-1]))]


def test_no_torch_in_the_image(server):
    site = list(Path(server.merged).glob("opt/venv/lib/python3*/site-packages"))
    assert len(site) == 1, site
    assert (site[0] / "onnxruntime").is_dir(), "sanity: the serving dependencies are there"
    found = [p for p in Path(server.merged).glob("**/site-packages/torch*")]
    found += [p for p in Path(server.merged).glob("usr/lib/python3*/**/torch") if p.is_dir()]
    assert not found, f"torch in the serving image: {found}"


def test_metrics_endpoint_is_served(server):
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as r:
        body = r.read().decode()
    assert "rnnserve_steps_total" in body


def test_writes_only_to_declared_volumes_and_exits_cleanly_on_sigterm(server, config):
    """Run last in this module: it stops the server. Anything it wrote is in the container's upper layer."""
    status = server.stop()
    assert status == 0, "".join(server.lines[-20:])
    assert any("rnnserve stopped" in line for line in server.lines)
    volumes = _volume_mounts()

    def outside() -> list[str]:
        after = _tree(server.upper)
        changed = [
            p for p, v in after.items() if server.before.get(p) != v and p not in server.runtime_touched
        ]
        return sorted(p for p in changed if not any(p == v or p.startswith(v + "/") for v in volumes))

    assert not outside(), f"the server wrote outside the declared volumes {volumes}: {outside()}"
    # The check sees a write by the image's user outside them (e.g. /var/tmp, world-writable in the image but
    # read-only in the pod).
    write = "open('/var/tmp/probe', 'w').write('x')"
    _buildah(
        "run",
        "--isolation",
        "chroot",
        "--user",
        config["User"],
        server.container,
        "--",
        "python",
        "-c",
        write,
    )
    assert "/var/tmp/probe" in outside()


def test_image_size_and_report(built):
    """After the run checks: the image's size, and (RNNSERVE_IMAGE_REPORT=1) the report the README cites."""
    size = built["size_bytes"]
    assert 0 < size < MAX_IMAGE_BYTES, f"image is {size / 1e6:.0f} MB"
    if os.environ.get("RNNSERVE_IMAGE_REPORT") != "1":
        return
    run = {
        "size_bytes": size,
        "base_size_bytes": built["base_size_bytes"],
        "base_seconds": built["base_seconds"],
        "build_seconds": built["build_seconds"],
        "module_seconds": round(time.monotonic() - built["started"], 1),
    }
    runs_file = REPORT.with_suffix(".json")
    runs = json.loads(runs_file.read_text()) if runs_file.exists() else {}
    runs["cached" if built["base_cached"] else "cold"] = run
    runs_file.write_text(json.dumps(runs, indent=2, sort_keys=True) + "\n")
    REPORT.write_text(render_report(runs))


def render_report(runs: dict) -> str:
    """The markdown table of docs/deploy/image.md from the last cold and the last cached run."""
    cols = [k for k in ("cold", "cached") if k in runs]
    head = {
        "cold": "first run (empty cache: debootstrap, pip)",
        "cached": "later run (cached base and layers)",
    }
    mb = 1e6
    rows = [
        (
            "image size (uncompressed, as `podman images` reports it)",
            lambda r: f"{r['size_bytes'] / mb:.0f} MB",
        ),
        ("of which the local Debian bookworm base", lambda r: f"{r['base_size_bytes'] / mb:.0f} MB"),
        (
            "of which the serving layers (venv, service code, default model)",
            lambda r: f"{(r['size_bytes'] - r['base_size_bytes']) / mb:.0f} MB",
        ),
        ("base image step", lambda r: f"{r['base_seconds']:.0f} s"),
        ("`buildah build`", lambda r: f"{r['build_seconds']:.0f} s"),
        ("`make image-check`'s tests (build, run, checks)", lambda r: f"{r['module_seconds']:.0f} s"),
    ]
    lines = ["| | " + " | ".join(head[c] for c in cols) + " |", "|---|" + "---|" * len(cols)]
    lines += ["| " + label + " | " + " | ".join(f(runs[c]) for c in cols) + " |" for label, f in rows]
    return "\n".join(lines) + "\n"


def test_apt_mirror_reads_both_source_formats(tmp_path):
    """The base is debootstrapped from the mirror apt uses: deb822 `.sources` and one-line `.list` files."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("local_image", ROOT / "deploy" / "local_image.py")
    assert spec and spec.loader
    local_image = importlib.util.module_from_spec(spec)
    sys.modules["local_image"] = local_image  # dataclasses look their module up there
    spec.loader.exec_module(local_image)
    deb822 = tmp_path / "debian.sources"
    deb822.write_text(
        "Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\n\n"
        "Enabled: no\nTypes: deb\nURIs: http://disabled.example/debian\nSuites: bookworm\n\n"
        "Types: deb deb-src\n# a comment\nURIs: http://mirror.example/debian\n"
        "Suites: bookworm bookworm-updates\n"
    )
    one_line = tmp_path / "sources.list"
    one_line.write_text(
        "# deb http://old.example/debian bookworm main\ndeb [arch=amd64] http://one.example/d bookworm main\n"
    )
    assert local_image.apt_mirror([deb822]) == "http://mirror.example/debian"
    assert local_image.apt_mirror([one_line]) == "http://one.example/d"
    with pytest.raises(SystemExit, match="no Debian mirror"):
        local_image.apt_mirror([one_line], suite="trixie")
