"""Copy generated result files into README.md between include markers, so no figure in the README is typed in.

A block looks like::

    <!-- include: docs/results/char_bpc.md -->
    ...generated content...
    <!-- end include -->

`python docs/sync_readme.py` rewrites the blocks; `--check` exits 1 if any block differs from its file
(tests/test_readme.py runs the check, so the README cannot drift from the files the code generated).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(<!-- include: (?P<path>[^ ]+) -->\n)(?P<body>.*?)(<!-- end include -->)", re.S)
LINK = re.compile(r"(\]\()(?P<target>[^)#\s]+)(\))")


def rebase_links(body: str, source: Path, root: Path) -> str:
    """Make links that are relative to the included file's folder relative to the README instead."""

    def fix(m: re.Match[str]) -> str:
        target = m.group("target")
        if "://" in target or target.startswith("/") or (root / target).exists():
            return m.group(0)
        local = source.parent / target
        if local.exists():
            return f"{m.group(1)}{local.resolve().relative_to(root.resolve()).as_posix()}{m.group(3)}"
        return m.group(0)

    return LINK.sub(fix, body)


def render(readme: str, root: Path = ROOT) -> str:
    """Return the README text with every include block replaced by its file's current content."""

    def fill(m: re.Match[str]) -> str:
        path = root / m.group("path")
        if not path.exists():
            body = f"_(not generated yet: `{m.group('path')}`)_\n"
        elif path.suffix == ".md":
            body = rebase_links(path.read_text(), path, root)
        else:  # any other text file (a sampled tune, a log) is shown verbatim
            body = "```\n" + path.read_text().rstrip("\n") + "\n```\n"
        if not body.endswith("\n"):
            body += "\n"
        return f"{m.group(1)}{body}{m.group(4)}"

    return BLOCK.sub(fill, readme)


def main() -> int:
    """Rewrite README.md in place, or with --check report whether it is in sync."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if README.md is out of date")
    args = parser.parse_args()
    readme = ROOT / "README.md"
    old = readme.read_text()
    new = render(old)
    if args.check:
        if old != new:
            print("README.md is out of date with the generated files: run `make readme`", file=sys.stderr)
            return 1
        return 0
    readme.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
