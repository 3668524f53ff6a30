"""Data readers, training loop, checkpoints, anomaly scoring and the adding problem, on tiny synthetic data.

Nothing here downloads: archives are built in the test with the same layout as the real sdist/wheel members.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import tarfile
import zipfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from models import ModelConfig, build_model, load_checkpoint, read_checkpoint
from models import data as D
from models.anomaly import AnomalyTrainConfig, _reuse, judge, run_anomaly, stream_scores
from models.experiment import BASELINE_MSE, LagConfig, adding_problem, run_lag
from models.report import render_char, render_long_lag
from models.train import (
    CharTrainConfig,
    evaluate_bpc,
    open_forget_gates_,
    run_char,
    sample,
    train_char_model,
)

TUNES = """X:1
T:Test One
M:6/8
L:1/8
K:D Major
|:ABc dcB|AFD DFA|ABc dcB|AFD D3:|!

X:2
T:Test Two
M:C|
L:1/8
K:G Major
GF|DGGB d2GB|d2GF Gc (3AGF|DGGB d2GB|dBcA F2GF|!

X:3
T:Test Three
M:3/4
L:1/8
K:A Minor
A2 B2 c2|e4 d2|c2 B2 A2|E6|!
"""

CSV = "timestamp,value,is_anomaly\n0,1.5,0\n1,2.5,0\n2,9.0,1\n3,2.0,0\n"


def _sdist(path: Path, member: str, payload: bytes) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in ((member, payload), ("pkg-0.1/setup.py", b"# not used\n")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


# ----------------------------------------------------------------------------------------------- readers


def test_tar_member_and_sha_check(tmp_path: Path) -> None:
    payload = TUNES.encode()
    archive = _sdist(tmp_path / "pkg-0.1.tar.gz", D.TUNES_MEMBER, payload)
    got = D.read_tar_member(archive, D.TUNES_MEMBER)
    assert got == payload
    D.check_sha256(got, hashlib.sha256(payload).hexdigest(), "tunes")
    with pytest.raises(D.DataError, match="does not match"):
        D.check_sha256(got + b" ", hashlib.sha256(payload).hexdigest(), "tunes")
    with pytest.raises(D.DataError, match="no member"):
        D.read_tar_member(archive, "pkg-0.1/data/missing.abc")


def test_zip_member_and_csv_reader(tmp_path: Path) -> None:
    members = {D.UCR_TEST_MEMBER: CSV.encode(), "aeon/x.py": b""}
    archive = _wheel(tmp_path / "aeon-0-py3-none-any.whl", members)
    values, labels = D.read_ucr_csv(D.read_zip_member(archive, D.UCR_TEST_MEMBER))
    np.testing.assert_allclose(values, [1.5, 2.5, 9.0, 2.0])
    assert labels.tolist() == [False, False, True, False]
    with pytest.raises(D.DataError, match="no member"):
        D.read_zip_member(archive, D.UCR_TRAIN_MEMBER)
    with pytest.raises(D.DataError, match="header"):
        D.read_ucr_csv(b"a,b,c\n1,2,3\n")
    with pytest.raises(D.DataError, match="non-finite"):
        D.read_ucr_csv(b"timestamp,value,is_anomaly\n0,nan,0\n")


def test_loaders_reject_missing_and_tampered_cache(tmp_path: Path) -> None:
    with pytest.raises(D.DataError, match="make data"):
        D.load_tunes(tmp_path)
    (tmp_path / D.TUNES_FILE).write_text(TUNES)  # right name, wrong bytes: the checksum must catch it
    with pytest.raises(D.DataError, match="sha256"):
        D.load_tunes(tmp_path)
    (tmp_path / D.UCR_TRAIN_FILE).write_text(CSV)
    (tmp_path / D.UCR_TEST_FILE).write_text(CSV)
    with pytest.raises(D.DataError, match="sha256"):
        D.load_ucr135(tmp_path)


def test_corpus_split_by_whole_tunes_and_codec() -> None:
    tunes = D.split_tunes(TUNES)
    assert [t.splitlines()[0] for t in tunes] == ["X:1", "X:2", "X:3"]
    corpus = D.make_char_corpus(TUNES, val_fraction=0.34)
    val, train = corpus.decode(corpus.val), corpus.decode(corpus.train)
    assert val.count("X:") == 1 and train.count("X:") == 2
    assert set(val.strip().split("\n\n")).isdisjoint(train.strip().split("\n\n"))
    assert corpus.vocabulary == tuple(sorted(set(TUNES)))
    assert corpus.decode(corpus.encode("X:1\nK:D")) == "X:1\nK:D"
    with pytest.raises(ValueError, match="not in the vocabulary"):
        corpus.encode("X:1 \u00e9")


def test_stream_batches_are_contiguous_per_stream() -> None:
    ids = np.arange(103, dtype=np.int64)
    chunks = list(D.stream_batches(ids, batch=4, seq_len=7))
    xs = np.concatenate([x for x, _ in chunks], axis=1)  # (4, 25)
    ys = np.concatenate([y for _, y in chunks], axis=1)
    np.testing.assert_array_equal(xs, np.arange(100).reshape(4, 25))
    np.testing.assert_array_equal(ys, xs + 1)
    assert [x.shape[1] for x, _ in chunks] == [7, 7, 7, 4]


# ----------------------------------------------------------------------------------------------- training


def _corpus() -> D.CharCorpus:
    return D.make_char_corpus(TUNES * 8, val_fraction=0.2, description="synthetic")


def test_training_loop_lowers_loss() -> None:
    torch.manual_seed(0)
    corpus = _corpus()
    cfg = CharTrainConfig(name="t", family="lstm", hidden=32, embed=16, batch=4, seq_len=32, steps=60,
                          lr=1e-2, eval_every=30, eval_batch=2, eval_seq_len=64)
    model = build_model(ModelConfig(family="lstm", task="token", vocab_size=len(corpus.vocabulary), hidden=32,
                                    embed=16))
    before = evaluate_bpc(model, corpus.val, 2, 64)
    assert before == pytest.approx(math.log2(len(corpus.vocabulary)), abs=0.5)  # ~uniform at initialisation
    hist = train_char_model(model, corpus, cfg, progress=False)
    assert len(hist.train_bpc) == 60 and [p.step for p in hist.val] == [30, 60]
    assert np.mean(hist.train_bpc[-10:]) < np.mean(hist.train_bpc[:10]) - 1.0
    assert hist.val[-1].val_bpc < before - 1.0


def test_run_char_checkpoint_round_trip_and_sampling(tmp_path: Path) -> None:
    corpus = _corpus()
    cfg = CharTrainConfig(name="char_gru", family="gru", hidden=16, embed=8, batch=4, seq_len=16, steps=8,
                          eval_every=8, eval_batch=2, eval_seq_len=32)
    result = run_char(cfg, corpus, tmp_path, progress=False)
    run = tmp_path / "char_gru"
    assert (run / "ckpt.pt").is_file() and (run / "loss.png").stat().st_size > 1000
    hist = json.loads((run / "history.json").read_text())
    assert len(hist["train_bpc"]) == 8 and hist["val"][-1]["val_bpc"] == pytest.approx(result.val_bpc)
    ckpt = read_checkpoint(run / "ckpt.pt")
    assert ckpt.meta.vocabulary == list(corpus.vocabulary)
    assert ckpt.meta.metrics["val_bpc"] == pytest.approx(result.val_bpc, abs=1e-4)
    # The reloaded model reproduces the validation number the run reported.
    assert evaluate_bpc(load_checkpoint(run / "ckpt.pt"), corpus.val, cfg.eval_batch,
                        cfg.eval_seq_len) == pytest.approx(result.val_bpc, abs=1e-5)
    text = sample(ckpt.model, corpus, prime="X:", length=50, seed=1)
    assert text.startswith("X:") and set(text) <= set(corpus.vocabulary)
    assert text == sample(ckpt.model, corpus, prime="X:", length=50, seed=1)  # seeded


def test_open_forget_gates_shifts_the_right_slice() -> None:
    for family, sl, sign in (("lstm", slice(8, 16), 1.0), ("peephole", slice(8, 16), 1.0),
                             ("cifg", slice(0, 8), -1.0), ("attention", slice(8, 16), 1.0)):
        m = build_model(ModelConfig(family=family, task="numeric", in_features=2, out_features=1, hidden=8))
        before = m.layers[0].bias_ih.detach().clone()
        open_forget_gates_(m, 1.0)
        diff = m.layers[0].bias_ih.detach() - before
        expected = torch.zeros_like(diff)
        expected[sl] = sign
        torch.testing.assert_close(diff, expected)
    gru = build_model(ModelConfig(family="gru", task="numeric", in_features=2, out_features=1, hidden=8))
    before = [p.detach().clone() for p in gru.parameters()]
    open_forget_gates_(gru, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, gru.parameters(), strict=True))


# ----------------------------------------------------------------------------------------------- anomaly


def test_judge_applies_the_tolerance_rule() -> None:
    scores = np.zeros(1000)
    scores[640] = 5.0
    det = judge(scores, (500, 510), 100)
    assert (det.top_index, det.distance, det.correct) == (640, 130, False)
    det = judge(scores, (600, 620), 100)
    assert (det.top_index, det.distance, det.correct) == (640, 20, True)
    scores[505] = 9.0
    assert judge(scores, (500, 510), 100).distance == 0


def test_anomaly_scoring_finds_an_injected_spike(tmp_path: Path) -> None:
    t = np.arange(1500)
    test = 60 + 10 * np.sin(2 * np.pi * t / 25)
    test[1100] += 25.0  # the injected anomaly
    labels = np.zeros(len(test), dtype=bool)
    labels[1100] = True
    series = D.AnomalySeries(test[:400].copy(), test, labels, (1100, 1100), 5, "synthetic sine")
    cfg = AnomalyTrainConfig(name="anomaly_gru", family="gru", hidden=16, batch=16, seq_len=48, steps=120,
                             lr=1e-2, chunk=200)
    r = run_anomaly(cfg, series, tmp_path, progress=False)
    assert r.detection.correct and r.detection.top_index == 1100, r.detection
    assert r.train_mse < 0.05  # normalised units: the sine is learned
    run = tmp_path / "anomaly_gru"
    assert (run / "anomaly.png").stat().st_size > 1000 and (run / "loss.png").is_file()
    ckpt = read_checkpoint(run / "ckpt.pt")
    assert ckpt.meta.metrics["input_mean"] == pytest.approx(test[:400].mean())
    # Streaming invariance: the chunk size the series is cut into does not change any score.
    norm = (test - ckpt.meta.metrics["input_mean"]) / ckpt.meta.metrics["input_std"]
    scores = np.load(run / "scores.npy")
    np.testing.assert_allclose(stream_scores(ckpt.model, norm, chunk=37), scores, atol=1e-5)
    # --reuse takes the finished run (same settings) instead of training again; other settings retrain.
    again = run_anomaly(cfg, series, tmp_path, progress=False, reuse=True)
    assert again.detection == r.detection and again.seconds == pytest.approx(r.seconds)
    assert _reuse(AnomalyTrainConfig(**{**asdict(cfg), "steps": 7}), series, tmp_path) is None


# ------------------------------------------------------------------------------------------- adding problem


def test_adding_problem_targets() -> None:
    gen = np.random.default_rng(0)
    for length in (10, 57, 200):
        x, y = adding_problem(256, length, gen, first_fraction=0.1)
        assert x.shape == (256, length, 2) and x.dtype == np.float32 and y.shape == (256,)
        markers = x[..., 1]
        assert np.all(markers.sum(1) == 2)
        first = markers.argmax(1)
        second = length - 1 - markers[:, ::-1].argmax(1)
        assert np.all(first < max(1, int(0.1 * length))) and np.all(second < max(2, length // 2))
        np.testing.assert_allclose(y, (x[..., 0] * markers).sum(1), rtol=1e-6)
    _, y = adding_problem(20000, 20, gen)
    assert np.mean((y - 1.0) ** 2) == pytest.approx(BASELINE_MSE, abs=0.01)
    with pytest.raises(ValueError, match="T >= 2"):
        adding_problem(4, 1, gen)


def test_run_lag_learns_a_short_lag() -> None:
    r = run_lag(LagConfig(family="gru", lag=6, hidden=16, steps=250, lr=1e-2, eval_every=50, test_size=200))
    assert r.curve[0][1] > BASELINE_MSE * 0.5  # untrained: no better than guessing
    assert r.learned and r.test_mse < 0.05, r.curve


# ----------------------------------------------------------------------------------------------- reports


def test_reports_render_from_json() -> None:
    char = {
        "data": "d", "best": "char_b", "command": "python -m models.train all",
        "budget": dict(hidden=8, layers=1, embed=4, batch=2, seq_len=4, steps=3, lr=0.01, clip=1.0, seed=0,
                       window=16),
        "sample": {"from": "char_b", "prime": "X:", "temperature": 0.8, "file": "sample_tune.abc"},
        "runs": [dict(name="char_a", params=10, val_bpc=2.5, train_bpc=2.4, seconds=3.0),
                 dict(name="char_b", params=12, val_bpc=2.1, train_bpc=2.0, seconds=200.0)],
    }
    md = render_char(char)
    rows = [line for line in md.splitlines() if line.startswith("| `")]
    assert rows[0].startswith("| `char_b` (best) | 12 | 2.100") and "3.3 min" in rows[0]
    lag = {
        "families": ["rnn"], "lags": [10, 50], "first_fraction": 0.1, "test_size": 9, "baseline_mse": 1 / 6,
        "threshold": 0.05, "command": "c", "seconds": 5.0,
        "budget": dict(hidden=8, batch=2, steps=3, lr=0.01, clip=1.0, seed=0),
        "runs": [dict(family="rnn", lag=10, test_mse=0.01, learned=True)],
    }
    md = render_long_lag(lag)
    assert "| `rnn` | 0.0100 **learned** | - |" in md
