"""``python -m tests.bench [--quick] [--out docs/bench] [--repeats N]``: run the benchmark suite.

Writes ``results.json``, ``results.md`` and PNG plots to ``--out`` and the README's Performance section to
``--performance-md``; prints the targets verdict. Not part of ``make test`` (``make bench``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tests.bench import report
from tests.bench.suite import Plan, Runner, load_result


def main(argv: list[str] | None = None) -> int:
    """Run the suite; exit status 0 whether or not targets are met (the verdict is in the report)."""
    parser = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="reduced run (one to two minutes)")
    parser.add_argument("--out", type=Path, default=Path("docs/bench"), help="results folder")
    parser.add_argument(
        "--performance-md",
        type=Path,
        default=Path("docs/performance.md"),
        help="where the README's Performance section goes ('-' = do not write)",
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
    if args.render is not None:
        result = load_result(args.render)
    else:
        runner = Runner(Plan.make(args.quick, args.repeats), args.out)
        try:
            result = runner.run()
        finally:
            runner.close()
    perf = None if str(args.performance_md) == "-" else args.performance_md
    verdicts = report.write(result, args.out, perf)
    print(report.verdict_table(verdicts))
    for note in result.notes:
        print("note:", note, file=sys.stderr)
    print(f"results: {args.out / 'results.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
