"""The Azure AD stand-in on the wire: TLS, discovery, secrets, verified client assertions, errors and faults.

Assertions are built here with ``cryptography`` directly, independently of the NMI code that signs them.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import ssl
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from standins.aad import JWT_BEARER, AadStandin, ClientCertificate, issue_client_certificate

TENANT = "contoso-tenant"
CLIENT = "0f0e0d0c-0000-4000-8000-0000000000aa"
SECRET = "standin-secret-1"
SCOPE = "https://vault.azure.net/.default"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def rsa_cert() -> ClientCertificate:
    return issue_client_certificate(key_type="RSA", with_chain=False)


@pytest.fixture(scope="module")
def ec_cert() -> ClientCertificate:
    return issue_client_certificate(key_type="EC", with_chain=False)


@pytest.fixture
async def aad() -> AsyncIterator[AadStandin]:
    async with AadStandin() as standin:
        standin.register_app(TENANT, CLIENT, secret=SECRET)
        yield standin


@pytest.fixture
async def http(aad: AadStandin) -> AsyncIterator[aiohttp.ClientSession]:
    ctx = ssl.create_default_context(cadata=aad.ca_pem.decode())
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=ctx), timeout=aiohttp.ClientTimeout(total=5)
    ) as session:
        yield session


def token_url(aad: AadStandin, tenant: str = TENANT) -> str:
    return f"{aad.url}{tenant}/oauth2/v2.0/token"


async def post_token(http: aiohttp.ClientSession, aad: AadStandin, **form: str) -> tuple[int, dict[str, Any]]:
    data = {"grant_type": "client_credentials", "client_id": CLIENT, "scope": SCOPE, **form}
    tenant = data.pop("tenant", TENANT)
    async with http.post(token_url(aad, tenant), data=data) as resp:
        return resp.status, await resp.json()


def b64u(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def assertion(
    cert: ClientCertificate,
    audience: str,
    *,
    alg: str | None = None,
    key_pem: str | None = None,
    claims: dict[str, Any] | None = None,
    header: dict[str, Any] | None = None,
) -> str:
    key = serialization.load_pem_private_key((key_pem or cert.key_pem).encode(), None)
    leaf = x509.load_pem_x509_certificate(cert.leaf_pem.encode())
    alg = alg or ("ES256" if isinstance(key, ec.EllipticCurvePrivateKey) else "RS256")
    now = int(time.time())
    head = {"alg": alg, "typ": "JWT", "x5t": b64u(leaf.fingerprint(hashes.SHA1())), **(header or {})}
    head = {k: v for k, v in head.items() if v is not None}  # None in ``header`` removes a field.
    body = {"aud": audience, "iss": CLIENT, "sub": CLIENT, "jti": "j", "nbf": now, "exp": now + 600}
    body.update(claims or {})
    signing_input = f"{b64u(json.dumps(head).encode())}.{b64u(json.dumps(body).encode())}".encode()
    if alg == "RS256":
        assert isinstance(key, rsa.RSAPrivateKey)
        sig = key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
    elif alg == "PS256":
        assert isinstance(key, rsa.RSAPrivateKey)
        sig = key.sign(signing_input, padding.PSS(padding.MGF1(hashes.SHA256()), 32), hashes.SHA256())
    elif alg == "ES256":
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        r, s = decode_dss_signature(key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
        sig = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    else:
        sig = b"not-a-signature"
    return f"{signing_input.decode()}.{b64u(sig)}"


def assert_aad_error(status: int, body: dict[str, Any], want_status: int, error: str, code: int) -> None:
    assert status == want_status, body
    assert body["error"] == error
    assert body["error_codes"] == [code]
    first, *rest = body["error_description"].split("\r\n")
    assert first.startswith(f"AADSTS{code}: ")
    assert [line.split(":")[0] for line in rest] == ["Trace ID", "Correlation ID", "Timestamp"]
    assert {"timestamp", "trace_id", "correlation_id", "error_uri"} <= body.keys()


# ---------------------------------------------------------------- discovery


async def test_openid_configuration_points_at_the_standin(
    aad: AadStandin, http: aiohttp.ClientSession
) -> None:
    async with http.get(f"{aad.url}{TENANT}/v2.0/.well-known/openid-configuration") as resp:
        assert resp.status == 200
        doc = await resp.json()
    assert doc["token_endpoint"] == token_url(aad)
    assert doc["authorization_endpoint"] == f"{aad.url}{TENANT}/oauth2/v2.0/authorize"
    assert doc["issuer"] == f"{aad.url}{TENANT}/v2.0"
    assert aad.discovery_calls == 1


async def test_unknown_tenant_discovery_is_aadsts90002(aad: AadStandin, http: aiohttp.ClientSession) -> None:
    url = f"{aad.url}nobody/v2.0/.well-known/openid-configuration"
    async with http.get(url, headers={"client-request-id": "corr-123"}) as resp:
        status, body = resp.status, await resp.json()
    assert_aad_error(status, body, 400, "invalid_tenant", 90002)
    assert body["correlation_id"] == "corr-123"
    assert "Tenant 'nobody' not found" in body["error_description"]


async def test_instance_discovery(aad: AadStandin, http: aiohttp.ClientSession) -> None:
    params = {"api-version": "1.1", "authorization_endpoint": f"{aad.url}{TENANT}/oauth2/v2.0/authorize"}
    async with http.get(f"{aad.url}common/discovery/instance", params=params) as resp:
        doc = await resp.json()
    assert doc["tenant_discovery_endpoint"] == f"{aad.url}{TENANT}/v2.0/.well-known/openid-configuration"


async def test_tls_is_real_an_untrusting_client_is_refused(aad: AadStandin) -> None:
    async with aiohttp.ClientSession() as plain:
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await plain.get(f"{aad.url}{TENANT}/v2.0/.well-known/openid-configuration")


# ---------------------------------------------------------------- secrets


async def test_client_secret_grant(aad: AadStandin, http: aiohttp.ClientSession) -> None:
    status, body = await post_token(http, aad, client_secret=SECRET)
    assert status == 200
    assert set(body) == {"token_type", "expires_in", "ext_expires_in", "access_token"}
    assert (body["token_type"], body["expires_in"], body["ext_expires_in"]) == ("Bearer", 3599, 3599)
    assert body["access_token"].count(".") == 2
    claims = aad.verify_access_token(body["access_token"])
    assert (claims["aud"], claims["appid"], claims["tid"]) == ("https://vault.azure.net", CLIENT, TENANT)
    assert aad.token_call_count(CLIENT) == 1
    assert aad.calls[-1].method == "secret"


async def test_client_secret_basic_auth(aad: AadStandin, http: aiohttp.ClientSession) -> None:
    data = {"grant_type": "client_credentials", "scope": SCOPE}
    basic = base64.b64encode(f"{CLIENT}:{SECRET}".encode()).decode()
    async with http.post(token_url(aad), data=data, headers={"Authorization": f"Basic {basic}"}) as resp:
        assert resp.status == 200


@pytest.mark.parametrize(
    ("form", "status", "error", "code"),
    [
        ({"client_secret": "wrong-secret-zz9"}, 401, "invalid_client", 7000215),
        ({}, 401, "invalid_client", 7000218),
        ({"client_id": "unknown-app", "client_secret": SECRET}, 400, "unauthorized_client", 700016),
        ({"client_secret": SECRET, "scope": "https://vault.azure.net/read"}, 400, "invalid_scope", 1002012),
        ({"client_secret": SECRET, "grant_type": "password"}, 400, "unsupported_grant_type", 70003),
        ({"client_secret": SECRET, "tenant": "other-tenant"}, 400, "invalid_request", 90002),
    ],
)
async def test_refusals_have_azure_ad_shape(
    aad: AadStandin, http: aiohttp.ClientSession, form: dict[str, str], status: int, error: str, code: int
) -> None:
    got_status, body = await post_token(http, aad, **form)
    assert_aad_error(got_status, body, status, error, code)
    assert "wrong-secret-zz9" not in json.dumps(body)


async def test_disabled_app(aad: AadStandin, http: aiohttp.ClientSession) -> None:
    aad.set_enabled(TENANT, CLIENT, False)
    status, body = await post_token(http, aad, client_secret=SECRET)
    assert_aad_error(status, body, 400, "unauthorized_client", 7000112)


async def test_rotate_secret(aad: AadStandin, http: aiohttp.ClientSession) -> None:
    aad.rotate_secret(TENANT, CLIENT, "second", keep_old=True)
    assert (await post_token(http, aad, client_secret=SECRET))[0] == 200
    assert (await post_token(http, aad, client_secret="second"))[0] == 200
    aad.rotate_secret(TENANT, CLIENT, "third")
    assert (await post_token(http, aad, client_secret=SECRET))[0] == 401
    assert (await post_token(http, aad, client_secret="third"))[0] == 200


# ------------------------------------------------------------- assertions


@pytest.mark.parametrize("alg", ["RS256", "PS256", "ES256"])
async def test_valid_assertions_are_accepted(
    alg: str,
    aad: AadStandin,
    http: aiohttp.ClientSession,
    rsa_cert: ClientCertificate,
    ec_cert: ClientCertificate,
) -> None:
    cert = ec_cert if alg == "ES256" else rsa_cert
    aad.register_app(TENANT, CLIENT, certificate_pem=cert.leaf_pem)
    header = {}
    if alg == "PS256":  # Azure AD's documented form: the SHA-256 thumbprint only.
        leaf = x509.load_pem_x509_certificate(cert.leaf_pem.encode())
        header = {"x5t": None, "x5t#S256": b64u(leaf.fingerprint(hashes.SHA256()))}
    jwt = assertion(cert, token_url(aad), alg=alg, header=header)
    status, body = await post_token(http, aad, client_assertion_type=JWT_BEARER, client_assertion=jwt)
    assert status == 200, body
    assert aad.calls[-1].algorithm == alg and aad.calls[-1].method == "assertion"
    assert aad.verify_access_token(body["access_token"])["appidacr"] == "2"


async def test_signature_by_another_key_is_refused(
    aad: AadStandin, http: aiohttp.ClientSession, rsa_cert: ClientCertificate
) -> None:
    aad.register_app(TENANT, CLIENT, certificate_pem=rsa_cert.leaf_pem)
    impostor = issue_client_certificate(key_type="RSA", with_chain=False)
    jwt = assertion(rsa_cert, token_url(aad), key_pem=impostor.key_pem)  # Right thumbprint, wrong key.
    status, body = await post_token(http, aad, client_assertion_type=JWT_BEARER, client_assertion=jwt)
    assert_aad_error(status, body, 401, "invalid_client", 700027)
    assert "did not match the expected signature" in body["error_description"]


async def test_unregistered_certificate_is_refused(
    aad: AadStandin, http: aiohttp.ClientSession, rsa_cert: ClientCertificate, ec_cert: ClientCertificate
) -> None:
    aad.register_app(TENANT, CLIENT, certificate_pem=rsa_cert.leaf_pem)
    status, body = await post_token(
        http, aad, client_assertion_type=JWT_BEARER, client_assertion=assertion(ec_cert, token_url(aad))
    )
    assert_aad_error(status, body, 401, "invalid_client", 700027)
    assert "not registered on application" in body["error_description"]


@pytest.mark.parametrize(
    ("overrides", "code"),
    [
        ({"claims": {"aud": "https://login.microsoftonline.com/x/oauth2/v2.0/token"}}, 50012),
        ({"claims": {"iss": "someone-else"}}, 700021),
        ({"claims": {"sub": "someone-else"}}, 700021),
        ({"claims": {"exp": 1_000_000}}, 700024),
        ({"claims": {"nbf": int(time.time()) + 3600}}, 700024),
        ({"alg": "HS256"}, 700027),
        ({"header": {"x5t": 12345}}, 50027),
        ({"header": {"x5t": None}}, 700027),
    ],
)
async def test_bad_assertions_are_refused(
    aad: AadStandin,
    http: aiohttp.ClientSession,
    rsa_cert: ClientCertificate,
    overrides: dict[str, Any],
    code: int,
) -> None:
    aad.register_app(TENANT, CLIENT, certificate_pem=rsa_cert.leaf_pem)
    jwt = assertion(rsa_cert, token_url(aad), **overrides)
    status, body = await post_token(http, aad, client_assertion_type=JWT_BEARER, client_assertion=jwt)
    assert_aad_error(status, body, 401, "invalid_client", code)


async def test_malformed_assertion_and_wrong_type(
    aad: AadStandin, http: aiohttp.ClientSession, rsa_cert: ClientCertificate
) -> None:
    aad.register_app(TENANT, CLIENT, certificate_pem=rsa_cert.leaf_pem)
    status, body = await post_token(http, aad, client_assertion_type=JWT_BEARER, client_assertion="a.b")
    assert_aad_error(status, body, 401, "invalid_client", 50027)
    good = assertion(rsa_cert, token_url(aad))
    status, body = await post_token(http, aad, client_assertion_type="urn:other", client_assertion=good)
    assert_aad_error(status, body, 401, "invalid_client", 7000218)


# ------------------------------------------------------------------ faults


async def test_injected_faults_then_recovery(aad: AadStandin, http: aiohttp.ClientSession) -> None:
    aad.fail_next(2, kind="server_error")
    aad.fail_next(kind="throttle", retry_after=7)
    aad.fail_next(kind="unavailable", retry_after=3)
    aad.fail_next(kind="invalid_client")
    statuses = []
    for _ in range(6):
        async with http.post(
            token_url(aad),
            data={
                "grant_type": "client_credentials",
                "client_id": CLIENT,
                "scope": SCOPE,
                "client_secret": SECRET,
            },
        ) as resp:
            statuses.append((resp.status, resp.headers.get("Retry-After")))
            body = await resp.json()
    assert statuses == [(500, None), (500, None), (429, "7"), (503, "3"), (401, None), (200, None)]
    assert "access_token" in body
    assert aad.token_call_count(CLIENT) == 6
    assert [c.status for c in aad.calls] == [500, 500, 429, 503, 401, 200]


async def test_delay(aad: AadStandin, http: aiohttp.ClientSession) -> None:
    aad.delay_s = 0.2
    started = time.monotonic()
    status, _ = await post_token(http, aad, client_secret=SECRET)
    assert status == 200 and time.monotonic() - started >= 0.2


async def test_down_and_up_on_the_same_port(aad: AadStandin, http: aiohttp.ClientSession) -> None:
    port = aad.port
    await aad.go_down()
    with pytest.raises(aiohttp.ClientError):
        await post_token(http, aad, client_secret=SECRET)
    await aad.come_up()
    assert aad.port == port
    assert (await post_token(http, aad, client_secret=SECRET))[0] == 200


# --------------------------------------------------------------------- CLI


async def test_cli_prints_url_and_writes_ca_bundle(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "standins.aad",
        "--port",
        "0",
        "--cert-dir",
        str(tmp_path),
        "--app",
        f"{TENANT},{CLIENT},{SECRET}",
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), timeout=10)
        info = json.loads(line)
        assert info["ca_bundle"] == str(tmp_path / "aad-ca.pem")
        ctx = ssl.create_default_context(cafile=info["ca_bundle"])
        form = {
            "grant_type": "client_credentials",
            "client_id": CLIENT,
            "scope": SCOPE,
            "client_secret": SECRET,
        }
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as http,
            http.post(f"{info['url']}{TENANT}/oauth2/v2.0/token", data=form) as resp,
        ):
            assert resp.status == 200
    finally:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), timeout=10) == 0
