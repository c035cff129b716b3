"""Forwarding non-token IMDS requests (and exception pods' token requests) to the real IMDS.

Unlike the original (nmi-spec §2.8): hop-by-hop headers are stripped both ways, no
``X-Forwarded-For`` or similar is added or passed on, redirects are not followed, every call has
a timeout, large bodies are refused, and outcomes are counted.
"""

from __future__ import annotations

import asyncio

import aiohttp
from yarl import URL

from nmi.metrics import Metrics
from podidentity.errors import UpstreamUnavailable
from podidentity.http.request import Request
from podidentity.http.response import Response
from podidentity.imds.settings import UpstreamSettings

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        # Never tell IMDS (or let a pod tell IMDS) who is behind the node.
        "forwarded",
        "x-forwarded-for",
        "x-forwarded-host",
        "x-forwarded-proto",
        "x-real-ip",
    }
)
# Headers the server sets itself on every response.
_OWN_RESPONSE_HEADERS = frozenset({"date", "server"})
MAX_RESPONSE_BYTES = 1024 * 1024
# aiohttp adds these unless told not to; a proxy should send only what the client sent.
_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")


def _strip(headers: dict[str, str]) -> dict[str, str]:
    listed = {h.strip().lower() for h in headers.get("connection", "").split(",") if h.strip()}
    return {k: v for k, v in headers.items() if k not in HOP_BY_HOP and k not in listed}


class ImdsProxy:
    def __init__(self, settings: UpstreamSettings, session: aiohttp.ClientSession, metrics: Metrics) -> None:
        self._session = session
        self._timeout = aiohttp.ClientTimeout(
            total=settings.proxy_timeout_s, sock_connect=settings.connect_timeout_s
        )
        self._host = settings.metadata_ip
        self._port = settings.metadata_port
        self._outcomes = {
            name: metrics.proxy_requests.labels(name) for name in ("ok", "error", "timeout", "too_large")
        }

    async def forward(self, request: Request, path: str) -> Response:
        url = URL.build(
            scheme="http",
            host=self._host,
            port=self._port,
            path=path,
            query_string=request.query,
            encoded=True,
        )
        headers = _strip(request.headers)
        skip = [h for h in _AUTO_HEADERS if h.lower() not in headers]
        try:
            async with self._session.request(
                request.method,
                url,
                headers=headers,
                data=request.body or None,
                allow_redirects=False,
                timeout=self._timeout,
                skip_auto_headers=skip,
                auto_decompress=False,
            ) as upstream:
                body = await self._read_capped(upstream)
                out = tuple(
                    (k.encode("latin-1"), v.encode("latin-1"))
                    for k, v in upstream.headers.items()
                    if k.lower() not in HOP_BY_HOP and k.lower() not in _OWN_RESPONSE_HEADERS
                )
                self._outcomes["ok"].inc()
                return Response(upstream.status, body, out)
        except TimeoutError:
            self._outcomes["timeout"].inc()
            raise UpstreamUnavailable("the metadata service did not answer in time") from None
        except (aiohttp.ClientError, OSError, asyncio.IncompleteReadError):
            self._outcomes["error"].inc()
            raise UpstreamUnavailable("the metadata service could not be reached") from None

    async def _read_capped(self, upstream: aiohttp.ClientResponse) -> bytes:
        # content.read(n) returns what has arrived so far, not n bytes: loop until EOF.
        chunks: list[bytes] = []
        size = 0
        while chunk := await upstream.content.read(65536):
            size += len(chunk)
            if size > MAX_RESPONSE_BYTES:
                self._outcomes["too_large"].inc()
                raise UpstreamUnavailable("the metadata service answered with an oversized body")
            chunks.append(chunk)
        return b"".join(chunks)
