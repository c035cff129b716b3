"""The whole standard-mode story: MIC assigns, NMI waits for Assigned, then serves the pod's token."""

from __future__ import annotations

import asyncio

import pytest

from nmi.app import App as NmiApp
from nmi.settings import (
    ClusterSettings,
    IdentitySettings,
    IptablesSettings,
    ObservabilitySettings,
    ServerSettings,
    Settings,
    UpstreamSettings,
)
from standins import apiserver as k8s
from tests.mic.conftest import FAST_KUBE, POOL, Env, identity, uami
from tests.nmi.conftest import http, token_path

pytestmark = pytest.mark.timeout(60)

CLIENT = "abcdabcd-0000-0000-0000-0000000000aa"
POD_IP = "127.0.0.50"


async def test_pod_token_waits_for_mic_then_is_served(env: Env) -> None:
    env.imds.add_identity(CLIENT, resource_id=uami("web"))
    env.api.create(identity("web", CLIENT))
    env.api.create(k8s.binding("web-binding", "web", "web"))
    env.api.create(k8s.pod("web", node="aks-pool-0", ip=POD_IP, labels={"aadpodidbinding": "web"}))
    nmi = NmiApp(
        Settings(
            server=ServerSettings(port=0),
            upstream=UpstreamSettings(metadata_ip="127.0.0.1", metadata_port=env.imds.port),
            identity=IdentitySettings(identity_wait_timeout_s=20.0),
            observability=ObservabilitySettings(
                prometheus_port=0, probe_port=0, probe_address="127.0.0.1", metrics_address="127.0.0.1"
            ),
            cluster=ClusterSettings(node_name="aks-pool-0", kubeconfig=str(env.kubeconfig)),
            iptables=IptablesSettings(manage=False),
            kube=FAST_KUBE,
        ),
    )
    await nmi.start()
    try:
        assert nmi.server is not None
        request = asyncio.create_task(http(nmi.server.port, token_path(), src=POD_IP))
        await asyncio.sleep(0.3)
        assert not request.done(), "no AzureAssignedIdentity yet: NMI must wait, not refuse"
        await env.start_mic()
        reply = await asyncio.wait_for(request, 15)
        assert reply.status == 200, reply.body
        assert reply.json()["client_id"] == CLIENT
        assert uami("web").casefold() in {i.casefold() for i in env.pool_ids()}, POOL
        assert env.status("web-default-web") == "Assigned"
    finally:
        await nmi.stop()
