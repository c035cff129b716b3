"""NMI fed by the Kubernetes watch caches, against the API server stand-in over TLS + kubeconfig."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from nmi.app import App
from nmi.settings import (
    ClusterSettings,
    IdentitySettings,
    IptablesSettings,
    ObservabilitySettings,
    ServerSettings,
    Settings,
    UpstreamSettings,
)
from podidentity.kube.settings import KubeSettings
from podidentity.model import AzureAssignedIdentity
from standins import apiserver as k8s
from standins.apiserver import FakeApiServer
from standins.imds import ImdsStandIn
from tests.nmi.conftest import Reply, http, token_path

pytestmark = pytest.mark.timeout(60)

NODE = "node-a"
CLIENT_A = "aaaaaaaa-0000-0000-0000-00000000000a"
CLIENT_B = "bbbbbbbb-0000-0000-0000-00000000000b"
FAST = KubeSettings(
    qps=0,
    connect_timeout_s=1.0,
    request_timeout_s=2.0,
    inactivity_timeout_s=0.5,
    backoff_initial_s=0.05,
    backoff_max_s=0.3,
    secret_ttl_s=0.5,
)


@dataclass
class Cluster:
    api: FakeApiServer
    imds: ImdsStandIn
    app: App

    async def get(self, src: str, path: str | None = None) -> Reply:
        assert self.app.server is not None
        return await http(self.app.server.port, path or token_path(), src=src)

    async def ready(self) -> Reply:
        assert self.app.probe_server is not None
        return await http(self.app.probe_server.port, "/readyz", src="127.0.0.1")


@pytest.fixture
async def cluster_factory(tmp_path: Path) -> AsyncIterator[Any]:
    made: list[Cluster] = []

    async def make(
        mode: str = "standard", objects: tuple[dict[str, Any], ...] | list[dict[str, Any]] = ()
    ) -> Cluster:
        api = FakeApiServer(tls=True, token="t0ken", bookmark_interval_s=0.1)
        await api.start()
        api.load(objects)
        imds = ImdsStandIn()
        imds.add_identity(CLIENT_A)
        imds.add_identity(CLIENT_B)
        await imds.start("127.0.0.1", 0)
        kubeconfig = api.write_kubeconfig(tmp_path / f"kubeconfig-{len(made)}")
        settings = Settings(
            server=ServerSettings(port=0),
            upstream=UpstreamSettings(metadata_ip="127.0.0.1", metadata_port=imds.port),
            identity=IdentitySettings(
                operation_mode=mode,
                force_namespaced=mode == "managed",  # type: ignore[arg-type]
                pod_wait_timeout_s=3.0,
                identity_wait_timeout_s=1.0,
            ),
            observability=ObservabilitySettings(
                prometheus_port=0, probe_port=0, probe_address="127.0.0.1", metrics_address="127.0.0.1"
            ),
            cluster=ClusterSettings(node_name=NODE, kubeconfig=str(kubeconfig), watch_broken_threshold_s=0.5),
            iptables=IptablesSettings(manage=False),
            kube=FAST,
        )
        app = App(settings)
        cluster = Cluster(api, imds, app)
        made.append(cluster)
        await app.start()
        for _ in range(300):
            if app.state.synced:
                break
            await asyncio.sleep(0.01)
        assert app.state.synced
        return cluster

    yield make
    for c in made:
        await c.app.stop()
        await c.imds.stop()
        await c.api.stop()


ID_A = k8s.azure_identity("id-a", client_id=CLIENT_A)
ID_B = k8s.azure_identity("id-b", client_id=CLIENT_B)


async def eventually(check: Any, timeout: float = 5.0) -> Any:
    for _ in range(int(timeout / 0.02)):
        result = await check()
        if result:
            return result
        await asyncio.sleep(0.02)
    return await check()


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
