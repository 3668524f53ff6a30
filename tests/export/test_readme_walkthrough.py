"""README "Serve your own PyTorch model": its three blocks run as written, end to end.

The export block runs in a fresh directory (a subprocess, as a user would run it); the real server
(`python -m service.server`, the bash block's command on free loopback ports) serves the repository it wrote;
the client block runs against it with only the address changed, and asserts chunked == one pass itself. The
test then checks, through the same native client, that served chunks equal ONNX Runtime's one pass over each
exported file.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "service"))  # the service tests' server harness

from server_thread import ServerProcess  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
HEADING = "## Serve your own PyTorch model"
NAMES = ("my_rnn", "my_lstm", "my_gru")


def walkthrough_blocks() -> list[tuple[str, str]]:
    """The fenced blocks of the README section, as (language, code)."""
    text = (ROOT / "README.md").read_text()
    start = text.index(HEADING)
    end = text.index("\n## ", start + len(HEADING))
    return re.findall(r"```(\w+)\n(.*?)```", text[start:end], re.S)


def test_walkthrough_runs_as_written(tmp_path):
    blocks = walkthrough_blocks()
    assert [lang for lang, _ in blocks] == ["python", "bash", "python"]
    export_code, serve_cmd, client_code = (code for _, code in blocks)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    (tmp_path / "export_step.py").write_text(export_code)
    res = subprocess.run(
        [sys.executable, "export_step.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stderr
    repo = tmp_path / "my_repository"
    for name in NAMES:
        assert f"wrote my_repository/{name}/1/model.onnx" in res.stdout
        assert "FAIL" not in (repo / name / "1" / "verification.txt").read_text()
    assert res.stdout.count("PASS  ORT chunked stream == PyTorch one pass") == 3

    assert serve_cmd.split()[1:] == ["-m", "service.server", "--model-repository", "my_repository"]
    server = ServerProcess(repo)
    try:
        assert '"127.0.0.1:8001"' in client_code
        (tmp_path / "client_step.py").write_text(client_code.replace("127.0.0.1:8001", server.address))
        res = subprocess.run(
            [sys.executable, "client_step.py"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert res.returncode == 0, res.stderr
        assert res.stdout.splitlines() == [f"{n} chunked == one pass" for n in NAMES]

        # Served chunks also equal ONNX Runtime's one pass over the exported file (the server adds nothing).
        from service.client import Client

        ids = np.random.default_rng(5).integers(0, 10, 40)
        with Client(server.address) as client:
            for name in NAMES:
                sess = ort.InferenceSession(str(repo / name / "1" / "model.onnx"))
                feeds = {"tokens": ids[None].astype(np.int64)}
                for i in sess.get_inputs()[1:]:
                    feeds[i.name] = np.zeros((1, *i.shape[1:]), np.float32)
                (ref,) = sess.run(["logits"], feeds)
                with client.session(name) as s:
                    got = np.concatenate([s.step({"tokens": c})["logits"] for c in np.split(ids, [3, 4, 20])])
                assert np.abs(got - ref[0]).max() <= 1e-5
    finally:
        server.stop()
