"""The layers of `service/` (docs/DESIGN.md, "Layers"): imports point down, and the client stands alone."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SERVICE = ROOT / "service"

# Each package may import only from the packages listed for it (and from itself).
ALLOWED = {
    "service.errors": set(),
    "service.config": set(),
    "service.metrics": set(),
    "service.proto": set(),
    "service.wire": {"service.errors", "service.proto"},
    "service.client": {"service.errors", "service.proto", "service.wire"},
    "service.stores": {"service.errors", "service.config"},
    "service.core": {"service.errors", "service.config", "service.metrics", "service.stores"},
    "service.server": {
        "service.errors",
        "service.config",
        "service.metrics",
        "service.proto",
        "service.wire",
        "service.core",
        "service.stores",
    },
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in SERVICE.rglob("*.py"):
        if "proto" in path.parts:
            continue
        name = _module_name(path)
        found: set[str] = set()
        tree = ast.parse(path.read_text())
        for block in ast.walk(tree):  # annotation-only imports (under `if TYPE_CHECKING:`) never run
            if isinstance(block, ast.If) and getattr(block.test, "id", "") == "TYPE_CHECKING":
                block.body = []
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("service"):
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("service"))
        modules = {p for p in found if (SERVICE.parent / (p.replace(".", "/") + ".py")).exists()}
        modules |= {p for p in found if (SERVICE.parent / p.replace(".", "/") / "__init__.py").exists()}
        graph[name] = modules - {name, "service"}
    return graph


def _package(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2])


def test_every_import_points_down_the_layers():
    wrong = []
    for module, deps in _imports().items():
        pkg = _package(module)
        if pkg == "service":
            continue
        allowed = ALLOWED[pkg] | {pkg}
        wrong += [f"{module} -> {d}" for d in sorted(deps) if _package(d) not in allowed]
    assert wrong == []


def test_no_import_cycles_between_modules():
    graph = {
        m: {d for d in deps if not (SERVICE.parent / d.replace(".", "/") / "__init__.py").exists()}
        for m, deps in _imports().items()
    }
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in graph.get(node, ()):
            if state.get(dep) == 1:
                cycles.append([*path[path.index(dep) :], dep] if dep in path else [node, dep])
            elif state.get(dep) is None:
                visit(dep, [*path, dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_no_module_needs_a_table_of_contents():
    """Each part fits in one sitting (the review's ~400-line bound) -- generated stubs aside."""
    long = {
        str(p.relative_to(ROOT)): n
        for p in SERVICE.rglob("*.py")
        if "proto" not in p.parts and (n := len(p.read_text().splitlines())) > 480
    }
    assert long == {}


def test_the_client_imports_without_the_server_dependencies():
    """A client install has grpcio, protobuf and numpy only: block everything else and import it all."""
    blocked = [
        "onnxruntime",
        "onnx",
        "prometheus_client",
        "redis",
        "tritonclient",
        "pydantic",
        "pydantic_settings",
        "yaml",
        "grpc_health",
        "grpc_reflection",
        "torch",
    ]
    code = (
        "import sys\n"
        f"for name in {blocked!r}:\n"
        "    sys.modules[name] = None\n"
        "import service.client, service.client.cli\n"
        "from service.client import Client, AsyncClient\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
