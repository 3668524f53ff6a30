"""``python -m tests.bench [--quick] [--out DIR] [--repeats N]``: run the benchmark suite.

Writes ``results.json``, ``results.md`` and PNG plots to ``--out`` and the README's Performance section to
``--performance-md``; prints the targets verdict. Not part of ``make test`` (``make bench``).

A full run writes the committed results: ``docs/bench/`` and ``docs/performance.md`` (which the README
includes). A ``--quick`` run writes everything to ``docs/bench/quick/`` (git-ignored), so a reduced run never
overwrites the committed figures.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tests.bench import report
from tests.bench.suite import Plan, Runner, load_result

FULL_OUT = Path("docs/bench")
FULL_PAGE = Path("docs/performance.md")
QUICK_OUT = FULL_OUT / "quick"


def outputs(
    quick: bool, out: Path | None, page: Path | None, render: Path | None = None
) -> tuple[Path, Path]:
    """Where results and the performance page go.

    Results: ``--out``; else the re-rendered JSON's folder; else ``QUICK_OUT`` for a quick run, ``FULL_OUT``
    for a full one. The page: ``--performance-md``; else ``FULL_PAGE`` (which the README includes) only when
    the results go to ``FULL_OUT``, and inside the results folder otherwise, so a quick or side run never
    rewrites the committed page.
    """
    if out is None:
        out = render.parent if render is not None else (QUICK_OUT if quick else FULL_OUT)
    if page is None:
        page = FULL_PAGE if out == FULL_OUT else out / "performance.md"
    return out, page


def main(argv: list[str] | None = None) -> int:
    """Run the suite and write the report; exit status 0 whether or not targets are met (the verdict is in the
    report), 1 when a measurement could not be made (a perf_analyzer run failed)."""
    parser = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="reduced run (two to three minutes)")
    parser.add_argument(
        "--out", type=Path, default=None, help=f"results folder (default {FULL_OUT}; --quick: {QUICK_OUT})"
    )
    parser.add_argument(
        "--performance-md",
        type=Path,
        default=None,
        help=f"where the Performance section goes ('-' = do not write; default {FULL_PAGE} when the results "
        f"go to {FULL_OUT}, else inside the results folder)",
    )
    parser.add_argument("--repeats", type=int, default=None, help="runs per load scenario (median kept)")
    parser.add_argument(
        "--render",
        type=Path,
        default=None,
        metavar="RESULTS_JSON",
        help="do not measure: re-render the report from an earlier results.json",
    )
    args = parser.parse_args(argv)
    args.out, args.performance_md = outputs(args.quick, args.out, args.performance_md, args.render)
    failures: list[str] = []
    if args.render is not None:
        result = load_result(args.render)
    else:
        runner = Runner(Plan.make(args.quick, args.repeats), args.out)
        try:
            result = runner.run()
        finally:
            runner.close()
        failures = runner.failures
    perf = None if str(args.performance_md) == "-" else args.performance_md
    verdicts = report.write(result, args.out, perf)
    print(report.verdict_table(verdicts))
    for note in result.notes:
        print("note:", note, file=sys.stderr)
    print(f"results: {args.out / 'results.md'}", file=sys.stderr)
    for failure in failures:
        print("FAILED:", failure.splitlines()[0], file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
