"""The large-file reader (split, skip other nodes' documents, parse only what changed) keeps exactly
what the plain parser keeps."""

from __future__ import annotations

from pathlib import Path

import pytest

from nmi.cluster_file import ClusterStateFile, load, read_snapshot
from podidentity.errors import ConfigError
from podidentity.model import AzureAssignedIdentity, AzureIdentity, Pod
from podidentity.state import ClusterState

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "cluster-state.yaml"

# --- the fast reader gives what the plain parser gives ------------------------------------------

MIXED = """\
%s
apiVersion: v1
kind: Pod
metadata: {name: here, namespace: a, labels: {aadpodidbinding: x, "n": "1"}}
spec: {nodeName: demo-node, hostNetwork: false}
status: {phase: Running, podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: there, namespace: a}
spec:
  nodeName: "node-b"
status: {phase: Running, podIP: 10.0.0.2}
---
# a pod whose node field also appears in a label: parsed, then judged by spec.nodeName
apiVersion: v1
kind: Pod
metadata: {name: labelled, namespace: a, labels: {nodeName: node-b}}
spec: {nodeName: demo-node}
status: {phase: Running, podIP: 10.0.0.3}
--- {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "json"}, "spec": {"nodeName": "demo-node"}}
---
defaults: &defaults {type: 0, clientID: merged}
kind: AzureIdentity
apiVersion: aadpodidentity.k8s.io/v1
metadata: {name: merged, namespace: a}
spec:
  <<: *defaults
  resourceID: /r
---
apiVersion: aadpodidentity.k8s.io/v1
kind: AzureAssignedIdentity
metadata: {name: aai-there, namespace: a, labels: {nodename: node-b}}
spec:
  pod: there
  podNamespace: a
  nodename: node-b
  azureIdentityRef: {metadata: {name: merged}, spec: {type: 0, clientID: merged}}
status: {status: Assigned}
---
apiVersion: aadpodidentity.k8s.io/v1
kind: AzureAssignedIdentity
metadata: {name: aai-here, namespace: a}
spec:
  pod: here
  podNamespace: a
  azureIdentityRef: {metadata: {name: merged}, spec: {type: 0, clientID: merged}}
status: {status: Assigned}
"""


@pytest.mark.parametrize("head", ["", "---", "%YAML 1.1\n---"], ids=["bare", "marker", "directive"])
def test_the_fast_reader_keeps_what_the_plain_parser_keeps(tmp_path: Path, head: str) -> None:
    path = tmp_path / "state.yaml"
    path.write_text(MIXED % head)
    snapshot = read_snapshot(path, node_name="demo-node")
    assert snapshot.total == 7
    assert set(snapshot.objects["Pod"]) == set(
        o.key for o in load(path) if isinstance(o, Pod) and o.node_name == "demo-node"
    )
    (identity,) = snapshot.objects["AzureIdentity"].values()
    assert isinstance(identity, AzureIdentity) and identity.client_id == "merged"
    # Assigned identities of other nodes are left out, as the watch's nodename selector does;
    # one that names no node is kept.
    assert [k.name for k in snapshot.objects["AzureAssignedIdentity"]] == ["aai-here"]
    every = {o.key: o for o in load(path)}
    for objects in snapshot.objects.values():
        for key, obj in objects.items():
            assert every[key] == obj


def test_an_error_in_one_document_names_it_with_the_files_line(tmp_path: Path) -> None:
    path = tmp_path / "state.yaml"
    path.write_text(EXAMPLE.read_text() + "---\nkind: Pod\nmetadata: {name: [broken\n")
    with pytest.raises(ConfigError, match=r"(?s)not valid YAML.*line 5[0-9]"):
        read_snapshot(path, node_name="demo-node")
    path.write_text(EXAMPLE.read_text() + "---\nkind: Pod\nmetadata: {}\n")
    with pytest.raises(ConfigError, match=r"document 8: .*metadata\.name is required"):
        read_snapshot(path, node_name="demo-node")


async def test_a_reload_parses_only_changed_documents_and_applies_only_changes(tmp_path: Path) -> None:
    path = tmp_path / "state.yaml"
    path.write_text(EXAMPLE.read_text())
    state = ClusterState()
    source = ClusterStateFile(str(path), state, node_name="demo-node", poll_s=1)
    source.load_initial()
    before = {o.key: o for o in state.all(Pod)}
    identity = state.all(AzureIdentity)[0]
    version = state.version
    path.write_text(EXAMPLE.read_text().replace("podIP: 10.244.0.11", "podIP: 10.244.0.99"))
    assert await source.reload()
    after = {o.key: o for o in state.all(Pod)}
    changed = [k.name for k in after if after[k] is not before[k]]
    assert changed == ["batch"] and state.pods_at("10.244.0.99")[0].name == "batch"
    assert state.all(AzureIdentity)[0] is identity  # unchanged documents were not parsed again
    assert state.version == version + 1  # one chunk: one mutation
    assert state.count(AzureAssignedIdentity) == 1
