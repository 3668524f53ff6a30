"""The `rnnserve` CLI as a subprocess against a real `python -m service.server` subprocess."""

from __future__ import annotations

import json
import string
import subprocess
import sys
from pathlib import Path

import fixtures
import numpy as np
import pytest
from server_thread import ServerProcess

from service.client import Client

ROOT = Path(__file__).resolve().parents[2]
# Every printable ASCII character, so the real ABC prime "X:1" works as it does on the trained default model.
VOCAB = tuple(dict.fromkeys("\n" + string.printable[:95]))


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli_repo")
    fixtures.token_lstm(root, "default", vocab=VOCAB)
    fixtures.numeric_gru(root, "tiny_gru")
    return root


@pytest.fixture(scope="module")
def server(repo):
    proc = ServerProcess(repo)
    yield proc
    proc.stop()


def cli(server, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service.client.cli", "--address", server.address, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_server_announces_where_it_listens(server):
    text = "".join(server.lines)
    assert "rnnserve listening: gRPC 127.0.0.1:" in text and "default:1" in text and "tiny_gru:1" in text


def test_models(server):
    out = cli(server, "models")
    assert out.returncode == 0, out.stderr
    assert "default  v1" in out.stdout and "in    tokens: int64 (?, ?)" in out.stdout
    as_json = json.loads(cli(server, "models", "--json").stdout)
    assert {m["name"] for m in as_json} == {"default", "tiny_gru"}


def test_stream_text_prints_top_next_char_per_step(server, repo, tmp_path):
    text = "X:1\nT:abc\nK:G\n|:GABc dedB:|\n"
    path = tmp_path / "tune.abc"
    path.write_text(text)
    out = cli(server, "stream", "--model", "default", "--text", str(path), "--chunk", "7")
    assert out.returncode == 0, out.stderr
    rows = [line.split("\t") for line in out.stdout.splitlines()[1:]]
    assert len(rows) == len(text)
    vocab = VOCAB
    ids = np.array([vocab.index(c) for c in text], np.int64)
    logits = fixtures.run_whole(repo / "default" / "1" / "model.onnx", {"tokens": ids[None]})["logits"][0]
    assert [r[2] for r in rows] == [repr(vocab[i]) for i in logits.argmax(-1)]
    assert [r[1] for r in rows] == [repr(c) for c in text]


def test_stream_csv_prints_predictions(server, repo, tmp_path):
    x = np.random.default_rng(0).normal(size=(11, 3)).astype(np.float32)
    path = tmp_path / "series.csv"
    path.write_text("a,b,c\n" + "\n".join(",".join(f"{v:.7g}" for v in row) for row in x) + "\n")
    out = cli(server, "stream", "--model", "tiny_gru", "--csv", str(path), "--chunk", "4")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "step,y[0],y[1]"
    got = np.array([[float(v) for v in line.split(",")[1:]] for line in lines[1:]])
    want = fixtures.run_whole(repo / "tiny_gru" / "1" / "model.onnx", {"x": x[None]})["y"][0]
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_generate_prints_prime_and_tokens(server):
    out = cli(server, "generate", "--prime", "X:1", "--tokens", "50", "--seed", "3", "--temperature", "0.8")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("X:1") and len(out.stdout) == len("X:1") + 50 + 1
    again = cli(server, "generate", "--prime", "X:1", "--tokens", "50", "--seed", "3", "--temperature", "0.8")
    assert again.stdout == out.stdout


def test_session_shows_a_session(server):
    with Client(server.address) as c:
        s = c.session("default")
        s.step(np.array([1, 2, 3]))
        out = cli(server, "session", s.id)
        assert out.returncode == 0, out.stderr
        info = json.loads(out.stdout)
        assert info["session_id"] == s.id and info["last_seq"] == 1 and info["steps"] == 3
        s.close()


def test_errors_exit_nonzero_with_status(server, tmp_path):
    out = cli(server, "session", "no-such-session")
    assert out.returncode == 1 and "NOT_FOUND" in out.stderr
    path = tmp_path / "bad.txt"
    path.write_text("\u00e9")
    out = cli(server, "stream", "--model", "default", "--text", str(path))
    assert out.returncode != 0 and "vocabulary" in out.stderr


def test_console_script_is_installed(server):
    script = Path(sys.executable).parent / "rnnserve"
    assert script.exists(), "pip install -e . installs the rnnserve console script"
    out = subprocess.run(
        [str(script), "--address", server.address, "models"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and "default  v1" in out.stdout, out.stderr


def test_missing_file_and_ragged_csv_give_one_clean_line(server, tmp_path):
    out = cli(server, "stream", "--model", "default", "--text", str(tmp_path / "missing.txt"))
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert (
        out.stderr.strip() == f"rnnserve: cannot read {tmp_path / 'missing.txt'}: No such file or directory"
    )
    out = cli(server, "stream", "--model", "tiny_gru", "--csv", str(tmp_path / "missing.csv"))
    assert out.returncode == 1 and "No such file" in out.stderr and "Traceback" not in out.stderr
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("a,b,c\n1,2,3\n4,5\n")  # tiny_gru takes 3 features per step
    out = cli(server, "stream", "--model", "tiny_gru", "--csv", str(ragged))
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert (
        out.stderr.strip()
        == f"rnnserve: {ragged}:3: 2 values, expected 3 (the model takes; every row needs as many)"
    )
