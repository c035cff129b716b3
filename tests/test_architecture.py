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


PACKAGES = ("podidentity", "nmi", "mic", "iptables", "standins")


def test_kubernetes_asyncio_only_in_the_config_adapter() -> None:
    for package in PACKAGES:
        allowed = ("podidentity/kube/config.py",) if package == "podidentity" else ()
        assert offenders(package, "kubernetes_asyncio", allowed=allowed) == [], package


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        # The core stands alone: it knows neither daemon, nor the stand-ins, nor the tests.
        ("podidentity", "nmi"),
        ("podidentity", "mic"),
        ("podidentity", "iptables"),
        ("podidentity", "standins"),
        ("podidentity", "tests"),
        # The daemons are siblings over the core.
        ("mic", "nmi"),
        ("nmi", "mic"),
        ("iptables", "nmi"),
        ("iptables", "mic"),
        ("iptables", "podidentity"),
        ("nmi", "standins"),
        ("nmi", "tests"),
        ("mic", "standins"),
        ("mic", "tests"),
        ("iptables", "standins"),
        # Layers inside the core: HTTP knows nothing of Kubernetes or tokens.
        ("podidentity/http", "podidentity.kube"),
        ("podidentity/http", "podidentity.imds"),
        ("podidentity/imds", "podidentity.http"),
        ("podidentity/imds", "podidentity.kube"),
        ("nmi/tokens", "podidentity.http"),
        ("nmi/tokens", "podidentity.kube"),
    ],
)
def test_layers(package: str, forbidden: str) -> None:
    assert offenders(package, forbidden) == []


def _private_imports(package: str) -> list[str]:
    """``from other_package.x import _name`` or ``import other_package._module``: another's insides."""
    found: list[str] = []
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module.split(".")[0] == package:
                    continue
                modules = [node.module]
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.Import):
                modules = [a.name for a in node.names if a.name.split(".")[0] != package]
                names = []
            else:
                continue
            for module in modules:
                if module.split(".")[0] not in PACKAGES:
                    continue
                private = [m for m in module.split(".") if m.startswith("_") and m != "__init__"]
                private += [n for n in names if n.startswith("_") and n != "__version__"]
                if private:
                    found.append(f"{path.relative_to(ROOT)}: {module} {private}")
    return sorted(found)


@pytest.mark.parametrize("package", PACKAGES)
def test_no_package_imports_another_packages_private_names(package: str) -> None:
    assert _private_imports(package) == []


def test_the_rules_can_fail() -> None:
    # The checks read real source: a rule that never matches would pass for the wrong reason.
    assert offenders("nmi", "podidentity")
    assert offenders("mic", "podidentity")
    assert [name for names in imports("podidentity").values() for name in names if name == "asyncio"]


def test_pure_modules_do_no_io() -> None:
    io = ("aiohttp", "socket", "subprocess", "asyncio.subprocess", "pyroute2", "msal", "requests")
    for module in (
        "nmi/resolver.py",
        "nmi/selectors.py",
        "nmi/routing.py",
        "nmi/tokens/policy.py",
        "podidentity/model.py",
        "podidentity/binding.py",
        "iptables/rules.py",
        "iptables/drift.py",
        "iptables/savefile.py",
        "mic/desired.py",
        "mic/diff.py",
        "mic/armbody.py",
    ):
        names = imports(str(Path(module).parent)).get(module, set())
        assert not [n for n in names if n.split(".")[0] in io], module
