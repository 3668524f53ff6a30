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
    assert (
        sync_readme.render(text, tmp_path)
        == "x\n<!-- include: t.md -->\n| a | 1 |\n<!-- end include -->\ny\n"
    )


def test_links_are_rebased_and_other_files_fenced(tmp_path):
    sys.path.insert(0, str(ROOT / "docs"))
    import sync_readme

    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "plot.png").write_bytes(b"")
    (tmp_path / "docs" / "t.md").write_text("![p](plot.png) [x](https://e.org/a)\n")
    (tmp_path / "docs" / "tune.abc").write_text("X:1\nK:G\n")
    text = (
        "<!-- include: docs/t.md -->\n<!-- end include -->\n"
        "<!-- include: docs/tune.abc -->\n<!-- end include -->\n"
    )
    out = sync_readme.render(text, tmp_path)
    assert "![p](docs/plot.png) [x](https://e.org/a)" in out
    assert "```\nX:1\nK:G\n```\n" in out
