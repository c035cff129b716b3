"""An empty ``--cluster-state`` is not a cluster: refused at start, a failed reload afterwards."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from nmi.cluster_file import ClusterStateFile
from podidentity.errors import ConfigError
from podidentity.model import AzureIdentity, Pod
from podidentity.state import ClusterState

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "cluster-state.yaml"

EMPTY = {
    "0-bytes": "",
    "whitespace": "  \n\n   \n",
    "only-comments": "# nothing here yet\n# still nothing\n",
    "only-separators": "---\n---\n--- # x\n",
    "empty-list": "apiVersion: v1\nkind: List\nitems: []\n",
    "null-documents": "---\n~\n---\nnull\n",
}


@pytest.mark.parametrize("text", EMPTY.values(), ids=EMPTY.keys())
def test_an_empty_file_is_refused_at_start(tmp_path: Path, text: str) -> None:
    path = tmp_path / "state.yaml"
    path.write_text(text)
    state = ClusterState()
    source = ClusterStateFile(str(path), state, node_name="demo-node", poll_s=1)
    with pytest.raises(ConfigError, match="no objects"):
        source.load_initial()
    assert not state.synced


@pytest.mark.parametrize("text", EMPTY.values(), ids=EMPTY.keys())
async def test_truncating_the_file_keeps_the_last_good_state(
    tmp_path: Path, text: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "state.yaml"
    path.write_text(EXAMPLE.read_text())
    state = ClusterState()
    source = ClusterStateFile(str(path), state, node_name="demo-node", poll_s=1)
    source.load_initial()
    pods = {p.name for p in state.all(Pod)}
    assert len(pods) == 3

    path.write_text(text)  # ": > file", as a rewrite in place starts
    with caplog.at_level(logging.ERROR, logger="nmi.cluster_file"):
        assert await source.reload() is False
    assert {p.name for p in state.all(Pod)} == pods
    assert state.pods_at("10.244.0.10") and state.synced
    assert source.reload_failures == 1 and source.reloads == 0
    assert source.last_error is not None and "no objects" in source.last_error
    assert "keeping the previous one" in caplog.text

    path.write_text(EXAMPLE.read_text())  # the rewrite completes
    assert await source.reload() is True
    assert source.last_error is None and source.reloads == 1 and source.reload_failures == 1


def test_objects_but_no_pods_is_a_cluster(tmp_path: Path) -> None:
    path = tmp_path / "state.yaml"
    path.write_text(
        "# a node without pods\n---\nkind: AzureIdentity\napiVersion: aadpodidentity.k8s.io/v1\n"
        "metadata: {name: x}\nspec: {type: 0, clientID: abc}\n"
    )
    state = ClusterState()
    ClusterStateFile(str(path), state, node_name="demo-node", poll_s=1).load_initial()
    assert state.synced and state.count(Pod) == 0 and state.count(AzureIdentity) == 1


def test_pods_of_other_nodes_only_is_a_cluster(tmp_path: Path) -> None:
    path = tmp_path / "state.yaml"
    path.write_text("kind: Pod\napiVersion: v1\nmetadata: {name: p}\nspec: {nodeName: other}\n")
    state = ClusterState()
    ClusterStateFile(str(path), state, node_name="demo-node", poll_s=1).load_initial()
    assert state.synced and state.count(Pod) == 0
