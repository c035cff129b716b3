"""Module boundaries, checked on the source: who may import what."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imports(package: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in (ROOT / package).rglob("*.py"):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
        found[str(path.relative_to(ROOT))] = names
    return found


def offenders(package: str, forbidden: str, allowed: tuple[str, ...] = ()) -> list[str]:
    return sorted(
        f"{path} imports {name}"
        for path, names in imports(package).items()
        if path not in allowed
        for name in names
        if name == forbidden or name.startswith(forbidden + ".")
    )


def test_kubernetes_asyncio_only_in_the_config_adapter() -> None:
    assert offenders("nmi", "kubernetes_asyncio", allowed=("nmi/kube/config.py",)) == []
    assert offenders("mic", "kubernetes_asyncio") == []


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("nmi/http", "nmi.kube"),
        ("nmi/http", "nmi.tokens"),
        ("nmi/http", "nmi.handlers"),
        ("iptables", "nmi"),
        ("nmi/tokens", "nmi.http"),
        ("nmi/tokens", "nmi.kube"),
        ("nmi", "standins"),
        ("nmi", "tests"),
        ("mic", "standins"),
        ("iptables", "standins"),
    ],
)
def test_layers(package: str, forbidden: str) -> None:
    assert offenders(package, forbidden) == []


def test_pure_modules_do_no_io() -> None:
    io = ("aiohttp", "socket", "subprocess", "asyncio.subprocess", "pyroute2", "msal", "requests")
    for module in (
        "nmi/resolver.py",
        "nmi/routing.py",
        "nmi/tokens/policy.py",
        "iptables/rules.py",
        "iptables/drift.py",
        "iptables/savefile.py",
        "mic/desired.py",
        "mic/diff.py",
        "mic/armbody.py",
    ):
        names = imports(str(Path(module).parent)).get(module, set())
        assert not [n for n in names if n.split(".")[0] in io], module
