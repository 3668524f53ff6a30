"""The serving image's Dockerfile, parsed with Docker's own parser (`dockerfile`: BuildKit's parser).

No docker engine runs here, so the image is not built in tests; what the file promises is checked instead:
multi-stage, pinned base, non-root numeric user, no torch, the ports and entrypoint the server uses, and a
build context (.dockerignore) that holds everything the COPY lines need and nothing heavy.
"""

from __future__ import annotations

import fnmatch
import re
import shlex
import tomllib
from dataclasses import dataclass
from pathlib import Path

import dockerfile
import pytest

from service.config import Settings

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"


@dataclass(frozen=True)
class Stage:
    """One build stage: its base image (ARGs resolved), its name and its instructions."""

    image: str
    name: str | None
    commands: tuple[dockerfile.Command, ...]

    def all(self, cmd: str) -> list[dockerfile.Command]:
        return [c for c in self.commands if c.cmd == cmd]


def stages() -> list[Stage]:
    commands = dockerfile.parse_file(str(DOCKERFILE))
    args: dict[str, str] = {}
    out: list[Stage] = []
    current: list[dockerfile.Command] = []
    header: tuple[str, str | None] | None = None
    for c in commands:
        if c.cmd == "ARG" and header is None:
            name, _, default = c.value[0].partition("=")
            args[name] = default
        elif c.cmd == "FROM":
            if header is not None:
                out.append(Stage(header[0], header[1], tuple(current)))
            image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], c.value[0])
            name = c.value[2] if len(c.value) == 3 and c.value[1].upper() == "AS" else None
            header, current = (image, name), []
        else:
            current.append(c)
    assert header is not None, "no FROM in deploy/Dockerfile"
    out.append(Stage(header[0], header[1], tuple(current)))
    return out


def test_multi_stage_with_pinned_slim_python_base():
    all_stages = stages()
    assert len(all_stages) >= 2, "the image must be multi-stage (build stage + slim runtime stage)"
    runtime = all_stages[-1]
    copies_from_build = [c for c in runtime.all("COPY") if any(f.startswith("--from=") for f in c.flags)]
    assert copies_from_build, "the runtime stage copies its venv from a build stage"
    for stage in all_stages:
        repo, _, tag = stage.image.partition(":")
        assert repo == "python", stage.image
        assert re.fullmatch(r"3\.11\.\d+-slim(-\w+)?", tag), f"base {stage.image} is not a pinned slim tag"


def test_runtime_runs_as_a_numeric_non_root_user():
    runtime = stages()[-1]
    users = runtime.all("USER")
    assert users, "the runtime stage must switch user"
    uid, _, gid = users[-1].value[0].partition(":")
    assert uid.isdigit() and int(uid) > 0, "USER must be numeric (runAsNonRoot can only verify a numeric uid)"
    assert not gid or (gid.isdigit() and int(gid) > 0)
    created = " ".join(" ".join(c.value) for c in runtime.all("RUN"))
    assert f"--uid {uid}" in created, "USER names the uid of the account the image creates"
    # The manifests run as the same uid.
    deployment = (ROOT / "deploy" / "base" / "deployment.yaml").read_text()
    assert f"runAsUser: {uid}" in deployment


def test_no_torch_in_the_serving_image():
    text = DOCKERFILE.read_text()
    runs = " ".join(" ".join(c.value) for s in stages() for c in s.all("RUN"))
    assert "torch" not in runs.replace("torch must not be in the serving image", "").replace(
        "pip show torch", ""
    ), "a RUN line installs torch"
    assert not re.search(r"install[^\n]*\.\[", text), "the image must not install the project's extras"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"] + project["optional-dependencies"]["server"]
    assert not [d for d in deps if re.match(r"torch\b", d)], "torch must not be a serving dependency"
    assert "pip show torch" in runs, "the build fails if anything pulls torch in transitively"


def test_ports_env_and_entrypoint_match_the_server():
    runtime = stages()[-1]
    (expose,) = runtime.all("EXPOSE")
    ports = {int(p) for p in expose.value}
    assert ports == {
        Settings.model_fields["grpc_port"].default,
        Settings.model_fields["metrics_port"].default,
    }
    (entry,) = runtime.all("ENTRYPOINT")
    assert entry.json, "exec-form ENTRYPOINT, so the server is PID 1 and receives SIGTERM itself"
    assert list(entry.value) == ["python", "-m", "service.server"]
    env: dict[str, str] = {}
    for c in runtime.all("ENV"):
        env.update(zip(c.value[::2], c.value[1::2], strict=True))
    assert int(env["RNNSERVE_GRPC_PORT"]) == Settings.model_fields["grpc_port"].default
    assert int(env["RNNSERVE_METRICS_PORT"]) == Settings.model_fields["metrics_port"].default
    (workdir,) = runtime.all("WORKDIR")
    repo_copy = [c for c in runtime.all("COPY") if c.value[0] == "models/repository"]
    assert repo_copy, "the default model repository is baked into the image"
    dest = Path(workdir.value[0]) / repo_copy[0].value[1]
    assert Path(env["RNNSERVE_MODEL_REPOSITORY"]) == dest


def test_build_tools_do_not_reach_the_runtime_stage():
    build = " ".join(" ".join(c.value) for c in stages()[0].all("RUN"))
    assert "pip uninstall -y grpcio-tools" in build
    runtime = stages()[-1]
    copied = [c.value[0] for c in runtime.all("COPY") if any(f == "--from=build" for f in c.flags)]
    assert set(copied) == {"/opt/venv", "/src/service"}, copied


def test_protoc_invocation_matches_the_makefile():
    """The image generates the stubs exactly as `make protos` does (same import root, same outputs)."""
    make = (ROOT / "Makefile").read_text()
    want = re.search(r"grpc_tools\.protoc (.*) \$\(PROTO_SRC\)", make)
    assert want, "Makefile protos rule not found"
    runs = " ".join(" ".join(c.value) for c in stages()[0].all("RUN"))
    assert " ".join(want.group(1).split()) in " ".join(runs.split())


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; `!` re-includes. Parents of a path count as matches."""
    ignored = False
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for raw in patterns:
        neg = raw.startswith("!")
        pat = raw[1:] if neg else raw
        pat = pat.rstrip("/")
        if pat == "**" or any(
            fnmatch.fnmatch(p, pat) or fnmatch.fnmatch(p, pat.replace("**/", "")) for p in prefixes
        ):
            ignored = not neg
    return ignored


@pytest.fixture(scope="module")
def ignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def test_build_context_holds_what_copy_needs_and_nothing_heavy(ignore_patterns):
    sources = [
        c.value[0]
        for s in stages()
        for c in s.all("COPY")
        if not any(f.startswith("--from=") for f in c.flags)
    ]
    assert sources
    for src in sources:
        assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
        assert not _ignored(src, ignore_patterns), f"COPY {src} is excluded by .dockerignore"
    for heavy in (".venv/bin/python", ".git/HEAD", "data/irish.abc", "runs/x/ckpt.pt", "tests/conftest.py"):
        assert _ignored(heavy, ignore_patterns), f"{heavy} would be sent to the docker daemon"
    # Stubs are generated in the build stage; stale local ones must not leak in.
    assert _ignored("service/proto/rnnserve_pb2.py", ignore_patterns)
    assert not _ignored("service/server/app.py", ignore_patterns)


def test_build_commands_are_shell_parsable():
    for stage in stages():
        for c in stage.all("RUN"):
            shlex.split(" ".join(c.value))
