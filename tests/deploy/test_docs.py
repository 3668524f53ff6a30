"""The deploy docs (docs/deploy.md, README "Deploy on Kubernetes") use the commands the tests run."""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pytest

from tests.deploy.test_manifests import OVERLAYS

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "docs" / "deploy.md", ROOT / "README.md"]


def commands(text: str) -> list[list[str]]:
    """Shell commands inside ```bash blocks (comments dropped)."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                out.append(shlex.split(line))
    return out


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_deploy_commands_name_what_the_tests_render(doc: Path):
    cmds = commands(doc.read_text())
    kube = [c for c in cmds if c[:1] == ["kubectl"]]
    if doc.name == "README.md" and not kube:
        pytest.skip(
            "README has no Deploy on Kubernetes commands yet (the lead copies them from docs/deploy.md)"
        )
    rendered = set()
    for c in kube:
        if c[1] == "kustomize":
            target = c[2]
        elif c[1] == "apply" and c[2] == "-k":
            target = c[3]
        else:
            continue
        assert target.startswith("deploy/overlays/"), c
        overlay = target.removeprefix("deploy/overlays/").rstrip("/")
        assert overlay in OVERLAYS, f"{doc.name}: {' '.join(c)} names an overlay the tests do not render"
        rendered.add(overlay)
    assert rendered == set(OVERLAYS), f"{doc.name} should show every overlay the tests render"
    for c in cmds:
        if c[:2] == ["docker", "build"]:
            assert c[c.index("-f") + 1] == "deploy/Dockerfile" and c[-1] == ".", c
        if c[:1] == ["make"]:
            assert re.search(rf"^{re.escape(c[1])}:", (ROOT / "Makefile").read_text(), re.M), c


def test_deploy_doc_includes_equal_the_generated_files():
    """docs/deploy.md quotes docs/deploy/failover.md (deploy/failover_report.py) and docs/deploy/proxy.md
    (deploy/proxy_report.py, `make proxy-check`) verbatim; the README's Deploy section includes both."""
    sys.path.insert(0, str(ROOT / "docs"))
    import sync_readme

    text = (ROOT / "docs" / "deploy.md").read_text()
    readme = (ROOT / "README.md").read_text()
    for name in ("failover", "proxy"):
        assert f"<!-- include: docs/deploy/{name}.md -->" in text
        assert f"<!-- include: docs/deploy/{name}.md -->" in readme
        assert (ROOT / "docs" / "deploy" / f"{name}.png").stat().st_size > 10_000
    assert sync_readme.render(text, ROOT) == text, "re-copy docs/deploy/*.md into docs/deploy.md"
