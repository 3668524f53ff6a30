"""docs/triton.md's perf_analyzer command, run as written (only the address is the test server's).

The command calls the wrapper deploy/perf_analyzer, which must find the binary's libcudart by itself: the test
removes LD_LIBRARY_PATH from the environment. The server serves the committed default model, as `make serve`.
RNNSERVE_PYTHON names the interpreter running the tests (the wrapper's default is the repository's .venv).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.service.server_thread import ServerThread, make_settings

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def documented_command() -> list[str]:
    """The first `deploy/perf_analyzer` command of the perf_analyzer section's code block."""
    text = (ROOT / "docs" / "triton.md").read_text()
    section = text.split("## perf_analyzer", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "no bash block in docs/triton.md's perf_analyzer section"
    joined = block.group(1).replace("\\\n", " ")
    (line,) = [ln for ln in joined.splitlines() if ln.strip().startswith("deploy/perf_analyzer")]
    return shlex.split(line)


@pytest.fixture(scope="module")
def server():
    srv = ServerThread(make_settings(ROOT / "models" / "repository", metrics_port=-1))
    yield srv
    srv.stop()


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    env["RNNSERVE_PYTHON"] = sys.executable
    return env


def test_documented_command_runs_against_a_real_server(server):
    cmd = documented_command()
    assert cmd[0] == "deploy/perf_analyzer" and "localhost:8001" in cmd
    cmd = [server.running.address if a == "localhost:8001" else a for a in cmd]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=_env(), timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "error while loading shared libraries" not in output
    assert re.search(r"Sequence count: [1-9]", output), output
    ok = int(re.search(r"Successful request count: (\d+)", output).group(1))
    assert ok >= 200, output
    throughput = re.search(r"Concurrency: 2, throughput: ([\d.]+) infer/sec", output)
    assert throughput and float(throughput.group(1)) > 0, output


def test_wrapper_names_what_is_missing(tmp_path):
    env = _env()
    env["RNNSERVE_PYTHON"] = str(tmp_path / "no-venv" / "bin" / "python")
    cmd = ["deploy/perf_analyzer", "--version"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    assert out.returncode == 2 and "no Python environment" in out.stderr
