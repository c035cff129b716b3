"""Finding the cluster as kubectl does, and the console script kubectl discovers."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import yaml

from tests.plugin.conftest import SCRIPT, Plugin


def test_the_console_script_is_where_kubectl_looks_for_plugins() -> None:
    # kubectl runs `kubectl pod-identity ...` as the first executable named kubectl-pod_identity on
    # PATH (dashes in the command become underscores in the file name): pip puts it in the
    # environment's bin directory.
    assert SCRIPT.name == "kubectl-" + "pod-identity".replace("-", "_")
    assert SCRIPT.parent == Path(sys.executable).parent
    assert SCRIPT.is_file()
    mode = SCRIPT.stat().st_mode
    assert mode & stat.S_IXUSR and mode & stat.S_IXOTH
    assert os.access(SCRIPT, os.X_OK)


async def test_python_dash_m_runs_the_same_plugin(plugin: Plugin) -> None:
    result = await plugin.run("list", "-o", "json", program=[sys.executable, "-m", "kubectl_pod_identity"])
    assert result.status == 0, result.stderr
    assert result.stdout == "[]\n"
    version = await plugin.run("--version", kubeconfig=False)
    assert version.status == 0 and version.stdout.startswith("kubectl pod-identity ")


async def test_connection_flags_before_the_command(plugin: Plugin) -> None:
    result = await plugin.run("--kubeconfig", str(plugin.kubeconfig), "list", kubeconfig=False)
    assert result.status == 0, result.stderr


async def test_kubeconfig_from_the_environment(plugin: Plugin) -> None:
    result = await plugin.run("list", kubeconfig=False, env={"KUBECONFIG": str(plugin.kubeconfig)})
    assert result.status == 0, result.stderr


async def test_kubeconfig_from_home(plugin: Plugin) -> None:
    (plugin.home / ".kube").mkdir()
    (plugin.home / ".kube" / "config").write_text(plugin.kubeconfig.read_text())
    result = await plugin.run("list", kubeconfig=False)
    assert result.status == 0, result.stderr


async def test_context_picks_another_cluster(plugin: Plugin, tmp_path: Path) -> None:
    # The file's current context points at nothing that answers; --context picks the stand-in, whose
    # CA now lives in a file referenced by a relative path (made absolute in the private copy).
    doc = yaml.safe_load(plugin.kubeconfig.read_text())
    (tmp_path / "ca.crt").write_bytes(plugin.api.ca_pem or b"")
    cluster = doc["clusters"][0]["cluster"]
    del cluster["certificate-authority-data"]
    cluster["certificate-authority"] = "ca.crt"
    doc["clusters"].append({"name": "dead", "cluster": {"server": "https://127.0.0.1:1"}})
    doc["contexts"].append({"name": "dead", "context": {"cluster": "dead", "user": "standin"}})
    doc["current-context"] = "dead"
    path = tmp_path / "two-contexts"
    path.write_text(yaml.safe_dump(doc))

    dead = await plugin.run("list", "--kubeconfig", str(path), "--request-timeout", "2", kubeconfig=False)
    assert dead.status == 1
    assert "cannot list azureidentities" in dead.stderr
    good = await plugin.run("list", "--kubeconfig", str(path), "--context", "standin", kubeconfig=False)
    assert good.status == 0, good.stderr
    missing = await plugin.run("list", "--kubeconfig", str(path), "--context", "nope", kubeconfig=False)
    assert missing.status == 2
    assert "context 'nope' not found" in missing.stderr


async def test_no_configuration_at_all_is_a_usage_error(plugin: Plugin) -> None:
    result = await plugin.run("list", kubeconfig=False)
    assert result.status == 2
    assert "no kubeconfig given" in result.stderr


async def test_wrong_token_is_refused(plugin: Plugin) -> None:
    plugin.api.token = "another-token"
    result = await plugin.run("list")
    assert result.status == 1
    assert "401 Unauthorized" in result.stderr
