"""Train character models on the Irish folk tunes: truncated BPTT with carried state, Adam, gradient clipping.

Every family trains with the same budget (steps x batch x sequence length, same hidden size), so the
validation bits per character compare the cells, not the effort. A run writes ``runs/<name>/``: ``ckpt.pt``
(the checkpoint ``python -m export`` reads: config, state_dict, meta with
vocabulary/data/metrics/description), ``history.json`` (losses) and ``loss.png``.

    python -m models.train char --family lstm --name char_lstm      # one run
    python -m models.train all                                      # every family + docs/results/char_bpc.*
    python -m models.train default                                  # the small committed default model
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from models import CheckpointMeta, ModelConfig, build_model, load_checkpoint, parallel, save_checkpoint
from models.data import CharCorpus, load_tunes, stream_batches

FAMILIES = ("rnn", "lstm", "peephole", "cifg", "gru", "attention")
RUNS_DIR = Path("runs")
RESULTS_DIR = Path("docs/results")

State = dict[str, Tensor]


@dataclass
class CharTrainConfig:
    """Hyper-parameters of one character-model run (the budget is steps x batch x seq_len)."""

    name: str
    family: str = "lstm"
    hidden: int = 256
    layers: int = 1
    embed: int = 64
    window: int = 32
    batch: int = 32
    seq_len: int = 64
    steps: int = 600
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decay to lr * min_lr_ratio
    clip: float = 1.0
    forget_bias: float = 1.0  # added to LSTM-kind forget-gate biases at initialisation (open_forget_gates_)
    seed: int = 0
    eval_every: int = 100
    eval_batch: int = 16
    eval_seq_len: int = 256
    threads: int = 1


@dataclass
class EvalPoint:
    """Validation loss at one training step."""

    step: int
    val_bpc: float


@dataclass
class TrainHistory:
    """Per-step training loss (bits per char) and periodic validation."""

    train_bpc: list[float] = field(default_factory=list)
    val: list[EvalPoint] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class CharRunResult:
    """What one run produced; ``val_bpc`` is on the whole held-out tunes at the end of training."""

    name: str
    family: str
    params: int
    val_bpc: float
    train_bpc: float
    seconds: float
    steps: int
    checkpoint: str
    config: CharTrainConfig


def detach(state: State) -> State:
    """Cut the graph between truncated-BPTT chunks, keeping the values (the state is carried, not reset)."""
    return {k: v.detach() for k, v in state.items()}


def open_forget_gates_(model: nn.Module, bias: float = 1.0) -> None:
    """Initialise LSTM-kind forget gates open: add ``bias`` to the forget-gate bias of every LSTM layer.

    With zero-mean biases the forget gate starts near 0.5, so the cell forgets half of its content every step
    and gradients through c vanish over a few tens of steps; Gers, Schmidhuber & Cummins (2000) and
    Jozefowicz, Zaremba & Sutskever (2015) start it near 1 instead (TensorFlow's ``forget_bias=1``). For
    ``cifg`` (f = 1 - i) the same effect is a closed input gate: ``bias`` is subtracted from the input-gate
    bias. rnn and gru layers are left as built.
    """
    from models.cells import LSTMLayer

    with torch.no_grad():
        for layer in getattr(model, "layers", []):
            if isinstance(layer, LSTMLayer):
                H = layer.hidden
                if layer.variant == "cifg":
                    layer.bias_ih[0:H] -= bias  # gate order (i, g, o)
                else:
                    layer.bias_ih[H : 2 * H] += bias  # gate order (i, f, g, o)


def lr_at(step: int, cfg: CharTrainConfig) -> float:
    """Cosine decay from ``lr`` to ``lr * min_lr_ratio`` over the run."""
    t = min(step / max(cfg.steps - 1, 1), 1.0)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def cycle_batches(ids: np.ndarray, batch: int, seq_len: int) -> Iterator[tuple[Tensor, Tensor, bool]]:
    """Yield truncated-BPTT batches forever; the flag is True at the start of each pass (reset the state)."""
    while True:
        first = True
        for x, y in stream_batches(ids, batch, seq_len):
            yield torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y)), first
            first = False


@torch.no_grad()
def evaluate_bpc(model: nn.Module, ids: np.ndarray, batch: int, seq_len: int) -> float:
    """Bits per character over all of ``ids`` (in ``batch`` streams, state carried through each stream)."""
    model.eval()
    state: State | None = None
    total, count = 0.0, 0
    for x, y in stream_batches(ids, batch, seq_len):
        logits, state = model(torch.from_numpy(np.ascontiguousarray(x)), state)  # (B, T, V)
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            torch.from_numpy(np.ascontiguousarray(y)).reshape(-1),
            reduction="sum",
        )
        total += float(loss)
        count += y.size
    model.train()
    return total / count / math.log(2)


def train_char_model(
    model: nn.Module,
    corpus: CharCorpus,
    cfg: CharTrainConfig,
    *,
    progress: bool = True,
    desc: str | None = None,
) -> TrainHistory:
    """Train ``model`` in place on ``corpus.train`` (truncated BPTT); validate every ``eval_every`` steps."""
    torch.manual_seed(cfg.seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    hist = TrainHistory()
    batches = cycle_batches(corpus.train, cfg.batch, cfg.seq_len)
    state: State | None = None
    model.train()
    t0 = time.perf_counter()
    bar = parallel.bar(range(cfg.steps), desc=desc or cfg.name, disable=not progress)
    for step in bar:
        x, y, fresh = next(batches)
        if fresh:
            state = None  # a new pass over the corpus: streams restart, so their carried state must too
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        logits, state = model(x, state)  # (B, T, V)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        opt.step()
        state = detach(state)
        hist.train_bpc.append(float(loss.detach()) / math.log(2))
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            bpc = evaluate_bpc(model, corpus.val, cfg.eval_batch, cfg.eval_seq_len)
            hist.val.append(EvalPoint(step + 1, bpc))
            bar.set_postfix(train=f"{np.mean(hist.train_bpc[-50:]):.3f}", val=f"{bpc:.3f}")
    hist.seconds = time.perf_counter() - t0
    return hist


@torch.no_grad()
def sample(
    model: nn.Module,
    corpus: CharCorpus,
    prime: str = "X:",
    length: int = 800,
    temperature: float = 0.8,
    seed: int = 0,
    stop_at_blank_line: bool = True,
) -> str:
    """Sample text from a char model, one character per step, state carried (as the server streams it).

    Stops after ``length`` characters or, with ``stop_at_blank_line``, at the blank line that ends a tune.
    """
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    logits, state = model(torch.from_numpy(corpus.encode(prime))[None, :], None)  # (1, T, V)
    out = prime
    for _ in range(length):
        probs = torch.softmax(logits[0, -1] / temperature, dim=-1)
        nxt = int(torch.multinomial(probs, 1, generator=gen))
        out += corpus.vocabulary[nxt]
        if stop_at_blank_line and out.endswith("\n\n") and len(out.strip()) > len(prime):
            break
        logits, state = model(torch.tensor([[nxt]], dtype=torch.int64), state)
    return out.rstrip("\n") + "\n"


def plot_loss(hist: TrainHistory, title: str, path: Path, unit: str = "bits per character") -> None:
    """Write a PNG of the (smoothed) training loss and the validation loss against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    tr = np.asarray(hist.train_bpc)
    k = max(1, min(50, len(tr) // 10))
    smooth = np.convolve(tr, np.ones(k) / k, mode="valid")
    ax.plot(np.arange(1, len(tr) + 1), tr, color="tab:blue", alpha=0.2, lw=0.8)
    ax.plot(np.arange(k, len(tr) + 1), smooth, color="tab:blue", label=f"train (mean of {k})")
    if hist.val:
        ax.plot(
            [p.step for p in hist.val],
            [p.val_bpc for p in hist.val],
            "o-",
            color="tab:orange",
            label="validation",
        )
    ax.set_xlabel("step")
    ax.set_ylabel(unit)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def param_count(model: nn.Module) -> int:
    """Count the trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def build_char_model(cfg: CharTrainConfig, vocab_size: int) -> nn.Module:
    """Build a token model of ``cfg.family`` from the shared model definitions."""
    return build_model(
        ModelConfig(
            family=cfg.family,
            task="token",
            vocab_size=vocab_size,
            hidden=cfg.hidden,
            layers=cfg.layers,
            window=cfg.window,
            embed=cfg.embed,
        )
    )


def run_char(
    cfg: CharTrainConfig, corpus: CharCorpus, runs_dir: Path = RUNS_DIR, progress: bool = True
) -> CharRunResult:
    """Train one char model and write its run directory (checkpoint, history, loss plot)."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model = build_char_model(cfg, len(corpus.vocabulary))
    open_forget_gates_(model, cfg.forget_bias)
    hist = train_char_model(model, corpus, cfg, progress=progress)
    val_bpc = hist.val[-1].val_bpc
    train_bpc = float(np.mean(hist.train_bpc[-50:]))
    run = runs_dir / cfg.name
    meta = CheckpointMeta(
        vocabulary=list(corpus.vocabulary),
        data=corpus.description,
        metrics={"val_bpc": round(val_bpc, 4), "train_bpc": round(train_bpc, 4)},
        description=(
            f"{cfg.family} char model ({cfg.layers}x{cfg.hidden}) on Irish folk tunes in ABC notation; "
            f"prime with 'X:' to generate a tune"
        ),
        extra={"train": asdict(cfg)},
    )
    ckpt = run / "ckpt.pt"
    save_checkpoint(ckpt, model, meta)
    (run / "history.json").write_text(
        json.dumps(
            {
                "config": asdict(cfg),
                "train_bpc": hist.train_bpc,
                "val": [asdict(p) for p in hist.val],
                "seconds": hist.seconds,
            },
            indent=1,
        )
    )
    plot_loss(
        hist, f"{cfg.name}: {cfg.family} {cfg.layers}x{cfg.hidden}, val {val_bpc:.3f} bpc", run / "loss.png"
    )
    return CharRunResult(
        cfg.name, cfg.family, param_count(model), val_bpc, train_bpc, hist.seconds, cfg.steps, str(ckpt), cfg
    )


def run_all(
    base: CharTrainConfig,
    families: tuple[str, ...],
    runs_dir: Path,
    results_dir: Path,
    sample_len: int = 800,
    jobs: int = 1,
) -> list[CharRunResult]:
    """Train ``char_<family>`` for every family, same budget; write the results JSON, table and sample."""
    corpus = load_tunes()
    cfgs = [CharTrainConfig(**{**asdict(base), "name": f"char_{fam}", "family": fam}) for fam in families]
    results: list[CharRunResult] = []
    if jobs <= 1:
        for cfg in cfgs:
            results.append(run_char(cfg, corpus, runs_dir))
            print(f"{cfg.name}: val {results[-1].val_bpc:.4f} bpc in {results[-1].seconds:.0f} s", flush=True)
    else:
        # One process per run, one thread each; the slowest family (attention) starts first. Ctrl-C stops all.
        cfgs.sort(key=lambda c: c.family != "attention")
        calls = [(cfg, corpus, runs_dir, False) for cfg in cfgs]
        for result in parallel.run_parallel(run_char, calls, jobs, desc="char models"):
            results.append(result)
            tqdm.write(f"{result.name}: val {result.val_bpc:.4f} bpc in {result.seconds:.0f} s")
        results.sort(key=lambda r: families.index(r.family))
    best = min(results, key=lambda r: r.val_bpc)
    tune = sample(load_checkpoint(best.checkpoint), corpus, prime="X:", length=sample_len, seed=base.seed)
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "sample_tune.abc").write_text(tune)
    payload = {
        "data": corpus.description,
        "budget": {
            k: getattr(base, k)
            for k in (
                "hidden",
                "layers",
                "embed",
                "batch",
                "seq_len",
                "steps",
                "lr",
                "clip",
                "forget_bias",
                "seed",
                "window",
            )
        },
        "command": " ".join(["python -m models.train"] + sys.argv[1:]),
        "best": best.name,
        "jobs": jobs,
        "sample": {
            "from": best.name,
            "prime": "X:",
            "temperature": 0.8,
            "seed": base.seed,
            "file": "docs/results/sample_tune.abc",
        },
        "runs": [
            {
                "name": r.name,
                "family": r.family,
                "params": r.params,
                "val_bpc": r.val_bpc,
                "train_bpc": r.train_bpc,
                "seconds": r.seconds,
                "steps": r.steps,
            }
            for r in results
        ],
    }
    (results_dir / "char_bpc.json").write_text(json.dumps(payload, indent=1))
    import shutil

    shutil.copy(runs_dir / best.name / "loss.png", results_dir / "char_loss_best.png")
    from models.report import plot_char_curves, write_char_report

    write_char_report(results_dir)
    plot_char_curves(results_dir, runs_dir)
    return results


# The budget flags every char run shares: one list, so a new field cannot get a flag but miss the config.
_INT_BUDGET = (
    "hidden",
    "layers",
    "embed",
    "window",
    "batch",
    "seq_len",
    "steps",
    "eval_every",
    "seed",
    "threads",
)
_FLOAT_BUDGET = ("lr", "clip", "forget_bias")


def _add_budget_args(ap: argparse.ArgumentParser, d: CharTrainConfig) -> None:
    for f in _INT_BUDGET:
        ap.add_argument(f"--{f.replace('_', '-')}", type=int, default=getattr(d, f))
    for f in _FLOAT_BUDGET:
        ap.add_argument(f"--{f.replace('_', '-')}", type=float, default=getattr(d, f))


def _budget(args: argparse.Namespace, name: str, family: str) -> CharTrainConfig:
    keys = _INT_BUDGET + _FLOAT_BUDGET
    return CharTrainConfig(name=name, family=family, **{k: getattr(args, k) for k in keys})


def main(argv: list[str] | None = None) -> int:
    """CLI: ``char`` (one run), ``all`` (every family + results), ``default`` (the committed default)."""
    ap = argparse.ArgumentParser(description="Train char models on the Irish folk tunes.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = CharTrainConfig(name="")
    one = sub.add_parser("char", help="train one char model")
    one.add_argument("--family", choices=FAMILIES, default="lstm")
    one.add_argument("--name", default=None, help="run name (default char_<family>)")
    _add_budget_args(one, d)
    every = sub.add_parser("all", help="every family with the same budget; writes docs/results/char_bpc.*")
    every.add_argument("--families", default=",".join(FAMILIES))
    every.add_argument("--jobs", type=int, default=1, help="runs in parallel (one process and thread each)")
    _add_budget_args(every, d)
    dflt = sub.add_parser(
        "default", help="the small default model (runs/default), exported by `make default-model`"
    )
    dflt.add_argument("--family", choices=FAMILIES, default="attention")
    _add_budget_args(dflt, CharTrainConfig(name="default", steps=600))
    for p in (one, every, dflt):
        p.add_argument("--runs-dir", type=Path, default=RUNS_DIR)
    every.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = ap.parse_args(argv)

    if args.cmd == "all":
        fams = tuple(f for f in args.families.split(",") if f)
        unknown = set(fams) - set(FAMILIES)
        if unknown:
            ap.error(f"unknown families {sorted(unknown)}; expected some of {FAMILIES}")
        run_all(_budget(args, "", "lstm"), fams, args.runs_dir, args.results_dir, jobs=args.jobs)
        return 0
    name = "default" if args.cmd == "default" else (args.name or f"char_{args.family}")
    corpus = load_tunes()
    r = run_char(_budget(args, name, args.family), corpus, args.runs_dir)
    print(
        f"{r.name}: {r.family}, {r.params} parameters, val {r.val_bpc:.4f} bpc, {r.seconds:.0f} s -> "
        f"{r.checkpoint}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
