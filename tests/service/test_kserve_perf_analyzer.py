"""Triton's own load generator, perf_analyzer (shipped in the tritonclient wheel), against the real server.

perf_analyzer reads ModelMetadata and ModelConfig, recognises a sequence model by `sequence_batching`, drives
sequences with sequence_id/start/end (unary and streaming) and reads ModelStatistics. The binary links
libb64 and libcudart (`apt-get install libb64-0d`, `pip install nvidia-cuda-runtime-cu12`). Only the
tritonclient 2.41 wheel ships a working binary (pinned in pyproject.toml): anything else fails here, loudly.
"""

from __future__ import annotations

import importlib.metadata
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


PINNED = "2.41.0"  # the last tritonclient wheel with a working perf_analyzer (pyproject.toml, test extra)


@pytest.fixture(scope="module")
def perf_analyzer() -> tuple[Path, dict[str, str]]:
    # Fail, never skip: a missing or placeholder binary would otherwise hide every test below.
    installed = importlib.metadata.version("tritonclient")
    if installed != PINNED:
        pytest.fail(f"tritonclient {installed} installed; perf_analyzer needs tritonclient[grpc]=={PINNED}")
    if not BINARY.exists():
        pytest.fail(f"{BINARY} is missing from the tritonclient {PINNED} wheel's install")
    env = _environment()
    probe = subprocess.run([str(BINARY), "--version"], capture_output=True, text=True, env=env, timeout=60)
    if probe.returncode != 0 or "Perf Analyzer Version" not in probe.stdout + probe.stderr:
        pytest.fail(f"perf_analyzer cannot run: {(probe.stdout + probe.stderr).strip()[:500]}")
    return BINARY, env


def test_the_pinned_tritonclient_ships_a_working_perf_analyzer(perf_analyzer):
    binary, env = perf_analyzer
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, env=env, timeout=60)
    assert re.search(r"Perf Analyzer Version \d", out.stdout + out.stderr)


def test_the_wrapper_refuses_another_tritonclient(tmp_path):
    # A stand-in interpreter that reports tritonclient 2.73.0, as a newer wheel (with the placeholder) would.
    fake = tmp_path / "bin" / "python"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\necho 2.73.0\n')
    fake.chmod(0o755)
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        ["deploy/perf_analyzer", "--version"],
        cwd=root,
        capture_output=True,
        text=True,
        env={**os.environ, "RNNSERVE_PYTHON": str(fake)},
        timeout=60,
    )
    assert out.returncode == 2, out.stderr
    assert "tritonclient 2.73.0" in out.stderr and "==2.41.0" in out.stderr, out.stderr


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
