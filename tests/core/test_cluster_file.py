from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from nmi.cluster_file import ClusterStateFile, load, parse_documents
from podidentity.errors import ConfigError
from podidentity.model import AzureIdentity, IdentityType, Pod, Secret
from podidentity.state import ClusterState

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "cluster-state.yaml"


def test_example_file_parses_every_kind() -> None:
    kinds = sorted(type(o).__name__ for o in load(EXAMPLE))
    assert kinds == sorted(
        [
            "Pod",
            "Pod",
            "Pod",
            "AzureIdentity",
            "AzureIdentityBinding",
            "AzureAssignedIdentity",
            "AzurePodIdentityException",
        ]
    )


def test_list_kind_and_secret_base64() -> None:
    text = """
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Secret
  metadata: {name: sp, namespace: team}
  data: {clientSecret: aHVudGVyMg==}
- apiVersion: aadpodidentity.k8s.io/v1
  kind: AzureIdentity
  metadata: {name: sp, namespace: team}
  spec: {type: 1, clientID: abc, tenantID: t, clientPassword: {name: sp}}
"""
    secret, ident = parse_documents(text)
    assert isinstance(secret, Secret) and secret.data["clientSecret"] == b"hunter2"
    assert isinstance(ident, AzureIdentity) and ident.type is IdentityType.SERVICE_PRINCIPAL
    assert ident.client_password is not None and ident.client_password.namespace == "team"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("kind: Pod\nmetadata: {}\n", "metadata.name is required"),
        ("kind: Gadget\nmetadata: {name: x}\n", "unsupported kind"),
        (
            "kind: AzureIdentity\nmetadata: {name: x}\nspec: {type: 7, clientID: a}\n",
            "spec.type must be 0, 1, 2 or 3",
        ),
        ("kind: AzureIdentity\nmetadata: {name: x}\nspec: {type: 0}\n", "spec.clientID is required"),
        ("a: [\n", "not valid YAML"),
        ("---\nkind: Pod\nmetadata: {name: ok}\n---\nkind: Pod\nmetadata: {name: 3}\n", "document 2"),
    ],
)
def test_bad_input_names_the_problem(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_documents(text)


async def test_reload_on_change_and_bad_edit_keeps_previous_state(tmp_path: Path) -> None:
    path = tmp_path / "state.yaml"
    path.write_text(EXAMPLE.read_text())
    state = ClusterState()
    source = ClusterStateFile(str(path), state, node_name="demo-node", poll_s=0.01)
    assert not state.synced
    source.load_initial()
    assert state.synced and state.count(Pod) == 3
    task = asyncio.create_task(source.run())
    try:
        path.write_text("kind: Pod\nmetadata: {name: [broken\n")
        os.utime(path, ns=(1, 1))
        for _ in range(200):
            if source.last_error:
                break
            await asyncio.sleep(0.01)
        assert source.last_error and state.count(Pod) == 3
        path.write_text(EXAMPLE.read_text().split("---")[0])
        for _ in range(200):
            if state.count(Pod) == 1:
                break
            await asyncio.sleep(0.01)
        assert state.count(Pod) == 1 and source.last_error is None
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_pods_of_other_nodes_are_left_out(tmp_path: Path) -> None:
    state = ClusterState()
    source = ClusterStateFile(str(EXAMPLE), state, node_name="another-node", poll_s=1)
    source.load_initial()
    assert state.count(Pod) == 0 and state.count(AzureIdentity) == 1
