"""The README's figures are the generated files, verbatim."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_blocks_match_generated_files():
    result = subprocess.run([sys.executable, "docs/sync_readme.py", "--check"], cwd=ROOT, capture_output=True)
    assert result.returncode == 0, result.stderr.decode()


def test_render_replaces_block(tmp_path):
    sys.path.insert(0, str(ROOT / "docs"))
    import sync_readme

    (tmp_path / "t.md").write_text("| a | 1 |\n")
    text = "x\n<!-- include: t.md -->\nstale\n<!-- end include -->\ny\n"
    assert sync_readme.render(text, tmp_path) == "x\n<!-- include: t.md -->\n| a | 1 |\n<!-- end include -->\ny\n"
