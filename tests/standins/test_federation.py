"""Azure AD federated identity credentials against the API server stand-in's service-account tokens.

A real msal ConfidentialClientApplication presents a TokenRequest token as its client assertion; the
Azure AD stand-in fetches the API server's discovery document and JWKS over HTTPS, as Azure AD does.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import msal
import pytest
import requests

from standins.aad import JWT_BEARER, AadStandin
from standins.apiserver import FakeApiServer, pod, service_account

TENANT = "contoso-tenant"
CLIENT = "0f0e0d0c-0000-4000-8000-0000000000fe"
SCOPE = "https://vault.azure.net/.default"
SUBJECT = "system:serviceaccount:apps:workload"
NO_MATCH = "No matching federated identity record found for presented "
BAD_SIGNATURE = "Client assertion failed signature validation. [Reason - "


@pytest.fixture
async def apiserver() -> AsyncIterator[FakeApiServer]:
    async with FakeApiServer(tls=True) as server:
        server.create(service_account("workload", namespace="apps"))
        server.create(pod("web", namespace="apps", service_account="workload"))
        yield server


@pytest.fixture
async def aad(apiserver: FakeApiServer) -> AsyncIterator[AadStandin]:
    trust = ssl.create_default_context(cadata=(apiserver.ca_pem or b"").decode())
    async with AadStandin(trust=trust) as standin:
        standin.register_app(TENANT, CLIENT)
        standin.add_federated_credential(TENANT, CLIENT, issuer=apiserver.issuer, subject=SUBJECT)
        yield standin


@pytest.fixture
async def http(aad: AadStandin) -> AsyncIterator[aiohttp.ClientSession]:
    ctx = ssl.create_default_context(cadata=aad.ca_pem.decode())
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as session:
        yield session


def sa_token(apiserver: FakeApiServer, audience: str = "api://AzureADTokenExchange") -> str:
    body = {
        "spec": {
            "audiences": [audience],
            "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": "web"},
        }
    }
    answer, _ = apiserver.create_token("apps", "workload", body)
    token: str = answer["status"]["token"]
    return token


async def exchange(
    http: aiohttp.ClientSession, aad: AadStandin, assertion: str
) -> tuple[int, dict[str, Any]]:
    form = {
        "grant_type": "client_credentials",
        "client_id": CLIENT,
        "scope": SCOPE,
        "client_assertion_type": JWT_BEARER,
        "client_assertion": assertion,
    }
    async with http.post(f"{aad.url}{TENANT}/oauth2/v2.0/token", data=form) as resp:
        return resp.status, await resp.json()


def assert_error(status: int, body: dict[str, Any], want_status: int, error: str, code: int) -> None:
    assert (status, body["error"], body["error_codes"]) == (want_status, error, [code]), body
    assert body["error_description"].startswith(f"AADSTS{code}: ")


async def test_msal_exchanges_a_token_request_token(
    apiserver: FakeApiServer, aad: AadStandin, tmp_path: Path
) -> None:
    ca_bundle = aad.write_ca_bundle(tmp_path / "aad-ca.pem")
    # As NMI will: the pod's token through the TokenRequest API (here over HTTPS), then msal.
    ctx = ssl.create_default_context(cadata=(apiserver.ca_pem or b"").decode())
    body = {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "spec": {
            "audiences": ["api://AzureADTokenExchange"],
            "expirationSeconds": 3600,
            "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": "web"},
        },
    }
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as kube,
        kube.post(
            f"{apiserver.url}/api/v1/namespaces/apps/serviceaccounts/workload/token", json=body
        ) as resp,
    ):
        assert resp.status == 201
        token = (await resp.json())["status"]["token"]

    def acquire(assertion: str) -> dict[str, Any]:
        session = requests.Session()
        session.trust_env = False  # else REQUESTS_CA_BUNDLE would override verify
        session.verify = ca_bundle
        app = msal.ConfidentialClientApplication(
            CLIENT,
            client_credential={"client_assertion": lambda: assertion},
            authority=f"{aad.url}{TENANT}",
            validate_authority=False,
            instance_discovery=False,
            http_client=session,
            token_cache=msal.TokenCache(),
        )
        result: dict[str, Any] = app.acquire_token_for_client(scopes=[SCOPE])
        return result

    result = await asyncio.to_thread(acquire, token)
    assert "access_token" in result, result
    claims = aad.verify_access_token(result["access_token"])
    assert (
        claims["aud"] == "https://vault.azure.net" and claims["appid"] == CLIENT and claims["tid"] == TENANT
    )
    assert claims["oid"] and claims["appidacr"] == "2"
    assert aad.issuer_fetches == 1
    assert aad.calls[-1].federated_subject == SUBJECT and aad.calls[-1].status == 200

    # A second pod token: the issuer's keys come from the cache.
    again = await asyncio.to_thread(acquire, sa_token(apiserver))
    assert "access_token" in again and aad.issuer_fetches == 1


@pytest.mark.parametrize(
    ("case", "status", "error", "code", "text"),
    [
        ("issuer", 401, "invalid_client", 700211, NO_MATCH + "assertion issuer 'https://elsewhere.example/'"),
        ("subject", 401, "invalid_client", 700213, NO_MATCH + f"assertion subject '{SUBJECT}'"),
        ("audience", 401, "invalid_client", 700212, NO_MATCH + "assertion audience 'api://other'"),
        ("legacy", 401, "invalid_client", 70021, NO_MATCH + "assertion. Assertion Issuer: '<issuer>'. "
         f"Assertion Subject: '{SUBJECT}'. Assertion Audience: 'api://AzureADTokenExchange'."),
        ("expired", 401, "invalid_client", 700024, "Client assertion is not within its valid time range. "),
        ("signature", 401, "invalid_client", 700027, BAD_SIGNATURE + "The provided signature value did not"),
        ("rotated", 401, "invalid_client", 700027, BAD_SIGNATURE + "The key was not found.]"),
        ("unreachable", 400, "invalid_request", 50166, "Request to External OIDC endpoint failed."),
        ("untrusted", 400, "invalid_request", 50166, "Request to External OIDC endpoint failed."),
        ("malformed", 401, "invalid_client", 50027, "JWT token is invalid or malformed."),
    ],
)  # fmt: skip
async def test_refusals(
    apiserver: FakeApiServer,
    aad: AadStandin,
    http: aiohttp.ClientSession,
    case: str,
    status: int,
    error: str,
    code: int,
    text: str,
) -> None:
    token = sa_token(apiserver, "api://other" if case == "audience" else "api://AzureADTokenExchange")
    app = aad.app(TENANT, CLIENT)
    if case == "issuer":
        app.federated_credentials.clear()
        aad.add_federated_credential(TENANT, CLIENT, issuer="https://elsewhere.example/", subject=SUBJECT)
        text = text.replace("https://elsewhere.example/", apiserver.issuer)
    elif case == "subject":
        app.federated_credentials.clear()
        aad.add_federated_credential(
            TENANT, CLIENT, issuer=apiserver.issuer, subject="system:serviceaccount:x:y"
        )
    elif case == "legacy":
        aad.legacy_federation_errors = True
        app.federated_credentials.clear()
        aad.add_federated_credential(
            TENANT, CLIENT, issuer=apiserver.issuer, subject="system:serviceaccount:x:y"
        )
        text = text.replace("<issuer>", apiserver.issuer)
    elif case == "expired":
        aad.clock = lambda: time.time() + 3600 + 301
    elif case == "signature":
        head, payload, sig = token.split(".")
        token = f"{head}.{payload}.{sig[:-4]}AAAA"
    elif case == "rotated":
        assert (await exchange(http, aad, token))[0] == 200  # keys cached
        apiserver.rotate_signing_key()
        token_after = sa_token(apiserver)
        assert (await exchange(http, aad, token_after))[0] == 200  # unknown kid: fetched again
        assert aad.issuer_fetches == 2
    elif case == "unreachable":
        await apiserver.stop_listening()
    elif case == "untrusted":
        # Trusting only the system store, which does not know the API server's CA.
        async with AadStandin(ca=aad.ca) as plain:
            plain.register_app(TENANT, CLIENT)
            plain.add_federated_credential(TENANT, CLIENT, issuer=apiserver.issuer, subject=SUBJECT)
            got, body = await exchange(http, plain, token)
        assert_error(got, body, status, error, code)
        return
    elif case == "malformed":
        token = "not-a.jwt"
    got, body = await exchange(http, aad, token)
    assert_error(got, body, status, error, code)
    assert text in body["error_description"], body["error_description"]


async def test_federated_credential_rules(apiserver: FakeApiServer, aad: AadStandin) -> None:
    with pytest.raises(ValueError, match="https"):
        aad.add_federated_credential(TENANT, CLIENT, issuer="http://plain.example", subject=SUBJECT)
    for n in range(19):
        aad.add_federated_credential(TENANT, CLIENT, issuer=apiserver.issuer, subject=f"s{n}")
    with pytest.raises(ValueError, match="20"):
        aad.add_federated_credential(TENANT, CLIENT, issuer=apiserver.issuer, subject="one-too-many")
    aad.remove_federated_credential(TENANT, CLIENT, "fic-1")
    assert SUBJECT not in [c.subject for c in aad.app(TENANT, CLIENT).federated_credentials]


async def test_the_standins_jwks_is_the_one_fetched(apiserver: FakeApiServer, aad: AadStandin) -> None:
    """Discovery is anonymous even on a server that wants a bearer token for everything else."""
    apiserver.token = "required"
    ctx = ssl.create_default_context(cadata=aad.ca_pem.decode())
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as http:
        got, body = await exchange(http, aad, sa_token(apiserver))
    assert got == 200, json.dumps(body)
