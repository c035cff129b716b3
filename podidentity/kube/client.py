"""Requests and watch streams to the Kubernetes API over one ``aiohttp`` session, rate limited.

Why not ``kubernetes_asyncio``'s ``ApiClient``/``watch.Watch``: importing any part of it imports
every generated API and model class (~950 modules): aiohttp + PyYAML 34.5 MB VmRSS, plus
``kubernetes_asyncio.client`` 72.1 MB, i.e. +37.6 MB and +0.35 s on every node, for typed models
NMI never uses (it parses the JSON shape itself, ``podidentity.model``). So requests go through one
``aiohttp.ClientSession`` and watch streams are split into lines here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any

import aiohttp

from podidentity.kube.config import Connection
from podidentity.kube.errors import (
    KubeApiError,
    KubeUnavailable,
    WatchStalled,
    api_error_from_status,
    retry_after_of,
)
from podidentity.kube.settings import KubeSettings

log = logging.getLogger("podidentity.kube")

_MAX_ERROR_BODY = 4096


# --- rate limiting ---------------------------------------------------------------------------


class RateLimiter:
    """Token bucket, ``qps`` sustained and ``burst`` at once; callers queue in arrival order.

    Each caller takes a token at once, possibly going negative, and sleeps until its token would
    have been refilled: callers are served in order without a wake-up storm (client-go's shape).
    """

    def __init__(self, qps: float, burst: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._qps = qps
        self._burst = float(max(1, burst))
        self._tokens = self._burst
        self._clock = clock
        self._last = clock()

    async def acquire(self) -> None:
        if self._qps <= 0:
            return
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._last) * self._qps)
        self._last = now
        self._tokens -= 1.0
        if self._tokens < 0:
            await asyncio.sleep(-self._tokens / self._qps)


# --- the client ------------------------------------------------------------------------------


class KubeClient:
    """One ``ClientSession`` for every request NMI makes to the API server."""

    def __init__(
        self,
        connection: Connection,
        settings: KubeSettings,
        *,
        session: aiohttp.ClientSession | None = None,  # None: own one (tests may share)
    ) -> None:
        self._connection = connection
        self._settings = settings
        self._limiter = RateLimiter(settings.qps, settings.burst)
        self._own_session = session is None
        self._session = session or aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                ssl=connection.ssl_context if connection.ssl_context is not None else True,
                limit=32,
                keepalive_timeout=30.0,
            ),
            headers={"User-Agent": settings.user_agent, "Accept": "application/json"},
            # JSON bodies only: skip aiohttp's cookie handling.
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        self._extra: dict[str, Any] = {}
        if connection.tls_server_name:
            self._extra["server_hostname"] = connection.tls_server_name
        if connection.proxy:
            self._extra["proxy"] = connection.proxy

    @property
    def connection(self) -> Connection:
        return self._connection

    async def close(self) -> None:
        if self._own_session:
            await self._session.close()

    async def _headers(self) -> dict[str, str]:
        value = await self._connection.auth.header()
        return {"Authorization": value} if value else {}

    def _url(self, path: str) -> str:
        return self._connection.server + path

    async def get(self, path: str, params: Mapping[str, str] | None = None) -> dict[str, Any]:
        """GET a JSON object; ``KubeApiError`` for an error status, ``KubeUnavailable`` otherwise."""
        body = await self._exchange("GET", path, params=params, ok=(200,))
        try:
            result = json.loads(body)
        except ValueError as exc:
            raise KubeUnavailable(f"GET {path}: response is not JSON") from exc
        if not isinstance(result, dict):
            raise KubeUnavailable(f"GET {path}: response is not a JSON object")
        return result

    async def write(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        *,
        content_type: str = "application/json",
    ) -> dict[str, Any]:
        """POST/PUT/PATCH/DELETE with a JSON body; returns the object (or Status) the server sent.

        Errors as ``get``. Writes are never retried here: the caller knows whether a repeat is safe.
        """
        data: bytes | None = None
        if body is not None:
            data = json.dumps(body, separators=(",", ":")).encode()
        raw = await self._exchange(
            method,
            path,
            data=data,
            content_type=content_type if data is not None else None,
            ok=(200, 201, 202),
        )
        result = _json_or_none(raw)
        return result if isinstance(result, dict) else {}

    async def _exchange(
        self,
        method: str,
        path: str,
        *,
        ok: tuple[int, ...],
        params: Mapping[str, str] | None = None,
        data: bytes | None = None,
        content_type: str | None = None,
    ) -> bytes:
        """One rate-limited request, bounded by ``request_timeout_s``; the body of an ``ok`` answer."""
        await self._limiter.acquire()
        headers = await self._headers()
        if content_type is not None:
            headers["Content-Type"] = content_type
        with self._reaching(f"{method} {path}"):
            async with (
                asyncio.timeout(self._settings.request_timeout_s),
                self._session.request(
                    method,
                    self._url(path),
                    params=params,
                    data=data,
                    headers=headers,
                    timeout=aiohttp.ClientTimeout(total=None, sock_connect=self._settings.connect_timeout_s),
                    **self._extra,
                ) as resp,
            ):
                raw = await resp.read()
                status = resp.status
                retry_after = retry_after_of(resp.headers)
        if status not in ok:
            raise self._refused(status, raw, retry_after)
        return raw

    @contextlib.contextmanager
    def _reaching(self, what: str) -> Iterator[None]:
        """Timeouts and transport failures become ``KubeUnavailable`` naming ``what``."""
        try:
            yield
        except TimeoutError as exc:
            raise KubeUnavailable(f"{what}: no answer within {self._settings.request_timeout_s}s") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise KubeUnavailable(f"{what}: {exc or type(exc).__name__}") from exc

    def _refused(self, status: int, body: bytes, retry_after: float | None) -> KubeApiError:
        if status == 401:
            self._connection.auth.invalidate()
        return api_error_from_status(status, _json_or_none(body[:_MAX_ERROR_BODY]), retry_after)

    @contextlib.asynccontextmanager
    async def watch(
        self, path: str, params: Mapping[str, str], *, inactivity_timeout_s: float
    ) -> AsyncIterator[WatchStream]:
        """Open a watch; the stream yields raw ``{"type", "object"}`` events until the server ends it."""
        await self._limiter.acquire()
        headers = await self._headers()
        with self._reaching(f"watch {path}"):
            async with asyncio.timeout(self._settings.request_timeout_s):
                resp = await self._session.get(
                    self._url(path),
                    params=params,
                    headers=headers,
                    # The body never ends on its own: inactivity is policed per read by WatchStream.
                    timeout=aiohttp.ClientTimeout(total=None, sock_connect=self._settings.connect_timeout_s),
                    **self._extra,
                )
        try:
            if resp.status != 200:
                try:
                    async with asyncio.timeout(self._settings.request_timeout_s):
                        body = await resp.content.read(_MAX_ERROR_BODY)
                except (TimeoutError, aiohttp.ClientError, OSError):
                    body = b""
                raise self._refused(resp.status, body, retry_after_of(resp.headers))
            yield WatchStream(resp, inactivity_timeout_s, self._settings.max_event_bytes, path)
        finally:
            # Never hand a half-read watch body back to the pool: close the connection.
            resp.close()


def _json_or_none(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None


class WatchStream:
    """Newline-delimited JSON events from one watch response, with an inactivity deadline per read."""

    __slots__ = ("_inactivity", "_lines", "_max_bytes", "_path", "_resp", "_tail")

    def __init__(
        self, resp: aiohttp.ClientResponse, inactivity_timeout_s: float, max_bytes: int, path: str
    ) -> None:
        self._resp = resp
        self._inactivity = inactivity_timeout_s
        self._max_bytes = max_bytes
        self._path = path
        self._lines: deque[bytes] = deque()
        self._tail = b""

    def __aiter__(self) -> WatchStream:
        return self

    async def __anext__(self) -> dict[str, Any]:
        while not self._lines:
            await self._fill()
        return self._decode(self._lines.popleft())

    async def _fill(self) -> None:
        try:
            async with asyncio.timeout(self._inactivity):
                chunk = await self._resp.content.readany()
        except TimeoutError:
            raise WatchStalled(f"watch {self._path}: no event for {self._inactivity}s") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise KubeUnavailable(f"watch {self._path}: stream broke: {exc or type(exc).__name__}") from exc
        if not chunk:
            if self._tail.strip():
                raise KubeUnavailable(f"watch {self._path}: stream ended in the middle of an event")
            raise StopAsyncIteration
        # One split per chunk (not per line) keeps a burst of small events linear in its size.
        parts = (self._tail + chunk).split(b"\n")
        self._tail = parts.pop()
        if len(self._tail) > self._max_bytes:
            raise KubeUnavailable(f"watch {self._path}: event longer than {self._max_bytes} bytes")
        self._lines.extend(p for p in parts if p.strip())

    def _decode(self, line: bytes) -> dict[str, Any]:
        try:
            event = json.loads(line)
        except ValueError:
            raise KubeUnavailable(f"watch {self._path}: event is not JSON") from None
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            raise KubeUnavailable(f"watch {self._path}: event without a type")
        return event
