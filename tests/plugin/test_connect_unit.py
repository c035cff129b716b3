"""Which kubeconfig and context: the rules kubectl follows, on files only."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kubectl_pod_identity.connect import kubeconfig_path, with_context
from kubectl_pod_identity.errors import Refused, UsageError
from kubectl_pod_identity.operations import _refused
from podidentity.errors import ConfigError
from podidentity.kube.errors import KubeApiError


def test_kubeconfig_precedence(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert kubeconfig_path("flag", {"KUBECONFIG": "env", "HOME": str(home)}) == "flag"
    assert kubeconfig_path(None, {"KUBECONFIG": "env", "HOME": str(home)}) == "env"
    assert kubeconfig_path(None, {"HOME": str(home)}) is None  # in-cluster
    (home / ".kube").mkdir(parents=True)
    (home / ".kube" / "config").write_text("{}")
    assert kubeconfig_path(None, {"HOME": str(home)}) == str(home / ".kube" / "config")
    assert kubeconfig_path(None, {"KUBECONFIG": "", "HOME": str(home)}) == str(home / ".kube" / "config")


def _config(path: Path, name: str, *, ca: str = "ca.crt", current: str | None = None) -> Path:
    doc = {
        "clusters": [{"name": name, "cluster": {"server": f"https://{name}", "certificate-authority": ca}}],
        "users": [
            {
                "name": name,
                "user": {"client-certificate": "c.crt", "client-key": "/abs/c.key", "tokenFile": "t"},
            }
        ],
        "contexts": [
            {"name": name, "context": {"cluster": name, "user": name}},
            {"name": "shared", "context": {"cluster": name}},
        ],
        "current-context": current or name,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc))
    return path


def test_with_context_merges_first_wins_and_makes_paths_absolute(tmp_path: Path) -> None:
    one = _config(tmp_path / "one" / "config", "one")
    two = _config(tmp_path / "two" / "config", "two")
    merged = with_context(f"{one}:{tmp_path / 'missing'}:{two}", "two")
    assert merged["current-context"] == "two"
    assert [c["name"] for c in merged["contexts"]] == ["one", "shared", "two"]
    shared = next(c for c in merged["contexts"] if c["name"] == "shared")
    assert shared["context"]["cluster"] == "one"  # the first file to name it wins
    cluster = next(c for c in merged["clusters"] if c["name"] == "two")["cluster"]
    assert cluster["certificate-authority"] == str(tmp_path / "two" / "ca.crt")
    user = next(u for u in merged["users"] if u["name"] == "two")["user"]
    assert user == {
        "client-certificate": str(tmp_path / "two" / "c.crt"),
        "client-key": "/abs/c.key",
        "tokenFile": str(tmp_path / "two" / "t"),
    }


def test_with_context_errors(tmp_path: Path) -> None:
    one = _config(tmp_path / "config", "one")
    with pytest.raises(ConfigError, match=r"context 'nope' not found .* \(contexts: one, shared\)"):
        with_context(str(one), "nope")
    with pytest.raises(ConfigError, match="does not exist"):
        with_context(str(tmp_path / "missing"), "one")
    (tmp_path / "list").write_text("- 1\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        with_context(str(tmp_path / "list"), "one")


async def test_context_without_any_kubeconfig_is_a_usage_error(tmp_path: Path) -> None:
    from kubectl_pod_identity.connect import connect
    from podidentity.kube.settings import KubeSettings

    with pytest.raises(UsageError, match="--context 'x': no kubeconfig"):
        await connect(None, "x", KubeSettings(), environ={"HOME": str(tmp_path)})


def test_a_missing_resource_kind_hints_at_the_crds() -> None:
    missing = KubeApiError(404, "NotFound", "the server could not find the requested resource")
    assert "CRDs installed?" in str(_refused("cannot list azureidentities", missing))
    gone = KubeApiError(404, "NotFound", 'azureidentities.aadpodidentity.k8s.io "x" not found')
    refused = _refused("cannot read", gone)
    assert isinstance(refused, Refused) and "CRDs" not in str(refused)
