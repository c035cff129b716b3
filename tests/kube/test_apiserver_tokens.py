"""The API server stand-in's ServiceAccounts, TokenRequest and issuer discovery, on the wire.

Checked with plain aiohttp and with kubernetes_asyncio (a real client), never through stand-in internals;
tokens are verified here with ``cryptography`` against the JWKS the server publishes.
"""

from __future__ import annotations

import base64
import json
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from standins.apiserver import FakeApiServer, node, pod, secret, service_account

TOKEN = "admin-token"
WI = {"azure.workload.identity/client-id": "11111111-2222-3333-4444-555555555555"}


@pytest.fixture
async def server() -> AsyncIterator[FakeApiServer]:
    async with FakeApiServer(tls=True, token=TOKEN) as s:
        yield s


@pytest.fixture
async def http(server: FakeApiServer) -> AsyncIterator[aiohttp.ClientSession]:
    ctx = ssl.create_default_context(cadata=(server.ca_pem or b"").decode())
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as session:
        yield session


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _decode(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    header, payload, _ = token.split(".")
    return json.loads(_unb64(header)), json.loads(_unb64(payload))


async def _call(
    http: aiohttp.ClientSession,
    server: FakeApiServer,
    method: str,
    path: str,
    body: Any = None,
    *,
    auth: bool = True,
    content_type: str = "application/json",
) -> tuple[int, Any, dict[str, str]]:
    headers = {"Authorization": f"Bearer {TOKEN}"} if auth else {}
    data = None if body is None else json.dumps(body)
    if data is not None:
        headers["content-type"] = content_type
    async with http.request(method, server.url + path, data=data, headers=headers) as resp:
        return (
            resp.status,
            await resp.json(content_type=None),
            {k.lower(): v for k, v in resp.headers.items()},
        )


def _request(
    pod_name: str | None = "web", uid: str | None = None, *, expiration: int | None = 3600, **spec: Any
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "spec": {"audiences": ["api://AzureADTokenExchange"], **spec},
    }
    if expiration is not None:
        body["spec"]["expirationSeconds"] = expiration
    if pod_name is not None:
        ref = {"kind": "Pod", "apiVersion": "v1", "name": pod_name}
        if uid is not None:
            ref["uid"] = uid
        body["spec"]["boundObjectRef"] = ref
    return body


TOKEN_PATH = "/api/v1/namespaces/apps/serviceaccounts/workload/token"


def _setup(server: FakeApiServer) -> tuple[dict[str, Any], dict[str, Any]]:
    server.create(node("node-a"))
    sa = server.create(service_account("workload", namespace="apps", annotations=WI))
    p = server.create(pod("web", namespace="apps", service_account="workload"))
    return sa, p


async def test_token_request_issues_a_bound_token_verifiable_with_the_published_keys(
    server: FakeApiServer, http: aiohttp.ClientSession
) -> None:
    sa, p = _setup(server)
    before = int(time.time())
    status, body, _ = await _call(http, server, "POST", TOKEN_PATH, _request(uid=p["metadata"]["uid"]))
    assert status == 201, body
    assert body["kind"] == "TokenRequest" and body["apiVersion"] == "authentication.k8s.io/v1"
    assert body["metadata"]["name"] == "workload" and body["metadata"]["namespace"] == "apps"
    assert body["spec"]["audiences"] == ["api://AzureADTokenExchange"]
    assert body["spec"]["expirationSeconds"] == 3600
    header, claims = _decode(body["status"]["token"])
    assert header == {"alg": "RS256", "kid": server.signing_key_id}
    assert claims["iss"] == server.issuer == server.url
    assert claims["sub"] == "system:serviceaccount:apps:workload"
    assert claims["aud"] == ["api://AzureADTokenExchange"]
    assert before <= claims["iat"] == claims["nbf"] and claims["exp"] == claims["iat"] + 3600
    assert claims["jti"]
    assert claims["kubernetes.io"] == {
        "namespace": "apps",
        "serviceaccount": {"name": "workload", "uid": sa["metadata"]["uid"]},
        "pod": {"name": "web", "uid": p["metadata"]["uid"]},
        "node": {"name": "node-a", "uid": server.get("Node", "", "node-a")["metadata"]["uid"]},  # type: ignore[index]
    }
    expires = body["status"]["expirationTimestamp"]
    assert expires == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(claims["exp"]))

    # The signature verifies with the key the (anonymous) JWKS endpoint publishes under that kid.
    status, jwks, headers = await _call(http, server, "GET", "/openid/v1/jwks", auth=False)
    assert status == 200 and headers["content-type"].startswith("application/jwk-set+json")
    (key,) = jwks["keys"]
    assert {k: key[k] for k in ("kty", "alg", "use", "kid")} == {
        "kty": "RSA",
        "alg": "RS256",
        "use": "sig",
        "kid": server.signing_key_id,
    }
    public = rsa.RSAPublicNumbers(
        int.from_bytes(_unb64(key["e"]), "big"), int.from_bytes(_unb64(key["n"]), "big")
    ).public_key()
    signing_input, _, signature = body["status"]["token"].rpartition(".")
    public.verify(_unb64(signature), signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())

    (issued,) = server.issued_tokens
    assert (issued.namespace, issued.service_account, issued.pod, issued.pod_uid) == (
        "apps",
        "workload",
        "web",
        p["metadata"]["uid"],
    )
    assert issued.audiences == ("api://AzureADTokenExchange",) and issued.expiration_seconds == 3600
    assert issued.bound_kind == "Pod" and issued.token == body["status"]["token"]
    assert [r.resource for r in server.requests if r.action == "create"] == ["serviceaccounts/token"]


async def test_discovery_document(server: FakeApiServer, http: aiohttp.ClientSession) -> None:
    status, doc, headers = await _call(http, server, "GET", "/.well-known/openid-configuration", auth=False)
    assert status == 200 and headers["content-type"].startswith("application/json")
    assert doc == {
        "issuer": server.url,
        "jwks_uri": f"{server.url}/openid/v1/jwks",
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["RS256"],
    }
    server.anonymous_discovery = False
    status, _, _ = await _call(http, server, "GET", "/.well-known/openid-configuration", auth=False)
    assert status == 401
    # Everything else still needs the token.
    assert (await _call(http, server, "GET", "/api/v1/serviceaccounts", auth=False))[0] == 401


async def test_configured_issuer_and_audiences() -> None:
    async with FakeApiServer(
        tls=True,
        issuer="https://oidc.example/tenant/cluster/",
        api_audiences=["https://kubernetes.default.svc"],
    ) as server:
        server.create(service_account("default"))
        answer, _ = server.create_token("default", "default", {"spec": {}})
        _, claims = _decode(answer["status"]["token"])
        assert claims["iss"] == "https://oidc.example/tenant/cluster/"
        assert claims["aud"] == ["https://kubernetes.default.svc"]
        assert answer["spec"]["expirationSeconds"] == 3600 and "pod" not in claims["kubernetes.io"]
        assert server.openid_configuration()["jwks_uri"] == f"{server.url}/openid/v1/jwks"


@pytest.mark.parametrize(
    ("case", "status", "reason", "message"),
    [
        ("no-sa", 404, "NotFound", 'serviceaccounts "workload" not found'),
        ("no-pod", 404, "NotFound", 'pods "web" not found'),
        (
            "uid",
            409,
            "Conflict",
            'Operation cannot be fulfilled on Pod "web": the UID in the bound object reference (stale-uid) '
            "does not match the UID in record. The object might have been deleted and then recreated",
        ),
        (
            "other-sa",
            400,
            "BadRequest",
            'cannot bind token for serviceaccount "workload" to pod running with different '
            "serviceaccount name.",
        ),
        (
            "short",
            422,
            "Invalid",
            'TokenRequest.authentication.k8s.io "" is invalid: spec.expirationSeconds: Invalid value: 599: '
            "may not specify a duration less than 10 minutes",
        ),
        ("kind", 400, "BadRequest", "cannot bind token to object of type apps/v1, Kind=Deployment"),
        (
            "name",
            422,
            "Invalid",
            'TokenRequest.authentication.k8s.io "workload" is invalid: metadata.name: Invalid value: '
            '"other": must match the service account name if specified',
        ),
    ],
)
async def test_token_request_refusals(
    server: FakeApiServer, http: aiohttp.ClientSession, case: str, status: int, reason: str, message: str
) -> None:
    if case != "no-sa":
        server.create(service_account("workload", namespace="apps"))
    if case not in ("no-sa", "no-pod"):
        server.create(
            pod("web", namespace="apps", service_account="other" if case == "other-sa" else "workload")
        )
    body = _request(uid="stale-uid" if case == "uid" else None, expiration=599 if case == "short" else 3600)
    if case == "kind":
        body["spec"]["boundObjectRef"] = {"kind": "Deployment", "apiVersion": "apps/v1", "name": "web"}
    if case == "name":
        body["metadata"] = {"name": "other"}
    got, answer, _ = await _call(http, server, "POST", TOKEN_PATH, body)
    assert (got, answer["kind"], answer["reason"], answer["code"]) == (status, "Status", reason, status)
    assert answer["message"] == message
    assert server.issued_tokens == []


async def test_pod_without_service_account_name_runs_as_default(
    server: FakeApiServer, http: aiohttp.ClientSession
) -> None:
    server.create(service_account("default", namespace="apps"))
    server.create(pod("plain", namespace="apps"))
    path = "/api/v1/namespaces/apps/serviceaccounts/default/token"
    status, _, _ = await _call(http, server, "POST", path, _request("plain"))
    assert status == 201


async def test_expiration_is_capped_with_a_warning(
    server: FakeApiServer, http: aiohttp.ClientSession
) -> None:
    _setup(server)
    status, body, headers = await _call(http, server, "POST", TOKEN_PATH, _request(expiration=200_000))
    assert status == 201 and body["spec"]["expirationSeconds"] == 172_800
    assert headers["warning"] == '299 - "requested expiration of 200000 seconds shortened to 172800 seconds"'
    _, claims = _decode(body["status"]["token"])
    assert claims["exp"] - claims["iat"] == 172_800


async def test_secret_bound_and_unbound_tokens(server: FakeApiServer, http: aiohttp.ClientSession) -> None:
    _setup(server)
    s = server.create(secret("bound", {"k": "v"}, namespace="apps"))
    body = _request(None)
    body["spec"]["boundObjectRef"] = {"kind": "Secret", "apiVersion": "v1", "name": "bound"}
    status, answer, _ = await _call(http, server, "POST", TOKEN_PATH, body)
    assert status == 201
    assert _decode(answer["status"]["token"])[1]["kubernetes.io"]["secret"] == {
        "name": "bound",
        "uid": s["metadata"]["uid"],
    }
    status, answer, _ = await _call(http, server, "POST", TOKEN_PATH, _request(None, expiration=None))
    assert status == 201 and answer["spec"]["expirationSeconds"] == 3600
    assert set(_decode(answer["status"]["token"])[1]["kubernetes.io"]) == {"namespace", "serviceaccount"}


async def test_rbac_refusal_can_be_injected(server: FakeApiServer, http: aiohttp.ClientSession) -> None:
    _setup(server)
    server.fail_next(1, 403, verbs=("create",), resources="serviceaccounts/token")
    # A bare plural does not cover the subresource, and reads are unaffected.
    assert (await _call(http, server, "GET", "/api/v1/namespaces/apps/serviceaccounts/workload"))[0] == 200
    status, body, _ = await _call(http, server, "POST", TOKEN_PATH, _request())
    assert status == 403 and body["reason"] == "Forbidden"
    assert body["message"] == (
        'serviceaccounts "workload" is forbidden: User "system:serviceaccount:default:standin" cannot create '
        'resource "serviceaccounts/token" in API group "" in the namespace "apps"'
    )
    assert (await _call(http, server, "POST", TOKEN_PATH, _request()))[0] == 201
    server.fail_next(1, 403, verbs=("create",), resources="ServiceAccount/token")
    assert (await _call(http, server, "POST", TOKEN_PATH, _request()))[0] == 403


async def test_signing_key_rotation(server: FakeApiServer, http: aiohttp.ClientSession) -> None:
    first = server.signing_key_id
    second = server.rotate_signing_key(keep_old=True)
    assert second != first and server.signing_key_id == second
    _, jwks, _ = await _call(http, server, "GET", "/openid/v1/jwks", auth=False)
    assert [k["kid"] for k in jwks["keys"]] == [second, first]
    third = server.rotate_signing_key()
    _, jwks, _ = await _call(http, server, "GET", "/openid/v1/jwks", auth=False)
    assert [k["kid"] for k in jwks["keys"]] == [third]


async def test_service_accounts_are_served_like_other_objects(
    server: FakeApiServer, http: aiohttp.ClientSession
) -> None:
    status, created, _ = await _call(
        http, server, "POST", "/api/v1/namespaces/apps/serviceaccounts", service_account("a", annotations=WI)
    )
    assert status == 400  # the body names namespace "default", the URL "apps"
    status, created, _ = await _call(
        http,
        server,
        "POST",
        "/api/v1/namespaces/apps/serviceaccounts",
        service_account("a", namespace="apps", annotations=WI),
    )
    assert status == 201 and created["metadata"]["annotations"] == WI and created["metadata"]["uid"]
    status, patched, _ = await _call(
        http,
        server,
        "PATCH",
        "/api/v1/namespaces/apps/serviceaccounts/a",
        {"metadata": {"annotations": {"azure.workload.identity/tenant-id": "t-1"}}},
        content_type="application/merge-patch+json",
    )
    assert status == 200 and patched["metadata"]["annotations"] == {
        **WI,
        "azure.workload.identity/tenant-id": "t-1",
    }
    server.create(service_account("b", namespace="other"))
    status, listed, _ = await _call(http, server, "GET", "/api/v1/serviceaccounts")
    assert status == 200 and listed["kind"] == "ServiceAccountList"
    assert [(i["metadata"]["namespace"], i["metadata"]["name"]) for i in listed["items"]] == [
        ("apps", "a"),
        ("other", "b"),
    ]
    status, one, _ = await _call(http, server, "GET", "/api/v1/namespaces/other/serviceaccounts/b")
    assert status == 200 and one["kind"] == "ServiceAccount"
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with http.get(
        server.url + "/api/v1/namespaces/apps/serviceaccounts", params={"watch": "true"}, headers=headers
    ) as resp:
        event = json.loads(await resp.content.readline())
    assert (
        event["type"] == "ADDED"
        and event["object"]["metadata"]["annotations"]["azure.workload.identity/tenant-id"]
    )


async def test_kubernetes_asyncio_client(server: FakeApiServer, tmp_path: Path) -> None:
    from kubernetes_asyncio import client, config

    _, p = _setup(server)
    kubeconfig = server.write_kubeconfig(tmp_path / "kubeconfig")
    api_client = await config.new_client_from_config(config_file=str(kubeconfig))
    async with api_client:
        core = client.CoreV1Api(api_client)
        sa = await core.read_namespaced_service_account("workload", "apps")
        assert sa.metadata.annotations == WI
        request = client.AuthenticationV1TokenRequest(
            spec=client.V1TokenRequestSpec(
                audiences=["api://AzureADTokenExchange"],
                expiration_seconds=3600,
                bound_object_ref=client.V1BoundObjectReference(
                    kind="Pod", api_version="v1", name="web", uid=p["metadata"]["uid"]
                ),
            )
        )
        answer = await core.create_namespaced_service_account_token("workload", "apps", request)
        assert answer.status.token == server.issued_tokens[-1].token
        assert answer.status.expiration_timestamp == server.issued_tokens[-1].expires_at
