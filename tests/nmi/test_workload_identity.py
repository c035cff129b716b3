"""Workload identity behind IMDS, end to end over real sockets: NMI watches the API server stand-in
(TLS), asks its TokenRequest API for the pod's service-account token and exchanges it, through
msal, at the Azure AD stand-in (TLS), which checks it against the cluster's issuer keys as Azure AD
does (fetching them over HTTPS)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
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
from standins import apiserver as k8s
from standins.aad import AadStandin
from standins.apiserver import FakeApiServer
from standins.imds import ImdsStandIn
from tests.nmi.conftest import FAST, NODE, Reply, http, token_path

pytestmark = pytest.mark.timeout(60)

TENANT = "7a7a0000-0000-4000-8000-0000000000aa"
APP_CLIENT = "5c5c0000-0000-4000-8000-0000000000c1"
OTHER_CLIENT = "5c5c0000-0000-4000-8000-0000000000c2"
TYPE3_CLIENT = "5c5c0000-0000-4000-8000-0000000000c3"
WEB_IP, OTHER_IP, BOUND_IP = "127.0.0.61", "127.0.0.62", "127.0.0.63"


@dataclass
class Federation:
    api: FakeApiServer
    aad: AadStandin
    app: App

    async def get(self, src: str, **query: str) -> Reply:
        assert self.app.server is not None
        return await http(self.app.server.port, token_path(**query), src=src)


def claims(reply: Reply) -> dict[str, Any]:
    payload = reply.json()["access_token"].split(".")[1]
    result: dict[str, Any] = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return result


WI_LABEL = {"azure.workload.identity/use": "true"}
CLIENT_ANNOTATION = "azure.workload.identity/client-id"


def apps_pod(name: str, ip: str, sa: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return k8s.pod(
        name,
        namespace="apps",
        node=NODE,
        ip=ip,
        labels=WI_LABEL if labels is None else labels,
        service_account=sa,
    )


@pytest.fixture
async def federation(tmp_path: Path) -> AsyncIterator[Federation]:
    async with started(tmp_path) as running:
        yield running


@contextlib.asynccontextmanager
async def started(tmp_path: Path, *, workload_identity: bool = True) -> AsyncIterator[Federation]:
    api = FakeApiServer(tls=True, token="t0ken", bookmark_interval_s=0.1)
    await api.start()
    assert api.ca_pem is not None
    (tmp_path / "cluster-ca.pem").write_bytes(api.ca_pem)
    aad = AadStandin(trust=str(tmp_path / "cluster-ca.pem"))
    await aad.start()
    aad.add_tenant(TENANT)
    for client in (APP_CLIENT, OTHER_CLIENT, TYPE3_CLIENT):
        aad.register_app(TENANT, client)
    aad.add_federated_credential(
        TENANT, APP_CLIENT, issuer=api.issuer, subject="system:serviceaccount:apps:app"
    )
    aad.add_federated_credential(
        TENANT, TYPE3_CLIENT, issuer=api.issuer, subject="system:serviceaccount:apps:bound"
    )
    api.load(
        [
            k8s.service_account(
                "app", namespace="apps", annotations={"azure.workload.identity/client-id": APP_CLIENT}
            ),
            k8s.service_account(
                "other", namespace="apps", annotations={"azure.workload.identity/client-id": OTHER_CLIENT}
            ),
            k8s.service_account("bound", namespace="apps"),
            apps_pod("web", WEB_IP, "app"),
            apps_pod("other", OTHER_IP, "other"),
            apps_pod("bound", BOUND_IP, "bound", {"aadpodidbinding": "orders"}),
            k8s.azure_identity(
                "orders", namespace="apps", client_id=TYPE3_CLIENT, id_type=3, tenant_id=TENANT
            ),
            k8s.binding("orders", "orders", "orders", namespace="apps"),
        ]
    )
    imds = ImdsStandIn()
    await imds.start("127.0.0.1", 0)
    settings = Settings(
        server=ServerSettings(port=0),
        upstream=UpstreamSettings(
            metadata_ip="127.0.0.1",
            metadata_port=imds.port,
            aad_ca_bundle=aad.write_ca_bundle(tmp_path / "aad.pem"),
        ),
        identity=IdentitySettings(
            pod_wait_timeout_s=3.0,
            identity_wait_timeout_s=1.0,
            federation_authority_host=aad.url,
            federation_tenant_id=TENANT,
            workload_identity=workload_identity,
        ),
        observability=ObservabilitySettings(
            prometheus_port=0, probe_port=0, probe_address="127.0.0.1", metrics_address="127.0.0.1"
        ),
        cluster=ClusterSettings(
            node_name=NODE, kubeconfig=str(api.write_kubeconfig(tmp_path / "kubeconfig"))
        ),
        iptables=IptablesSettings(manage=False),
        kube=FAST,
    )
    app = App(settings)
    await app.start()
    try:
        for _ in range(300):
            if app.state.synced:
                break
            await asyncio.sleep(0.01)
        assert app.state.synced
        yield Federation(api, aad, app)
    finally:
        await app.stop()
        await imds.stop()
        await aad.close()
        await api.stop()


async def test_a_workload_identity_pod_gets_its_federated_token_and_then_the_cached_one(
    federation: Federation,
) -> None:
    first = await federation.get(WEB_IP)
    assert first.status == 200, first.body
    token = claims(first)
    assert (
        token["appid"] == APP_CLIENT and token["aud"] == "https://vault.azure.net" and token["tid"] == TENANT
    )
    assert first.json()["client_id"] == APP_CLIENT
    [issued] = federation.api.issued_tokens
    assert (issued.namespace, issued.service_account, issued.pod) == ("apps", "app", "web")
    assert list(issued.audiences) == ["api://AzureADTokenExchange"] and issued.pod_uid
    [call] = federation.aad.calls
    assert call.federated_subject == "system:serviceaccount:apps:app" and call.status == 200
    again = await federation.get(WEB_IP)
    assert again.json()["access_token"] == first.json()["access_token"]
    # Another resource: a new Azure AD exchange, but the same service-account token.
    arm = await federation.get(WEB_IP, resource="https://management.azure.com/")
    assert arm.status == 200 and claims(arm)["aud"].rstrip("/") == "https://management.azure.com"
    assert len(federation.api.issued_tokens) == 1 and len(federation.aad.calls) == 2


async def test_a_pod_never_gets_another_service_accounts_client(federation: Federation) -> None:
    reply = await federation.get(WEB_IP, client_id=OTHER_CLIENT)
    assert reply.status == 400 and reply.json()["error_description"].startswith("Identity not found")
    assert not federation.api.issued_tokens and not federation.aad.calls


async def test_a_type_3_identity_bound_by_a_binding_uses_the_pods_own_service_account(
    federation: Federation,
) -> None:
    reply = await federation.get(BOUND_IP)
    assert reply.status == 200, reply.body
    assert claims(reply)["appid"] == TYPE3_CLIENT
    [issued] = federation.api.issued_tokens
    assert (issued.service_account, issued.pod) == ("bound", "bound")
    assert federation.app.state.count(k8s_aai()) == 0  # no AzureAssignedIdentity needed


async def test_no_federated_credential_is_a_final_error_with_azure_ads_code(federation: Federation) -> None:
    # "other" is annotated, but Azure AD has no federated credential for its subject.
    reply = await federation.get(OTHER_IP)
    assert reply.status == 403, reply.body
    body = reply.json()
    assert "AADSTS7002" in body["error_description"] or "AADSTS70021" in body["error_description"]
    assert federation.api.issued_tokens and "eyJ" not in reply.body.decode()


async def test_a_refused_token_request_is_a_final_error(federation: Federation) -> None:
    federation.api.fail_next(1, 403, verbs=("create",), resources="serviceaccounts/token")
    reply = await federation.get(WEB_IP)
    assert reply.status == 403 and reply.json()["error"] == "service_account_token_refused", reply.body
    assert "403" in reply.json()["error_description"]


def k8s_aai() -> Any:
    from podidentity.model import AzureAssignedIdentity

    return AzureAssignedIdentity


async def test_a_hundred_pods_at_once_cost_one_exchange_per_service_account_and_resource(
    federation: Federation,
) -> None:
    pods = [apps_pod(f"burst-{i}", f"127.0.1.{i + 1}", "app") for i in range(100)]
    federation.api.load(pods)
    for _ in range(300):
        if len(federation.app.state.pods_at("127.0.1.100")) == 1:
            break
        await asyncio.sleep(0.01)
    replies = await asyncio.gather(*(federation.get(f"127.0.1.{i + 1}") for i in range(100)))
    assert all(r.status == 200 for r in replies), [r.body for r in replies if r.status != 200][:3]
    assert len({r.json()["access_token"] for r in replies}) == 1
    # Single flight per (client, service account, resource): one TokenRequest and one Azure AD call.
    assert len(federation.api.issued_tokens) == 1 and len(federation.aad.calls) == 1


async def test_with_workload_identity_off_no_account_is_watched_or_asked_for_and_type_3_is_final(
    tmp_path: Path,
) -> None:
    async with started(tmp_path, workload_identity=False) as off:
        bound = await off.get(BOUND_IP)
        assert bound.status == 400, bound.body
        assert "--enable-workload-identity=false" in bound.json()["error_description"]
        # A pod following workload identity's conventions is just a pod without a binding.
        labelled = await off.get(WEB_IP)
        assert labelled.status == 400 and labelled.json()["error_description"].startswith(
            "Identity not found"
        )
        assert not off.api.issued_tokens and not off.aad.calls
        resources = {r.resource for r in off.api.requests}
        assert "pods" in resources and not {"serviceaccounts", "serviceaccounts/token"} & resources
