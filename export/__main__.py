"""Export CLI.

    python -m export --checkpoint runs/char_lstm/ckpt.pt --repository models/repository --name char_lstm \
        [--version N] [--quantize int8 [--eval-text FILE]] [--if-changed]
    python -m export --runs runs --repository models/repository      # every runs/<name>/ckpt.pt as <name>

Each export is verified before anything is written (see ``export.verify``); a failure exits with status 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from export.pipeline import ExportError, ExportResult, export_checkpoint


def _print(result: ExportResult) -> None:
    if result.skipped:
        print(f"{result.name}: unchanged checkpoint, version {result.version} kept ({result.path})")
        return
    print(f"{result.name}: wrote version {result.version} -> {result.path}")
    print(result.report.format())
    if result.quantization is not None:
        print(result.quantization.format())
        print(f"(written to {result.path.parent / 'quantization.json'} and quantization.png)")


def main(argv: list[str] | None = None) -> int:
    """Parse flags, export, print the verification (and quantization) reports."""
    ap = argparse.ArgumentParser(prog="python -m export", description="Export checkpoints to verified ONNX.")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", type=Path, help="a checkpoint written by models.save_checkpoint")
    src.add_argument("--runs", type=Path, help="export every <runs>/<name>/ckpt.pt under the name <name>")
    ap.add_argument("--repository", type=Path, default=Path("models/repository"))
    ap.add_argument("--name", help="model name in the repository (default: the checkpoint's directory name)")
    ap.add_argument("--version", type=int, help="version number (default: next free)")
    ap.add_argument("--quantize", choices=["int8"], help="int8 dynamic quantization; reports the change")
    ap.add_argument(
        "--eval-text", type=Path, help="text to report bits/char on, float32 vs int8 (token models)"
    )
    ap.add_argument(
        "--if-changed",
        action="store_true",
        help="skip when the newest version came from the same checkpoint bytes",
    )
    ap.add_argument("--tol", type=float, default=1e-5)
    args = ap.parse_args(argv)
    eval_text = args.eval_text.read_text(encoding="utf-8") if args.eval_text else None

    if args.runs is not None:
        jobs = [(p, p.parent.name) for p in sorted(args.runs.glob("*/ckpt.pt"))]
        if not jobs:
            print(f"no checkpoints under {args.runs}/*/ckpt.pt; run `make train` first", file=sys.stderr)
            return 1
        if_changed = True
    else:
        jobs = [(args.checkpoint, args.name or args.checkpoint.resolve().parent.name)]
        if_changed = args.if_changed
    failed = 0
    for ckpt, name in jobs:
        try:
            _print(
                export_checkpoint(
                    ckpt,
                    args.repository,
                    name,
                    version=args.version,
                    quantize=args.quantize,
                    if_changed=if_changed,
                    eval_text=eval_text,
                    tol=args.tol,
                )
            )
        except ExportError as exc:
            print(f"{name}: EXPORT FAILED\n{exc}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
