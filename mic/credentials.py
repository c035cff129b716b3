"""MIC's own bearer token for Resource Manager.

* Managed identity (azure.json ``useManagedIdentityExtension``): IMDS through the core's
  ``ImdsTokenSource`` (retries, 429 handling, deadline), for ``userAssignedIdentityID`` or the
  system-assigned identity. The token is reused until five minutes before it expires.
* ``--arm-token-file``: a token read from a file on each use, for tests and break-glass.

Service-principal credentials (``aadClientId``/``aadClientSecret``) are not implemented yet.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Protocol
from urllib.parse import urlsplit

import aiohttp
from prometheus_client import CollectorRegistry

from podidentity.errors import ConfigError, UpstreamRefused, UpstreamUnavailable
from podidentity.imds.limiter import UpstreamLimiter
from podidentity.imds.metrics import UpstreamMetrics
from podidentity.imds.settings import UpstreamSettings
from podidentity.imds.source import ImdsTokenSource
from podidentity.tokens import Token, TokenRequest

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
