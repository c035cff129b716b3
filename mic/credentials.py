"""MIC's own bearer token for Resource Manager.

* Managed identity (azure.json ``useManagedIdentityExtension``): IMDS through the core's
  ``ImdsTokenSource`` (retries, 429 handling, deadline), for ``userAssignedIdentityID`` or the
  system-assigned identity. The token is reused until five minutes before it expires.
* Service principal (``aadClientId``/``aadClientSecret``): client credentials through MSAL against
  the cloud's Azure AD (mic-spec §4); private clouds through ``AZURE_ENVIRONMENT_FILEPATH``.
* ``--arm-token-file``: a token read from a file on each use, for tests and break-glass.

With ``--cloudconfig``, ``ReloadingCredential`` rebuilds the credential when azure.json changes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from typing import Any, Protocol
from urllib.parse import urlsplit

import aiohttp
from prometheus_client import CollectorRegistry

from mic.settings import AzureConfig, read_azure_config
from podidentity.clouds import CloudEnvironment
from podidentity.errors import ConfigError, UpstreamRefused, UpstreamUnavailable
from podidentity.imds.limiter import UpstreamLimiter
from podidentity.imds.metrics import UpstreamMetrics
from podidentity.imds.settings import UpstreamSettings
from podidentity.imds.source import ImdsTokenSource
from podidentity.tokens import Token, TokenRequest

log = logging.getLogger("mic.credentials")

REFRESH_MARGIN_S = 300.0
TOKEN_DEADLINE_S = 30.0


class CredentialError(Exception):
    """No token: the ARM call cannot be made (retried with the VM/VMSS's backoff)."""


class ArmCredential(Protocol):
    async def token(self) -> str: ...

    def invalidate(self) -> None:
        """ARM said 401: get a new token next time."""


class ImdsArmCredential:
    def __init__(
        self,
        imds_endpoint: str,
        resource: str,
        session: aiohttp.ClientSession,
        *,
        client_id: str = "",
        user_agent: str = "aad-pod-identity/MIC",
        clock: Callable[[], float] = time.time,
    ) -> None:
        parts = urlsplit(imds_endpoint)
        if parts.scheme != "http" or not parts.hostname:
            raise ConfigError(f"--imds-endpoint must be an http:// URL, got {imds_endpoint!r}")
        settings = UpstreamSettings(metadata_ip=parts.hostname, metadata_port=parts.port or 80)
        # NMI's per-node IMDS budget applies to MIC's pod too; its metrics stay private to MIC.
        self._source = ImdsTokenSource(
            settings,
            session,
            UpstreamLimiter(settings.max_concurrent, settings.rate_per_s),
            # MIC's scrape shows ARM, not NMI's upstream families: these stay private.
            UpstreamMetrics(CollectorRegistry()),
            user_agent=user_agent,
            clock=clock,
        )
        self._request = TokenRequest(
            identity=None, resource=resource, api_version=settings.api_version, client_id=client_id
        )
        self._clock = clock
        self._token: Token | None = None
        self._lock = asyncio.Lock()

    async def token(self) -> str:
        async with self._lock:  # one fetch for every caller that finds the token stale
            if self._token is None or self._token.expires_on - self._clock() < REFRESH_MARGIN_S:
                loop = asyncio.get_running_loop()
                try:
                    self._token = await self._source.fetch(
                        self._request, deadline=loop.time() + TOKEN_DEADLINE_S
                    )
                except (UpstreamRefused, UpstreamUnavailable) as exc:
                    raise CredentialError(f"IMDS token for Resource Manager: {exc}") from exc
            return self._token.access_token

    def invalidate(self) -> None:
        self._token = None


class FileArmCredential:
    def __init__(self, path: str) -> None:
        self._path = path

    async def token(self) -> str:
        try:
            text = await asyncio.to_thread(_read, self._path)
        except OSError as exc:
            raise CredentialError(f"cannot read --arm-token-file {self._path}: {exc}") from exc
        if not text.strip():
            raise CredentialError(f"--arm-token-file {self._path} is empty")
        return text.strip()

    def invalidate(self) -> None:
        return None


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


class ServicePrincipalArmCredential:
    """azure.json's ``aadClientId``/``aadClientSecret``: client credentials through MSAL against
    ``<activeDirectoryEndpoint><tenantId>``, in a worker thread (MSAL is synchronous)."""

    def __init__(
        self,
        cloud: CloudEnvironment,
        tenant_id: str,
        client_id: str,
        secret: str,
        resource: str,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._authority = cloud.active_directory_endpoint + tenant_id
        self._microsoft = cloud.microsoft_authority
        self._client_id = client_id
        self._secret = secret
        self._scope = resource.rstrip("/") + "/.default"
        self._clock = clock
        self._token: tuple[str, float] | None = None
        self._lock = asyncio.Lock()
        self._app: Any = None

    def _acquire(self) -> dict[str, Any]:
        import msal  # only MICs with a service principal pay for it

        if self._app is None:
            # Private clouds' Azure AD is not Microsoft's: no authority validation, no discovery.
            self._app = msal.ConfidentialClientApplication(
                self._client_id,
                client_credential=self._secret,
                authority=self._authority,
                validate_authority=self._microsoft,
                instance_discovery=None if self._microsoft else False,
                timeout=TOKEN_DEADLINE_S,
            )
        result: dict[str, Any] = self._app.acquire_token_for_client(scopes=[self._scope])
        return result

    async def token(self) -> str:
        async with self._lock:
            if self._token is None or self._token[1] - self._clock() < REFRESH_MARGIN_S:
                try:
                    result = await asyncio.to_thread(self._acquire)
                except Exception as exc:  # requests' and MSAL's own errors, unreachable Azure AD
                    raise CredentialError(f"Azure AD token for Resource Manager: {exc}") from exc
                token = result.get("access_token")
                if not isinstance(token, str) or not token:
                    code = result.get("error_codes") or result.get("error") or "no access_token"
                    described = str(result.get("error_description", "")).splitlines()[0:1]
                    raise CredentialError(
                        f"Azure AD refused MIC's service principal: {code} {''.join(described)}"
                    )
                expires_in = result.get("expires_in")
                lifetime = float(expires_in) if isinstance(expires_in, int | float | str) else 3600.0
                self._token = (token, self._clock() + lifetime)
            return self._token[0]

    def invalidate(self) -> None:
        self._token = None


class ReloadingCredential:
    """The credential azure.json describes, rebuilt when the file changes (credential rotation).

    The file is looked at again at most every ``check_s`` seconds, on use. An edit that does not
    parse, or names no credential, keeps the last good credential and logs why, naming the key.
    """

    def __init__(
        self,
        path: str,
        build: Callable[[AzureConfig], ArmCredential],
        *,
        check_s: float = 5.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._path = path
        self._build = build
        self._check_s = check_s
        self._monotonic = monotonic
        self._signature = _signature(path)
        self.config = read_azure_config(path)
        self._inner = build(self.config)
        self._checked = monotonic()

    def _maybe_reload(self) -> None:
        now = self._monotonic()
        if now - self._checked < self._check_s:
            return
        self._checked = now
        signature = _signature(self._path)
        if signature == self._signature:
            return
        self._signature = signature
        try:
            config = read_azure_config(self._path)
            inner = self._build(config)
        except ConfigError as exc:
            log.error("%s changed but cannot be used; keeping the previous credential: %s", self._path, exc)
            return
        log.info("%s changed: MIC's Azure credential rebuilt", self._path)
        self.config, self._inner = config, inner

    async def token(self) -> str:
        self._maybe_reload()
        return await self._inner.token()

    def invalidate(self) -> None:
        # ARM said 401: perhaps the secret was rotated; look at the file again at once.
        self._checked = float("-inf")
        self._inner.invalidate()


def _signature(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)
