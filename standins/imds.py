"""A stand-in for Azure IMDS: a real HTTP server that answers like 169.254.169.254 does.

Wire behaviour kept from IMDS: the ``Metadata: true`` header (exact, lower case) on every path;
``api-version`` required; identities chosen by ``client_id`` / ``msi_res_id`` (alias
``mi_res_id``) / ``object_id``, case-insensitively; with none named, the system-assigned
identity, else the only user-assigned one, else IMDS's "Multiple user assigned identities exist"
400; an unknown identity is 400 "Identity not found"; token bodies hold only string values;
throttling above N concurrent or R per second is 429 with ``Retry-After``; JSON errors with
``Content-Type: application/json; charset=utf-8`` and an ``IMDS/...`` server header.

Tests drive faults through the Python API, separate processes through ``/__standin/*``, a path
no IMDS client would ever ask for. Neither needs the ``Metadata`` header.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, Literal

from aiohttp import web
from multidict import CIMultiDict

from standins._imds_state import (
    Failure,
    Faults,
    RateWindow,
    TokenRequestRecord,
    VmIdentity,
    instance_document,
    new_identity,
)
from standins._jwt import make_token

TOKEN_PATH = "/metadata/identity/oauth2/token"
CONTROL_PREFIX = "/__standin/"
SERVER = "IMDS/150.870.65.1854"
JSON_TYPE = "application/json; charset=utf-8"
API_VERSIONS = (
    "2017-03-01", "2017-04-02", "2017-08-01", "2017-10-01", "2017-12-01", "2018-02-01", "2018-04-02",
    "2018-10-01", "2019-02-01", "2019-03-11", "2019-04-30", "2019-06-01", "2019-06-04", "2019-08-01",
    "2019-08-15", "2019-11-01", "2020-06-01", "2020-07-15", "2020-09-01", "2020-10-01", "2020-12-01",
    "2021-01-01", "2021-02-01", "2021-03-01", "2021-05-01", "2021-10-01", "2021-11-01", "2021-11-15",
    "2021-12-13", "2022-02-01", "2022-03-01", "2022-07-01", "2022-08-01", "2022-11-01", "2023-07-01",
    "2023-11-15", "2024-03-15",
)  # fmt: skip
# Managed identity tokens arrived with this version; older ones are instance-only.
FIRST_IDENTITY_VERSION = "2018-02-01"
SELECTORS = (("client_id", "client_id"), ("msi_res_id", "msi_res_id"), ("mi_res_id", "msi_res_id"),
             ("object_id", "object_id"))  # fmt: skip
NO_HEADER = {"error": "invalid_request", "error_description": "Required metadata header not specified"}
NO_HEADER_INSTANCE = {"error": "Bad request. Required metadata header not specified"}
NOT_FOUND_IDENTITY = {"error": "invalid_request", "error_description": "Identity not found"}
MULTIPLE_IDENTITIES = {
    "error": "invalid_request",
    "error_description": (
        "Multiple user assigned identities exist, please specify the clientId / resourceId of the identity "
        "in the token request"
    ),
}
THROTTLED = {"error": "too_many_requests", "error_description": "Too many requests. Retry after some time."}
FAULT_ERRORS = {
    410: ("service_unavailable", "IMDS is updating. Retry after some time."),
    429: ("too_many_requests", "Too many requests. Retry after some time."),
    500: ("server_error", "Internal server error."),
    503: ("temporarily_unavailable", "The service is temporarily unavailable."),
}
ExpiresOnFormat = Literal["epoch", "date"]


def _json(status: int, body: Any, headers: dict[str, str] | None = None) -> web.Response:
    out = {"Content-Type": JSON_TYPE, "Server": SERVER}
    if headers:
        out.update(headers)
    return web.Response(status=status, body=json.dumps(body, separators=(",", ":")).encode(), headers=out)


def _versions_error(missing: bool) -> dict[str, Any]:
    what = "was not specified" if missing else "is invalid or was not specified"
    return {
        "error": f"Bad request. api-version {what} in the request. "
        "For more information refer to aka.ms/azureimds",
        "newest-versions": list(API_VERSIONS[-3:][::-1]),
    }


class ImdsStandIn:
    """IMDS on a loopback port. Everything is configurable per instance; defaults are Azure's."""

    def __init__(
        self,
        *,
        token_lifetime_s: int = 86399,
        max_concurrent: int = 5,
        rate_per_s: float = 20.0,
        throttle_window_s: float = 1.0,
        throttle_retry_after_s: int = 1,
        expires_on_format: ExpiresOnFormat = "epoch",
        tenant_id: str = "72f988bf-0000-4000-8000-000000000000",
        vm_name: str = "aks-nodepool1-00000000-vmss000000",
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.token_lifetime_s = token_lifetime_s
        self.max_concurrent = max_concurrent
        self.throttle_retry_after_s = throttle_retry_after_s
        self.expires_on_format: ExpiresOnFormat = expires_on_format
        self.tenant_id = tenant_id
        self.vm_name = vm_name
        self.identities: list[VmIdentity] = []
        self.faults = Faults()
        self.requests: list[TokenRequestRecord] = []
        self.max_seen_concurrency = 0
        self._clock = clock
        self._rate = RateWindow(max(1, round(rate_per_s * throttle_window_s)), throttle_window_s, monotonic)
        self._in_flight = 0
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._runner: web.AppRunner | None = None
        self._gate: asyncio.Event | None = None
        self._stopping: asyncio.Event | None = None
        self.host = "127.0.0.1"
        self.port = 0

    # --- Python API -------------------------------------------------------------------------

    def add_identity(
        self, client_id: str, *, resource_id: str = "", object_id: str = "", system_assigned: bool = False
    ) -> VmIdentity:
        identity = new_identity(
            client_id, resource_id=resource_id, object_id=object_id, system_assigned=system_assigned
        )
        # A VM has at most one system-assigned identity, and one entry per client ID.
        self.identities = [
            i
            for i in self.identities
            if i.client_id.casefold() != client_id.casefold() and not (system_assigned and i.system_assigned)
        ]
        self.identities.append(identity)
        return identity

    def fail_next(
        self,
        count: int,
        status: int,
        *,
        retry_after: float | None = None,
        error: str = "",
        description: str = "",
    ) -> None:
        for _ in range(count):
            self.faults.failures.append(Failure(status, retry_after, error, description))

    def drop_next(self, count: int) -> None:
        self.faults.drop += count

    def set_delay(self, seconds: float) -> None:
        self.faults.delay_s = seconds

    def clear_faults(self) -> None:
        self.faults.clear()
        self.release()

    def hold(self) -> None:
        """Token requests that pass the throttle wait, counted as in flight, until ``release()``."""
        if self._gate is None or self._gate.is_set():
            self._gate = asyncio.Event()

    def release(self) -> None:
        if self._gate is not None:
            self._gate.set()

    def reset_requests(self) -> None:
        self.requests.clear()
        self.max_seen_concurrency = 0

    def count(
        self, *, client_id: str | None = None, resource: str | None = None, status: int | None = None
    ) -> int:
        """Token requests received, optionally only those for one identity, resource or answer status."""
        return sum(
            1
            for r in self.requests
            if (client_id is None or r.client_id.casefold() == client_id.casefold())
            and (resource is None or r.resource == resource)
            and (status is None or r.status == status)
        )

    async def wait_for_requests(self, n: int, *, timeout: float = 5.0) -> None:
        """Until at least ``n`` token requests have arrived (answered or not)."""
        if len(self.requests) >= n:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (n, future)
        self._waiters.append(entry)
        try:
            async with asyncio.timeout(timeout):
                await future
        finally:
            if entry in self._waiters:
                self._waiters.remove(entry)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._stopping = asyncio.Event()
        self._runner = web.AppRunner(self.app(), access_log=None, handle_signals=False, shutdown_timeout=2.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port).start()
        self.host, self.port = self._runner.addresses[0][:2]

    async def stop(self) -> None:
        # Held and slowed requests end now, so shutdown never waits out an injected delay.
        if self._stopping is not None:
            self._stopping.set()
        self.release()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        return app

    # --- dispatch ---------------------------------------------------------------------------

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        if path.startswith(CONTROL_PREFIX):
            return await self._control(request, path[len(CONTROL_PREFIX) :])
        if path == TOKEN_PATH:
            return await self._token(request)
        if path == "/metadata/instance" or path.startswith("/metadata/instance/"):
            return self._instance(request, path[len("/metadata/instance") :])
        if path == "/metadata/versions":
            if request.headers.get("Metadata") != "true":
                return _json(400, NO_HEADER_INSTANCE)
            return _json(200, {"apiVersions": list(API_VERSIONS)})
        return _json(404, {"error": "Not found"})

    # --- token ------------------------------------------------------------------------------

    async def _token(self, request: web.Request) -> web.StreamResponse:
        record = TokenRequestRecord(
            at=self._clock(),
            path=request.path,
            query=dict(request.query),
            headers=CIMultiDict(request.headers),
            peer=request.remote,
            resource=request.query.get("resource", ""),
        )
        self._arrived(record)
        if request.method != "GET":
            return self._answer(record, _json(405, {"error": "Method not allowed"}))
        if request.headers.get("Metadata") != "true":
            return self._answer(record, _json(400, NO_HEADER))
        if self._in_flight >= self.max_concurrent or not self._rate.admit():
            headers = {"Retry-After": str(self.throttle_retry_after_s)}
            return self._answer(record, _json(429, THROTTLED, headers))
        self._in_flight += 1
        self.max_seen_concurrency = max(self.max_seen_concurrency, self._in_flight)
        try:
            return await self._token_admitted(request, record)
        finally:
            self._in_flight -= 1

    async def _token_admitted(self, request: web.Request, record: TokenRequestRecord) -> web.StreamResponse:
        faults = self.faults
        resetting = faults.outage is not None and faults.outage.status < 0
        if faults.drop > 0 or resetting:
            if not resetting:
                faults.drop -= 1
            record.status = -1
            if request.transport is not None:
                request.transport.abort()
            raise asyncio.CancelledError  # aiohttp ends a handler quietly when its peer is gone
        if self._gate is not None:
            await self._until_stopping(self._gate.wait(), None)
        if faults.delay_s > 0:
            await self._until_stopping(None, faults.delay_s)
        if faults.failures or faults.outage is not None:
            failure = faults.failures.popleft() if faults.failures else faults.outage
            assert failure is not None
            error, description = FAULT_ERRORS.get(failure.status, ("server_error", "Injected failure."))
            body = {"error": failure.error or error, "error_description": failure.description or description}
            headers = (
                {"Retry-After": _seconds(failure.retry_after)} if failure.retry_after is not None else None
            )
            return self._answer(record, _json(failure.status, body, headers))
        query = request.query
        version = query.get("api-version", "")
        if not version:
            body = {
                "error": "invalid_request",
                "error_description": "Required query variable 'api-version' is missing",
            }
            return self._answer(record, _json(400, body))
        if version not in API_VERSIONS or version < FIRST_IDENTITY_VERSION:
            body = {"error": "invalid_request", "error_description": f"Invalid api-version '{version}'"}
            return self._answer(record, _json(400, body))
        if not query.get("resource"):
            body = {
                "error": "invalid_request",
                "error_description": "Required query variable 'resource' is missing",
            }
            return self._answer(record, _json(400, body))
        identity, error_body = self._choose(query)
        if identity is None:
            return self._answer(record, _json(400, error_body))
        record.client_id = identity.client_id
        return self._answer(record, _json(200, self._token_body(identity, query["resource"])))

    async def _until_stopping(self, awaitable: Awaitable[Any] | None, timeout: float | None) -> None:
        waits = [asyncio.ensure_future(awaitable)] if awaitable is not None else []
        if self._stopping is not None:
            waits.append(asyncio.ensure_future(self._stopping.wait()))
        try:
            if waits:
                await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            else:
                await asyncio.sleep(timeout or 0)
        finally:
            for w in waits:
                w.cancel()

    def _choose(self, query: Any) -> tuple[VmIdentity | None, dict[str, str]]:
        named = [(selector, query[param]) for param, selector in SELECTORS if query.get(param)]
        if not named:
            system = [i for i in self.identities if i.system_assigned]
            if system:
                return system[0], {}
            user = [i for i in self.identities if not i.system_assigned]
            if len(user) == 1:
                return user[0], {}
            return None, (MULTIPLE_IDENTITIES if user else NOT_FOUND_IDENTITY)
        for identity in self.identities:
            if all(identity.matches(selector, value) for selector, value in named):
                return identity, {}
        return None, NOT_FOUND_IDENTITY

    def _token_body(self, identity: VmIdentity, resource: str) -> dict[str, str]:
        now = int(self._clock())
        expires = now + self.token_lifetime_s
        token = make_token(
            audience=resource,
            client_id=identity.client_id,
            object_id=identity.object_id,
            tenant_id=self.tenant_id,
            issued_at=now,
            expires_at=expires,
            resource_id=identity.resource_id,
        )
        if self.expires_on_format == "date":
            expires_on = datetime.fromtimestamp(expires, UTC).strftime("%m/%d/%Y %I:%M:%S %p +00:00")
        else:
            expires_on = str(expires)
        return {
            "access_token": token,
            "client_id": identity.client_id,
            "expires_in": str(self.token_lifetime_s),
            "expires_on": expires_on,
            "ext_expires_in": str(self.token_lifetime_s),
            "not_before": str(now),
            "resource": resource,
            "token_type": "Bearer",
        }

    def _arrived(self, record: TokenRequestRecord) -> None:
        self.requests.append(record)
        total = len(self.requests)
        for n, future in list(self._waiters):
            if n <= total and not future.done():
                future.set_result(None)

    @staticmethod
    def _answer(record: TokenRequestRecord, response: web.Response) -> web.Response:
        record.status = response.status
        return response

    # --- instance metadata ------------------------------------------------------------------

    def _instance(self, request: web.Request, rest: str) -> web.StreamResponse:
        if request.method != "GET":
            return _json(405, {"error": "Method not allowed"})
        if request.headers.get("Metadata") != "true":
            return _json(400, NO_HEADER_INSTANCE)
        version = request.query.get("api-version", "")
        if version not in API_VERSIONS:
            return _json(400, _versions_error(missing=not version))
        node: Any = instance_document(self.vm_name)
        for part in [p for p in rest.split("/") if p]:
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                return _json(404, {"error": "Not found"})
        text = request.query.get("format") == "text"
        if isinstance(node, dict | list):
            if not text:
                return _json(200, node)
            keys = node.keys() if isinstance(node, dict) else (str(i) for i in range(len(node)))
            return web.Response(text="\n".join(keys), headers={"Server": SERVER})
        if not text:
            # IMDS serves leaves as text only.
            return _json(400, {"error": "Bad request. Leaf nodes only support text format"})
        return web.Response(text=str(node), headers={"Server": SERVER})

    # --- control ----------------------------------------------------------------------------

    async def _control(self, request: web.Request, what: str) -> web.StreamResponse:
        handlers: dict[tuple[str, str], Callable[[web.Request], Awaitable[web.StreamResponse]]] = {
            ("GET", "faults"): self._get_faults,
            ("POST", "faults"): self._post_faults,
            ("DELETE", "faults"): self._delete_faults,
            ("GET", "requests"): self._get_requests,
            ("DELETE", "requests"): self._delete_requests,
            ("GET", "identities"): self._get_identities,
            ("POST", "identities"): self._post_identities,
        }
        handler = handlers.get((request.method, what))
        if handler is None:
            return _json(404, {"error": "unknown stand-in control"})
        try:
            return await handler(request)
        except (ValueError, TypeError, KeyError) as exc:
            return _json(400, {"error": "bad_control_request", "error_description": str(exc)})

    async def _get_faults(self, request: web.Request) -> web.StreamResponse:
        return _json(200, self.faults.to_json())

    async def _post_faults(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if not isinstance(body, dict):
            raise ValueError("expected a JSON object")
        if body.get("clear"):
            self.clear_faults()
        if "delay_s" in body:
            self.set_delay(float(body["delay_s"]))
        if "drop" in body:
            self.drop_next(int(body["drop"]))
        fail = body.get("fail")
        if fail is not None:
            retry_after = fail.get("retry_after")
            self.fail_next(
                int(fail.get("count", 1)),
                int(fail["status"]),
                retry_after=float(retry_after) if retry_after is not None else None,
                error=str(fail.get("error", "")),
                description=str(fail.get("description", "")),
            )
        return _json(200, self.faults.to_json())

    async def _delete_faults(self, request: web.Request) -> web.StreamResponse:
        self.clear_faults()
        return _json(200, self.faults.to_json())

    async def _get_requests(self, request: web.Request) -> web.StreamResponse:
        counts: dict[tuple[str, str], int] = {}
        for r in self.requests:
            counts[(r.client_id, r.resource)] = counts.get((r.client_id, r.resource), 0) + 1
        return _json(
            200,
            {
                "requests": [r.to_json() for r in self.requests],
                "counts": [{"client_id": c, "resource": res, "count": n} for (c, res), n in counts.items()],
                "max_concurrency": self.max_seen_concurrency,
            },
        )

    async def _delete_requests(self, request: web.Request) -> web.StreamResponse:
        self.reset_requests()
        return web.Response(status=204)

    async def _get_identities(self, request: web.Request) -> web.StreamResponse:
        return _json(200, [_identity_json(i) for i in self.identities])

    async def _post_identities(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if not isinstance(body, dict) or not isinstance(body.get("client_id"), str):
            raise ValueError("expected an object with a client_id string")
        identity = self.add_identity(
            body["client_id"],
            resource_id=str(body.get("resource_id", "")),
            object_id=str(body.get("object_id", "")),
            system_assigned=bool(body.get("system_assigned", False)),
        )
        return _json(201, _identity_json(identity))


def _identity_json(identity: VmIdentity) -> dict[str, Any]:
    return {
        "client_id": identity.client_id,
        "resource_id": identity.resource_id,
        "object_id": identity.object_id,
        "system_assigned": identity.system_assigned,
    }


def _seconds(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


# --- CLI ------------------------------------------------------------------------------------


def identities_from(path: str) -> list[tuple[str, str]]:
    """``(client_id, resource_id)`` of every type-0 AzureIdentity in a ``--cluster-state`` file.

    Identities embedded in AzureAssignedIdentity objects count too: MIC assigned them to the VM.
    """
    from nmi.cluster_file import load
    from podidentity.model import AzureAssignedIdentity, AzureIdentity, IdentityType

    found: dict[str, tuple[str, str]] = {}
    for obj in load(path):
        identity = obj.identity if isinstance(obj, AzureAssignedIdentity) else obj
        if isinstance(identity, AzureIdentity) and identity.type is IdentityType.USER_ASSIGNED_MSI:
            found.setdefault(identity.client_id_folded, (identity.client_id, identity.resource_id))
    return list(found.values())


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m standins.imds", description="An Azure IMDS stand-in.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port; the chosen one is printed")
    p.add_argument(
        "--identities-from", metavar="CLUSTER_STATE.yaml", help="assign its type-0 identities to the VM"
    )
    p.add_argument("--identity", action="append", default=[], metavar="CLIENT_ID[,RESOURCE_ID]")
    p.add_argument(
        "--system-assigned",
        nargs="?",
        const="00000000-5157-4d1f-9000-000000000001",
        metavar="CLIENT_ID",
        help="give the VM a system-assigned identity",
    )
    p.add_argument("--token-lifetime", type=int, default=86399, help="seconds")
    p.add_argument("--max-concurrent", type=int, default=5)
    p.add_argument("--rate", type=float, default=20.0, help="identity requests per second before 429")
    p.add_argument("--expires-on-format", choices=("epoch", "date"), default="epoch")
    return p


async def _serve(args: argparse.Namespace, assigned: list[tuple[str, str]]) -> None:
    imds = ImdsStandIn(
        token_lifetime_s=args.token_lifetime,
        max_concurrent=args.max_concurrent,
        rate_per_s=args.rate,
        expires_on_format=args.expires_on_format,
    )
    for client_id, resource_id in assigned:
        imds.add_identity(client_id, resource_id=resource_id)
    for spec in args.identity:
        client_id, _, resource_id = spec.partition(",")
        imds.add_identity(client_id, resource_id=resource_id)
    if args.system_assigned:
        imds.add_identity(args.system_assigned, system_assigned=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await imds.start(args.host, args.port)
    print(
        f"imds stand-in listening on {imds.host}:{imds.port} with {len(imds.identities)} identities",
        flush=True,
    )
    try:
        await stop.wait()
    finally:
        await imds.stop()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        assigned = identities_from(args.identities_from) if args.identities_from else []
        asyncio.run(_serve(args, assigned))
    except Exception as exc:  # a bad --identities-from file, a busy port: one line, not a traceback
        print(f"imds stand-in: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
