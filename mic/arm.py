"""Resource Manager client for VM/VMSS identities: GET, PATCH + long-running-operation polling.

* Every call has a deadline (``request_timeout_s``). A PATCH counts as applied only when ARM says its
  operation ``Succeeded``: whatever its status (Compute answers **200** with ``provisioningState:
  Updating`` while the update still runs; other APIs 201/202), ``Azure-AsyncOperation`` is polled if
  given, else ``Location``, else the resource until its ``provisioningState`` is terminal; a 200
  without polling headers is done at once only when it says ``Succeeded``. ``Failed``/``Canceled``
  raise ``ArmError`` with the operation's error code and message, like a refused PATCH. Polls run until
  ``lro_timeout_s``, at the pace of ``Retry-After`` (else ``lro_default_poll_s``), never faster than
  ``lro_min_poll_s`` nor slower than ``LRO_MAX_POLL_S``.
* 429 closes a gate for that one VM/VMSS and that kind of call (read or write) until Retry-After
  passes; calls meanwhile fail at once with ``ArmThrottled`` and make no request (the original's gates
  were per client, so one hot scale set stalled all others, mic-spec §6.6). 429 is not retried
  here: the reconciler retries the VM/VMSS when the gate opens.
* 401 drops the cached token; errors carry ARM's ``error.code`` so callers never parse text, except
  for the identity IDs ARM names only in the message of ``LinkedAuthorizationFailed``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from email.utils import parsedate_to_datetime
from typing import Any, Literal
from urllib.parse import urlsplit

import aiohttp

from mic.credentials import ArmCredential, CredentialError
from mic.metrics import OP_VM_GET, OP_VM_UPDATE, OP_VMSS_GET, OP_VMSS_UPDATE, MicMetrics
from mic.model import ArmTarget
from mic.settings import ArmSettings

log = logging.getLogger("mic.arm")

LINKED_AUTHORIZATION_FAILED = "LinkedAuthorizationFailed"
FAILED_IDENTITY_OPERATION = "FailedIdentityOperation"
MAX_BODY_BYTES = 4 * 1024 * 1024
LRO_MAX_POLL_S = 60.0
"""Upper bound on one pause between polls, whatever ``Retry-After`` asks."""
_FAILED = ("failed", "canceled")


class ArmError(Exception):
    def __init__(self, status: int, code: str, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(f"{status} {code}: {message}" if message else f"{status} {code}")
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after


class ArmThrottled(ArmError):
    """A 429, or a call refused locally because the resource's gate is still closed."""

    def __init__(self, until: float, message: str) -> None:
        super().__init__(429, "TooManyRequests", message)
        self.until = until
        """``clock()`` time the gate opens."""


_IDENTITY_ID = re.compile(
    r"/subscriptions/[^/'\",\s]+/resourcegroups/[^/'\",\s]+/providers/microsoft\.managedidentity/"
    r"userassignedidentities/[^/'\",\s]+",
    re.IGNORECASE,
)


def identities_named(error: ArmError) -> set[str]:
    """Folded identity IDs an authorisation error names (the original parsed the same text)."""
    return {m.group(0).casefold() for m in _IDENTITY_ID.finditer(error.message)}


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


Access = Literal["read", "write"]


class ArmClient:
    def __init__(
        self,
        settings: ArmSettings,
        session: aiohttp.ClientSession,
        credential: ArmCredential,
        metrics: MicMetrics,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Any] = asyncio.sleep,
    ) -> None:
        self._settings = settings
        self._session = session
        self._credential = credential
        self._metrics = metrics
        self._clock = clock
        self._sleep = sleep
        self._base = settings.endpoint.rstrip("/")
        self._host = urlsplit(self._base).netloc
        self._gates: dict[tuple[tuple[str, str, str, str], Access], float] = {}

    def gate(self, target: ArmTarget) -> float:
        """``clock()`` time until which calls on ``target`` are held back (0: open)."""
        now = self._clock()
        until = max(
            self._gates.get((target.folded, "read"), 0.0), self._gates.get((target.folded, "write"), 0.0)
        )
        return until if until > now else 0.0

    async def get(self, target: ArmTarget) -> dict[str, Any]:
        op = OP_VMSS_GET if target.is_vmss else OP_VM_GET
        started = self._clock()
        try:
            status, body, _ = await self._call("GET", target, "read", None)
        except ArmError as exc:
            self._failed(op, exc)
            raise
        self._succeeded(op, started)
        if not isinstance(body, dict):
            raise ArmError(status, "InvalidResponse", "the resource is not a JSON object")
        return body

    async def patch(self, target: ArmTarget, body: Mapping[str, Any]) -> None:
        """PATCH and follow the operation to its end; returns only once ARM reports it ``Succeeded``.

        ``ArmError`` if the PATCH was refused, or its operation ended ``Failed``/``Canceled`` (with the
        operation's error code and message), or did not end within ``lro_timeout_s``.
        """
        op = OP_VMSS_UPDATE if target.is_vmss else OP_VM_UPDATE
        started = self._clock()
        try:
            _, answer, headers = await self._call("PATCH", target, "write", body)
            await self._wait(target, answer, headers)
        except ArmError as exc:
            self._failed(op, exc)
            raise
        self._succeeded(op, started)

    def _succeeded(self, op: str, started: float) -> None:
        self._metrics.cloud_duration[op].observe(self._clock() - started)
        self._metrics.arm_requests.labels(op, "success").inc()

    def _failed(self, op: str, exc: ArmError) -> None:
        self._metrics.cloud_errors[op].inc()
        self._metrics.arm_requests.labels(op, outcome_of(exc)).inc()

    async def _wait(self, target: ArmTarget, answer: Any, headers: Mapping[str, str]) -> None:
        """Follow a PATCH to its end, whatever its status (Compute answers 200 while still Updating):
        the ``Azure-AsyncOperation`` URL if given, else the ``Location`` URL, else the resource itself
        until its ``provisioningState`` is terminal."""
        async_url = _header(headers, "Azure-AsyncOperation")
        location = _header(headers, "Location")
        if not async_url and not location and _provisioning(answer) == "succeeded":
            return  # finished synchronously
        deadline = self._clock() + self._settings.lro_timeout_s
        delay = parse_retry_after(_header(headers, "Retry-After"))
        while True:
            pause = self._settings.lro_default_poll_s if delay is None else delay
            pause = min(max(pause, self._settings.lro_min_poll_s), LRO_MAX_POLL_S)
            pause = min(pause, deadline - self._clock())
            if pause <= 0:
                raise ArmError(0, "OperationTimeout", f"{target}: operation not finished in time")
            await self._sleep(pause)
            if async_url:
                _, body, poll_headers = await self._request("GET", async_url, None, target, "read")
                state = str(body.get("status", "")) if isinstance(body, dict) else ""
                if state.casefold() == "succeeded":
                    return
                if state.casefold() in _FAILED:
                    code, message = _error_fields(
                        body.get("error") if isinstance(body, dict) else None, state
                    )
                    raise ArmError(200, code, message or f"{target}: operation {state}")
            elif location:
                # 202 while running; then 200/204 (the error status if it failed: raised by _request).
                status, body, poll_headers = await self._request("GET", location, None, target, "read")
                if status != 202:
                    _raise_if_failed(target, body)
                    return
            else:
                _, body, poll_headers = await self._call("GET", target, "read", None)
                state = _provisioning(body)
                if state in ("", "succeeded"):  # no provisioningState: finished (ARM's rule)
                    return
                _raise_if_failed(target, body)
            delay = parse_retry_after(_header(poll_headers, "Retry-After"))

    async def _call(
        self, method: str, target: ArmTarget, access: Access, body: Mapping[str, Any] | None
    ) -> tuple[int, Any, Mapping[str, str]]:
        url = f"{self._base}{target.path}?api-version={self._settings.api_version}"
        return await self._request(method, url, body, target, access)

    async def _request(
        self, method: str, url: str, body: Mapping[str, Any] | None, target: ArmTarget, access: Access
    ) -> tuple[int, Any, Mapping[str, str]]:
        key = (target.folded, access)
        until = self._gates.get(key, 0.0)
        if until > self._clock():
            raise ArmThrottled(until, f"{target}: throttled for another {until - self._clock():.1f}s")
        headers = {"Accept": "application/json"}
        if urlsplit(url).netloc == self._host:  # never hand the token to another host
            try:
                headers["Authorization"] = f"Bearer {await self._credential.token()}"
            except CredentialError as exc:
                raise ArmError(401, "NoToken", str(exc)) from exc
        data = None
        if body is not None:
            data = json.dumps(body, separators=(",", ":")).encode()
            headers["Content-Type"] = "application/json"
        try:
            async with (
                asyncio.timeout(self._settings.request_timeout_s),
                self._session.request(
                    method,
                    url,
                    data=data,
                    headers=headers,
                    allow_redirects=False,
                    timeout=aiohttp.ClientTimeout(total=None, sock_connect=self._settings.connect_timeout_s),
                ) as resp,
            ):
                raw = await resp.content.read(MAX_BODY_BYTES)
                status = resp.status
                resp_headers = dict(resp.headers)
        except TimeoutError as exc:
            raise ArmError(
                0, "Timeout", f"{method} {target}: no answer in {self._settings.request_timeout_s}s"
            ) from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise ArmError(0, "Transport", f"{method} {target}: {exc or type(exc).__name__}") from exc
        parsed: Any = None
        if raw:
            try:
                parsed = json.loads(raw)
            except ValueError:
                parsed = None
        if status < 400:
            return status, parsed, resp_headers
        retry_after = parse_retry_after(resp_headers.get("Retry-After"))
        code, message = _error_fields(parsed.get("error") if isinstance(parsed, dict) else None, str(status))
        if status == 401:
            self._credential.invalidate()
        if status == 429:
            wait = retry_after if retry_after is not None else self._settings.throttle_default_s
            until = self._clock() + wait
            self._gates[key] = until
            log.warning("%s %s: throttled by ARM; no %s calls for %.1fs", method, target, access, wait)
            raise ArmThrottled(until, f"{method} {target}: 429 {message}")
        raise ArmError(status, code, message, retry_after=retry_after)


def outcome_of(exc: ArmError) -> str:
    """A bounded label for a failed call: throttled, transport, refused (4xx), error (5xx), failed."""
    if isinstance(exc, ArmThrottled):
        return "throttled"
    if exc.status == 0:
        return "transport"
    if 400 <= exc.status < 500:
        return "refused"
    if exc.status >= 500:
        return "error"
    return "failed"  # the operation itself ended Failed or Canceled


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is None:  # a plain dict from a test double: match case-insensitively
        value = next((v for k, v in headers.items() if k.casefold() == name.casefold()), None)
    return value or None


def _provisioning(body: Any) -> str:
    """A resource's folded ``properties.provisioningState`` ("" when absent or not a resource)."""
    props = body.get("properties") if isinstance(body, dict) else None
    return str(props.get("provisioningState") or "").casefold() if isinstance(props, dict) else ""


def _raise_if_failed(target: ArmTarget, body: Any) -> None:
    state = _provisioning(body)
    if state in _FAILED:
        code, message = _error_fields(body.get("error") if isinstance(body, dict) else None, state.title())
        raise ArmError(200, code, message or f"{target}: provisioningState {state.title()}")


def _error_fields(error: Any, fallback: str) -> tuple[str, str]:
    if isinstance(error, dict):
        return str(error.get("code") or fallback), str(error.get("message") or "")
    return fallback, ""
