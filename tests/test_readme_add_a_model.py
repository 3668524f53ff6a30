"""README "Add a model while it serves", run as written: one server process from start to end.

A fresh directory plays the clone: `models/repository` holds a copy of the shipped `default` model,
`.venv/bin/python` and `.venv/bin/rnnserve` are this interpreter and the CLI, `my_repository/my_model` is a
user's model, `broken.onnx` the same model with its state not carried (the load-time self-check refuses it)
and `fixed.onnx` a good one. The README's blocks run through bash in that directory, unchanged; only the ports
come from the environment (`RNNSERVE_GRPC_PORT`, `RNNSERVE_METRICS_PORT`, `RNNSERVE_ADDRESS`), so the test
never takes 8001. A `sleep` is the README's way to wait for the next poll; on a loaded machine the test gives
the commands after it more time (it runs them again, up to 60 s) instead of failing.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import string
import subprocess
import sys
import time
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent / "service"))

import fixtures  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HEADING = "## Add a model while it serves"
VOCAB = tuple(dict.fromkeys("\n" + string.printable[:95]))


def blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    start = text.index(HEADING)
    end = text.index("\n## ", start + len(HEADING))
    return [code for lang, code in re.findall(r"```(\w*)\n(.*?)```", text[start:end], re.S) if lang == "bash"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clone(tmp: Path) -> None:
    shutil.copytree(ROOT / "models" / "repository" / "default", tmp / "models" / "repository" / "default")
    bin_dir = tmp / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    # Scripts, not symlinks: a symlinked interpreter outside its venv would not find the venv's packages.
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    (bin_dir / "rnnserve").write_text(f'#!/bin/sh\nexec {sys.executable} -m service.client.cli "$@"\n')
    (bin_dir / "python").chmod(0o755)
    (bin_dir / "rnnserve").chmod(0o755)
    good = fixtures.token_lstm(tmp / "my_repository", "my_model", vocab=VOCAB)
    shutil.copy(good, tmp / "fixed.onnx")
    onnx.save(fixtures.state_passthrough(good), tmp / "broken.onnx")


class Shell:
    """Runs README lines in the clone, as a user would in a second terminal."""

    def __init__(self, cwd: Path, env: dict[str, str]) -> None:
        self.cwd, self.env = cwd, env

    def run(self, block: str) -> str:
        out = subprocess.run(
            ["bash", "-c", block], cwd=self.cwd, env=self.env, capture_output=True, text=True, timeout=120
        )
        return out.stdout + out.stderr

    def run_until(self, block: str, *expected: str, limit_s: float = 60) -> str:
        """Run the block; while an expected text is missing, run its lines after the last `sleep` again."""
        out = self.run(block)
        after = block.split("sleep", 1)[1].split("\n", 1)[1] if "sleep" in block else block
        deadline = time.monotonic() + limit_s
        while not all(e in out for e in expected) and time.monotonic() < deadline:
            time.sleep(1)
            out = self.run(after)
        assert all(e in out for e in expected), f"missing {expected} in:\n{out}"
        return out


def test_add_a_model_while_it_serves_as_written(tmp_path):
    serve, quick, add, broken, fixed = blocks()
    assert serve.split("#")[0].split() == [
        ".venv/bin/python",
        "-m",
        "service.server",
        "--model-repository",
        "models/repository",
    ]
    _clone(tmp_path)
    port = _free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "RNNSERVE_GRPC_HOST": "127.0.0.1",
        "RNNSERVE_GRPC_PORT": str(port),
        "RNNSERVE_METRICS_PORT": "-1",
        "RNNSERVE_ADDRESS": f"127.0.0.1:{port}",
    }
    server = subprocess.Popen(
        ["bash", "-c", serve],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        lines = [""]
        deadline = time.monotonic() + 120
        while "rnnserve listening" not in lines[-1] and time.monotonic() < deadline:
            lines.append(server.stdout.readline())
            assert lines[-1] or server.poll() is None, "the server exited:\n" + "".join(lines)
        assert "rnnserve listening" in lines[-1]
        sh = Shell(tmp_path, env)

        out = sh.run(quick)
        assert re.search(r"^default\s+v\d", out, re.M), out
        assert (tmp_path / "tune.txt").read_text() == "X:1\nT:The Kesh\n"
        assert "Traceback" not in out and len(out.splitlines()) > 15, out  # one line per input character

        out = sh.run_until(add, "my_model  v1")
        assert "Traceback" not in out

        out = sh.run_until(broken, "my_model: NOT_SERVING", "my_model  v2  REFUSED: self-check failed")
        assert re.search(r"version 2 was refused at load: self-check failed", out), out

        out = sh.run_until(fixed, "my_model: SERVING")
        assert "my_model  v2" in sh.run(".venv/bin/rnnserve models")
        assert server.poll() is None, "the server restarted or died"  # one process from start to end
    finally:
        server.terminate()
        server.wait(timeout=60)
