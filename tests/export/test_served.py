"""End to end: exported models of every family, served by the real server, streamed in chunks, equal PyTorch.

Two sessions per model step with equal chunk lengths at the same time, so the server may batch them together;
their outputs must still equal PyTorch's single pass over each stream (<= 1e-5).
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "service"))  # the service tests' server harness

from server_thread import ServerThread, make_settings  # noqa: E402

from export.graph import build_onnx  # noqa: E402
from models import FAMILIES, CheckpointMeta, ModelConfig, build_model  # noqa: E402

VOCAB = [chr(ord("a") + i) for i in range(11)]
CHUNKS = (1, 5, 17, 1, 40)


def _model(family: str, task: str):
    cfg = ModelConfig(
        family, task, vocab_size=len(VOCAB), in_features=3, out_features=2, hidden=8, layers=2, window=16
    )
    torch.manual_seed(FAMILIES.index(family))
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    repo = root / "repo"
    models = {}
    for family in FAMILIES:
        for task in ("token", "numeric"):
            if task == "numeric" and family not in ("gru", "attention"):
                continue  # numeric heads are covered by two families; keeps the test quick
            name = f"{family}_{task}"
            model = _model(family, task)
            path = repo / name / "1" / "model.onnx"  # verification is tested elsewhere; keep this one quick
            path.parent.mkdir(parents=True)
            onnx.save(build_onnx(model, CheckpointMeta(vocabulary=VOCAB if task == "token" else None)), path)
            models[name] = model
    server = ServerThread(make_settings(repo))
    yield server, models
    server.stop()


def _stream(client_session, data_name: str, x: np.ndarray, out_name: str) -> np.ndarray:
    outs, lo = [], 0
    for n in CHUNKS:
        outs.append(client_session.step({data_name: x[lo : lo + n]})[out_name])
        lo += n
    return np.concatenate(outs, 0)


@pytest.mark.parametrize("name", [f"{f}_token" for f in FAMILIES] + ["gru_numeric", "attention_numeric"])
def test_served_stream_equals_pytorch(served, name):
    from service.client import Client

    server, models = served
    model = models[name]
    rng = np.random.default_rng(0)
    total = sum(CHUNKS)
    if model.cfg.task == "token":
        xs = [rng.integers(0, len(VOCAB), total).astype(np.int64) for _ in range(2)]
        data_name, out_name = "tokens", "logits"
    else:
        xs = [rng.standard_normal((total, 3)).astype(np.float32) for _ in range(2)]
        data_name, out_name = "x", "y"
    with Client(server.address) as client:
        sessions = [client.session(name) for _ in xs]
        with ThreadPoolExecutor(2) as pool:
            got = list(
                pool.map(
                    lambda sx: _stream(sx[0], data_name, sx[1], out_name), zip(sessions, xs, strict=True)
                )
            )
        for s in sessions:
            s.close()
    with torch.no_grad():
        ref, _ = model(torch.from_numpy(np.stack(xs)))
    for i in range(2):
        assert got[i].shape == ref[i].shape
        assert float(np.max(np.abs(got[i] - ref[i].numpy()))) <= 1e-5
