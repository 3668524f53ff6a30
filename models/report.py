"""Regenerate the markdown tables in ``docs/results/`` from the JSON files the training code wrote.

    python -m models.report            # every table whose JSON exists

No figure here is typed by hand: each table is rendered from ``char_bpc.json``, ``anomaly.json`` or
``long_lag.json``, which record the command that produced them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RESULTS_DIR = Path("docs/results")


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def _fmt_seconds(s: float | None) -> str:
    if s is None or s != s:  # not recorded (a reused run from before timings were stored)
        return "-"
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def render_char(data: dict) -> str:
    """Markdown for ``char_bpc.json``."""
    b = data["budget"]
    lines = [
        "| variant | parameters | validation bits/char | train bits/char | training time |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in sorted(data["runs"], key=lambda r: r["val_bpc"]):
        best = " (best)" if r["name"] == data["best"] else ""
        lines.append(
            f"| `{r['name']}`{best} | {r['params']:,} | {r['val_bpc']:.3f} | {r['train_bpc']:.3f} | "
            f"{_fmt_seconds(r['seconds'])} |"
        )
    lines += [
        "",
        f"Same budget for every variant: {b['layers']} layer x {b['hidden']} hidden (embedding "
        f"{b['embed']}), {b['steps']} steps of {b['batch']} streams x {b['seq_len']} characters "
        f"(truncated BPTT, state carried), Adam lr {b['lr']} with cosine decay, gradient clipping at "
        f"{b['clip']}, seed {b['seed']}; "
        f"LSTM-kind forget gates start open (bias +{b.get('forget_bias', 1.0)}); attention window "
        f"{b['window']}. Validation: the held-out tunes, whole, with the state carried. Training time is "
        "wall clock on a 2-core CPU shared with other jobs (one thread per run; `--jobs` in the command "
        "says how many ran in parallel), so it compares poorly across runs.",
        f"Data: {data['data']}.",
        f"Command: `{data['command']}`. Sampled tune from `{data['sample']['from']}` (prime "
        f"`{data['sample']['prime']}`, temperature {data['sample']['temperature']}): "
        f"[`{data['sample']['file']}`](sample_tune.abc).",
        "",
        "![validation bits per character during training](char_val_bpc.png)",
    ]
    return "\n".join(lines) + "\n"


def render_anomaly(data: dict) -> str:
    """Markdown for ``anomaly.json``."""
    lines = [
        "| model | parameters | top-scoring point | distance to labelled range | verdict | normal-region "
        "MSE | time |",
        "|---|---:|---:|---:|---|---:|---:|",
    ]
    for r in data["runs"]:
        lines.append(
            f"| `{r['name']}` | {r['params']:,} | {r['top_index']} | {r['distance']} | "
            f"{'correct' if r['correct'] else 'wrong'} | {r['normal_test_mse']:.4f} | "
            f"{_fmt_seconds(r['seconds'])} |"
        )
    if any(r["seconds"] is None for r in data["runs"]):
        lines += ["", "Time `-`: the run was reused (`--reuse`) from an earlier run that did not record it."]
    b = data["budget"]
    n_ok = sum(r["correct"] for r in data["runs"])
    lines += [
        "",
        f"{n_ok} of {len(data['runs'])} models put their top score in the labelled region ({data['rule']}).",
        f"Each model: {b['layers']} x {b['hidden']} hidden, trained {b['steps']} steps on random windows of "
        f"{b['seq_len']} normal points (batch {b['batch']}, Adam lr {b['lr']}, seed {b['seed']}) to "
        f"predict the next "
        f"normalised value; the test series is streamed in chunks of {b['chunk']} with the state carried; "
        f"score = "
        "squared prediction error.",
        f"Data: {data['data']}.",
        f"Command: `{data['command']}`. Plot ({data['plot']['from']}): series, score, labelled region:",
        "",
        "![UCR #135: series, score, labelled anomaly](anomaly.png)",
    ]
    return "\n".join(lines) + "\n"


def render_long_lag(data: dict) -> str:
    """Markdown for ``long_lag.json``: final test MSE per family x lag, marked learned below the threshold."""
    lags = data["lags"]
    fams = data["families"]
    cell = {(r["family"], r["lag"]): r for r in data["runs"]}
    lines = ["| variant | " + " | ".join(f"T = {lag}" for lag in lags) + " |", "|---|" + "---:|" * len(lags)]
    for fam in fams:
        row = []
        for lag in lags:
            r = cell.get((fam, lag))
            row.append("-" if r is None else f"{r['test_mse']:.4f}{' **learned**' if r['learned'] else ''}")
        lines.append(f"| `{fam}` | " + " | ".join(row) + " |")
    b = data["budget"]
    lines += [
        "",
        f"Adding problem (Hochreiter & Schmidhuber 1997, sec. 5.4): sequences of T steps of (value, marker); "
        f"the target is the sum of the two marked values, one marked in the first "
        f"{data['first_fraction']:.0%} of the sequence and one before T/2, so the answer depends on one "
        f"input more than {1 - data['first_fraction']:.0%} of T steps back and another more than T/2 back. "
        f"Cells: test MSE on {data['test_size']} fixed sequences at the end of training; baseline (always "
        f"predict 1) is {data['baseline_mse']:.3f}; **learned** = MSE < {data['threshold']}.",
        f"Same budget for every variant and lag: hidden {b['hidden']}, {b['steps']} steps of batch "
        f"{b['batch']}, "
        f"Adam lr {b['lr']}, gradient-norm clipping at {b['clip']}, full BPTT through the sequence, seed "
        f"{b['seed']}.",
        f"Command: `{data['command']}` ({_fmt_seconds(data['seconds'])} in all).",
        "",
        "![adding problem: final test MSE per lag and learning curves](long_lag.png)",
    ]
    return "\n".join(lines) + "\n"


def write_char_report(results_dir: Path = RESULTS_DIR) -> Path:
    """Write ``char_bpc.md`` from ``char_bpc.json``."""
    out = results_dir / "char_bpc.md"
    out.write_text(render_char(_load(results_dir / "char_bpc.json")))
    return out


def write_anomaly_report(results_dir: Path = RESULTS_DIR) -> Path:
    """Write ``anomaly.md`` from ``anomaly.json``."""
    out = results_dir / "anomaly.md"
    out.write_text(render_anomaly(_load(results_dir / "anomaly.json")))
    return out


def write_long_lag_report(results_dir: Path = RESULTS_DIR) -> Path:
    """Write ``long_lag.md`` from ``long_lag.json``."""
    out = results_dir / "long_lag.md"
    out.write_text(render_long_lag(_load(results_dir / "long_lag.json")))
    return out


def plot_char_curves(results_dir: Path = RESULTS_DIR, runs_dir: Path = Path("runs")) -> Path | None:
    """Plot validation bits/char against the step for every run in ``char_bpc.json`` (runs/*/history.json).

    Returns the PNG path, or None when the run directories are not on this machine.
    """
    data = _load(results_dir / "char_bpc.json")
    histories = {r["name"]: runs_dir / r["name"] / "history.json" for r in data["runs"]}
    if not all(p.is_file() for p in histories.values()):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, path in histories.items():
        val = json.loads(path.read_text())["val"]
        ax.plot([p["step"] for p in val], [p["val_bpc"] for p in val], "o-", ms=3, label=name)
    ax.set_xlabel("training step")
    ax.set_ylabel("validation bits per character")
    ax.set_title("char models on the Irish folk tunes (same budget)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = results_dir / "char_val_bpc.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    """Regenerate every table whose JSON exists."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    ap.add_argument("--runs-dir", type=Path, default=Path("runs"))
    args = ap.parse_args(argv)
    for stem, write in (
        ("char_bpc", write_char_report),
        ("anomaly", write_anomaly_report),
        ("long_lag", write_long_lag_report),
    ):
        if (args.results_dir / f"{stem}.json").exists():
            print(write(args.results_dir))
    if (args.results_dir / "char_bpc.json").exists():
        print(plot_char_curves(args.results_dir, args.runs_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
