"""Streaming anomaly detection on UCR KDD-TSAD #135 with a next-value predictor.

A numeric model learns to predict x[t+1] from x[..t] on the 1,200 normal training points (normalised with the
training mean and standard deviation). The test series (7,501 points) is then streamed through the model in
chunks with the recurrent state carried between them, exactly as a client streams it through the server; each
step's score is the squared error of the previous step's prediction. The archive's rule (Wu & Keogh 2021,
"Current time series anomaly detection benchmarks are flawed..."): a detector is right if its single
top-scoring point lies within the labelled anomaly +-100 points.

    python -m models.anomaly                       # anomaly_<family> for every family + docs/results
    python -m models.anomaly --families gru --steps 300
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from models import CheckpointMeta, ModelConfig, build_model, read_checkpoint, save_checkpoint
from models.data import AnomalySeries, load_ucr135
from models.train import TrainHistory, open_forget_gates_, plot_loss

FAMILIES = ("rnn", "lstm", "peephole", "cifg", "gru", "attention")
RUNS_DIR = Path("runs")
RESULTS_DIR = Path("docs/results")


@dataclass
class AnomalyTrainConfig:
    """Hyper-parameters of one anomaly-model run."""

    name: str
    family: str = "gru"
    hidden: int = 64
    layers: int = 1
    window: int = 32
    batch: int = 32
    seq_len: int = 128
    steps: int = 300
    lr: float = 3e-3
    clip: float = 1.0
    seed: int = 0
    chunk: int = 500  # test-time streaming chunk length (state carried between chunks)
    threads: int = 1


@dataclass(frozen=True)
class Normaliser:
    """z-scoring with the training statistics (the model sees and predicts normalised values)."""

    mean: float
    std: float

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Normalise raw values."""
        return (x - self.mean) / self.std


@dataclass(frozen=True)
class Detection:
    """Where the top score lies relative to the labelled anomaly, judged by the archive's +-tolerance rule."""

    top_index: int
    top_score: float
    anomaly: tuple[int, int]
    tolerance: int
    correct: bool
    distance: int  # 0 inside the labelled range, else points to its nearest end


def judge(scores: np.ndarray, anomaly: tuple[int, int], tolerance: int) -> Detection:
    """Apply the UCR rule to ``scores`` (one per test point)."""
    top = int(np.argmax(scores))
    lo, hi = anomaly
    distance = 0 if lo <= top <= hi else (lo - top if top < lo else top - hi)
    return Detection(top, float(scores[top]), anomaly, tolerance, distance <= tolerance, distance)


def random_crops(
    series: np.ndarray, batch: int, seq_len: int, gen: np.random.Generator
) -> tuple[Tensor, Tensor]:
    """``batch`` random windows: inputs x[t..t+T) and next-value targets x[t+1..t+T+1), shape (B, T, 1)."""
    if len(series) <= seq_len + 1:
        raise ValueError(f"series of {len(series)} points is too short for windows of {seq_len}")
    starts = gen.integers(0, len(series) - seq_len - 1, size=batch)
    idx = starts[:, None] + np.arange(seq_len)[None, :]  # (B, T)
    x = torch.from_numpy(series[idx].astype(np.float32))[..., None]  # (B, T, 1)
    y = torch.from_numpy(series[idx + 1].astype(np.float32))[..., None]  # (B, T, 1)
    return x, y


def train_predictor(
    model: nn.Module, series: np.ndarray, cfg: AnomalyTrainConfig, progress: bool = True
) -> list[float]:
    """Train ``model`` to predict the next value of the (normalised) ``series``; returns per-step MSE."""
    torch.manual_seed(cfg.seed)
    gen = np.random.default_rng(cfg.seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.steps, eta_min=cfg.lr * 0.1)
    losses = []
    model.train()
    for _ in tqdm(range(cfg.steps), desc=cfg.name, disable=not progress, dynamic_ncols=True):
        x, y = random_crops(series, cfg.batch, cfg.seq_len, gen)
        pred, _ = model(x)  # (B, T, 1)
        loss = F.mse_loss(pred, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    return losses


@torch.no_grad()
def stream_scores(model: nn.Module, series: np.ndarray, chunk: int) -> np.ndarray:
    """Squared next-value prediction error per point, streaming ``series`` in chunks with carried state.

    ``scores[t]`` = (prediction made at t-1 - x[t])^2; ``scores[0]`` = 0 (nothing predicted it).
    """
    model.eval()
    state = None
    preds = []
    for start in range(0, len(series), chunk):
        x = torch.from_numpy(series[start : start + chunk].astype(np.float32))[None, :, None]  # (1, T, 1)
        y, state = model(x, state)  # (1, T, 1)
        preds.append(y[0, :, 0].numpy())
    pred = np.concatenate(preds)  # pred[t] predicts series[t+1]
    scores = np.zeros(len(series))
    scores[1:] = (pred[:-1] - series[1:]) ** 2
    return scores


def plot_detection(series: AnomalySeries, scores: np.ndarray, det: Detection, title: str, path: Path) -> None:
    """PNG: the test series with the labelled region, the score, and a zoom around the labelled anomaly."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lo, hi = det.anomaly
    t = np.arange(len(series.test))
    fig, axes = plt.subplots(3, 1, figsize=(10, 7.5))
    ax1, ax2, ax3 = axes
    for ax in axes:
        ax.axvspan(
            lo - det.tolerance,
            hi + det.tolerance,
            color="tab:green",
            alpha=0.12,
            label=f"labelled +-{det.tolerance}",
        )
        ax.axvspan(lo, hi, color="tab:red", alpha=0.3, label="labelled anomaly")
    ax1.plot(t, series.test, lw=0.6, color="black")
    ax1.axvspan(0, len(series.train), color="tab:blue", alpha=0.07, label="training part")
    ax1.set_ylabel("heart rate")
    ax1.legend(loc="upper right", fontsize=8)
    ax2.plot(t, scores, lw=0.6, color="tab:purple")
    ax2.axvline(
        det.top_index,
        color="tab:orange",
        ls="--",
        label=f"top score at {det.top_index} ({'correct' if det.correct else 'wrong'})",
    )
    ax2.set_ylabel("score (squared error)")
    ax2.legend(loc="upper right", fontsize=8)
    z = slice(max(0, lo - 400), min(len(t), hi + 400))
    ax3.plot(t[z], series.test[z], lw=0.8, color="black")
    ax3b = ax3.twinx()
    ax3b.plot(t[z], scores[z], lw=0.8, color="tab:purple")
    ax3.set_ylabel("zoom: series")
    ax3b.set_ylabel("score")
    ax3.set_xlabel("test index")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


@dataclass
class AnomalyRunResult:
    """One family's outcome on #135."""

    name: str
    family: str
    params: int
    train_mse: float
    normal_test_mse: float  # mean score outside the labelled region +- tolerance
    detection: Detection
    seconds: float
    checkpoint: str


def _reuse(cfg: AnomalyTrainConfig, series: AnomalySeries, runs_dir: Path) -> AnomalyRunResult | None:
    """Rebuild a finished run's result from its checkpoint and scores if it was trained with ``cfg``."""
    run = runs_dir / cfg.name
    if not (run / "ckpt.pt").is_file() or not (run / "scores.npy").is_file():
        return None
    ckpt = read_checkpoint(run / "ckpt.pt")
    if ckpt.meta.extra.get("train") != asdict(cfg):
        return None
    scores = np.load(run / "scores.npy")
    return AnomalyRunResult(
        cfg.name,
        cfg.family,
        sum(p.numel() for p in ckpt.model.parameters()),
        float(ckpt.meta.metrics["train_mse"]),
        float(ckpt.meta.metrics["normal_test_mse"]),
        judge(scores, series.anomaly, series.tolerance),
        float(ckpt.meta.extra.get("seconds", float("nan"))),
        str(run / "ckpt.pt"),
    )


def run_anomaly(
    cfg: AnomalyTrainConfig,
    series: AnomalySeries,
    runs_dir: Path = RUNS_DIR,
    progress: bool = True,
    reuse: bool = False,
) -> AnomalyRunResult:
    """Train one next-value predictor, score the test series, write ``runs/<name>/`` (ckpt, plots, scores)."""
    if reuse:
        done = _reuse(cfg, series, runs_dir)
        if done is not None:
            return done
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    norm = Normaliser(float(series.train.mean()), float(series.train.std()))
    model = build_model(
        ModelConfig(
            family=cfg.family,
            task="numeric",
            in_features=1,
            out_features=1,
            hidden=cfg.hidden,
            layers=cfg.layers,
            window=cfg.window,
        )
    )
    open_forget_gates_(model)
    t0 = time.perf_counter()
    losses = train_predictor(model, norm(series.train), cfg, progress)
    scores = stream_scores(model, norm(series.test), cfg.chunk)
    seconds = time.perf_counter() - t0
    det = judge(scores, series.anomaly, series.tolerance)
    lo, hi = series.anomaly
    outside = np.ones(len(scores), dtype=bool)
    outside[max(0, lo - series.tolerance) : hi + series.tolerance + 1] = False
    outside[0] = False
    normal_mse = float(scores[outside].mean())
    run = runs_dir / cfg.name
    meta = CheckpointMeta(
        data=series.description,
        metrics={
            "train_mse": round(float(np.mean(losses[-50:])), 5),
            "normal_test_mse": round(normal_mse, 5),
            "top_index": det.top_index,
            "correct": float(det.correct),
            "input_mean": norm.mean,
            "input_std": norm.std,
        },
        description=(
            f"{cfg.family} next-value predictor ({cfg.layers}x{cfg.hidden}) for streaming anomaly scoring "
            f"on UCR #135 heart rate; feed (x - {norm.mean:.4f}) / {norm.std:.4f} one value per step; "
            "y[t] predicts the next normalised value, score = squared error"
        ),
        extra={"train": asdict(cfg), "seconds": seconds},
    )
    save_checkpoint(run / "ckpt.pt", model, meta)
    np.save(run / "scores.npy", scores)

    plot_loss(
        TrainHistory(train_bpc=losses),
        f"{cfg.name}: next-value MSE (normalised)",
        run / "loss.png",
        unit="MSE",
    )
    plot_detection(
        series,
        scores,
        det,
        f"{cfg.name}: UCR #135, top score at {det.top_index} "
        f"({'inside' if det.correct else 'outside'} {lo}-{hi} +-{series.tolerance})",
        run / "anomaly.png",
    )
    return AnomalyRunResult(
        cfg.name,
        cfg.family,
        sum(p.numel() for p in model.parameters()),
        float(np.mean(losses[-50:])),
        normal_mse,
        det,
        seconds,
        str(run / "ckpt.pt"),
    )


def main(argv: list[str] | None = None) -> int:
    """CLI: train ``anomaly_<family>`` for each family, write docs/results/anomaly.{json,md,png}."""
    d = AnomalyTrainConfig(name="")
    ap = argparse.ArgumentParser(description="Streaming anomaly detection on UCR #135.")
    ap.add_argument("--families", default=",".join(FAMILIES))
    for f in ("hidden", "layers", "batch", "seq_len", "steps", "seed", "chunk", "threads"):
        ap.add_argument(f"--{f.replace('_', '-')}", type=int, default=getattr(d, f))
    ap.add_argument("--lr", type=float, default=d.lr)
    ap.add_argument("--runs-dir", type=Path, default=RUNS_DIR)
    ap.add_argument(
        "--reuse",
        action="store_true",
        help="take finished runs trained with the same settings from --runs-dir",
    )
    ap.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = ap.parse_args(argv)
    fams = tuple(f for f in args.families.split(",") if f)
    if set(fams) - set(FAMILIES):
        ap.error(f"unknown families {sorted(set(fams) - set(FAMILIES))}; expected some of {FAMILIES}")
    series = load_ucr135()
    results = []
    for fam in fams:
        cfg = AnomalyTrainConfig(
            name=f"anomaly_{fam}",
            family=fam,
            lr=args.lr,
            **{
                k: getattr(args, k)
                for k in ("hidden", "layers", "batch", "seq_len", "steps", "seed", "chunk", "threads")
            },
        )
        r = run_anomaly(cfg, series, args.runs_dir, reuse=args.reuse)
        results.append(r)
        print(
            f"{r.name}: top score at {r.detection.top_index} -> "
            f"{'correct' if r.detection.correct else 'wrong'} "
            f"(distance {r.detection.distance}); {r.seconds:.0f} s",
            flush=True,
        )
    args.results_dir.mkdir(parents=True, exist_ok=True)
    shown = next((r for r in results if r.family == "gru"), results[0])
    import shutil

    shutil.copy(Path(shown.checkpoint).parent / "anomaly.png", args.results_dir / "anomaly.png")
    payload = {
        "data": series.description,
        "rule": f"correct if the top-scoring point is within {series.anomaly[0]}-{series.anomaly[1]} "
        f"+-{series.tolerance}",
        "command": " ".join(["python -m models.anomaly"] + (argv if argv is not None else sys.argv[1:])),
        "budget": {
            k: getattr(args, k)
            for k in ("hidden", "layers", "batch", "seq_len", "steps", "lr", "seed", "chunk")
        },
        "plot": {"from": shown.name, "file": "docs/results/anomaly.png"},
        "runs": [
            {
                "name": r.name,
                "family": r.family,
                "params": r.params,
                "train_mse": r.train_mse,
                "normal_test_mse": r.normal_test_mse,
                "seconds": None if r.seconds != r.seconds else r.seconds,
                **asdict(r.detection),
            }
            for r in results
        ],
    }
    (args.results_dir / "anomaly.json").write_text(json.dumps(payload, indent=1))
    from models.report import write_anomaly_report

    write_anomaly_report(args.results_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
