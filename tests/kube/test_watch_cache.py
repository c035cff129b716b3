"""The node-scoped caches follow the API server: list, then every watch event applied at once."""

from __future__ import annotations

from podidentity.model import (
    AzureAssignedIdentity,
    AzureIdentity,
    AzureIdentityBinding,
    AzurePodIdentityException,
    ObjectKey,
    Pod,
)
from podidentity.state import ClusterState
from standins.apiserver import FakeApiServer, assigned_identity, azure_identity, binding, exception, pod

from .conftest import NODE, CacheFactory, until


def _pod(state: ClusterState, name: str, namespace: str = "default") -> Pod | None:
    return state.get(Pod, ObjectKey(namespace, name))


async def test_list_populates_state_marks_synced_and_uses_pages(
    apiserver: FakeApiServer, make_cache: CacheFactory
) -> None:
    for i in range(120):
        apiserver.create(pod(f"p{i:03}", namespace=f"ns{i % 3}"))
    apiserver.create(pod("elsewhere", node="node-b"))
    apiserver.create(exception("mic", {"app": "mic"}))

    cache = await make_cache()

    assert cache.source.ready
    assert cache.state.synced
    assert cache.state.sources() == {
        "kube/pods": True,
        "kube/azureidentities": True,
        "kube/azureidentitybindings": True,
        "kube/azureassignedidentities": True,
        "kube/azurepodidentityexceptions": True,
        "kube/serviceaccounts": True,
    }
    assert cache.state.count(Pod) == 120
    assert _pod(cache.state, "elsewhere") is None
    assert cache.state.count(AzurePodIdentityException) == 1
    pod_lists = [r for r in apiserver.requests if r.path == "/api/v1/pods" and r.verb == "list"]
    assert len(pod_lists) == 3  # 120 pods in pages of 50
    assert all(r.query["fieldSelector"] == f"spec.nodeName={NODE}" for r in pod_lists)
    assert [("continue" in r.query) for r in pod_lists] == [False, True, True]
    watches = [r for r in apiserver.requests if r.verb == "watch"]
    assert {r.query["allowWatchBookmarks"] for r in watches} == {"true"}
    assert all(int(r.query["timeoutSeconds"]) >= 30 for r in watches)
    assert all(r.user_agent.startswith("nmi/") for r in apiserver.requests)
    health = cache.source.health()
    assert health["pods"]["synced"] is True
    assert health["pods"]["broken_since"] is None
    assert health["pods"]["objects"] == 120


async def test_pod_changes_reach_the_ip_index_at_once(
    apiserver: FakeApiServer, make_cache: CacheFactory
) -> None:
    apiserver.create(pod("web", ip="10.1.0.5"))
    apiserver.create(pod("batch", ip="10.1.0.6"))
    apiserver.create(pod("gone", ip="10.1.0.7"))
    cache = await make_cache()
    state = cache.state
    assert [p.name for p in state.pods_at("10.1.0.5")] == ["web"]

    apiserver.patch("pods", "default", "web", {"status": {"podIP": "10.1.0.50"}})
    await until(lambda: bool(state.pods_at("10.1.0.50")), state)
    assert state.pods_at("10.1.0.5") == []

    apiserver.patch("pods", "default", "batch", {"status": {"phase": "Succeeded"}})
    await until(lambda: _pod(state, "batch").phase == "Succeeded", state)  # type: ignore[union-attr]
    assert state.pods_at("10.1.0.6") == []

    apiserver.delete("pods", "default", "gone", graceful=True)
    await until(lambda: _pod(state, "gone").deleting, state)  # type: ignore[union-attr]
    assert state.pods_at("10.1.0.7") == []

    apiserver.delete("pods", "default", "gone")
    await until(lambda: _pod(state, "gone") is None, state)

    apiserver.create(pod("new", ip="10.1.0.8"))
    await until(lambda: bool(state.pods_at("10.1.0.8")), state)
    apiserver.create(pod("other-node", node="node-b", ip="10.1.0.9"))
    apiserver.create(pod("last", ip="10.1.0.10"))
    await until(lambda: bool(state.pods_at("10.1.0.10")), state)
    assert state.pods_at("10.1.0.9") == []  # the field selector keeps other nodes' pods out


async def test_assigned_identities_only_for_this_node(
    apiserver: FakeApiServer, make_cache: CacheFactory
) -> None:
    ident = azure_identity("id1")
    apiserver.create(assigned_identity("web", ident, node=NODE))
    apiserver.create(assigned_identity("far", ident, node="node-b"))
    cache = await make_cache()
    state = cache.state

    assert [a.pod_name for a in state.all(AzureAssignedIdentity)] == ["web"]
    aai_lists = [r for r in apiserver.requests if r.path.endswith("/azureassignedidentities")]
    assert aai_lists and all(r.query["labelSelector"] == f"nodename={NODE}" for r in aai_lists)

    apiserver.create(assigned_identity("far2", ident, node="node-b"))
    apiserver.create(assigned_identity("web2", ident, node=NODE, state="Created"))
    await until(lambda: state.count(AzureAssignedIdentity) == 2, state)
    assert {a.pod_name for a in state.all(AzureAssignedIdentity)} == {"web", "web2"}

    name = "web2-default-id1"
    apiserver.patch("azureassignedidentities", "default", name, {"status": {"status": "Assigned"}})
    key = ObjectKey("default", name)
    await until(lambda: getattr(state.get(AzureAssignedIdentity, key), "state", "") == "Assigned", state)

    # MIC moving the label away is a DELETED event for this node's selector.
    apiserver.patch(
        "azureassignedidentities", "default", name, {"metadata": {"labels": {"nodename": "node-b"}}}
    )
    await until(lambda: state.count(AzureAssignedIdentity) == 1, state)

    # Deleting with MIC's finalizer marks it first, then it disappears when the finalizer goes.
    apiserver.delete("azureassignedidentities", "default", "web-default-id1")
    apiserver.patch(
        "azureassignedidentities", "default", "web-default-id1", {"metadata": {"finalizers": None}}
    )
    await until(lambda: state.count(AzureAssignedIdentity) == 0, state)


async def test_without_scale_features_every_assigned_identity_is_cached(
    apiserver: FakeApiServer, make_cache: CacheFactory
) -> None:
    ident = azure_identity("id1")
    apiserver.create(assigned_identity("web", ident, node=NODE))
    apiserver.create(assigned_identity("far", ident, node="node-b"))
    cache = await make_cache(scale=False)
    assert cache.state.count(AzureAssignedIdentity) == 2
    assert all("labelSelector" not in r.query for r in apiserver.requests if "azureassigned" in r.path)


async def test_managed_mode_caches_identities_bindings_and_exceptions(
    apiserver: FakeApiServer, make_cache: CacheFactory
) -> None:
    apiserver.create(azure_identity("id1", namespace="team-a"))
    apiserver.create(binding("b1", "id1", "web", namespace="team-a"))
    apiserver.create(exception("ex", {"app": "mic"}, namespace="kube-system"))
    apiserver.create(assigned_identity("web", azure_identity("id1"), node=NODE))
    cache = await make_cache(mode="managed")
    state = cache.state

    assert set(state.sources()) == {
        "kube/pods",
        "kube/azureidentities",
        "kube/azureidentitybindings",
        "kube/azurepodidentityexceptions",
        "kube/serviceaccounts",
    }
    assert [i.name for i in state.in_namespace(AzureIdentity, "team-a")] == ["id1"]
    assert [b.selector for b in state.in_namespace(AzureIdentityBinding, "team-a")] == ["web"]
    assert state.count(AzureAssignedIdentity) == 0
    assert not any("azureassignedidentities" in r.path for r in apiserver.requests)

    apiserver.patch(
        "azureidentities", "team-a", "id1", {"spec": {"clientID": "00000000-0000-0000-0000-0000000000ff"}}
    )
    await until(
        lambda: state.get(AzureIdentity, ObjectKey("team-a", "id1")).client_id.endswith("ff"),  # type: ignore[union-attr]
        state,
    )
    apiserver.delete("azureidentitybindings", "team-a", "b1")
    await until(lambda: state.count(AzureIdentityBinding) == 0, state)


async def test_invalid_object_is_skipped_and_the_watch_goes_on(
    apiserver: FakeApiServer, make_cache: CacheFactory
) -> None:
    broken = assigned_identity("bad", azure_identity("id1"), node=NODE)
    del broken["spec"]["pod"]
    apiserver.create(broken)
    apiserver.create(assigned_identity("good", azure_identity("id1"), node=NODE))
    cache = await make_cache()
    state = cache.state
    assert [a.pod_name for a in state.all(AzureAssignedIdentity)] == ["good"]
    assert cache.errors("parse_azureassignedidentities") == 1

    # A valid object turning invalid is dropped, not kept stale; later events still arrive.
    apiserver.patch(
        "azureassignedidentities", "default", "good-default-id1", {"spec": {"azureIdentityRef": "oops"}}
    )
    await until(lambda: state.count(AzureAssignedIdentity) == 0, state)
    apiserver.create(assigned_identity("later", azure_identity("id1"), node=NODE))
    await until(lambda: state.count(AzureAssignedIdentity) == 1, state)
    assert cache.errors("parse_azureassignedidentities") == 2
    assert cache.source.health()["azureassignedidentities"]["restarts"] == 0


async def test_on_pod_added_fires_once_per_new_pod(
    apiserver: FakeApiServer, make_cache: CacheFactory
) -> None:
    seen: list[str] = []
    apiserver.create(pod("listed"))
    cache = await make_cache(on_pod_added=lambda p: seen.append(p.name))
    assert seen == ["listed"]
    apiserver.create(pod("watched"))
    await until(lambda: _pod(cache.state, "watched") is not None, cache.state)
    apiserver.patch("pods", "default", "watched", {"status": {"podIP": "10.9.9.9"}})
    await until(lambda: bool(cache.state.pods_at("10.9.9.9")), cache.state)
    assert seen == ["listed", "watched"]


async def test_hook_errors_do_not_stop_the_cache(apiserver: FakeApiServer, make_cache: CacheFactory) -> None:
    def boom(_pod: Pod) -> None:
        raise RuntimeError("hook bug")

    cache = await make_cache(on_pod_added=boom)
    apiserver.create(pod("a"))
    apiserver.create(pod("b"))
    await until(lambda: cache.state.count(Pod) == 2, cache.state)
    assert cache.source.health()["pods"]["restarts"] == 0
