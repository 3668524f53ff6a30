"""Triton's own load generator, perf_analyzer (shipped in the tritonclient wheel), against the real server.

perf_analyzer reads ModelMetadata and ModelConfig, recognises a sequence model by `sequence_batching`, drives
sequences with sequence_id/start/end (unary and streaming) and reads ModelStatistics. The binary links
libb64 and libcudart; where they are missing (`apt-get install libb64-0d`, `pip install
nvidia-cuda-runtime-cu12`) the test is skipped with that reason.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import fixtures
import pytest
from kserve_harness import ServerThread

from service.config import Settings

pytestmark = pytest.mark.slow
BINARY = Path(sys.executable).parent / "perf_analyzer"


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    try:
        import nvidia.cuda_runtime as cudart  # only a shared library for the binary; no GPU is used

        lib = str(Path(next(iter(cudart.__path__))) / "lib")
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (lib, env.get("LD_LIBRARY_PATH", "")) if p)
    except ImportError:
        pass
    return env


@pytest.fixture(scope="module")
def perf_analyzer() -> tuple[Path, dict[str, str]]:
    if not BINARY.exists():
        pytest.skip("perf_analyzer is not in the venv (tritonclient wheel without it)")
    env = _environment()
    probe = subprocess.run([str(BINARY), "--help"], capture_output=True, text=True, env=env, timeout=60)
    if "error while loading shared libraries" in probe.stderr:
        pytest.skip(f"perf_analyzer cannot start: {probe.stderr.strip()}")
    return BINARY, env


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("pa_repo")
    fixtures.token_lstm(repo, "tiny_lstm")
    srv = ServerThread(Settings(model_repository=repo, grpc_host="127.0.0.1", grpc_port=0, metrics_port=-1))
    yield srv
    srv.stop()


@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "streaming"])
def test_perf_analyzer_drives_sequences(perf_analyzer, server, streaming):
    binary, env = perf_analyzer
    args = [
        str(binary),
        "-m",
        "tiny_lstm",
        "-i",
        "grpc",
        "-u",
        server.url,
        "--input-data",
        "zero",
        "--shape",
        "tokens:4",
        "--sequence-length",
        "10",
        "--concurrency-range",
        "2",
        "--measurement-mode",
        "count_windows",
        "--measurement-request-count",
        "100",
        "--max-trials",
        "3",
        "--stability-percentage",
        "1000",
    ]
    if streaming:
        args.append("--streaming")
    result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=240)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert re.search(r"Sequence count: [1-9]", output), output
    ok = int(re.search(r"Successful request count: (\d+)", output).group(1))
    assert ok >= 100, output
    assert "error" not in output.lower(), output
