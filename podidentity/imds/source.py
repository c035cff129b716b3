"""Managed-identity tokens from IMDS, retried within the caller's deadline (nmi-spec §3.5, §9.4).

Unlike adal's IMDS client in the original, every wait (the limiter, each attempt, each backoff)
is bounded by the deadline of the request being served, a backoff that would end past it is not
slept at all, and a 429 pauses every caller on the node because the IMDS budget is per VM.

Status rule: a permanent refusal (400 "Identity not found", 401, 403, 501, 505, an unreadable
200) is ``UpstreamRefused`` (403 to the pod, like the original). A transient status (404 and 410
"IMDS updating", 408, 429, other 5xx) that persists until the attempts or the deadline run out is
``UpstreamUnavailable`` (503, with the upstream's Retry-After when it gave one), because SDKs
retry a 503 and give up on a 403, and the condition is one they should retry. Transport errors
and timeouts are ``UpstreamUnavailable`` too. No description ever carries the upstream URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp
from yarl import URL

from podidentity.errors import UpstreamRefused, UpstreamUnavailable
from podidentity.imds.limiter import UpstreamLimiter
from podidentity.imds.metrics import OP_MSI, OP_MSI_USER_ASSIGNED, UpstreamMetrics
from podidentity.imds.settings import UpstreamSettings
from podidentity.tokens import Token, TokenRequest, number

log = logging.getLogger("nmi.tokens.imds")

TOKEN_PATH = "/metadata/identity/oauth2/token"
MAX_BODY_BYTES = 64 * 1024
"""An IMDS token response is a few KiB; anything far larger is not one."""
MAX_DESCRIPTION_CHARS = 300
MAX_RETRY_AFTER_S = 70.0
"""IMDS documents 410 as over within 70 s; a larger Retry-After must not stall the node for longer."""
# 501 and 505 say the request can never succeed as sent; IMDS's "retry 5xx" advice cannot mean them.
_PERMANENT_5XX = frozenset({501, 505})
# IMDS answers 404 on its token path only while it is updating (Azure's retry guidance).
_TRANSIENT_4XX = {404: "404", 408: "408", 410: "410", 429: "429"}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
_ERROR_CODE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_DATE_FORMATS = (
    "%m/%d/%Y %I:%M:%S %p %z",
    "%m/%d/%Y %H:%M:%S %z",
    "%m/%d/%Y %I:%M:%S %p",
    "%m/%d/%Y %H:%M:%S",
)


class _Answer:
    """One upstream response, read whole."""

    __slots__ = ("body", "retry_after", "status")

    def __init__(self, status: int, body: bytes, retry_after: float | None) -> None:
        self.status = status
        self.body = body
        self.retry_after = retry_after


class _BadBody(Exception):
    pass


class ImdsTokenSource:
    """``TokenSource`` for user-assigned (and, for pass-through, system-assigned) managed identities."""

    def __init__(
        self,
        settings: UpstreamSettings,
        session: aiohttp.ClientSession,
        limiter: UpstreamLimiter,
        metrics: UpstreamMetrics,
        *,
        user_agent: str,
        clock: Callable[[], float] = time.time,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self._settings = settings
        self._session = session
        self._limiter = limiter
        self._clock = clock
        self._loop = loop
        self._url = URL.build(
            scheme="http", host=settings.metadata_ip, port=settings.metadata_port, path=TOKEN_PATH
        )
        self._headers = {"Metadata": "true", "User-Agent": user_agent}
        self._backoff = settings.retry_backoff_s
        self._recovered = asyncio.Event()
        # Resolved once: .labels() locks and allocates on every call.
        self._durations = {op: metrics.imds_operations.labels(op) for op in (OP_MSI, OP_MSI_USER_ASSIGNED)}
        self._errors = {op: metrics.imds_errors.labels(op) for op in (OP_MSI, OP_MSI_USER_ASSIGNED)}
        self._in_flight = metrics.upstream_in_flight
        reasons = ("timeout", "transport", "5xx", *_TRANSIENT_4XX.values())
        self._retries = {reason: metrics.upstream_retries.labels(reason) for reason in reasons}

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    async def fetch(self, request: TokenRequest, *, deadline: float) -> Token:
        query = _query(request, self._settings.api_version)
        op = OP_MSI if len(query) == 2 else OP_MSI_USER_ASSIGNED
        started = self.loop.time()
        try:
            token = await self._fetch(query, request, deadline)
        except (UpstreamRefused, UpstreamUnavailable):
            self._errors[op].inc()
            raise
        self._durations[op].observe(self.loop.time() - started)
        return token

    async def _fetch(self, query: Mapping[str, str], request: TokenRequest, deadline: float) -> Token:
        loop = self.loop
        attempts = len(self._backoff) + 1
        for attempt in range(1, attempts + 1):
            retry_after: float | None = None
            try:
                answer = await self._attempt(query, deadline)
            except UpstreamUnavailable:
                raise
            except TimeoutError:
                reason = "timeout"
                failure: UpstreamRefused | UpstreamUnavailable = UpstreamUnavailable(
                    "the metadata service did not answer in time"
                )
            except (aiohttp.ClientError, OSError, asyncio.IncompleteReadError) as exc:
                reason = "transport"
                failure = UpstreamUnavailable(
                    f"the metadata service could not be reached ({type(exc).__name__})"
                )
            else:
                if answer.status == 200:
                    self._answered()
                    return self._token(answer, request)
                transient = _transient(answer.status)
                error, description = _error_of(answer)
                if transient is None:
                    raise UpstreamRefused(error, description, upstream_status=answer.status)
                reason = transient
                retry_after = answer.retry_after
                if answer.status == 429:
                    # The budget is the VM's: everyone on the node backs off, not just this caller.
                    self._limiter.pause_until(loop.time() + self._pause_for(attempt, retry_after))
                failure = UpstreamUnavailable(
                    f"the metadata service kept answering {answer.status} ({error}: {description})",
                    retry_after=retry_after,
                )
            wait = self._backoff[attempt - 1] if attempt < attempts else math.inf
            if retry_after is not None:
                wait = max(wait, retry_after)
            if loop.time() + wait >= deadline:
                log.info("IMDS attempt #%d/%d failed (%s); escalating", attempt, attempts, reason)
                raise failure
            log.info("IMDS attempt #%d/%d failed (%s); will retry in %.2fs", attempt, attempts, reason, wait)
            self._retries[reason].inc()
            await self._back_off(wait)
        raise AssertionError("unreachable: the last attempt always returns or raises")

    async def _attempt(self, query: Mapping[str, str], deadline: float) -> _Answer:
        # Ranked by what is fetched, so each waiting identity gets its turn (see the limiter).
        async with self._limiter.slot(deadline=deadline, key=tuple(query.items())):
            loop = self.loop
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise UpstreamUnavailable("no time left to ask the metadata service")
            per_attempt = min(self._settings.request_timeout_s, remaining)
            # The session's own default timeout must not cut the attempt shorter or let it run longer.
            timeout = aiohttp.ClientTimeout(
                total=None, sock_connect=min(self._settings.connect_timeout_s, per_attempt)
            )
            sends = 0

            async def every_send_counts(
                req: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType
            ) -> aiohttp.ClientResponse:
                # aiohttp sends an idempotent request once more when its connection breaks: that is
                # another call to IMDS, so it spends the budget as any other (a reset storm must not
                # double the node's rate).
                nonlocal sends
                sends += 1
                if sends > 1:
                    await self._limiter.charge(deadline=deadline)
                return await handler(req)

            self._in_flight.inc()
            try:
                async with asyncio.timeout(per_attempt):
                    async with self._session.get(
                        self._url.with_query(query),
                        headers=self._headers,
                        allow_redirects=False,
                        timeout=timeout,
                        middlewares=(every_send_counts,),
                    ) as response:
                        body = await _read_capped(response)
                        return _Answer(response.status, body, self._retry_after(response.headers))
            finally:
                self._in_flight.dec()

    def _answered(self) -> None:
        # IMDS answers again: every fetch sleeping in its backoff tries at once (the limiter still
        # paces them), so a pod whose fetch failed during the outage does not wait out a 4 s step.
        recovered, self._recovered = self._recovered, asyncio.Event()
        recovered.set()

    async def _back_off(self, wait: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                await self._recovered.wait()

    def _pause_for(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return retry_after
        if not self._backoff:
            return 1.0
        return self._backoff[min(attempt, len(self._backoff)) - 1]

    def _retry_after(self, headers: Mapping[str, str]) -> float | None:
        value = headers.get("Retry-After")
        if not value:
            return None
        value = value.strip()
        try:
            seconds = float(value)
        except ValueError:
            try:
                seconds = parsedate_to_datetime(value).timestamp() - self._clock()
            except (TypeError, ValueError, IndexError):
                return None
        if math.isnan(seconds):
            return None
        return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)

    def _token(self, answer: _Answer, request: TokenRequest) -> Token:
        fallback_client = request.identity.client_id if request.identity is not None else request.client_id
        try:
            return parse_token(
                answer.body, now=self._clock(), resource=request.resource, client_id=fallback_client
            )
        except _BadBody as exc:
            raise UpstreamRefused("upstream_error", str(exc), upstream_status=answer.status) from None


def _query(request: TokenRequest, default_api_version: str) -> dict[str, str]:
    """The upstream query; its length tells the operation (two keys: system-assigned)."""
    query = {"api-version": request.api_version or default_api_version, "resource": request.resource}
    if request.identity is not None:
        # Always the identity's own client ID, whatever the pod asked by (nmi-spec §3.5).
        query["client_id"] = request.identity.client_id
    elif request.client_id:
        query["client_id"] = request.client_id
    elif request.resource_id:
        query["msi_res_id"] = request.resource_id
    return query


def _transient(status: int) -> str | None:
    """The retry reason for a status worth retrying, else ``None``."""
    if status in _TRANSIENT_4XX:
        return _TRANSIENT_4XX[status]
    if 500 <= status <= 599 and status not in _PERMANENT_5XX:
        return "5xx"
    return None


async def _read_capped(response: aiohttp.ClientResponse) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(16384):
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise UpstreamUnavailable("the metadata service answered with an oversized body")
        chunks.append(chunk)
    return b"".join(chunks)


def _clean(text: str) -> str:
    text = _CONTROL.sub(" ", text).strip()
    if len(text) > MAX_DESCRIPTION_CHARS:
        return text[: MAX_DESCRIPTION_CHARS - 3] + "..."
    return text


def _error_of(answer: _Answer) -> tuple[str, str]:
    """IMDS's ``error`` code and description, or a generic pair when the body is not its JSON."""
    generic = ("upstream_error", f"the metadata service answered HTTP {answer.status}")
    try:
        body = json.loads(answer.body)
    except (ValueError, UnicodeDecodeError):
        return generic
    if not isinstance(body, dict):
        return generic
    error: Any = body.get("error")
    description: Any = body.get("error_description")
    if isinstance(error, dict):  # the ARM shape: {"error": {"code": ..., "message": ...}}
        error, description = error.get("code"), error.get("message")
    if not isinstance(error, str) or not error:
        return generic
    if not _ERROR_CODE.match(error):
        # IMDS's instance API puts a sentence in "error"; keep it as the description.
        return "upstream_error", _clean(error)
    if not isinstance(description, str) or not description.strip():
        return error, generic[1]
    return error, _clean(description)


def _epoch(value: Any) -> float | None:
    """Epoch seconds from a number, a numeric string, or the date strings some IMDS-likes send."""
    seconds = number(value)
    if seconds is not None or not isinstance(value, str):
        return seconds
    text = value.strip()
    for fmt in _DATE_FORMATS:
        try:
            parsed = datetime.strptime(text, fmt)
        except ValueError:
            continue
        return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()


def parse_token(body: bytes, *, now: float, resource: str, client_id: str) -> Token:
    """A ``Token`` from an IMDS 200 body; ``resource`` and ``client_id`` fill fields IMDS left out."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise _BadBody("the metadata service answered 200 with a body that is not JSON") from None
    if not isinstance(data, dict):
        raise _BadBody("the metadata service answered 200 without a token object")
    access_token = data.get("access_token")
    if not isinstance(access_token, str) or not access_token:
        raise _BadBody("the metadata service answered 200 without an access_token")
    expires_on = _epoch(data.get("expires_on"))
    if expires_on is None:
        expires_in = number(data.get("expires_in"))
        if expires_in is None:
            raise _BadBody("the metadata service answered 200 without expires_on or expires_in")
        expires_on = now + expires_in
    not_before = _epoch(data.get("not_before"))
    ext_expires_in = number(data.get("ext_expires_in"))
    return Token(
        access_token=access_token,
        resource=_text(data.get("resource")) or resource,
        token_type=_text(data.get("token_type")) or "Bearer",
        client_id=_text(data.get("client_id")) or client_id,
        expires_on=expires_on,
        not_before=not_before if not_before is not None else now,
        obtained_at=now,
        ext_expires_in=int(ext_expires_in) if ext_expires_in is not None else None,
    )


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""
