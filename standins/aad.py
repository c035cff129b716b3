"""An Azure AD (Entra ID) stand-in over TLS: what MSAL's client-credentials flow calls, wire-faithful.

Served, per tenant (tenant IDs and client IDs match case-insensitively, like GUIDs do):

* ``GET /{tenant}/v2.0/.well-known/openid-configuration``: the discovery document, pointing at this server.
  An unknown tenant gets Azure AD's ``400 invalid_tenant`` / AADSTS90002.
* ``GET /common/discovery/instance``: instance discovery, for clients that validate the authority.
* ``POST /{tenant}/oauth2/v2.0/token`` with ``grant_type=client_credentials`` and either a client secret
  (``client_secret`` in the body or HTTP Basic) or a JWT client assertion whose signature (RS256, PS256,
  ES256/384/512) is verified against the registered certificate named by its ``x5t#S256``/``x5t`` header,
  with ``aud`` (this tenant's token endpoint), ``iss == sub == client_id`` and ``nbf``/``exp`` checked.
  ``scope`` must end with ``/.default``.
* Federated identity credentials (``add_federated_credential``): an assertion whose ``iss`` is not the client
  ID and that names no certificate thumbprint is matched on issuer, subject and audience (AADSTS700211,
  700213, 700212; or the older 70021 with ``legacy_federation_errors``), then verified against the issuer's
  keys, fetched from ``<iss>/.well-known/openid-configuration`` → ``jwks_uri`` over HTTPS trusting
  ``trust`` (AADSTS50166 when that fails; cached ``jwks_ttl_s``, fetched again for an unknown ``kid``;
  ``issuer_fetches`` counts them), then its time range (AADSTS700024).

Errors have Azure AD's shape: ``error``, ``error_description`` ("AADSTSnnn: text\\r\\nTrace ID: ...\\r\\n
Correlation ID: ...\\r\\nTimestamp: ..."), ``error_codes``, ``timestamp``, ``trace_id``, ``correlation_id``,
``error_uri``; with Azure AD's statuses (401 for a bad credential, 400 for the rest).

Test controls: ``register_app``, ``rotate_secret``, ``add_certificate``, ``set_enabled``, ``fail_next``
(invalid_client 401, 500, 429/503 with Retry-After), ``delay_s`` (slowness on every request),
``go_down``/``come_up`` (connections refused and reset), and counters of token calls per client.

Run on its own: ``python -m standins.aad --port 8443 --cert-dir /tmp/aad`` prints the authority URL and
writes the CA bundle to trust to ``<cert-dir>/aad-ca.pem``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import collections
import datetime as dt
import hashlib
import hmac
import json
import os
import signal
import socket
import ssl
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import aiohttp
import trustme
from aiohttp import web
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID

from standins import _oidc

JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
CLOCK_SKEW_S = 300
"""Azure AD tolerates five minutes of skew on assertion times."""
TOKEN_EXCHANGE_AUDIENCE = "api://AzureADTokenExchange"
MAX_FEDERATED_CREDENTIALS = 20
"""Azure AD's limit of federated identity credentials per application or managed identity."""
_FIC_DOCS = "https://learn.microsoft.com/entra/workload-id/workload-identity-federation"

FaultKind = Literal["invalid_client", "server_error", "throttle", "unavailable"]

_EC_CURVES = {"ES256": ("secp256r1", hashes.SHA256(), 32), "ES384": ("secp384r1", hashes.SHA384(), 48)}
_EC_CURVES["ES512"] = ("secp521r1", hashes.SHA512(), 66)


@dataclass(frozen=True)
class FederatedCredential:
    """A federated identity credential: tokens of ``issuer`` about ``subject`` for one of ``audiences``."""

    name: str
    issuer: str
    subject: str
    audiences: tuple[str, ...] = (TOKEN_EXCHANGE_AUDIENCE,)


@dataclass
class RegisteredApp:
    tenant: str
    client_id: str
    display_name: str
    secrets: list[str] = field(default_factory=list)
    certificates: list[x509.Certificate] = field(default_factory=list)
    enabled: bool = True
    federated_credentials: list[FederatedCredential] = field(default_factory=list)

    def certificate_by_thumbprint(self, sha256: bytes | None, sha1: bytes | None) -> x509.Certificate | None:
        for cert in self.certificates:
            if sha256 is not None and cert.fingerprint(hashes.SHA256()) != sha256:
                continue
            if sha1 is not None and cert.fingerprint(hashes.SHA1()) != sha1:
                continue
            return cert
        return None


@dataclass(frozen=True)
class TokenCall:
    """One request that reached the token endpoint, whatever its outcome."""

    tenant: str
    client_id: str
    scope: str
    method: str
    """``secret``, ``assertion`` or ``none``."""
    status: int
    error: str | None
    algorithm: str | None = None
    federated_subject: str | None = None
    """For a federated assertion: its ``sub`` (whatever the outcome once it was parsed)."""


@dataclass
class _Fault:
    kind: FaultKind
    retry_after: int | None


class AadError(Exception):
    def __init__(
        self, status: int, error: str, code: int, text: str, *, federated_subject: str | None = None
    ) -> None:
        super().__init__(f"AADSTS{code}: {text}")
        self.status = status
        self.error = error
        self.code = code
        self.text = text
        self.federated_subject = federated_subject


class AadStandin:
    """One Azure AD instance for any number of tenants, on an HTTPS port of its own."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        ca: trustme.CA | None = None,
        token_lifetime_s: int = 3599,
        clock: Any = time.time,
        trust: ssl.SSLContext | str | os.PathLike[str] | None = None,
        jwks_ttl_s: float = 300.0,
    ) -> None:
        self.host = host
        self.port = port
        self.ca = ca or trustme.CA()
        self._server_cert = self.ca.issue_cert(host, "localhost", "127.0.0.1")
        self.token_lifetime_s = token_lifetime_s
        self.clock = clock
        self.delay_s = 0.0
        """Added before answering any request: a slow Azure AD."""
        self.token_calls: collections.Counter[str] = collections.Counter()
        """Token endpoint requests per client ID (lower case), whatever their outcome."""
        self.calls: list[TokenCall] = []
        self.discovery_calls = 0
        self._apps: dict[tuple[str, str], RegisteredApp] = {}
        self._tenants: set[str] = set()
        self._faults: collections.deque[_Fault] = collections.deque()
        self._token_key = os.urandom(32)
        self._down = False
        self._runner: web.AppRunner | None = None
        self._site: web.SockSite | None = None
        # Federated credentials: the issuers' keys, fetched over HTTPS as Azure AD does.
        self._trust = trust
        self.jwks_ttl_s = jwks_ttl_s
        """How long an issuer's keys are used before its discovery document is fetched again."""
        self.issuer_fetches = 0
        """Fetches of an issuer's discovery document (each followed by its JWKS), successful or not."""
        self.legacy_federation_errors = False
        """Answer every federated mismatch with the older AADSTS70021 text instead of 700211/700212/700213."""
        self._issuer_keys: dict[str, tuple[float, dict[str, rsa.RSAPublicKey]]] = {}
        self._fetch_lock = asyncio.Lock()
        self._outbound: aiohttp.ClientSession | None = None

    # ----------------------------------------------------------------- lifecycle

    @property
    def url(self) -> str:
        """The authority host, as ``spec.adEndpoint`` would name it (with the trailing slash)."""
        return f"https://{self._url_host}:{self.port}/"

    @property
    def _url_host(self) -> str:
        return f"[{self.host}]" if ":" in self.host else self.host

    @property
    def ca_pem(self) -> bytes:
        return self.ca.cert_pem.bytes()

    def write_ca_bundle(self, path: str | os.PathLike[str]) -> str:
        """Write the PEM of the CA that signed this server's certificate; returns the path."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(self.ca_pem)
        return str(target)

    def ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._server_cert.configure_cert(ctx)
        return ctx

    async def start(self) -> AadStandin:
        app = web.Application(middlewares=[self._outage_middleware])
        app.router.add_get("/common/discovery/instance", self._instance_discovery)
        app.router.add_get("/{tenant}/v2.0/.well-known/openid-configuration", self._openid_configuration)
        app.router.add_post("/{tenant}/oauth2/v2.0/token", self._token)
        # A short shutdown: requests held by delay_s must not stall a test's teardown.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
        await self._runner.setup()
        await self._listen()
        return self

    async def close(self) -> None:
        if self._outbound is not None:
            await self._outbound.close()
            self._outbound = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
            self._site = None

    async def __aenter__(self) -> AadStandin:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def go_down(self) -> None:
        """Refuse new connections and reset requests on kept-alive ones, like an unreachable endpoint."""
        self._down = True
        if self._site is not None:
            await self._site.stop()
            self._site = None

    async def come_up(self) -> None:
        self._down = False
        if self._site is None:
            await self._listen()

    async def _listen(self) -> None:
        assert self._runner is not None
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]  # Kept, so come_up() rebinds the same port.
        self._site = web.SockSite(self._runner, sock, ssl_context=self.ssl_context())
        await self._site.start()

    # --------------------------------------------------------------- directory

    def add_tenant(self, tenant: str) -> None:
        self._tenants.add(tenant.casefold())

    def register_app(
        self,
        tenant: str,
        client_id: str,
        *,
        secret: str | None = None,
        certificate_pem: str | bytes | None = None,
        display_name: str | None = None,
        enabled: bool = True,
    ) -> RegisteredApp:
        self.add_tenant(tenant)
        app = RegisteredApp(
            tenant=tenant,
            client_id=client_id,
            display_name=display_name or f"app-{client_id[:8]}",
            enabled=enabled,
        )
        if secret is not None:
            app.secrets.append(secret)
        if certificate_pem is not None:
            app.certificates.append(_load_cert(certificate_pem))
        self._apps[(tenant.casefold(), client_id.casefold())] = app
        return app

    def app(self, tenant: str, client_id: str) -> RegisteredApp:
        return self._apps[(tenant.casefold(), client_id.casefold())]

    def rotate_secret(self, tenant: str, client_id: str, new_secret: str, *, keep_old: bool = False) -> None:
        app = self.app(tenant, client_id)
        app.secrets = [*app.secrets, new_secret] if keep_old else [new_secret]

    def add_certificate(self, tenant: str, client_id: str, certificate_pem: str | bytes) -> None:
        self.app(tenant, client_id).certificates.append(_load_cert(certificate_pem))

    def set_enabled(self, tenant: str, client_id: str, enabled: bool) -> None:
        self.app(tenant, client_id).enabled = enabled

    def add_federated_credential(
        self,
        tenant: str,
        client_id: str,
        *,
        issuer: str,
        subject: str,
        audiences: tuple[str, ...] | list[str] = (TOKEN_EXCHANGE_AUDIENCE,),
        name: str | None = None,
    ) -> FederatedCredential:
        """Trust tokens of ``issuer`` (an https URL, matched exactly, trailing slash included) about
        ``subject`` (``system:serviceaccount:NS:SA``, case-sensitive) carrying one of ``audiences``."""
        app = self.app(tenant, client_id)
        if not issuer.startswith("https://"):
            raise ValueError("a federated identity credential's issuer must be an https URL")
        if len(app.federated_credentials) >= MAX_FEDERATED_CREDENTIALS:
            raise ValueError(
                f"at most {MAX_FEDERATED_CREDENTIALS} federated identity credentials per application"
            )
        credential = FederatedCredential(
            name or f"fic-{len(app.federated_credentials) + 1}", issuer, subject, tuple(audiences)
        )
        app.federated_credentials.append(credential)
        return credential

    def remove_federated_credential(self, tenant: str, client_id: str, name: str) -> None:
        app = self.app(tenant, client_id)
        app.federated_credentials = [c for c in app.federated_credentials if c.name != name]

    def forget_issuer_keys(self) -> None:
        """Drop the cached issuer keys: the next federated assertion fetches them again."""
        self._issuer_keys.clear()

    # ------------------------------------------------------------------ faults

    def fail_next(
        self, count: int = 1, *, kind: FaultKind = "server_error", retry_after: int | None = None
    ) -> None:
        """The next ``count`` token requests fail this way, before any check."""
        for _ in range(count):
            self._faults.append(_Fault(kind, retry_after))

    def clear_faults(self) -> None:
        self._faults.clear()
        self.delay_s = 0.0

    def token_call_count(self, client_id: str | None = None) -> int:
        if client_id is None:
            return sum(self.token_calls.values())
        return self.token_calls[client_id.casefold()]

    def verify_access_token(self, token: str) -> dict[str, Any]:
        """The claims of an access token this stand-in issued; ``ValueError`` if it did not issue it."""
        header_b64, payload_b64, signature_b64 = token.split(".")
        expected = hmac.new(self._token_key, f"{header_b64}.{payload_b64}".encode(), hashlib.sha256).digest()
        if not hmac.compare_digest(expected, _b64decode(signature_b64)):
            raise ValueError("not issued by this stand-in")
        claims: dict[str, Any] = json.loads(_b64decode(payload_b64))
        return claims

    # --------------------------------------------------------------- handlers

    @web.middleware
    async def _outage_middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if self._down:
            # A request on a connection kept alive from before the outage: drop it without a response.
            if request.transport is not None:
                request.transport.abort()
            raise web.HTTPServiceUnavailable()
        if self.delay_s > 0 and request.method != "POST":
            await asyncio.sleep(self.delay_s)  # Token calls are delayed once counted, in _token.
        response: web.StreamResponse = await handler(request)
        return response

    def _base(self, request: web.Request) -> str:
        return f"https://{request.host}"

    async def _instance_discovery(self, request: web.Request) -> web.Response:
        endpoint = request.query.get("authorization_endpoint", "")
        parsed = urllib.parse.urlparse(endpoint)
        tenant = parsed.path.strip("/").split("/")[0] if parsed.path else "common"
        host = request.host
        return web.json_response(
            {
                "tenant_discovery_endpoint": (
                    f"{self._base(request)}/{tenant}/v2.0/.well-known/openid-configuration"
                ),
                "api-version": "1.1",
                "metadata": [{"preferred_network": host, "preferred_cache": host, "aliases": [host]}],
            }
        )

    async def _openid_configuration(self, request: web.Request) -> web.Response:
        self.discovery_calls += 1
        tenant = request.match_info["tenant"]
        if tenant.casefold() not in self._tenants and tenant.casefold() not in ("common", "organizations"):
            return self._error_response(
                request, AadError(400, "invalid_tenant", 90002, _tenant_not_found(tenant)), headers={}
            )
        base = f"{self._base(request)}/{tenant}"
        doc = {
            "token_endpoint": f"{base}/oauth2/v2.0/token",
            "token_endpoint_auth_methods_supported": [
                "client_secret_post",
                "private_key_jwt",
                "client_secret_basic",
            ],
            "jwks_uri": f"{base}/discovery/v2.0/keys",
            "response_modes_supported": ["query", "fragment", "form_post"],
            "subject_types_supported": ["pairwise"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
            "scopes_supported": ["openid", "profile", "email", "offline_access"],
            "issuer": f"{base}/v2.0",
            "request_uri_parameter_supported": False,
            "userinfo_endpoint": f"{self._base(request)}/oidc/userinfo",
            "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
            "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
            "http_logout_supported": True,
            "frontchannel_logout_supported": True,
            "end_session_endpoint": f"{base}/oauth2/v2.0/logout",
            "claims_supported": ["sub", "iss", "aud", "exp", "iat", "nbf", "tid", "ver"],
            "kerberos_endpoint": f"{base}/kerberos",
            "tenant_region_scope": None,
            "cloud_instance_name": request.host,
            "cloud_graph_host_name": request.host,
            "msgraph_host": request.host,
            "rbac_url": request.host,
        }
        return web.json_response(doc)

    async def _token(self, request: web.Request) -> web.Response:
        tenant = request.match_info["tenant"]
        form = await request.post()
        fields = {k: str(v) for k, v in form.items()}
        client_id, basic_secret = _basic_auth(request.headers.get("Authorization", ""))
        client_id = fields.get("client_id") or client_id
        method = (
            "assertion"
            if "client_assertion" in fields
            else "secret"
            if basic_secret or "client_secret" in fields
            else "none"
        )
        self.token_calls[client_id.casefold()] += 1
        if self.delay_s > 0:
            await asyncio.sleep(self.delay_s)
        algorithm: str | None = None
        federated_subject: str | None = None
        headers: dict[str, str] = {}
        try:
            if self._faults:
                fault = self._faults.popleft()
                headers = {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else {}
                raise _fault_error(fault, client_id)
            algorithm, federated_subject = await self._authenticate(
                request, tenant, client_id, fields, basic_secret
            )
            body = self._issue(tenant, client_id, fields["scope"], method)
        except AadError as err:
            self.calls.append(
                TokenCall(
                    tenant,
                    client_id,
                    fields.get("scope", ""),
                    method,
                    err.status,
                    err.error,
                    algorithm,
                    err.federated_subject,
                )
            )
            return self._error_response(request, err, headers=headers)
        self.calls.append(
            TokenCall(tenant, client_id, fields["scope"], method, 200, None, algorithm, federated_subject)
        )
        return web.json_response(body, headers=_NO_STORE)

    async def _authenticate(
        self,
        request: web.Request,
        tenant: str,
        client_id: str,
        fields: dict[str, str],
        basic_secret: str | None,
    ) -> tuple[str | None, str | None]:
        """Check the request and the client's credential: (assertion algorithm, federated subject)."""
        if tenant.casefold() not in self._tenants:
            raise AadError(400, "invalid_request", 90002, _tenant_not_found(tenant))
        grant = fields.get("grant_type", "")
        if not grant:
            raise AadError(400, "invalid_request", 900144, _missing("grant_type"))
        if grant != "client_credentials":
            raise AadError(
                400,
                "unsupported_grant_type",
                70003,
                f"The app requested an unsupported grant type '{grant}'.",
            )
        if not client_id:
            raise AadError(400, "invalid_request", 900144, _missing("client_id"))
        app = self._apps.get((tenant.casefold(), client_id.casefold()))
        if app is None:
            raise AadError(
                400,
                "unauthorized_client",
                700016,
                f"Application with identifier '{client_id}' was not found in the directory '{tenant}'. "
                "This can happen if the application has not been installed by the administrator of the "
                "tenant or consented to by any user in the tenant. You may have sent your authentication "
                "request to the wrong tenant.",
            )
        if not app.enabled:
            raise AadError(
                400,
                "unauthorized_client",
                7000112,
                f"Application '{app.client_id}'({app.display_name}) is disabled.",
            )
        scope = fields.get("scope", "")
        if not scope:
            raise AadError(400, "invalid_request", 900144, _missing("scope"))
        if not scope.endswith("/.default") or " " in scope.strip():
            raise AadError(
                400,
                "invalid_scope",
                1002012,
                f"The provided value for scope {scope} is not valid. Client credential flows must have a "
                "scope value with /.default suffixed to the resource identifier (application ID URI).",
            )
        if "client_assertion" in fields:
            if fields.get("client_assertion_type") != JWT_BEARER:
                raise AadError(
                    401,
                    "invalid_client",
                    7000218,
                    "The request body must contain the following parameter: 'client_assertion_type'.",
                )
            assertion = fields["client_assertion"]
            if _is_federated(assertion, app):
                return await self._verify_federated(assertion, app)
            audiences = {
                f"{self._base(request)}/{tenant}/oauth2/v2.0/token",
                f"{self._base(request)}/{tenant}/oauth2/token",
            }
            return _verify_assertion(assertion, app, audiences, self.clock()), None
        secret = fields.get("client_secret", basic_secret)
        if secret is None:
            raise AadError(
                401,
                "invalid_client",
                7000218,
                _missing("client_assertion' or 'client_secret"),
            )
        if not any(hmac.compare_digest(secret.encode(), known.encode()) for known in app.secrets):
            raise AadError(
                401,
                "invalid_client",
                7000215,
                _invalid_secret(app.client_id),
            )
        return None, None

    async def _verify_federated(self, assertion: str, app: RegisteredApp) -> tuple[str, str]:
        """A federated identity credential's assertion, checked as Azure AD does: a credential whose
        issuer, subject and audience match, then the signature against the issuer's published keys
        (discovery document → JWKS, over HTTPS), then the time range. Returns (algorithm, subject)."""
        header, claims, signing_input, signature = _oidc.split(assertion)  # parsed already by _is_federated
        issuer, subject = str(claims.get("iss", "")), str(claims.get("sub", ""))
        raw_aud = claims.get("aud")
        audiences = (
            [raw_aud] if isinstance(raw_aud, str) else [str(a) for a in raw_aud or [] if a is not None]
        )
        shown_aud = audiences[0] if audiences else ""

        def mismatch(code: int, what: str, value: str) -> AadError:
            if self.legacy_federation_errors:
                code, text = (
                    70021,
                    "No matching federated identity record found for presented assertion. "
                    f"Assertion Issuer: '{issuer}'. Assertion Subject: '{subject}'. Assertion Audience: "
                    f"'{shown_aud}'. https://docs.microsoft.com/en-us/azure/active-directory/develop/"
                    "workload-identity-federation",
                )
            else:
                text = (
                    f"No matching federated identity record found for presented assertion {what} '{value}'. "
                    "Please check your federated identity credential Subject, Audience and Issuer against "
                    f"the presented assertion. {_FIC_DOCS}"
                )
            return AadError(401, "invalid_client", code, text, federated_subject=subject)

        candidates = [c for c in app.federated_credentials if c.issuer == issuer]
        if not candidates:
            raise mismatch(700211, "issuer", issuer)
        candidates = [c for c in candidates if c.subject == subject]
        if not candidates:
            raise mismatch(700213, "subject", subject)
        if not any(a in c.audiences for c in candidates for a in audiences):
            raise mismatch(700212, "audience", shown_aud)
        algorithm = str(header.get("alg", ""))
        kid = str(header.get("kid", ""))
        keys = await self._keys_of(issuer, subject)
        if kid not in keys:  # a rotated key: fetch again before giving up
            keys = await self._keys_of(issuer, subject, refresh=True)
        key = keys.get(kid)
        if key is None or algorithm != "RS256":
            reason = (
                "The key was not found." if key is None else f"The algorithm '{algorithm}' is not supported."
            )
            raise AadError(
                401,
                "invalid_client",
                700027,
                f"Client assertion failed signature validation. [Reason - {reason}]",
                federated_subject=subject,
            )
        if not _oidc.verify_rs256(key, signing_input, signature):
            raise AadError(
                401,
                "invalid_client",
                700027,
                "Client assertion failed signature validation. [Reason - The provided signature value did "
                "not match the expected signature value.]",
                federated_subject=subject,
            )
        now = self.clock()
        exp, nbf = claims.get("exp"), claims.get("nbf", claims.get("iat"))
        expired = not isinstance(exp, int | float) or exp + CLOCK_SKEW_S < now
        early = isinstance(nbf, int | float) and nbf - CLOCK_SKEW_S > now
        if expired or early:
            raise AadError(
                401,
                "invalid_client",
                700024,
                f"Client assertion is not within its valid time range. Current time: {_ests_time(now)}, "
                f"assertion valid from {_ests_time(nbf if isinstance(nbf, int | float) else 0)}, "
                f"expiry time of assertion {_ests_time(exp if isinstance(exp, int | float) else 0)}. "
                "Review the documentation at https://learn.microsoft.com/entra/identity-platform/"
                "certificate-credentials .",
                federated_subject=subject,
            )
        return algorithm, subject

    async def _keys_of(
        self, issuer: str, subject: str, *, refresh: bool = False
    ) -> dict[str, rsa.RSAPublicKey]:
        """The issuer's signing keys by ``kid``: cached for ``jwks_ttl_s``, else fetched (single flight)."""
        async with self._fetch_lock:
            cached = self._issuer_keys.get(issuer)
            now = time.monotonic()
            if cached is not None and now - cached[0] < self.jwks_ttl_s and not refresh:
                return cached[1]
            self.issuer_fetches += 1
            try:
                keys = await self._fetch_keys(issuer)
            except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError, ssl.SSLError):
                raise AadError(
                    400,
                    "invalid_request",
                    50166,
                    "Request to External OIDC endpoint failed.",
                    federated_subject=subject,
                ) from None
            self._issuer_keys[issuer] = (time.monotonic(), keys)
            return keys

    async def _fetch_keys(self, issuer: str) -> dict[str, rsa.RSAPublicKey]:
        if self._outbound is None:
            trust = self._trust
            ctx = (
                trust
                if isinstance(trust, ssl.SSLContext)
                else ssl.create_default_context(cafile=os.fspath(trust) if trust is not None else None)
            )
            self._outbound = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=ctx), timeout=aiohttp.ClientTimeout(total=10)
            )
        session = self._outbound
        async with session.get(issuer.rstrip("/") + "/.well-known/openid-configuration") as resp:
            if resp.status != 200:
                raise ValueError(f"discovery document: HTTP {resp.status}")
            document = await resp.json(content_type=None)
        jwks_uri = document["jwks_uri"]
        if not isinstance(jwks_uri, str) or not jwks_uri.startswith("https://"):
            raise ValueError("jwks_uri must be an https URL")
        async with session.get(jwks_uri) as resp:
            if resp.status != 200:
                raise ValueError(f"JWKS: HTTP {resp.status}")
            jwks = await resp.json(content_type=None)
        keys: dict[str, rsa.RSAPublicKey] = {}
        for entry in jwks["keys"]:
            if isinstance(entry, dict) and entry.get("kty") == "RSA" and entry.get("use", "sig") == "sig":
                keys[str(entry.get("kid", ""))] = _oidc.public_key_from_jwk(entry)
        return keys

    def _issue(self, tenant: str, client_id: str, scope: str, method: str) -> dict[str, Any]:
        now = int(self.clock())
        resource = scope[: -len("/.default")]
        claims = {
            "aud": resource,
            "iss": f"https://sts.windows.net/{tenant}/",
            "iat": now,
            "nbf": now,
            "exp": now + self.token_lifetime_s,
            "appid": client_id,
            "appidacr": "2" if method == "assertion" else "1",
            "idtyp": "app",
            "oid": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{tenant}/{client_id}")),
            "sub": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{tenant}/{client_id}")),
            "tid": tenant,
            "uti": uuid.uuid4().hex[:22],
            "ver": "1.0",
        }
        header = {"alg": "HS256", "typ": "JWT", "kid": "standin"}
        signing_input = f"{_b64(_json(header))}.{_b64(_json(claims))}"
        signature = hmac.new(self._token_key, signing_input.encode(), hashlib.sha256).digest()
        return {
            "token_type": "Bearer",
            "expires_in": self.token_lifetime_s,
            "ext_expires_in": self.token_lifetime_s,
            "access_token": f"{signing_input}.{_b64(signature)}",
        }

    def _error_response(
        self, request: web.Request, err: AadError, *, headers: dict[str, str]
    ) -> web.Response:
        trace_id = str(uuid.uuid4())
        correlation_id = request.headers.get("client-request-id") or str(uuid.uuid4())
        stamp = dt.datetime.fromtimestamp(self.clock(), dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")
        body = {
            "error": err.error,
            "error_description": (
                f"AADSTS{err.code}: {err.text}\r\nTrace ID: {trace_id}\r\n"
                f"Correlation ID: {correlation_id}\r\nTimestamp: {stamp}"
            ),
            "error_codes": [err.code],
            "timestamp": stamp,
            "trace_id": trace_id,
            "correlation_id": correlation_id,
            "error_uri": f"{self._base(request)}/error?code={err.code}",
        }
        return web.json_response(body, status=err.status, headers={**_NO_STORE, **headers})


_NO_STORE = {"Cache-Control": "no-store, no-cache", "Pragma": "no-cache"}


def _fault_error(fault: _Fault, client_id: str) -> AadError:
    if fault.kind == "invalid_client":
        return AadError(
            401,
            "invalid_client",
            7000215,
            _invalid_secret(client_id),
        )
    if fault.kind == "throttle":
        return AadError(
            429, "temporarily_unavailable", 90055, "Too many requests; retry after the given delay."
        )
    if fault.kind == "unavailable":
        return AadError(
            503, "temporarily_unavailable", 90033, "A transient error has occurred. Please try again."
        )
    return AadError(500, "server_error", 90033, "A transient error has occurred. Please try again.")


def _tenant_not_found(tenant: str) -> str:
    return (
        f"Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID and are signing "
        "into the correct cloud. Check with your subscription administrator, this may happen if there are "
        "no active subscriptions for the tenant."
    )


def _invalid_secret(client_id: str) -> str:
    return (
        "Invalid client secret provided. Ensure the secret being sent in the request is the client secret "
        f"value, not the client secret ID, for a secret added to app '{client_id}'."
    )


def _missing(name: str) -> str:
    return f"The request body must contain the following parameter: '{name}'."


def _basic_auth(header: str) -> tuple[str, str | None]:
    if not header.lower().startswith("basic "):
        return "", None
    try:
        decoded = base64.b64decode(header[6:].strip()).decode()
    except (binascii.Error, UnicodeDecodeError):
        return "", None
    user, _, password = decoded.partition(":")
    return urllib.parse.unquote_plus(user), urllib.parse.unquote_plus(password)


def _is_federated(assertion: str, app: RegisteredApp) -> bool:
    """Azure AD tells a federated assertion from the app's own certificate-signed one by its issuer:
    a certificate assertion names no thumbprint-less key and has ``iss`` = the client ID."""
    try:
        header, claims, _, _ = _oidc.split(assertion)
    except (ValueError, binascii.Error):
        return False  # malformed: the certificate path answers AADSTS50027
    if "x5t" in header or "x5t#S256" in header:
        return False
    return str(claims.get("iss", "")).casefold() != app.client_id.casefold()


def _ests_time(when: float) -> str:
    """Azure AD's timestamps in error texts: ``2024-05-28T06:01:42.5853621Z``."""
    moment = dt.datetime.fromtimestamp(when, dt.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond:06d}0Z"


def _verify_assertion(assertion: str, app: RegisteredApp, audiences: set[str], now: float) -> str:
    """Verify a client assertion the way Azure AD does; returns its algorithm."""
    try:
        header_b64, payload_b64, signature_b64 = assertion.split(".")
        header = json.loads(_b64decode(header_b64))
        claims = json.loads(_b64decode(payload_b64))
        signature = _b64decode(signature_b64)
    except (ValueError, binascii.Error):
        raise AadError(401, "invalid_client", 50027, "JWT token is invalid or malformed.") from None
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise AadError(401, "invalid_client", 50027, "JWT token is invalid or malformed.")
    algorithm = str(header.get("alg", ""))
    try:
        sha256 = _b64decode(header["x5t#S256"]) if "x5t#S256" in header else None
        sha1 = _b64decode(header["x5t"]) if "x5t" in header else None
    except (ValueError, binascii.Error, TypeError):
        raise AadError(401, "invalid_client", 50027, "JWT token is invalid or malformed.") from None
    if sha256 is None and sha1 is None:
        raise AadError(
            401,
            "invalid_client",
            700027,
            "Client assertion failed signature validation. [Reason - The key was not found.]",
        )
    cert = app.certificate_by_thumbprint(sha256, sha1)
    if cert is None:
        shown = (sha256 or sha1 or b"").hex().upper()
        raise AadError(
            401,
            "invalid_client",
            700027,
            "The certificate with identifier used to sign the client assertion is not registered on "
            f"application. [Reason - The key was not found., Thumbprint of key used by client: '{shown}']",
        )
    if not _signature_ok(cert, algorithm, f"{header_b64}.{payload_b64}".encode(), signature):
        raise AadError(
            401,
            "invalid_client",
            700027,
            "Client assertion failed signature validation. [Reason - The provided signature value did not "
            "match the expected signature value.]",
        )
    if claims.get("aud") not in audiences:
        raise AadError(
            401, "invalid_client", 50012, "Client assertion audience claim does not match Realm issuer."
        )
    for claim in ("iss", "sub"):
        if str(claims.get(claim, "")).casefold() != app.client_id.casefold():
            raise AadError(
                401,
                "invalid_client",
                700021,
                "Client assertion application identifier doesn't match 'client_id' parameter.",
            )
    exp, nbf = claims.get("exp"), claims.get("nbf", claims.get("iat"))
    if not isinstance(exp, int | float) or exp + CLOCK_SKEW_S < now:
        raise AadError(401, "invalid_client", 700024, "Client assertion is not within its valid time range.")
    if isinstance(nbf, int | float) and nbf - CLOCK_SKEW_S > now:
        raise AadError(401, "invalid_client", 700024, "Client assertion is not within its valid time range.")
    return algorithm


def _signature_ok(cert: x509.Certificate, algorithm: str, signed: bytes, signature: bytes) -> bool:
    key = cert.public_key()
    try:
        if algorithm in ("RS256", "PS256") and isinstance(key, rsa.RSAPublicKey):
            pad: padding.AsymmetricPadding = (
                padding.PKCS1v15()
                if algorithm == "RS256"
                else padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.AUTO)
            )
            key.verify(signature, signed, pad, hashes.SHA256())
            return True
        if algorithm in _EC_CURVES and isinstance(key, ec.EllipticCurvePublicKey):
            curve, digest, size = _EC_CURVES[algorithm]
            if key.curve.name != curve or len(signature) != 2 * size:
                return False
            der = encode_dss_signature(
                int.from_bytes(signature[:size], "big"), int.from_bytes(signature[size:], "big")
            )
            key.verify(der, signed, ec.ECDSA(digest))
            return True
    except InvalidSignature:
        return False
    return False


def _load_cert(pem: str | bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem.encode() if isinstance(pem, str) else pem)


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _b64decode(text: str) -> bytes:
    if not isinstance(text, str):
        raise ValueError("not a string")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# ------------------------------------------------------------ certificates


@dataclass(frozen=True)
class ClientCertificate:
    """A service principal's certificate credential, as an operator would put it in a Kubernetes secret."""

    pfx: bytes
    """PKCS#12: key, leaf and (optionally) the intermediate and root; the ``certificate`` secret key."""
    password: bytes
    leaf_pem: str
    """What ``register_app(certificate_pem=...)`` takes."""
    key_pem: str
    chain_pems: tuple[str, ...]


def issue_client_certificate(
    *,
    key_type: Literal["RSA", "EC"] = "RSA",
    password: bytes = b"",
    with_chain: bool = True,
    leaf_first: bool = True,
    subject: str = "nmi-service-principal",
    valid_for: dt.timedelta = dt.timedelta(days=30),
) -> ClientCertificate:
    """A leaf certificate under an intermediate and a root (``with_chain``), bundled as PKCS#12.

    ``leaf_first=False`` stores the leaf among the extra certificates, after the CA ones, and not as the
    PKCS#12's main certificate: a consumer must find the leaf by its key, not by position.
    """
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)

    def new_key() -> Any:
        return (
            rsa.generate_private_key(65537, 2048)
            if key_type == "RSA"
            else ec.generate_private_key(ec.SECP256R1())
        )

    def build(name: str, issuer: str, public: Any, signer: Any, ca: bool) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + valid_for)
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        return builder.sign(signer, hashes.SHA256())

    key = new_key()
    chain: list[x509.Certificate] = []
    if with_chain:
        root_key, mid_key = new_key(), new_key()
        root = build(f"{subject} root", f"{subject} root", root_key.public_key(), root_key, True)
        mid = build(f"{subject} intermediate", f"{subject} root", mid_key.public_key(), root_key, True)
        leaf = build(subject, f"{subject} intermediate", key.public_key(), mid_key, False)
        chain = [mid, root]
    else:
        leaf = build(subject, subject, key.public_key(), key, False)
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    )
    if leaf_first:
        pfx = pkcs12.serialize_key_and_certificates(b"nmi", key, leaf, chain or None, encryption)
    else:
        pfx = pkcs12.serialize_key_and_certificates(b"nmi", key, None, [*reversed(chain), leaf], encryption)
    return ClientCertificate(
        pfx=pfx,
        password=password,
        leaf_pem=leaf.public_bytes(serialization.Encoding.PEM).decode(),
        key_pem=key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode(),
        chain_pems=tuple(c.public_bytes(serialization.Encoding.PEM).decode() for c in chain),
    )


# ---------------------------------------------------------------------- CLI


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m standins.aad", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument(
        "--cert-dir", required=True, help="where to write aad-ca.pem (the CA bundle to trust)"
    )
    parser.add_argument(
        "--app",
        action="append",
        default=[],
        metavar="TENANT,CLIENT_ID,SECRET",
        help="register an app with a client secret (repeatable)",
    )
    parser.add_argument(
        "--cert-app",
        action="append",
        default=[],
        metavar="TENANT,CLIENT_ID,CERT_PEM_PATH",
        help="register an app with a certificate (repeatable)",
    )
    return parser.parse_args(argv)


async def _serve(args: argparse.Namespace) -> None:
    standin = AadStandin(host=args.host, port=args.port)
    for spec in args.app:
        tenant, client_id, secret = spec.split(",", 2)
        standin.register_app(tenant, client_id, secret=secret)
    for spec in args.cert_app:
        tenant, client_id, path = spec.split(",", 2)
        with open(path, "rb") as pem:  # noqa: ASYNC230 - startup, before anything is served
            standin.register_app(tenant, client_id, certificate_pem=pem.read())
    ca_path = standin.write_ca_bundle(Path(args.cert_dir) / "aad-ca.pem")
    await standin.start()
    print(json.dumps({"url": standin.url, "ca_bundle": ca_path}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await standin.close()


def main(argv: list[str] | None = None) -> None:
    asyncio.run(_serve(_parse_args(argv)))


if __name__ == "__main__":
    main()
