"""NMI fed by the Kubernetes watch caches, against the API server stand-in over TLS + kubeconfig."""

from __future__ import annotations

import asyncio

import pytest

from podidentity.model import AzureAssignedIdentity
from standins import apiserver as k8s
from tests.nmi.conftest import CLIENT_A, CLIENT_B, NODE, Cluster, Reply, eventually, http

pytestmark = pytest.mark.timeout(60)

ID_A = k8s.azure_identity("id-a", client_id=CLIENT_A)
ID_B = k8s.azure_identity("id-b", client_id=CLIENT_B)


async def test_pod_request_before_watch_event_is_served(cluster_factory) -> None:
    c = await cluster_factory()
    request = asyncio.create_task(c.get("127.0.0.30"))
    await asyncio.sleep(0.2)
    assert not request.done()
    c.api.create(k8s.pod("web", node=NODE, ip="127.0.0.30"))
    c.api.create(k8s.assigned_identity("web", ID_A, node=NODE))
    reply = await asyncio.wait_for(request, 5)
    assert reply.status == 200 and reply.json()["client_id"] == CLIENT_A


async def test_deleted_pod_is_refused_and_reused_ip_gets_new_identities(cluster_factory) -> None:
    c = await cluster_factory(
        objects=[k8s.pod("old", node=NODE, ip="127.0.0.31"), k8s.assigned_identity("old", ID_A, node=NODE)]
    )
    assert (await c.get("127.0.0.31")).json()["client_id"] == CLIENT_A
    c.api.delete("Pod", "default", "old")
    await c.api.wait_for(lambda: c.api.get("Pod", "default", "old") is None)
    for _ in range(100):
        if not c.app.state.pods_at("127.0.0.31"):
            break
        await asyncio.sleep(0.01)
    assert not c.app.state.pods_at("127.0.0.31")
    c.api.create(k8s.pod("new", node=NODE, ip="127.0.0.31"))
    c.api.create(k8s.assigned_identity("new", ID_B, node=NODE))
    reply = await eventually(lambda: _ok_with(c, "127.0.0.31", CLIENT_B))
    assert reply and reply.json()["client_id"] == CLIENT_B


async def _ok_with(c: Cluster, src: str, client_id: str) -> Reply | None:
    reply = await c.get(src)
    return reply if reply.status == 200 and reply.json()["client_id"] == client_id else None


async def test_other_nodes_assignments_are_not_seen(cluster_factory) -> None:
    c = await cluster_factory(
        objects=[
            k8s.pod("web", node=NODE, ip="127.0.0.32"),
            k8s.assigned_identity("web", ID_A, node="node-b"),
        ]
    )
    assert c.app.state.count(AzureAssignedIdentity) == 0
    assert (await c.get("127.0.0.32")).status == 400


async def test_managed_label_change_and_binding_delete(cluster_factory) -> None:
    c = await cluster_factory(
        "managed",
        objects=[
            k8s.pod("web", node=NODE, ip="127.0.0.33", labels={"aadpodidbinding": "a"}),
            ID_A,
            ID_B,
            k8s.binding("bind-a", "id-a", "a"),
            k8s.binding("bind-b", "id-b", "b"),
        ],
    )
    assert (await c.get("127.0.0.33")).json()["client_id"] == CLIENT_A
    c.api.patch("Pod", "default", "web", {"metadata": {"labels": {"aadpodidbinding": "b"}}})
    assert await eventually(lambda: _ok_with(c, "127.0.0.33", CLIENT_B))
    c.api.delete("AzureIdentityBinding", "default", "bind-b")

    async def denied() -> bool:
        return (await c.get("127.0.0.33")).status == 400

    assert await eventually(denied)


async def test_api_server_outage_keeps_serving_and_readiness_reports_it(cluster_factory) -> None:
    c = await cluster_factory(
        objects=[k8s.pod("web", node=NODE, ip="127.0.0.34"), k8s.assigned_identity("web", ID_A, node=NODE)]
    )
    assert (await c.ready()).status == 200
    assert (await c.get("127.0.0.34")).status == 200
    await c.api.stop_listening()
    c.api.close_watches()

    async def not_ready() -> bool:
        return (await c.ready()).status == 503

    assert await eventually(not_ready)
    assert (await c.get("127.0.0.34")).status == 200
    health = await http(c.app.probe_server.port, "/healthz", src="127.0.0.1")  # type: ignore[union-attr]
    assert health.status == 200
    await c.api.start_listening()

    async def ready_again() -> bool:
        return (await c.ready()).status == 200

    assert await eventually(ready_again)
