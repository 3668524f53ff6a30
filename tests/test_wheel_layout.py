"""The build-time mapping into the wheel (wheel_layout.py), checked without building one; the one version."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.version import Version

import service
import wheel_layout as wl

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = {
    "service",
    "service.config",
    "service.server",
    "service.server.worker",
    "export",
    "export.contract",
}
KNOWN = SHIPPED | {"export.graph", "export.verify"}


def rewrite(text: str) -> str:
    return wl.rewrite(text, SHIPPED, KNOWN)


def test_imports_move_under_rnnserve_and_nothing_else_does():
    source = '''"""Run it: python -m service.server --help; use it: from service.server import main.

The service is up; python -m export.verify needs torch (not shipped, so left alone).
"""
from service.config import Settings  # from service.config import x, in a comment, stays
from export.contract import check
import service.server as srv
from service import __version__


def f():
    from service.server import worker
    cmd = [sys.executable, "-m", "service.server.worker", "service", "service.config is a module"]
    return f"{cmd} via -m service.server", 'service.server'
'''
    assert (
        rewrite(source)
        == '''"""Run it: python -m rnnserve.server --help; use it: from rnnserve.server import main.

The service is up; python -m export.verify needs torch (not shipped, so left alone).
"""
from rnnserve.config import Settings  # from service.config import x, in a comment, stays
from rnnserve.export.contract import check
import rnnserve.server as srv
from rnnserve import __version__


def f():
    from rnnserve.server import worker
    cmd = [sys.executable, "-m", "rnnserve.server.worker", "service", "service.config is a module"]
    return f"{cmd} via -m rnnserve.server", 'rnnserve.server'
'''
    )


@pytest.mark.parametrize(
    ("source", "needle"),
    [
        ("import service.config\n", "needs `as NAME`"),
        ("from models import RecurrentModel\n", "models, which the wheel does not ship"),
        ("def f():\n    import torch\n", "torch, which the wheel does not ship"),
        ("from export import graph\n", "export.graph, which the wheel does not ship"),
        ("from export.verify import verify_against_torch\n", "export.verify, which the wheel does not ship"),
    ],
)
def test_an_import_the_wheel_cannot_satisfy_fails_the_build(source, needle):
    with pytest.raises(wl.LayoutError, match=needle.replace("`", ".").replace("(", ".").replace(")", ".")):
        rewrite(source)


def test_every_shipped_module_of_the_repository_maps_cleanly():
    plan = wl.plan(ROOT)
    shipped, known = set(plan), wl.source_modules(ROOT)
    assert {"service.client.cli", "service.server.worker", "export.contract"} <= shipped
    assert not [m for m in shipped if m.startswith(("models", "export.graph", "export.verify"))]
    for module, path in plan.items():
        out = wl.rewrite(path.read_text(), shipped, known, str(path))
        assert wl.leftover_imports(out, module) == []


def test_floors_rise_to_what_the_stubs_check_and_never_fall():
    floors = {"grpcio": Version("1.85.1"), "protobuf": Version("7.35.1")}
    assert wl.raise_floor("grpcio>=1.66", floors) == "grpcio>=1.85.1"
    assert wl.raise_floor("protobuf<9,>=5.28", floors) == "protobuf<9,>=7.35.1"
    assert wl.raise_floor("grpcio>=1.90", floors) == "grpcio>=1.90"
    assert wl.raise_floor("numpy>=1.26", floors) == "numpy>=1.26"
    with pytest.raises(wl.LayoutError, match="excludes"):
        wl.raise_floor("grpcio<1.80", floors)


def test_the_version_is_written_once_and_image_tags_follow_it():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "service.__version__"}
    # The image tags cannot read it (kustomize, shell lines in docs): each must name the same version.
    tags = {}
    for rel in ("deploy/Dockerfile", "deploy/base/kustomization.yaml", "docs/deploy.md", "README.md"):
        text = (ROOT / rel).read_text()
        found = re.findall(r"rnnserve:(\d+\.\d+\.\d+\S*)", text) + re.findall(r"newTag: (\S+)", text)
        tags.update({f"{rel} {v}": v for v in found})
    assert tags and {k for k, v in tags.items() if v != service.__version__} == set()
