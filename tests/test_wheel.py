"""The wheel works alone: built from a clean copy of the sources, installed in a fresh venv, served, used.

The wheel is built the way pip builds it (`pip wheel`, the repository's own backend, wheel_layout.py) from a
copy of the files git tracks, so the git-ignored gRPC stubs of the checkout are not there to help. A fresh
venv (no pip of its own, no system site-packages) gets it from a wheelhouse of the dependencies re-packed
from this venv's installed distributions, so the test never downloads: first the client alone (numpy,
grpcio, protobuf; no ONNX Runtime), then `[server,export]`. Every command runs from an empty folder
with no PYTHONPATH, so nothing of the checkout is importable. The installed `rnnserve-server` (two worker
processes, spawned as `python -m rnnserve.server.worker`) serves the committed `default` model; the installed
client and `rnnserve` CLI must get what the checkout's client gets from the checkout's server.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import psutil
import pytest
import tritonclient.grpc as triton
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from wheel.wheelfile import WheelFile

import service
import wheel_layout
from service.client import Client
from tests.service.server_thread import ServerProcess, ServerThread, make_settings

ROOT = Path(__file__).resolve().parents[1]
# What a wheel build reads (pyproject.toml names the backend, the packages and the layout step).
SOURCES = (
    "pyproject.toml",
    "README.md",
    "MANIFEST.in",
    "wheel_layout.py",
    "protos",
    "service",
    "export",
    "models",
)
TEXT = "X:1\nT:The Kesh\nM:6/8\nK:G\n|:GAG GAB|ABA ABd|"
PRIME, TOKENS, SEED = "X:1\n", 40, 7

pytestmark = pytest.mark.slow


def run(*cmd: str | Path, cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command with no PYTHONPATH (nothing of the checkout importable) and return its result."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    if check and done.returncode:
        pytest.fail(f"{' '.join(map(str, cmd))} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done


def _tools() -> None:
    """Fail (not skip) when a tool the test needs is missing."""
    if shutil.which("git") is None:
        pytest.fail("git is missing: the wheel is built from the files git tracks")
    if run(sys.executable, "-m", "pip", "--version", cwd=ROOT, check=False).returncode:
        pytest.fail("pip is missing from this venv (make install-dev)")
    try:
        import grpc_tools  # noqa: F401 (the build generates the stubs with it, from this venv)
    except ImportError:
        pytest.fail("grpcio-tools is missing from this venv (make install-dev)")


# ------------------------------------------------------------------------------------------------ the wheel


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    _tools()
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("dist")
    listed = run("git", "ls-files", "--cached", "--others", "--exclude-standard", *SOURCES, cwd=ROOT).stdout
    for rel in listed.split():
        if (ROOT / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, src / rel)
    assert not list(src.glob("service/proto/*_pb2*")), (
        "the copy must not carry the checkout's generated stubs"
    )
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", out, src, cwd=src)
    (built,) = out.glob("rnnserve-*.whl")
    return built


def test_the_wheel_has_one_top_level_package_and_its_stubs(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        info = f"rnnserve-{service.__version__}.dist-info"
        meta = z.read(f"{info}/METADATA").decode()
        top = z.read(f"{info}/top_level.txt").decode().split()
        scripts = z.read(f"{info}/entry_points.txt").decode()
        stub = z.read("rnnserve/proto/rnnserve_pb2_grpc.py").decode()
        pb2 = z.read("rnnserve/proto/rnnserve_pb2.py").decode()
    assert {n.split("/")[0] for n in names} == {"rnnserve", info}
    assert top == ["rnnserve"]
    assert {"rnnserve/proto/rnnserve_pb2.py", "rnnserve/proto/rnnserve_pb2.pyi"} <= set(names)
    assert "from rnnserve.proto import rnnserve_pb2" in stub
    assert (
        "rnnserve = rnnserve.client.cli:main" in scripts
        and "rnnserve-server = rnnserve.server:main" in scripts
    )
    exported = {n for n in names if n.startswith("rnnserve/export/")}
    assert exported == {f"rnnserve/export/{m}.py" for m in wheel_layout.EXPORT_MODULES}
    assert f"Version: {service.__version__}\n" in meta
    # The stubs check their grpcio and protobuf at import; the wheel asks for at least those.
    grpc_floor = re.search(r"GRPC_GENERATED_VERSION = '([^']+)'", stub)[1]
    requires = [
        Requirement(line.split(": ", 1)[1]) for line in meta.splitlines() if line.startswith("Requires-Dist")
    ]
    pb_floor = ".".join(
        re.search(r"ValidateProtobufRuntimeVersion\(\s*\S+,\s*(\d+),\s*(\d+),\s*(\d+)", pb2).groups()
    )
    for name, floor in (("grpcio", grpc_floor), ("protobuf", pb_floor)):
        (req,) = [r for r in requires if r.name == name and not r.marker]
        assert req.specifier.contains(floor) and not req.specifier.contains(_below(floor)), (req, floor)


def _below(version: str) -> str:
    major, minor, *_ = version.split(".")
    return f"{major}.{int(minor) - 1}" if int(minor) else f"{int(major) - 1}.999"


# ------------------------------------------------------------------------------------ wheelhouse and venv


def _closure(wheel: Path, extras: set[str]) -> list[metadata.Distribution]:
    """This venv's installed distributions the wheel needs with `extras` (markers evaluated), not itself."""
    with zipfile.ZipFile(wheel) as z:
        (meta,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        lines = z.read(meta).decode().splitlines()
    todo = [
        (Requirement(line.split(": ", 1)[1]), extras) for line in lines if line.startswith("Requires-Dist: ")
    ]
    found: dict[str, metadata.Distribution] = {}
    seen: set[tuple[str, frozenset[str]]] = set()
    while todo:
        req, wanted = todo.pop()
        if req.marker and not any(req.marker.evaluate({"extra": e}) for e in {"", *wanted}):
            continue
        name = canonicalize_name(req.name)
        if name == "rnnserve" or (name, frozenset(req.extras)) in seen:
            continue
        seen.add((name, frozenset(req.extras)))
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            pytest.fail(f"{req} (needed by the wheel) is not installed in this venv: make install-dev")
        found[name] = dist
        todo += [(Requirement(r), set(req.extras)) for r in dist.requires or []]
    return sorted(found.values(), key=lambda d: d.metadata["Name"])


def _repack(dist: metadata.Distribution, into: Path, scratch: Path) -> None:
    """An installed distribution as a wheel again: its files under site-packages and its dist-info.

    Stored, not deflated: the wheelhouse lives for one test run, and deflating ~250 MB of shared libraries
    would take most of it. `wheel`'s own WheelFile writes the RECORD.
    """
    root = scratch / canonicalize_name(dist.metadata["Name"])
    info = ""
    for f in dist.files or []:
        parts = Path(f).parts
        if (
            parts[0] == ".."
            or "__pycache__" in parts
            or parts[-1] in ("INSTALLER", "REQUESTED", "direct_url.json")
        ):
            continue  # scripts (outside site-packages) are made again from entry_points.txt at install
        info = parts[0] if parts[0].endswith(".dist-info") else info
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(dist.locate_file(f), root / f)
    wheel_file = (root / info / "WHEEL").read_text().splitlines()
    tags = [line.split(": ", 1)[1] for line in wheel_file if line.startswith("Tag: ")]
    triple = "-".join(".".join(sorted({t.split("-")[i] for t in tags})) for i in range(3))
    with WheelFile(into / f"{info.removesuffix('.dist-info')}-{triple}.whl", "w", zipfile.ZIP_STORED) as whl:
        whl.write_files(str(root))


@pytest.fixture(scope="module")
def wheelhouse(wheel, tmp_path_factory) -> Path:
    house, scratch = tmp_path_factory.mktemp("wheelhouse"), tmp_path_factory.mktemp("unpacked")
    for dist in _closure(wheel, {"server", "export"}):
        _repack(dist, house, scratch)
    shutil.copy2(wheel, house)
    return house


@dataclass(frozen=True)
class Venv:
    """A fresh venv (no pip of its own, no system site-packages); commands run from an empty folder."""

    root: Path
    cwd: Path
    house: Path

    @property
    def python(self) -> Path:
        return self.root / "bin" / "python"

    def install(self, *requirements: str | Path) -> None:
        """Install from the wheelhouse only (this venv's pip, aimed at the fresh one with --python)."""
        pip = (sys.executable, "-m", "pip", "--python", self.python, "install", "-q", "--no-compile")
        run(*pip, "--no-index", "--find-links", self.house, *requirements, cwd=self.cwd)

    def run(self, script: str, *args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run one of the venv's console scripts (`rnnserve`, `rnnserve-server`, `python`)."""
        return run(self.root / "bin" / script, *args, cwd=self.cwd, check=check)

    def py(self, code: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run("python", "-c", code, *args, check=check)


@pytest.fixture(scope="module")
def venv(wheel, wheelhouse, tmp_path_factory) -> Venv:
    """The wheel installed client-only (the `served` fixture adds [server,export])."""
    where = tmp_path_factory.mktemp("venv")
    run(sys.executable, "-m", "venv", "--without-pip", where / "env", cwd=where)
    (where / "cwd").mkdir()
    env = Venv(where / "env", where / "cwd", wheelhouse)
    env.install(wheel)
    return env


# ---------------------------------------------------------------------------------------------- the tests


CLIENT_ONLY = """
import importlib.util, json
import rnnserve, rnnserve.client
server = ["onnxruntime", "pydantic", "prometheus_client", "redis", "tritonclient"]
absent = server + ["service", "export", "models"]  # nothing of the checkout either
print(json.dumps({
    "version": rnnserve.__version__,
    "file": rnnserve.__file__,
    "importable": [m for m in absent if importlib.util.find_spec(m) is not None],
}))
"""


def test_client_install_has_no_server_dependencies(venv):
    found = json.loads(venv.py(CLIENT_ONLY).stdout)
    assert found["version"] == service.__version__
    assert Path(found["file"]).is_relative_to(venv.root), f"rnnserve imported from {found['file']}"
    assert found["importable"] == [], "server dependencies (or the checkout) importable in a client install"
    assert venv.run("rnnserve", "--version").stdout.split() == ["rnnserve", service.__version__]


@pytest.fixture(scope="module")
def served(wheel, venv, tmp_path_factory) -> Iterator[tuple[ServerProcess, ServerThread, Path]]:
    """[server,export] installed; the installed server (2 workers) and the checkout's, on one model."""
    venv.install(f"{wheel}[server,export]")
    repo = tmp_path_factory.mktemp("repository")
    # The committed default model, version 1 only (the LSTM; version 2 adds attention and load time).
    shutil.copytree(ROOT / "models" / "repository" / "default" / "1", repo / "default" / "1")
    shutil.copy2(ROOT / "models" / "repository" / "default" / "config.yaml", repo / "default")
    server = ServerProcess(
        repo,
        "--workers",
        "2",
        server=[str(venv.root / "bin" / "rnnserve-server")],
        cwd=venv.cwd,
        env={"PYTHONPATH": ""},
    )
    reference = ServerThread(make_settings(repo))
    try:
        yield server, reference, repo
    finally:
        server.stop()
        reference.stop()


CLIENT = """
import json, sys
import numpy as np
from rnnserve.client import Client

text, prime, n, seed = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
with Client(sys.argv[1]) as client:
    model = client.get_model("default")
    ids = {c: i for i, c in enumerate(model.vocabulary)}
    chunks = [np.array([ids[c] for c in bar], dtype=np.int64) for bar in text.split("|") if bar]
    with client.session("default") as session:
        logits = [out["logits"][-1].tolist() for out in session.stream(chunks)]
        steps = session.describe().steps
    tune = "".join(client.generate("default", prime=prime, n=n, temperature=0.8, seed=seed))
    models = [m.name for m in client.list_models()]
print(json.dumps({"models": models, "logits": logits, "steps": steps, "tune": tune}))
"""


def _expected(address: str) -> dict:
    """The same calls with the checkout's client against the checkout's server."""
    with Client(address) as client:
        model = client.get_model("default")
        ids = {c: i for i, c in enumerate(model.vocabulary)}
        chunks = [np.array([ids[c] for c in bar], dtype=np.int64) for bar in TEXT.split("|") if bar]
        with client.session("default") as session:
            logits = [out["logits"][-1].tolist() for out in session.stream(chunks)]
            steps = session.describe().steps
        tune = "".join(client.generate("default", prime=PRIME, n=TOKENS, temperature=0.8, seed=SEED))
        return {
            "models": [m.name for m in client.list_models()],
            "logits": logits,
            "steps": steps,
            "tune": tune,
        }


def test_installed_server_client_and_cli_work_alone(venv, served):
    server, reference, _ = served
    workers = [c.cmdline() for c in psutil.Process(server.proc.pid).children()]
    assert len(workers) == 2 and all(
        w[:3] == [str(venv.python), "-m", "rnnserve.server.worker"] for w in workers
    )
    got = json.loads(venv.py(CLIENT, server.address, TEXT, PRIME, str(TOKENS), str(SEED)).stdout)
    want = _expected(reference.address)
    assert got["models"] == want["models"] == ["default"]
    assert got["steps"] == want["steps"] == len(TEXT.replace("|", ""))
    np.testing.assert_allclose(np.array(got["logits"]), np.array(want["logits"]), rtol=1e-5, atol=1e-5)
    assert got["tune"] == want["tune"] and len(got["tune"]) == TOKENS

    cli = ("rnnserve", "--address", server.address)
    models = json.loads(venv.run(*cli, "models", "--json").stdout)
    assert [m["name"] for m in models] == ["default"]
    generated = venv.run(*cli, "generate", "--prime", PRIME, "--tokens", str(TOKENS), "--seed", str(SEED))
    assert generated.stdout == PRIME + want["tune"] + "\n"
    tune = venv.cwd / "tune.abc"
    tune.write_text(TEXT.replace("|", ""))
    streamed = venv.run(*cli, "stream", "--model", "default", "--text", tune, "--chunk", "8")
    assert len(streamed.stdout.splitlines()) == 1 + len(TEXT.replace("|", ""))  # a header, then one per step
    assert venv.run(*cli, "health", "default").stdout.split() == ["default:", "SERVING"]

    # The installed version where the server reports one (KServe ServerMetadata), and by the server's flag.
    meta = triton.InferenceServerClient(url=server.address).get_server_metadata()
    assert meta.version == service.__version__
    shown = venv.run("rnnserve-server", "--version").stdout.split()
    assert shown == ["rnnserve-server", service.__version__]


def test_installed_contract_checker_passes_the_served_model(venv, served):
    _, _, repo = served
    done = venv.run(
        "python", "-m", "rnnserve.export.contract", repo / "default" / "1" / "model.onnx", check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
