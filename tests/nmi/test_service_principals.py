"""Service-principal identities (types 1 and 2) through NMI: MSAL against the Azure AD stand-in over TLS."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path
from typing import Any

import pytest

from standins.aad import AadStandin, issue_client_certificate
from tests.nmi.conftest import base_docs, token_path

pytestmark = pytest.mark.timeout(90)

TENANT = "11111111-2222-3333-4444-555555555555"
AUX_TENANT = "99999999-2222-3333-4444-555555555555"
SP_SECRET_ID = "5ec12e70-0000-4000-8000-000000000001"
SP_CERT_ID = "5ec12e70-0000-4000-8000-000000000002"
SECRET_VALUE = "Sup3r-S3cret-Value~"
WEB = "127.0.0.10"


@pytest.fixture
async def aad(tmp_path: Path):
    server = AadStandin()
    await server.start()
    server.write_ca_bundle(tmp_path / "aad-ca.pem")
    yield server
    await server.close()


def b64(raw: bytes | str) -> str:
    return base64.b64encode(raw.encode() if isinstance(raw, str) else raw).decode()


def sp_docs(
    aad: AadStandin,
    *,
    secret: str = SECRET_VALUE,
    pfx: bytes = b"",
    password: bytes = b"",
    managed: bool = False,
) -> list[dict[str, Any]]:
    """The example node, with pod web bound to a type-1 and pod batch to a type-2 service principal."""
    docs = [
        d
        for d in base_docs()
        if d["kind"] not in ("AzureIdentity", "AzureIdentityBinding", "AzureAssignedIdentity")
    ]
    identities = [
        ("sp-secret", 1, SP_SECRET_ID, "sp-secret-creds", {"clientSecret": b64(secret)}),
        ("sp-cert", 2, SP_CERT_ID, "sp-cert-creds", {"certificate": b64(pfx), "password": b64(password)}),
    ]
    for (name, type_, client_id, secret_name, data), pod in zip(identities, ("web", "batch"), strict=True):
        ident = {
            "apiVersion": "aadpodidentity.k8s.io/v1",
            "kind": "AzureIdentity",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {
                "type": type_,
                "clientID": client_id,
                "tenantID": TENANT,
                "adEndpoint": aad.url,
                "auxiliaryTenantIDs": [AUX_TENANT],
                "clientPassword": {"name": secret_name, "namespace": "default"},
            },
        }
        docs.append(ident)
        docs.append(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": secret_name, "namespace": "default"},
                "data": data,
            }
        )
        if managed:
            docs.append(
                {
                    "apiVersion": "aadpodidentity.k8s.io/v1",
                    "kind": "AzureIdentityBinding",
                    "metadata": {"name": f"{name}-binding", "namespace": "default"},
                    "spec": {"azureIdentity": name, "selector": pod},
                }
            )
        else:
            docs.append(
                {
                    "apiVersion": "aadpodidentity.k8s.io/v1",
                    "kind": "AzureAssignedIdentity",
                    "metadata": {"name": f"{pod}-default-{name}", "namespace": "default"},
                    "spec": {
                        "pod": pod,
                        "podNamespace": "default",
                        "azureIdentityRef": {k: v for k, v in ident.items() if k != "kind"},
                    },
                    "status": {"status": "Assigned"},
                }
            )
    for d in docs:
        if d["kind"] == "Pod" and d["metadata"]["name"] == "batch":
            d["metadata"]["labels"] = {"aadpodidbinding": "batch"}
    return docs


async def sp_node(make_node, aad: AadStandin, tmp_path: Path, *, managed: bool = False, **kw: Any):
    cert = issue_client_certificate(key_type="RSA", password=b"pfx-pass", with_chain=True)
    aad.register_app(TENANT, SP_SECRET_ID, secret=SECRET_VALUE)
    aad.register_app(AUX_TENANT, SP_SECRET_ID, secret=SECRET_VALUE)
    aad.register_app(TENANT, SP_CERT_ID, certificate_pem=cert.leaf_pem)
    identity = {"operation_mode": "managed", "force_namespaced": True} if managed else {}
    node = await make_node(
        sp_docs(aad, pfx=cert.pfx, password=b"pfx-pass", managed=managed),
        identity=identity,
        upstream={"aad_ca_bundle": str(tmp_path / "aad-ca.pem")},
        **kw,
    )
    return node, cert


@pytest.mark.parametrize("managed", [False, True])
async def test_secret_and_certificate_principals_get_imds_shaped_tokens(
    make_node, aad, tmp_path, managed
) -> None:
    node, _ = await sp_node(make_node, aad, tmp_path, managed=managed)
    for src, client_id in ((WEB, SP_SECRET_ID), ("127.0.0.11", SP_CERT_ID)):
        reply = await node.get(token_path(resource="https://vault.azure.net"), src=src)
        assert reply.status == 200, reply.body
        body = reply.json()
        assert body["client_id"] == client_id and body["token_type"] == "Bearer"
        assert all(isinstance(v, str) for v in body.values())
        claims = aad.verify_access_token(body["access_token"])
        assert claims["appid"].lower() == client_id and claims["aud"].rstrip("/") == "https://vault.azure.net"
    assert aad.token_call_count(SP_SECRET_ID) == 1 and aad.token_call_count(SP_CERT_ID) == 1


async def test_200_concurrent_cold_requests_make_one_token_call(make_node, aad, tmp_path) -> None:
    node, _ = await sp_node(make_node, aad, tmp_path)
    aad.delay_s = 0.3
    replies = await asyncio.gather(
        *(node.get(token_path(resource="https://storage.azure.com/"), src=WEB) for _ in range(200))
    )
    assert {r.status for r in replies} == {200}
    assert aad.token_call_count(SP_SECRET_ID) == 1


async def test_wrong_secret_is_403_with_aad_code_and_no_secret(make_node, aad, tmp_path) -> None:
    node, _ = await sp_node(make_node, aad, tmp_path)
    aad.rotate_secret(TENANT, SP_SECRET_ID, "something-else")
    reply = await node.get(token_path(), src=WEB)
    assert reply.status == 403
    body = reply.json()
    assert body["error"] == "invalid_client" and "AADSTS7000215" in body["error_description"]
    assert SECRET_VALUE not in reply.body.decode() and "client_assertion" not in reply.body.decode()


async def test_rotation_switches_credentials_without_restart(make_node, aad, tmp_path) -> None:
    node, cert = await sp_node(make_node, aad, tmp_path)
    assert (await node.get(token_path(), src=WEB)).status == 200
    aad.rotate_secret(TENANT, SP_SECRET_ID, "rotated-secret")
    node.write_state(sp_docs(aad, secret="rotated-secret", pfx=cert.pfx, password=b"pfx-pass"))
    # A new resource forces a fetch; it must use the new secret (the old one is refused now).
    for _ in range(100):
        reply = await node.get(token_path(resource="https://management.azure.com/"), src=WEB)
        if reply.status == 200:
            break
        await asyncio.sleep(0.05)
    assert reply.status == 200


async def test_aad_down_serves_cached_tokens_and_503_for_new_ones(make_node, aad, tmp_path) -> None:
    node, _ = await sp_node(make_node, aad, tmp_path)
    cached = await node.get(token_path(), src=WEB)
    assert cached.status == 200
    await aad.go_down()
    again = await node.get(token_path(), src=WEB)
    assert again.status == 200 and again.json()["access_token"] == cached.json()["access_token"]
    fresh = await node.get(token_path(resource="https://graph.microsoft.com/"), src=WEB)
    assert fresh.status == 503
    await aad.come_up()


async def test_auxiliary_tenant_opt_in(make_node, aad, tmp_path) -> None:
    node, _ = await sp_node(make_node, aad, tmp_path)
    primary = await node.get(token_path(), src=WEB)
    aux = await node.get(token_path(tenant_id=AUX_TENANT), src=WEB)
    assert primary.status == 200 and aux.status == 200
    assert aux.json()["access_token"] != primary.json()["access_token"]
    assert aad.verify_access_token(aux.json()["access_token"])["tid"] == AUX_TENANT
    assert (await node.get(token_path(tenant_id="not-listed"), src=WEB)).status == 400
