"""The tritonclient example of docs/triton.md (the README snippet) runs as written against a real server.

The block is executed verbatim except for the address (the test server listens on a free port, not 8001);
the text it prints must equal a greedy rollout computed with ONNX Runtime directly.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import fixtures
import numpy as np
import pytest
from kserve_harness import ServerThread

from service.config import Settings

DOC = Path(__file__).resolve().parents[2] / "docs" / "triton.md"
README_SNIPPET = DOC.parent / "triton_example.md"  # what the README includes
BLOCK = re.compile(r"<!-- triton-example -->\n```python\n(?P<code>.*?)```\n<!-- end triton-example -->", re.S)


def example_code() -> str:
    match = BLOCK.search(DOC.read_text())
    assert match, "docs/triton.md lost its triton-example block"
    return match.group("code")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("readme_repo")
    fixtures.token_lstm(repo, "default", hidden=12, seed=4)
    srv = ServerThread(Settings(model_repository=repo, grpc_host="127.0.0.1", grpc_port=0, metrics_port=-1))
    yield srv, repo
    srv.stop()


def test_example_runs_as_written_and_matches_ort(server):
    srv, repo = server
    code = example_code()
    assert 'url="localhost:8001"' in code
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code.replace("localhost:8001", srv.url), str(DOC), "exec"), {"__name__": "__example__"})
    printed = out.getvalue()

    vocab = list(fixtures.DEFAULT_VOCAB)
    prime = "X:1\nT:"
    ids = [vocab.index(c) for c in prime if c in vocab]
    text = prime
    model = repo / "default" / "1" / "model.onnx"
    for _ in range(60):
        logits = fixtures.run_whole(model, {"tokens": np.array([ids], np.int64)})["logits"][0, -1]
        ids.append(int(np.argmax(logits)))
        text += vocab[ids[-1]]
    assert printed == text + "\n"


def test_readme_snippet_is_the_tested_block():
    snippet = README_SNIPPET.read_text()
    assert f"```python\n{example_code()}```\n" in snippet
