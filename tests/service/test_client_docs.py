"""The client example in docs/api.md runs as written against the committed default model."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from server_thread import ServerProcess

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "api.md"
DEFAULT_MODEL = ROOT / "models" / "repository" / "default" / "1" / "model.onnx"


@pytest.mark.skipif(not DEFAULT_MODEL.exists(), reason="the committed default model is missing")
def test_docs_client_example_runs_against_the_default_model():
    code = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    srv = ServerProcess(ROOT / "models" / "repository")
    try:
        out = subprocess.run(
            [sys.executable, "-c", code],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "RNNSERVE_ADDRESS": srv.address},
        )
    finally:
        srv.stop()
    assert out.returncode == 0, out.stderr
    text = "X:1\nT:The Kesh\nM:6/8\nK:G\n|:GAG GAB|"
    bars = [b for b in text.split("|") if b]
    assert out.stdout.count("next character:") == len(bars)
    assert f"steps applied: {sum(len(b) for b in bars)}" in out.stdout
    tune = out.stdout.split("steps applied:")[1].split("\n", 1)[1]
    assert tune.startswith("X:1\n") and len(tune) >= 4 + 200
