"""The long-time-lag experiment: which recurrent cells learn the adding problem at which lag.

Bengio, Simard & Frasconi (1994) showed that gradient descent struggles to learn dependencies over long time
lags in plain recurrent networks (the gradient vanishes or explodes); Hochreiter & Schmidhuber (1997) built
the LSTM to bridge them and used the *adding problem* (their section 5.4) as a benchmark. Each input step is a
pair (value ~ U(0, 1), marker in {0, 1}); exactly two steps are marked, one in the first ``first_fraction`` of
the sequence and one before T/2; the target, read at the last step, is the sum of the two marked values.
Predicting the constant 1 gives MSE 1/6 (the variance of a sum of two U(0, 1)), which is the baseline to beat.

Every family and lag gets the same budget: same hidden size, steps, batch, optimiser (Adam), gradient-norm
clipping, full backpropagation through time over the whole sequence, seed.

    python -m models.experiment                               # full grid -> docs/results/long_lag.*
    python -m models.experiment --lags 10,50 --steps 200 --jobs 2   # smaller
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from models import ModelConfig, build_model, parallel
from models.train import open_forget_gates_

FAMILIES = ("rnn", "lstm", "peephole", "cifg", "gru", "attention")
RESULTS_DIR = Path("docs/results")
BASELINE_MSE = 1 / 6  # Var(U1 + U2) for U ~ U(0, 1): the error of always answering the mean, 1


@dataclass
class LagConfig:
    """Budget of one (family, lag) run; the same for every cell in the grid."""

    family: str
    lag: int
    hidden: int = 32
    window: int = 16
    batch: int = 64
    steps: int = 600
    lr: float = 1e-2
    clip: float = 1.0
    seed: int = 0
    first_fraction: float = 0.1
    test_size: int = 1000
    eval_every: int = 50
    threshold: float = 0.05
    forget_bias: float = 1.0  # LSTM kinds start with open forget gates (see models.train.open_forget_gates_)


@dataclass
class LagResult:
    """Outcome of one (family, lag) run."""

    family: str
    lag: int
    test_mse: float
    learned: bool
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, test MSE)
    seconds: float = 0.0


def adding_problem(
    batch: int, length: int, gen: np.random.Generator, first_fraction: float = 0.1
) -> tuple[np.ndarray, np.ndarray]:
    """One batch of the adding problem: inputs (B, T, 2) float32 (value, marker) and targets (B,) float32.

    The first marked step is uniform in [0, max(1, floor(first_fraction * T))), the second in
    [that bound, max(bound + 1, floor(T / 2))); the target is the sum of the two marked values.
    """
    if length < 2:
        raise ValueError(f"the adding problem needs T >= 2, got {length}")
    values = gen.random((batch, length), dtype=np.float32)  # (B, T)
    first_end = max(1, int(first_fraction * length))
    second_end = max(first_end + 1, length // 2)
    i1 = gen.integers(0, first_end, size=batch)
    i2 = gen.integers(first_end, second_end, size=batch)
    markers = np.zeros((batch, length), dtype=np.float32)  # (B, T)
    rows = np.arange(batch)
    markers[rows, i1] = 1.0
    markers[rows, i2] = 1.0
    x = np.stack([values, markers], axis=-1)  # (B, T, 2)
    y = values[rows, i1] + values[rows, i2]  # (B,)
    return x, y.astype(np.float32)


def build_lag_model(cfg: LagConfig) -> nn.Module:
    """Build a numeric model (2 features in, 1 out) of ``cfg.family``."""
    return build_model(
        ModelConfig(
            family=cfg.family,
            task="numeric",
            in_features=2,
            out_features=1,
            hidden=cfg.hidden,
            window=cfg.window,
        )
    )


def last_step_prediction(model: nn.Module, x: Tensor) -> Tensor:
    """Return the model's output at the final step, (B,)."""
    y, _ = model(x)  # (B, T, 1)
    return y[:, -1, 0]


def run_lag(cfg: LagConfig, progress: bool = False) -> LagResult:
    """Train one family at one lag with full BPTT; return the final test MSE on a fixed test set."""
    torch.set_num_threads(1)
    torch.manual_seed(cfg.seed)
    gen = np.random.default_rng(cfg.seed)
    # The test set comes from its own generator so it is identical for every family at this lag.
    xt, yt = adding_problem(
        cfg.test_size, cfg.lag, np.random.default_rng(10_000 + cfg.lag), cfg.first_fraction
    )
    x_test, y_test = torch.from_numpy(xt), torch.from_numpy(yt)
    model = build_lag_model(cfg)
    open_forget_gates_(model, cfg.forget_bias)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)

    @torch.no_grad()
    def test_mse() -> float:
        model.eval()
        mse = float(F.mse_loss(last_step_prediction(model, x_test), y_test))
        model.train()
        return mse

    t0 = time.perf_counter()
    curve = [(0, test_mse())]
    for step in parallel.bar(
        range(1, cfg.steps + 1), desc=f"{cfg.family} T={cfg.lag}", disable=not progress, leave=False
    ):
        xb, yb = adding_problem(cfg.batch, cfg.lag, gen, cfg.first_fraction)
        loss = F.mse_loss(last_step_prediction(model, torch.from_numpy(xb)), torch.from_numpy(yb))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        opt.step()
        if step % cfg.eval_every == 0 or step == cfg.steps:
            curve.append((step, test_mse()))
    final = curve[-1][1]
    return LagResult(cfg.family, cfg.lag, final, final < cfg.threshold, curve, time.perf_counter() - t0)


def plot_long_lag(
    results: list[LagResult], families: tuple[str, ...], lags: tuple[int, ...], threshold: float, path: Path
) -> None:
    """PNG: left, final test MSE per family against the lag; right, learning curves at each lag."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {(r.family, r.lag): r for r in results}
    colors = dict(zip(families, plt.get_cmap("tab10").colors, strict=False))
    fig, axes = plt.subplots(1, 1 + len(lags), figsize=(4 + 3.2 * len(lags), 4), squeeze=False)
    ax0 = axes[0][0]
    for fam in families:
        pts = [(lag, by[(fam, lag)].test_mse) for lag in lags if (fam, lag) in by]
        if pts:
            ax0.plot(*zip(*pts, strict=True), "o-", color=colors[fam], label=fam)
    ax0.axhline(BASELINE_MSE, color="grey", ls=":", label="baseline 1/6")
    ax0.axhline(threshold, color="black", ls="--", lw=0.8, label=f"learned < {threshold}")
    ax0.set_xscale("log")
    ax0.set_yscale("log")
    ax0.set_xticks(list(lags), [str(lag) for lag in lags])
    ax0.set_xlabel("sequence length T (lag)")
    ax0.set_ylabel("final test MSE")
    ax0.set_title("adding problem")
    ax0.legend(fontsize=7)
    for ax, lag in zip(axes[0][1:], lags, strict=True):
        for fam in families:
            r = by.get((fam, lag))
            if r:
                ax.plot(*zip(*r.curve, strict=True), color=colors[fam], label=fam)
        ax.axhline(BASELINE_MSE, color="grey", ls=":")
        ax.axhline(threshold, color="black", ls="--", lw=0.8)
        ax.set_yscale("log")
        ax.set_title(f"T = {lag}")
        ax.set_xlabel("step")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_grid(
    base: LagConfig, families: tuple[str, ...], lags: tuple[int, ...], jobs: int
) -> tuple[list[LagResult], float]:
    """Run every (family, lag) in ``jobs`` processes, one thread each; return results and wall seconds."""
    cfgs = [LagConfig(**{**asdict(base), "family": f, "lag": lag}) for lag in lags for f in families]
    # Longest first, so a parallel grid does not end waiting on one long run.
    cfgs.sort(key=lambda c: -c.lag * (2 if c.family == "attention" else 1))
    t0 = time.perf_counter()
    results: list[LagResult] = []
    bar = tqdm(total=len(cfgs), desc="long-lag grid", dynamic_ncols=True)
    if jobs <= 1:
        for c in cfgs:
            results.append(run_lag(c, progress=True))
            bar.set_postfix_str(f"{c.family} T={c.lag}: {results[-1].test_mse:.4f}")
            bar.update()
    else:
        # Ctrl-C stops every worker; each shows its per-step bar under the grid's.
        for r in parallel.run_parallel(run_lag, [(c,) for c in cfgs], jobs, desc="runs done"):
            results.append(r)
            bar.set_postfix_str(f"{r.family} T={r.lag}: {r.test_mse:.4f}")
            bar.update()
    bar.close()
    return results, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    """CLI: run the grid and write ``long_lag.json``, ``long_lag.md`` and ``long_lag.png``."""
    d = LagConfig(family="", lag=0)
    ap = argparse.ArgumentParser(description="Long-time-lag experiment (adding problem) for every family.")
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--lags", default="10,50,100,200")
    for f in ("hidden", "batch", "steps", "seed", "test_size", "eval_every"):
        ap.add_argument(f"--{f.replace('_', '-')}", type=int, default=getattr(d, f))
    for f in ("lr", "clip", "threshold"):
        ap.add_argument(f"--{f}", type=float, default=getattr(d, f))
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="worker processes")
    ap.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = ap.parse_args(argv)
    fams = tuple(f for f in args.families.split(",") if f)
    if set(fams) - set(FAMILIES):
        ap.error(f"unknown families {sorted(set(fams) - set(FAMILIES))}; expected some of {FAMILIES}")
    try:
        lags = tuple(int(v) for v in args.lags.split(",") if v)
    except ValueError:
        ap.error(f"--lags expects comma-separated integers, got {args.lags!r}")
    if any(lag < 2 for lag in lags):
        ap.error("every lag must be >= 2")
    base = LagConfig(
        family="",
        lag=0,
        **{
            k: getattr(args, k)
            for k in (
                "hidden",
                "batch",
                "steps",
                "seed",
                "test_size",
                "eval_every",
                "lr",
                "clip",
                "threshold",
            )
        },
    )
    results, seconds = run_grid(base, fams, lags, args.jobs)
    results.sort(key=lambda r: (fams.index(r.family), r.lag))
    args.results_dir.mkdir(parents=True, exist_ok=True)
    payload = {
        "task": "adding problem",
        "families": list(fams),
        "lags": list(lags),
        "first_fraction": base.first_fraction,
        "test_size": base.test_size,
        "baseline_mse": BASELINE_MSE,
        "threshold": base.threshold,
        "budget": {k: getattr(base, k) for k in ("hidden", "window", "batch", "steps", "lr", "clip", "seed")},
        "command": " ".join(["python -m models.experiment"] + (argv if argv is not None else sys.argv[1:])),
        "jobs": args.jobs,
        "seconds": seconds,
        "runs": [asdict(r) for r in results],
    }
    (args.results_dir / "long_lag.json").write_text(json.dumps(payload, indent=1))
    plot_long_lag(results, fams, lags, base.threshold, args.results_dir / "long_lag.png")
    from models.report import write_long_lag_report

    print(write_long_lag_report(args.results_dir).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
