"""The plugin stands on the core only, and its pure modules do no I/O."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "kubectl_pod_identity"
PROJECT = ("podidentity", "nmi", "mic", "iptables", "standins", "tests")


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_the_plugin_imports_only_the_core() -> None:
    files = sorted(PACKAGE.glob("*.py"))
    assert files
    for path in files:
        assert _imports(path) & set(PROJECT) <= {"podidentity"}, path.name
        assert "kubernetes_asyncio" not in _imports(path), path.name
    assert "podidentity" in _imports(PACKAGE / "operations.py")  # the rule can fail


def test_pure_modules_do_no_io() -> None:
    io = {"aiohttp", "asyncio", "socket", "subprocess", "os", "tempfile", "pathlib", "sys", "requests"}
    for module in ("validation.py", "objects.py", "errors.py"):
        assert not _imports(PACKAGE / module) & io, module
