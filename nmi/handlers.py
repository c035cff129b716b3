"""The token listener's routes: the HTTP face of ``TokenService`` and ``ImdsProxy``.

A request whose answer is already in memory (known pod, decided identity, cached token) is
answered synchronously from ``__call__``; only misses return a coroutine, which the HTTP layer
runs as a task and cancels if the client disconnects.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Awaitable, Callable
from functools import lru_cache
from typing import Any

from nmi.logs import AuditLog, redact
from nmi.metrics import Metrics
from nmi.proxy import ImdsProxy
from nmi.routing import Route, classify
from nmi.selectors import IdentityQuery, has_broken_escape, parse_token_query
from nmi.service import Excepted, Granted, TokenService
from nmi.settings import Settings
from nmi.tokens.policy import CacheKey, cache_key
from podidentity.errors import BadRequest, Forbidden, IdentityNotFound, ServiceError
from podidentity.http.request import Request
from podidentity.http.response import Response
from podidentity.model import AzureIdentity, Pod
from podidentity.tokens import Token

Headers = tuple[tuple[bytes, bytes], ...]
JSON: Headers = ((b"content-type", b"application/json; charset=utf-8"),)
TOKEN_OPERATION = "/metadata/identity/oauth2/token"
# What IMDS serves: GET everywhere, POST for scheduled events. Anything else is never forwarded.
PROXY_METHODS = frozenset({"GET", "POST"})
_API_VERSION = re.compile(r"\d{4}-\d{2}-\d{2}(-[A-Za-z0-9.]{1,32})?")
# Well-known audiences are kept as metric labels; anything else is "other", so a pod cannot
# grow the metric's cardinality by inventing resources.
KNOWN_RESOURCES = frozenset(
    {
        "https://management.azure.com/",
        "https://management.azure.com",
        "https://management.core.windows.net/",
        "https://vault.azure.net",
        "https://vault.azure.net/",
        "https://storage.azure.com/",
        "https://storage.azure.com",
        "https://graph.microsoft.com/",
        "https://graph.microsoft.com",
        "https://database.windows.net/",
        "https://ossrdbms-aad.database.windows.net",
        "https://servicebus.azure.net",
        "https://eventhubs.azure.net",
        "https://cognitiveservices.azure.com",
        "https://monitor.azure.com/",
        "https://containerregistry.azure.net",
    }
)

Outcome = Response | Awaitable[Response]
MAX_MEMOS = 4096


class GrantMemo:
    """A granted (caller, query) pair, valid while the cluster state is unchanged.

    A grant is a pure function of the cluster state and the query (only denials and waits depend
    on time), so re-using it while ``ClusterState.version`` is unchanged is the same check as
    deciding again. The token is still looked up on every request, and its rendering is kept
    only while ``expires_in`` would render the same.
    """

    __slots__ = ("audit", "key", "op_child", "remaining", "req_child", "response", "token", "version")

    def __init__(
        self, version: int, key: CacheKey, audit: dict[str, Any], req_child: Any, op_child: Any
    ) -> None:
        self.version = version
        self.key = key
        self.audit = audit
        self.req_child = req_child
        self.op_child = op_child
        self.token: Token | None = None
        self.remaining = -1
        self.response: Response | None = None


def error_body(error: str, description: str) -> bytes:
    return json.dumps({"error": error, "error_description": description}, separators=(",", ":")).encode()


def error_response(exc: ServiceError) -> Response:
    headers = JSON
    if exc.retry_after is not None:
        headers = (*JSON, (b"retry-after", str(int(exc.retry_after)).encode()))
    return Response(exc.status, error_body(exc.error, exc.description), headers)


# IMDS's own answer, byte for byte, so SDKs that parse it keep working (nmi-spec §2.3).
MISSING_METADATA = Response(
    400, error_body("invalid_request", "Required metadata header not specified"), JSON
)
MISSING_RESOURCE = Response(400, error_body("invalid_request", "parameter resource cannot be empty"), JSON)
INVALID_TOKEN_PATH = Response(400, error_body("invalid_request", "Invalid request"), JSON)
NON_CANONICAL = Response(400, error_body("invalid_request", "Invalid request path"), JSON)
INSTANCE_BLOCKED = Response(403, error_body("forbidden", "Request blocked by AAD Pod Identity NMI"), JSON)
HOST_TOKEN_DISABLED = Response(404, error_body("not_found", "/host/token is disabled on this node"), JSON)
TOKEN_METHOD_NOT_ALLOWED = Response(
    405, error_body("invalid_request", "Method not allowed"), (*JSON, (b"allow", b"GET"))
)
PROXY_METHOD_NOT_ALLOWED = Response(
    405, error_body("invalid_request", "Method not allowed"), (*JSON, (b"allow", b"GET, POST"))
)
MALFORMED_QUERY = Response(400, error_body("invalid_request", "Malformed query string"), JSON)


def resource_label(resource: str) -> str:
    return resource if resource in KNOWN_RESOURCES else "other"


@lru_cache(maxsize=4096)
def _route(raw_path: str) -> Route:
    return classify(raw_path)


class NmiHandler:
    def __init__(
        self,
        settings: Settings,
        service: TokenService,
        proxy: ImdsProxy,
        metrics: Metrics,
        audit: AuditLog,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._identity = settings.identity
        self._api_version = settings.upstream.api_version
        self._service = service
        # Held directly: the memo check runs on every request.
        self._state = service.state
        self._cache = service.cache
        self._proxy = proxy
        self._metrics = metrics
        self._audit = audit
        self._clock = clock
        self._granted = metrics.decisions.labels("granted")
        self._memos: dict[tuple[str, str], GrantMemo] = {}
        self._loop_time: Callable[[], float] = self._bind_loop_time
        self._passed = metrics.decisions.labels("pass_through")

    def __call__(self, request: Request) -> Outcome:
        route = _route(request.raw_path)
        if route is Route.TOKEN:
            return self._token(request)
        if route is Route.PROXY:
            return self._proxied(request)
        if route is Route.INSTANCE:
            if self._identity.block_instance_metadata:
                return self._observe(request, "instance", INSTANCE_BLOCKED)
            return self._proxied(request)
        if route is Route.HOST_TOKEN:
            return self._host_token(request)
        if route is Route.INVALID_TOKEN:
            return self._observe(request, "invalid_token", INVALID_TOKEN_PATH)
        return self._observe(request, "non_canonical", NON_CANONICAL)

    # --- metrics ------------------------------------------------------------------------

    def _bind_loop_time(self) -> float:
        # The loop is not running when the handler is built; bind its clock on first use.
        self._loop_time = asyncio.get_running_loop().time
        return self._loop_time()

    def _observe(self, request: Request, route: str, response: Response) -> Response:
        elapsed = self._loop_time() - request.received_at
        self._metrics.requests.labels(route, _STATUS[response.status]).observe(elapsed)
        return response

    def _observe_token(
        self, request: Request, operation: str, response: Response, namespace: str, resource: str
    ) -> Response:
        elapsed = self._loop_time() - request.received_at
        status = _STATUS[response.status]
        self._metrics.requests.labels("token", status).observe(elapsed)
        self._metrics.nmi_operations.labels(operation, status, namespace, resource_label(resource)).observe(
            elapsed
        )
        return response

    # --- token --------------------------------------------------------------------------

    def _metadata_ok(self, request: Request) -> bool:
        if not self._identity.metadata_header_required:
            return True
        value = request.headers.get("metadata")
        if value == "true":
            return True
        # IMDS itself accepts any case; the original demanded exactly "true" (nmi-spec §9.11).
        return value is not None and value.strip().lower() == "true"

    def _token(self, request: Request) -> Outcome:
        if request.method != "GET":
            return self._observe_token(request, TOKEN_OPERATION, TOKEN_METHOD_NOT_ALLOWED, "", "")
        if not self._metadata_ok(request):
            return self._observe_token(request, TOKEN_OPERATION, MISSING_METADATA, "", "")
        memo = self._memos.get((request.peer_ip, request.query))
        if memo is not None and memo.version == self._state.version:
            token = self._cache.peek_key(memo.key)
            if token is not None:
                return self._memo_response(request, memo, token)
        try:
            parsed = parse_token_query(request.query)
        except ServiceError as exc:
            return self._observe_token(request, TOKEN_OPERATION, error_response(exc), "", "")
        params = parsed.params
        resource = params.get("resource", "")
        if not resource:
            return self._observe_token(request, TOKEN_OPERATION, MISSING_RESOURCE, "", "")
        query = parsed.identity
        api_version = params.get("api-version") or self._api_version
        if _API_VERSION.fullmatch(api_version) is None:
            # It is forwarded upstream and shared by every pod joining the same fetch: one pod's
            # nonsense must not become another pod's refusal.
            error = BadRequest("api-version must look like 2018-02-01")
            return self._observe_token(request, TOKEN_OPERATION, error_response(error), "", resource)
        tenant_id = params.get("tenant_id", "")
        pod: Pod | None = None
        try:
            pod = self._service.pod_now(request.peer_ip)
            if pod is not None:
                granted = self._service.try_now(pod, query, resource, api_version, tenant_id)
                if granted is not None:
                    memo = self._memo(request, pod, granted, resource)
                    return self._memo_response(request, memo, granted.token)
        except ServiceError as exc:
            return self._failed(request, exc, pod=pod, resource=resource)
        return self._token_slow(request, query, resource, api_version, tenant_id)

    async def _token_slow(
        self, request: Request, query: IdentityQuery, resource: str, api_version: str, tenant_id: str
    ) -> Response:
        pod: Pod | None = None
        try:
            pod = await self._service.pod(request.peer_ip)
            outcome = await self._service.answer(pod, query, resource, api_version, tenant_id)
            if isinstance(outcome, Excepted):
                self._passed.inc()
                self._audit.record(
                    "pass_through", pod=f"{pod.namespace}/{pod.name}", exception=str(outcome.exception)
                )
                response = await self._proxy.forward(request, "/metadata/identity/oauth2/token")
                return self._observe_token(request, TOKEN_OPERATION, response, pod.namespace, resource)
            return self._granted_response(request, pod, outcome, resource)
        except ServiceError as exc:
            return self._failed(request, exc, pod=pod, resource=resource)

    def _memo(self, request: Request, pod: Pod, granted: Granted, resource: str) -> GrantMemo:
        if len(self._memos) >= MAX_MEMOS:
            self._memos.clear()
        memo = GrantMemo(
            self._state.version,
            cache_key(granted.request),
            self._grant_audit(pod, granted.identity, resource),
            self._metrics.requests.labels("token", "200"),
            self._metrics.nmi_operations.labels(
                TOKEN_OPERATION, "200", pod.namespace, resource_label(resource)
            ),
        )
        self._memos[request.peer_ip, request.query] = memo
        return memo

    def _memo_response(self, request: Request, memo: GrantMemo, token: Token) -> Response:
        now = self._clock()
        remaining = int(token.expires_on - now)
        response = memo.response
        if response is None or memo.token is not token or memo.remaining != remaining:
            response = memo.response = Response(200, token.render(now), JSON)
            memo.token = token
            memo.remaining = remaining
        self._granted.inc()
        self._audit.record_fields("granted", memo.audit)
        elapsed = self._loop_time() - request.received_at
        memo.req_child.observe(elapsed)
        memo.op_child.observe(elapsed)
        return response

    @staticmethod
    def _grant_audit(pod: Pod, identity: AzureIdentity, resource: str) -> dict[str, Any]:
        return {
            "pod": f"{pod.namespace}/{pod.name}",
            "identity": f"{identity.namespace}/{identity.name}",
            "client_id": redact(identity.client_id),
            "resource": resource,
        }

    def _granted_response(self, request: Request, pod: Pod, granted: Granted, resource: str) -> Response:
        self._granted.inc()
        self._audit.record_fields("granted", self._grant_audit(pod, granted.identity, resource))
        response = Response(200, granted.token.render(self._clock()), JSON)
        return self._observe_token(request, TOKEN_OPERATION, response, pod.namespace, resource)

    def _failed(self, request: Request, exc: ServiceError, *, pod: Pod | None, resource: str) -> Response:
        self._audit.record(
            "denied",
            pod=f"{pod.namespace}/{pod.name}" if pod else request.peer_ip,
            status=exc.status,
            reason=exc.description,
        )
        namespace = pod.namespace if pod else ""
        return self._observe_token(request, TOKEN_OPERATION, error_response(exc), namespace, resource)

    # --- proxy --------------------------------------------------------------------------

    def _proxied(self, request: Request) -> Outcome:
        if request.method not in PROXY_METHODS:
            return self._observe(request, "proxy", PROXY_METHOD_NOT_ALLOWED)
        if has_broken_escape(request.query):
            return self._observe(request, "proxy", MALFORMED_QUERY)
        if not self._metadata_ok(request):
            return self._observe(request, "proxy", MISSING_METADATA)
        return self._forward(request)

    async def _forward(self, request: Request) -> Response:
        try:
            response = await self._proxy.forward(request, request.raw_path)
        except ServiceError as exc:
            response = error_response(exc)
        return self._observe(request, "proxy", response)

    # --- legacy host token --------------------------------------------------------------

    def _host_token(self, request: Request) -> Outcome:
        if not self._identity.enable_host_token:
            return self._observe(request, "host_token", HOST_TOKEN_DISABLED)
        error: ServiceError
        if request.peer_ip != "127.0.0.1":
            error = Forbidden("/host/token only answers processes on this node (127.0.0.1)")
            return self._observe(request, "host_token", error_response(error))
        namespace = request.headers.get("podns", "")
        name = request.headers.get("podname", "")
        if not namespace or not name:
            error = BadRequest("missing 'podname' and 'podns' from request header")
            return self._observe(request, "host_token", error_response(error))
        try:
            parsed = parse_token_query(request.query)
        except ServiceError as exc:
            return self._observe(request, "host_token", error_response(exc))
        resource = parsed.params.get("resource", "")
        if not resource:
            return self._observe(request, "host_token", MISSING_RESOURCE)
        return self._host_token_slow(request, namespace, name, parsed.identity, resource)

    async def _host_token_slow(
        self, request: Request, namespace: str, name: str, query: IdentityQuery, resource: str
    ) -> Response:
        try:
            pod = self._service.pod_by_name(namespace, name)
            if pod is None:
                raise IdentityNotFound(f"pod {namespace}/{name} is not on this node")
            outcome = await self._service.answer(pod, query, resource, self._api_version)
            if not isinstance(outcome, Granted):
                raise IdentityNotFound(f"pod {namespace}/{name} is excepted and has no identity of its own")
            granted = outcome
        except ServiceError as exc:
            self._audit.record("denied", pod=f"{namespace}/{name}", status=exc.status, via="host_token")
            return self._observe(request, "host_token", error_response(exc))
        self._audit.record(
            "granted",
            pod=f"{namespace}/{name}",
            client_id=redact(granted.identity.client_id),
            via="host_token",
        )
        body = b'{"token":%s,"clientid":%s}' % (
            granted.token.render(self._clock()),
            json.dumps(granted.identity.client_id).encode(),
        )
        return self._observe(request, "host_token", Response(200, body, JSON))


_STATUS = {code: str(code) for code in range(100, 600)}
