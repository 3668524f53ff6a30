"""Export: every family and task verifies; corrupted graphs fail; dynamic T; metadata; int8; CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from export.contract import check_contract
from export.graph import build_onnx
from export.pipeline import ExportError, export_checkpoint, versions
from export.verify import verify_against_torch
from models import FAMILIES, CheckpointMeta, ModelConfig, build_model, save_checkpoint
from models.reference import reference_forward

ROOT = Path(__file__).resolve().parents[2]
VOCAB = [chr(ord("a") + i) for i in range(11)]


def tiny_model(family: str, task: str, seed: int = 0, hidden: int = 8):
    cfg = ModelConfig(
        family, task, vocab_size=len(VOCAB), in_features=3, out_features=2, hidden=hidden, layers=2, window=16
    )
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


def meta_for(task: str) -> CheckpointMeta:
    return CheckpointMeta(
        vocabulary=VOCAB if task == "token" else None,
        data="synthetic test data",
        metrics={"val_loss": 1.25},
        description="tiny test model",
    )


@pytest.mark.parametrize("task", ["token", "numeric"])
@pytest.mark.parametrize("family", FAMILIES)
def test_export_verifies(family, task):
    model = tiny_model(family, task)
    proto = build_onnx(model, meta_for(task))
    ops = {n.op_type for n in proto.graph.node}
    fused = {"rnn": "RNN", "gru": "GRU"}.get(family, "LSTM")
    assert fused in ops and "Scan" not in ops
    loops = [n for n in proto.graph.node if n.op_type == "Loop"]  # only the attention readout, over blocks
    assert len(loops) == (family == "attention")
    assert all(fused not in {m.op_type for m in loop.attribute[0].g.node} for loop in loops)
    assert sum(n.op_type == fused for n in proto.graph.node) == model.cfg.layers  # one op per layer
    report = check_contract(proto)
    report.extend(verify_against_torch(proto, model, progress=False))
    assert report.ok, report.format()
    assert len([c for c in report.checks if c.name.startswith("ORT == PyTorch")]) == 9  # T x B grid


@pytest.mark.parametrize("family", ["peephole", "cifg", "attention"])
def test_onnx_equals_numpy_equations(family):
    """The fused peephole P / input_forget and the attention graph match the equations, not just torch."""
    model = tiny_model(family, "numeric")
    sess = ort.InferenceSession(build_onnx(model).SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 37, 3)).astype(np.float32)
    feeds = {
        "x": x,
        **{
            f"state_in_{s.name}": np.zeros((3, *s.shape), np.float32 if s.name != "count" else np.int64)
            for s in model.state_shapes()
        },
    }
    y = sess.run(["y"], feeds)[0]
    params = {k: v.numpy() for k, v in model.state_dict().items()}
    y_ref, _ = reference_forward(model.cfg, params, x)
    assert float(np.max(np.abs(y - y_ref))) <= 1e-5


def _perturb(proto: onnx.ModelProto, prefix: str, delta: float) -> onnx.ModelProto:
    bad = onnx.ModelProto()
    bad.CopyFrom(proto)
    for init in bad.graph.initializer:
        if init.name.startswith(prefix):
            arr = numpy_helper.to_array(init).copy()
            arr.flat[0] += delta
            init.CopyFrom(numpy_helper.from_array(arr, init.name))
            return bad
    raise AssertionError(f"no initializer {prefix}")


@pytest.mark.parametrize(
    "family,prefix", [("lstm", "R_l"), ("peephole", "P_l"), ("gru", "W_l"), ("attention", "W_a")]
)
def test_corrupted_graph_fails_verification(family, prefix):
    model = tiny_model(family, "token")
    bad = _perturb(build_onnx(model, meta_for("token")), prefix, 0.05)
    report = verify_against_torch(bad, model, progress=False)
    assert not report.ok
    assert any(c.name.startswith("ORT == PyTorch") and not c.passed for c in report.failures())


def test_state_dropping_graph_fails_contract_streaming():
    """A graph that forgets its state between chunks is caught by the torch-free check too."""
    proto = build_onnx(tiny_model("gru", "numeric"))
    for node in proto.graph.node:
        if "state_out_h" in node.output:  # feed the output the incoming state instead of the new one
            node.op_type, node.input[:] = "Identity", ["state_in_h"]
            del node.attribute[:]
    report = check_contract(proto)
    assert not report.ok and not report.served  # the server's load-time self-check refuses it first
    assert "self-check failed" in report.failures()[0].detail


def test_dynamic_time_axis_one_file(tmp_path):
    model = tiny_model("attention", "token")
    path = tmp_path / "m.onnx"
    onnx.save(build_onnx(model, meta_for("token")), path)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    dims = {i.name: i.shape for i in sess.get_inputs()}
    assert dims["tokens"] == ["batch", "time"]
    assert dims["state_in_window"] == ["batch", 16, 8] and dims["state_in_count"] == ["batch", 1]
    assert {o.name: o.shape for o in sess.get_outputs()}["logits"] == ["batch", "time", len(VOCAB)]
    for steps in (1, 100):
        feeds = {
            "tokens": np.zeros((2, steps), np.int64),
            "state_in_h": np.zeros((2, 2, 8), np.float32),
            "state_in_c": np.zeros((2, 2, 8), np.float32),
            "state_in_window": np.zeros((2, 16, 8), np.float32),
            "state_in_count": np.zeros((2, 1), np.int64),
        }
        logits, *_, count = sess.run(None, feeds)
        assert logits.shape == (2, steps, len(VOCAB))
        assert count.tolist() == [[min(steps, 16)]] * 2


def test_metadata_readable_without_torch(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(build_onnx(tiny_model("cifg", "token"), meta_for("token")), path)
    code = (
        "import json, sys, onnxruntime as ort\n"
        f"m = ort.InferenceSession({str(path)!r}, providers=['CPUExecutionProvider']).get_modelmeta()\n"
        "md = m.custom_metadata_map\n"
        "assert 'torch' not in sys.modules\n"
        "print(json.dumps(md))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    md = json.loads(out)
    assert md["rnnserve.family"] == "cifg" and md["rnnserve.task"] == "token"
    assert json.loads(md["rnnserve.vocabulary"]) == VOCAB
    assert json.loads(md["rnnserve.metrics"]) == {"val_loss": 1.25}
    assert md["rnnserve.data"] == "synthetic test data" and md["rnnserve.description"] == "tiny test model"


def test_token_export_needs_matching_vocabulary():
    model = tiny_model("lstm", "token")
    with pytest.raises(ValueError, match="vocabulary"):
        build_onnx(model, CheckpointMeta(vocabulary=VOCAB[:-1]))
    with pytest.raises(ValueError, match="vocabulary"):
        build_onnx(model, CheckpointMeta())


def _checkpoint(tmp_path: Path, family: str, task: str, name: str = "run") -> Path:
    path = tmp_path / "runs" / name / "ckpt.pt"
    save_checkpoint(path, tiny_model(family, task), meta_for(task))
    return path


def test_pipeline_versions_and_if_changed(tmp_path):
    ckpt = _checkpoint(tmp_path, "lstm", "numeric")
    repo = tmp_path / "repo"
    r1 = export_checkpoint(ckpt, repo, "m", progress=False)
    assert r1.version == 1 and r1.path == repo / "m" / "1" / "model.onnx" and r1.report.ok
    assert (repo / "m" / "config.yaml").read_text().count("description:") == 1
    assert export_checkpoint(ckpt, repo, "m", if_changed=True, progress=False).skipped
    assert export_checkpoint(ckpt, repo, "m", progress=False).version == 2
    assert export_checkpoint(ckpt, repo, "m", version=7, progress=False).version == 7
    with pytest.raises(FileExistsError):
        export_checkpoint(ckpt, repo, "m", version=7, progress=False)
    assert versions(repo / "m") == [1, 2, 7]
    assert not [p for p in (repo / "m").iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_failed_verification_writes_nothing(tmp_path, monkeypatch):
    ckpt = _checkpoint(tmp_path, "gru", "token")
    import export.pipeline as pipeline

    real = pipeline.build_onnx
    monkeypatch.setattr(pipeline, "build_onnx", lambda *a, **k: _perturb(real(*a, **k), "R_l", 0.05))
    with pytest.raises(ExportError, match="nothing written"):
        export_checkpoint(ckpt, tmp_path / "repo", "m", progress=False)
    assert not (tmp_path / "repo" / "m").exists() or not any((tmp_path / "repo" / "m").iterdir())


def test_int8_quantization(tmp_path):
    ckpt = _checkpoint(tmp_path, "lstm", "token")
    text = "abcdefghijk" * 20
    r = export_checkpoint(
        ckpt, tmp_path / "repo", "q", quantize="int8", eval_text=text, progress=False, timing_seconds=0.05
    )
    q = r.quantization
    assert q is not None and q.fp32_bpc is not None and q.int8_bpc is not None
    assert 0 < q.max_abs_diff < 0.5 and q.int8_bytes < q.fp32_bytes and q.eval_text_chars == len(text) - 1
    saved = json.loads((r.path.parent / "quantization.json").read_text())
    assert (r.path.parent / "quantization.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert saved["throughput"][0]["speedup"] > 0
    sess = ort.InferenceSession(str(r.path), providers=["CPUExecutionProvider"])
    md = sess.get_modelmeta().custom_metadata_map
    assert md["rnnserve.quantization"] == "int8-dynamic" and md["rnnserve.family"] == "lstm"
    assert any(n.op_type == "DynamicQuantizeLSTM" for n in onnx.load(str(r.path)).graph.node)
    # Dynamic quantization scales depend on the batch: config.yaml carries the self-check tolerance
    # measured at export, and the server serves what the exporter wrote (one admission rule).
    from service.config import Settings
    from service.core.registry import Repository

    assert "self_check_tolerance:" in (tmp_path / "repo" / "q" / "config.yaml").read_text()
    repo = Repository(tmp_path / "repo", Settings(model_repository=tmp_path / "repo"))
    repo.scan()
    assert "q" in repo.served and repo.refusals() == []


def test_cli_runs_and_verify_command(tmp_path, capsys):
    from export.__main__ import main as export_main
    from export.verify import main as verify_main

    _checkpoint(tmp_path, "rnn", "numeric", "anomaly_rnn")
    ckpt = _checkpoint(tmp_path, "attention", "token", "char_attention")
    repo = tmp_path / "repo"
    args = ["--runs", str(tmp_path / "runs"), "--repository", str(repo)]
    assert export_main(args) == 0
    assert (repo / "anomaly_rnn" / "1" / "model.onnx").exists()
    assert (repo / "char_attention" / "1" / "model.onnx").exists()
    capsys.readouterr()
    assert export_main(args) == 0
    assert "unchanged" in capsys.readouterr().out and not (repo / "char_attention" / "2").exists()
    onnx_path = str(repo / "char_attention" / "1" / "model.onnx")
    # The documented command line, in a fresh interpreter.
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    ok = subprocess.run(
        [sys.executable, "-m", "export.verify", onnx_path, "--checkpoint", str(ckpt)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0 and "ORT == PyTorch at T=64, B=64" in ok.stdout, ok.stdout + ok.stderr
    other = tmp_path / "other.pt"  # same architecture, other weights: must fail
    save_checkpoint(other, tiny_model("attention", "token", seed=9), meta_for("token"))
    assert verify_main([onnx_path, "--checkpoint", str(other)]) == 1
    assert "FAIL" in capsys.readouterr().out
    assert verify_main([onnx_path]) == 0  # torch-free checks alone


def test_cli_rejects_empty_runs_dir(tmp_path, capsys):
    from export.__main__ import main as export_main

    assert export_main(["--runs", str(tmp_path), "--repository", str(tmp_path / "repo")]) == 1
    assert "make train" in capsys.readouterr().err


def test_attention_graph_clamps_count():
    model = tiny_model("attention", "numeric")
    sess = ort.InferenceSession(build_onnx(model).SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 5, 3)).astype(np.float32)
    state = {
        "h": np.zeros((3, 2, 8), np.float32),
        "c": np.zeros((3, 2, 8), np.float32),
        "window": rng.standard_normal((3, 16, 8)).astype(np.float32),
        "count": np.array([[-4], [40], [3]], np.int64),
    }
    y, *_, count = sess.run(None, {"x": x, **{f"state_in_{k}": v for k, v in state.items()}})
    with torch.no_grad():
        y_ref, _ = model(torch.from_numpy(x), {k: torch.from_numpy(v) for k, v in state.items()})
    assert np.isfinite(y).all() and float(np.max(np.abs(y - y_ref.numpy()))) <= 1e-5
    assert count.ravel().tolist() == [5, 16, 8]


def test_float32_noise_floor_fallback():
    """Below float32 resolution the check falls back to 'as exact as PyTorch float32'; bugs still fail."""
    model = tiny_model("rnn", "token", hidden=32)
    proto = build_onnx(model, meta_for("token"))
    report = verify_against_torch(proto, model, tol=1e-9, progress=False)
    assert report.ok, report.format()
    assert all("noise floor used" in c.detail for c in report.checks if c.max_abs and c.max_abs > 1e-9)
    bad = verify_against_torch(_perturb(proto, "R_l", 1e-3), model, tol=1e-9, progress=False)
    assert not bad.ok


def test_attention_long_chunk_crosses_blocks():
    """T = 300 runs as 10 Loop blocks of 32 (the last one padded) and still equals the equations."""
    from export.graph import ATTENTION_BLOCK

    model = tiny_model("attention", "numeric")
    sess = ort.InferenceSession(build_onnx(model).SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(4)
    steps = 300
    assert steps % ATTENTION_BLOCK and steps > 5 * ATTENTION_BLOCK
    x = rng.standard_normal((2, steps, 3)).astype(np.float32)
    state = {
        "h": (0.5 * rng.standard_normal((2, 2, 8))).astype(np.float32),
        "c": (0.5 * rng.standard_normal((2, 2, 8))).astype(np.float32),
        "window": rng.standard_normal((2, 16, 8)).astype(np.float32),
        "count": np.array([[3], [16]], np.int64),
    }
    y, *_ = sess.run(None, {"x": x, **{f"state_in_{k}": v for k, v in state.items()}})
    params = {k: v.numpy() for k, v in model.state_dict().items()}
    y_ref, _ = reference_forward(model.cfg, params, x, state)
    assert float(np.max(np.abs(y - y_ref))) <= 1e-5
