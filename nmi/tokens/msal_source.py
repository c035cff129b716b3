"""Azure AD tokens through MSAL: service principals (identity types 1 and 2, nmi-spec §3.5) and
federated workload identities (type 3, the pod's service-account token as the client assertion).

Shape of one ``fetch``:

1. the identity's secret is read through the injected reader (a failure is 503 and counts
   ``kubernetes_api_operations_errors_count{operation_type="get_secret"}``), refused if it lies outside the
   identity's namespace unless that is allowed (nmi-spec §9.2);
2. its fingerprint picks the ``msal.ConfidentialClientApplication`` for (authority, client ID, credential).
   A new fingerprint for an identity means the secret was rotated: the old application is dropped and
   ``on_credentials_changed(identity)`` fires, so the token cache in front can drop what it holds for it;
3. ``acquire_token_for_client`` runs in the source's own bounded thread pool (MSAL is synchronous and must
   never run on the event loop); the caller's deadline bounds the wait, a thread that outlives it has its
   result discarded, and its HTTP calls were given no more than the time that was left.

MSAL is used exactly as against a sovereign or private cloud: the authority is ``spec.adEndpoint`` plus the
tenant; for hosts that are not Microsoft's, authority validation and instance discovery are off; the TLS
trust store is the ``ca_bundle`` given to our own ``requests`` session, passed on every call so that the
process environment cannot override it (with no ``ca_bundle``, requests' default and ``REQUESTS_CA_BUNDLE``
apply). Certificate credentials reach MSAL as a client-assertion callback that we sign (PS256 for RSA,
ES256/384/512 for EC, with ``x5t``, ``x5t#S256`` and ``x5c``); see ``_build_app`` for why.

Two MSAL caches are bypassed on purpose, because the NMI token cache sits in front of this source and owns
freshness and retry policy:

* its token cache: the client's tokens are removed before each acquisition, so every ``fetch`` returns a
  token fresh from Azure AD (a proactive refresh must not get back the same about-to-expire token);
* its HTTP throttling cache, which replays 429/5xx answers for their Retry-After (5 s by default) and 400
  answers for 60 s without touching the network: a fixed app registration would keep failing for a minute
  and metrics would count replays as upstream calls. It is given a mapping that stores nothing.

Resources become v2 scopes as ``<resource>/.default``, with one trailing slash dropped first:
``https://management.azure.com/`` → ``https://management.azure.com/.default``, the form the Azure SDKs use.
A resource that already ends in ``/.default`` is passed as is: the way to reach an API whose tokens must
carry the trailing slash in ``aud`` (``https://x//.default``, as Microsoft documents for such APIs).

Errors: an Azure AD refusal becomes ``UpstreamRefused`` (403) carrying Azure AD's ``error`` and the first line
of its description (the AADSTS code and text; never trace IDs, never credential material), with the upstream
status. Transport failures, timeouts and 5xx are ``UpstreamUnavailable`` (503). A 429 is retried after its
Retry-After while the deadline allows, else ``UpstreamUnavailable(retry_after=...)``.

Auxiliary tenants: the IMDS-shaped answer is one token, for the primary tenant. A caller may opt into a
token from one of ``spec.auxiliaryTenantIDs`` with ``fetch(..., tenant_id=...)``; a tenant not listed there
is a 400.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import msal

from nmi.metrics import Metrics
from nmi.tokens.aad_answers import Throttled, failure, interpret, to_token
from nmi.tokens.aad_http import HttpClient, NoStore, Reply, make_session
from nmi.tokens.credentials import (
    CertificateCredential,
    ClientSecretCredential,
    CredentialError,
    check_secret_namespace,
    credential_fingerprint,
    load_credential,
    sign_client_assertion,
)
from podidentity.clouds import MICROSOFT_AUTHORITY_HOSTS
from podidentity.errors import BadRequest, ServiceError, UpstreamRefused, UpstreamUnavailable
from podidentity.imds.metrics import OP_AAD, OP_FEDERATED
from podidentity.model import SERVICE_PRINCIPAL_TYPES, AzureIdentity, IdentityType, ObjectKey, Secret
from podidentity.tokens import Token, TokenRequest

log = logging.getLogger(__name__)

SecretReader = Callable[[str, str], Awaitable[Secret]]
"""``(namespace, name) -> Secret``; raises on any failure."""
CredentialsChanged = Callable[[AzureIdentity], None]

MAX_THROTTLE_RETRIES = 3
"""When a 429 names no delay: MSAL's own default for confidential clients."""
MAX_APPS = 1024
"""MSAL applications kept; the least recently used beyond this are dropped (and rebuilt on demand)."""
_SHUT_DOWN = "the Azure AD token source is shut down"
_T = TypeVar("_T")


def resource_to_scope(resource: str) -> str:
    """The v2 scope for a v1 resource: ``https://x/`` and ``https://x`` both give ``https://x/.default``."""
    if resource.endswith("/.default"):
        return resource
    base = resource[:-1] if resource.endswith("/") else resource
    return f"{base}/.default"


class MsalTokenSource:
    """A ``TokenSource`` for service principals (identity types 1 and 2) and federated identities (3)."""

    def __init__(
        self,
        secret_reader: SecretReader,
        metrics: Metrics,
        *,
        executor_workers: int = 4,
        ca_bundle: str | None = None,
        allow_cross_namespace_secrets: bool = False,
        default_authority_host: str = "https://login.microsoftonline.com/",
        clock: Callable[[], float] = time.time,
        http_timeout_s: float = 10.0,
        on_credentials_changed: CredentialsChanged | None = None,
        assertions: AssertionProvider | None = None,
        federation: FederationSettings | None = None,
    ) -> None:
        self._read_secret = secret_reader
        self._assertions = assertions
        self._federation = federation or FederationSettings(authority_host=default_authority_host)
        self._allow_cross_namespace = allow_cross_namespace_secrets
        self._default_authority_host = default_authority_host
        self._clock = clock
        self._http_timeout_s = http_timeout_s
        self.on_credentials_changed = on_credentials_changed
        """Called on the event loop when an identity's secret material changed since its last fetch.

        Meant for the token cache: drop every token held for that identity, since they were minted with
        credentials that have since been replaced (possibly because they leaked). Settable after
        construction, since the cache is usually built after its sources. Exceptions are logged, not raised.
        """
        self._executor = ThreadPoolExecutor(max_workers=executor_workers, thread_name_prefix="nmi-msal")
        self._http = HttpClient(
            make_session(executor_workers), verify=ca_bundle or True, timeout_s=http_timeout_s
        )
        self._apps: collections.OrderedDict[_AppKey, _App] = collections.OrderedDict()
        self._building: dict[_AppKey, asyncio.Future[_App]] = {}
        self._fingerprints: dict[ObjectKey, str] = {}
        self._closed = False
        # Label children resolved once: each .labels() call takes a lock and allocates.
        self._m_duration = metrics.imds_operations.labels(operation_type=OP_AAD)
        self._m_errors = metrics.imds_errors.labels(operation_type=OP_AAD)
        self._m_secret_errors = metrics.kube_errors.labels(operation_type="get_secret")
        self._m_throttled = metrics.upstream_retries.labels(reason="throttled")
        self._m_federated_duration = metrics.imds_operations.labels(operation_type=OP_FEDERATED)
        self._m_federated_errors = metrics.imds_errors.labels(operation_type=OP_FEDERATED)

    # ------------------------------------------------------------------ public

    async def fetch(self, request: TokenRequest, *, deadline: float, tenant_id: str | None = None) -> Token:
        """A fresh token for ``request.identity`` (type 1 or 2), or ``tenant_id`` if an auxiliary tenant."""
        if self._closed:
            raise UpstreamUnavailable(_SHUT_DOWN)
        identity = request.identity
        if identity is not None and identity.type is IdentityType.FEDERATED:
            return await self._fetch_federated(request, identity, deadline)
        if identity is None or identity.type not in SERVICE_PRINCIPAL_TYPES:
            kind = "none" if identity is None else str(int(identity.type))
            raise UpstreamUnavailable(
                f"unsupported identity type {kind} for Azure AD service-principal tokens"
            )
        loop = asyncio.get_running_loop()
        started = loop.time()
        tenant = self._tenant(identity, tenant_id or request.tenant_id or None)
        authority = self._authority(identity, tenant)
        secret = await self._secret(identity, deadline)
        try:
            fingerprint = credential_fingerprint(identity, secret)
        except CredentialError as exc:
            raise UpstreamUnavailable(str(exc)) from None
        self._note_fingerprint(identity, fingerprint)
        try:
            key = _AppKey(authority, identity.client_id_folded, fingerprint)
            app = await self._app(key, lambda: self._build_app(identity, secret, key), deadline)
            token = await self._acquire(identity, app, request.resource, deadline)
        except (UpstreamRefused, UpstreamUnavailable):
            self._m_errors.inc()
            raise
        self._m_duration.observe(loop.time() - started)
        return token

    async def _fetch_federated(
        self, request: TokenRequest, identity: AzureIdentity, deadline: float
    ) -> Token:
        """Workload identity: the pod's service-account token is the client assertion (jwt-bearer)."""
        if self._assertions is None or request.pod is None or not request.service_account:
            raise UpstreamUnavailable("federated identities need the Kubernetes API (service-account tokens)")
        loop = asyncio.get_running_loop()
        started = loop.time()
        tenant = identity.tenant_id or self._federation.tenant_id
        if not tenant:
            raise UpstreamUnavailable(
                "no tenant for this federated client: set the service account's azure.workload.identity/"
                "tenant-id annotation, the identity's tenantID, or --federation-tenant-id"
            )
        # Never the identity's own adEndpoint: the assertion is a pod's service-account token, and an
        # AzureIdentity anyone may write must not choose where it is sent.
        authority = self._federation.authority_host.rstrip("/") + "/" + tenant
        try:
            assertion = await self._assertions(request, deadline)
            # One application per client and service account; its assertion callback reads the latest token.
            key = _AppKey(authority, identity.client_id_folded, "federated:" + request.service_account)
            holder = _FederatedAssertion()
            app = await self._app(key, lambda: self._build_federated_app(identity, key, holder), deadline)
            assert isinstance(app.assertion, _FederatedAssertion)
            app.assertion.current = assertion
            token = await self._acquire(identity, app, request.resource, deadline)
        except (UpstreamRefused, UpstreamUnavailable):
            self._m_federated_errors.inc()
            raise
        self._m_federated_duration.observe(loop.time() - started)
        return token

    def forget(self, identity: AzureIdentity) -> None:
        """Drop what is held for a deleted identity (its fingerprint; its apps unless shared)."""
        fingerprint = self._fingerprints.pop(identity.key, None)
        if fingerprint is not None and fingerprint not in self._fingerprints.values():
            self._drop_apps(identity.client_id_folded, fingerprint)

    def close(self) -> None:
        """Stop the worker threads; calls still running finish on their own and are discarded."""
        if self._closed:
            return
        self._closed = True
        self._apps.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._http.close_session()

    # ----------------------------------------------------------- identity bits

    def _tenant(self, identity: AzureIdentity, tenant_id: str | None) -> str:
        if tenant_id is None or tenant_id.casefold() == identity.tenant_id.casefold():
            if not identity.tenant_id:
                raise UpstreamUnavailable(
                    f"AzureIdentity {identity.key}: spec.tenantID is required for service principals"
                )
            return identity.tenant_id
        for aux in identity.auxiliary_tenant_ids:
            if aux.casefold() == tenant_id.casefold():
                return aux
        raise BadRequest(f"tenant {tenant_id!r} is not among the identity's auxiliaryTenantIDs")

    def _authority(self, identity: AzureIdentity, tenant: str) -> str:
        host = identity.ad_endpoint or self._default_authority_host
        parsed = urllib.parse.urlsplit(host)
        if parsed.scheme != "https" or not parsed.hostname:
            raise UpstreamUnavailable(f"AzureIdentity {identity.key}: spec.adEndpoint must be an https URL")
        if "/" in tenant or not tenant.strip():
            raise UpstreamUnavailable(f"AzureIdentity {identity.key}: tenant {tenant!r} is not a tenant ID")
        return host.rstrip("/") + "/" + tenant

    async def _secret(self, identity: AzureIdentity, deadline: float) -> Secret:
        try:
            ref = check_secret_namespace(identity, self._allow_cross_namespace)
        except CredentialError as exc:
            raise UpstreamUnavailable(str(exc)) from None
        try:
            async with asyncio.timeout_at(deadline):
                return await self._read_secret(ref.namespace, ref.name)
        except TimeoutError:
            self._m_secret_errors.inc()
            raise UpstreamUnavailable(
                f"failed to get Kubernetes secret {ref.namespace}/{ref.name}: timed out"
            ) from None
        except Exception as exc:
            self._m_secret_errors.inc()
            reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            raise UpstreamUnavailable(
                f"failed to get Kubernetes secret {ref.namespace}/{ref.name}: {reason}"
            ) from None

    def _note_fingerprint(self, identity: AzureIdentity, fingerprint: str) -> None:
        previous = self._fingerprints.get(identity.key)
        self._fingerprints[identity.key] = fingerprint
        if previous is None or previous == fingerprint:
            return
        log.info("credentials of AzureIdentity %s changed; dropping its Azure AD client", identity.key)
        if previous not in self._fingerprints.values():
            self._drop_apps(identity.client_id_folded, previous)
        hook = self.on_credentials_changed
        if hook is not None:
            try:
                hook(identity)
            except Exception:
                log.exception("on_credentials_changed failed for AzureIdentity %s", identity.key)

    def _drop_apps(self, client_id_folded: str, fingerprint: str) -> None:
        for key in [
            k for k in self._apps if k.client_id == client_id_folded and k.fingerprint == fingerprint
        ]:
            del self._apps[key]

    # ---------------------------------------------------------------- MSAL app

    async def _app(self, key: _AppKey, build: Callable[[], _App], deadline: float) -> _App:
        app = self._apps.get(key)
        if app is not None:
            self._apps.move_to_end(key)
            return app
        building = self._building.get(key)
        if building is None:
            building = self._submit(build)
            self._building[key] = building
            building.add_done_callback(lambda done: self._built(key, done))
        try:
            # Shielded: the build is shared by everyone waiting for this key, and is worth finishing (and
            # caching) even if this caller gives up.
            async with asyncio.timeout_at(deadline):
                return await asyncio.shield(building)
        except TimeoutError:
            raise UpstreamUnavailable("Azure AD did not answer in time (authority discovery)") from None
        except asyncio.CancelledError:
            self._raise_if_shut_down()
            raise
        except ServiceError:
            raise
        except CredentialError as exc:
            raise UpstreamUnavailable(str(exc)) from None
        except Exception as exc:
            raise failure(exc, self._http.answer_of(exc), ()) from None

    def _built(self, key: _AppKey, done: asyncio.Future[_App]) -> None:
        self._building.pop(key, None)
        if done.cancelled() or done.exception() is not None or self._closed:
            return  # The exception reached the waiters through the shield; this marks it retrieved.
        self._apps[key] = done.result()
        while len(self._apps) > MAX_APPS:
            self._apps.popitem(last=False)

    def _build_app(self, identity: AzureIdentity, secret: Secret, key: _AppKey) -> _App:
        """In a worker thread: parse the credential and build (and so discover) the MSAL application.

        Decoding an RSA PKCS#12 holds the GIL ~40 ms (cryptography validates the key and offers no way to
        skip that for PKCS#12), so the event loop stalls that long once per new credential, not per token.
        """
        credential = load_credential(identity, secret)
        client_credential: Any
        redact: tuple[str, ...] = ()
        if isinstance(credential, ClientSecretCredential):
            client_credential = credential.secret
            redact = (credential.secret,)
        else:
            # The assertion is ours, not MSAL's certificate support, for two reasons: MSAL cannot sign with EC
            # keys, and for RSA it would hand PyJWT the PEM to re-parse, which re-validates the key (~40 ms
            # of CPU with the GIL held, stalling the event loop) each time it signs. MSAL calls this for every
            # token request it sends, with the token endpoint it discovered as the audience.
            client_credential = {"client_assertion": _Assertion(credential, identity.client_id)}
        return _App(msal_app=self._msal_app(identity, key, client_credential), key=key, redact=redact)

    def _build_federated_app(
        self, identity: AzureIdentity, key: _AppKey, holder: _FederatedAssertion
    ) -> _App:
        """In a worker thread: the MSAL application of a federated client (authority discovery)."""
        msal_app = self._msal_app(identity, key, {"client_assertion": holder})
        return _App(msal_app=msal_app, key=key, redact=(), assertion=holder)

    def _msal_app(self, identity: AzureIdentity, key: _AppKey, client_credential: Any) -> Any:
        host = urllib.parse.urlsplit(key.authority).hostname or ""
        microsoft = host.casefold() in MICROSOFT_AUTHORITY_HOSTS
        self._http.begin(time.monotonic() + self._http_timeout_s)
        try:
            return msal.ConfidentialClientApplication(
                identity.client_id,
                client_credential=client_credential,
                authority=key.authority,
                validate_authority=microsoft,
                instance_discovery=None if microsoft else False,
                http_client=self._http,
                http_cache=NoStore(),
                token_cache=msal.TokenCache(),
            )
        except Exception as exc:
            self._http.attach(exc)
            raise

    # ------------------------------------------------------------- acquiring

    async def _acquire(self, identity: AzureIdentity, app: _App, resource: str, deadline: float) -> Token:
        loop = asyncio.get_running_loop()
        scope = resource_to_scope(resource)
        retries = 0
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise UpstreamUnavailable("deadline passed before Azure AD answered")
            # Each HTTP call in the thread gets at most the time left (see HttpClient).
            expires_at = time.monotonic() + remaining
            job = self._submit(self._acquire_blocking, app, scope, expires_at)
            try:
                # Leaving early (timeout or cancellation) cancels the job if it has not started: asyncio
                # chains the cancellation to the pool's future. A running job finishes and is discarded.
                async with asyncio.timeout_at(deadline):
                    reply = await job
            except TimeoutError:
                raise UpstreamUnavailable("Azure AD did not answer in time") from None
            except asyncio.CancelledError:
                self._raise_if_shut_down()
                raise
            obtained_at = self._clock()
            outcome = interpret(reply, app.redact)
            if isinstance(outcome, Throttled):
                wait = outcome.retry_after
                if retries < MAX_THROTTLE_RETRIES and loop.time() + wait < deadline:
                    retries += 1
                    self._m_throttled.inc()
                    log.info("Azure AD throttled AzureIdentity %s; retrying in %.1fs", identity.key, wait)
                    await asyncio.sleep(wait)
                    continue
                raise UpstreamUnavailable("Azure AD is throttling token requests (429)", retry_after=wait)
            return to_token(outcome, identity, resource, obtained_at)

    def _submit(self, fn: Callable[..., _T], *args: Any) -> asyncio.Future[_T]:
        if self._closed:
            raise UpstreamUnavailable(_SHUT_DOWN)
        return asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _raise_if_shut_down(self) -> None:
        """A cancellation that is not this task's own came from close() cancelling queued pool jobs."""
        task = asyncio.current_task()
        if self._closed and (task is None or task.cancelling() == 0):
            raise UpstreamUnavailable(_SHUT_DOWN) from None

    def _acquire_blocking(self, app: _App, scope: str, expires_at: float) -> Reply:
        """In a worker thread. Never raises: the loop side classifies what happened."""
        self._http.begin(expires_at)
        try:
            app.msal_app.remove_tokens_for_client()
            result = app.msal_app.acquire_token_for_client(scopes=[scope])
        except Exception as exc:
            return Reply(None, self._http.last(), exc)
        if not isinstance(result, dict):
            return Reply(None, self._http.last(), TypeError("MSAL returned no result"))
        return Reply(result, self._http.last(), None)


# ---------------------------------------------------------------------- pieces


@dataclass(frozen=True, slots=True)
class _AppKey:
    authority: str
    client_id: str
    """Case-folded."""
    fingerprint: str


@dataclass(frozen=True, slots=True)
class _App:
    msal_app: Any
    key: _AppKey
    redact: tuple[str, ...]
    """Credential strings that must never appear in an error text (belt and braces: Azure AD echoes none)."""
    assertion: _FederatedAssertion | None = None


class _FederatedAssertion:
    """MSAL's client assertion for a federated client: the service-account token the fetch put here.

    Concurrent fetches of one client and service account may each put one in; any of them is valid
    for that service account, so whichever MSAL reads is right.
    """

    def __init__(self) -> None:
        self.current = ""

    def __call__(self, context: dict[str, str]) -> str:
        return self.current


@dataclass(frozen=True, slots=True)
class FederationSettings:
    """Where federated clients get their tokens: ``<authority_host><tenant>`` (mirrors the webhook's
    ``AZURE_AUTHORITY_HOST`` and ``AZURE_TENANT_ID``)."""

    authority_host: str = "https://login.microsoftonline.com/"
    tenant_id: str = ""


AssertionProvider = Callable[[TokenRequest, float], Awaitable[str]]
"""The service-account token for a federated request (its pod), by the deadline (loop time)."""


class _Assertion:
    """MSAL calls this with ``{"client_id", "token_endpoint"}`` each time it needs a client assertion."""

    def __init__(self, credential: CertificateCredential, client_id: str) -> None:
        self._credential = credential
        self._client_id = client_id

    def __call__(self, context: dict[str, str]) -> str:
        return sign_client_assertion(
            self._credential, audience=context["token_endpoint"], client_id=self._client_id
        )
