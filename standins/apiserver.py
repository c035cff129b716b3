"""A Kubernetes API server stand-in that speaks the real wire protocol, for tests and the demo.

Clients reach it through an ordinary kubeconfig (``write_kubeconfig``), over HTTP or HTTPS with a
trustme CA, optionally with a bearer token. What it implements, as the real server does:

* pods, secrets, endpoints and events (``/api/v1``), ``coordination.k8s.io/v1`` leases and the four
  ``aadpodidentity.k8s.io/v1`` kinds, all-namespaces and namespaced collections,
  GET/POST/PUT/PATCH (JSON merge patch)/DELETE, finalizers and graceful pod deletion
  (``deletionTimestamp`` first); ``generateName``; each kind's update policy (a Lease PUT needs
  ``metadata.resourceVersion``; leases, endpoints and events are created by a PUT to a missing
  name); Status bodies worded as the real server's (``leases.coordination.k8s.io "x" not found``,
  the optimistic-lock Conflict, 422 ``Invalid`` with causes); Lease and Event validation, their
  MicroTime/Time fields parsed strictly and written back normalised;
* discovery (``/api``, ``/apis``, group and resource lists, ``/version``);
* lists with ``labelSelector`` (``=``, ``==``, ``!=``, ``in``, ``notin``, ``k``, ``!k``),
  ``fieldSelector`` (the kind's supported field labels; others are a 400 like the real server),
  ``limit``/``continue`` served from a snapshot at the first page's resourceVersion, sorted by key;
  core list items without ``kind``/``apiVersion``;
* one global, monotonically increasing resourceVersion; watches from a resourceVersion replay the
  retained history window and go live; older than the window gives an ERROR event with a 410
  ``Expired`` Status (or an HTTP 410, if asked); no resourceVersion gives synthetic ADDED events
  first; an object moving out of (into) a watch's selectors is sent as DELETED (ADDED);
  ``allowWatchBookmarks`` gives BOOKMARK events every ``bookmark_interval_s`` carrying the current
  resourceVersion; ``timeoutSeconds`` ends the stream cleanly;
* chunked ``{"type": ..., "object": ...}\\n`` lines.
* ``v1`` ServiceAccounts (served, listed, watched; not advertised in ``/api/v1`` discovery) and their
  ``token`` subresource, TokenRequest (``POST .../serviceaccounts/{name}/token``), validated as
  ``pkg/registry/core/serviceaccount/storage/token.go`` does: RS256 tokens with the ``kubernetes.io``
  claims, signed with a key generated at start (``rotate_signing_key``), recorded in ``issued_tokens``;
* service-account issuer discovery, anonymous by default: ``/.well-known/openid-configuration`` and
  ``/openid/v1/jwks``.

Faults: ``cut_next_event`` (half a line, then the connection closes), ``close_watches``,
``stall_watches`` (open streams go silent for good), ``pause_watches``/``resume_watches`` (hold
then burst), ``stop_listening``/``start_listening`` (connections refused, open ones reset),
``fail_next`` (the next N requests of some verbs and resources get 500, 429 with Retry-After,
403 Forbidden, 409 Conflict...), ``delay_requests`` (slow answers for some verbs and resources,
before or after the write took effect), ``compact`` (history dropped, older watches get 410).

CLI: ``python -m standins.apiserver --port P --load FILE.yaml [--tls] [--kubeconfig OUT]``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import copy
import datetime
import itertools
import json
import logging
import re
import secrets
import signal
import socket
import ssl
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa

from standins import _oidc

log = logging.getLogger("standins.apiserver")

OIDC_DISCOVERY_PATH = "/.well-known/openid-configuration"
OIDC_JWKS_PATH = "/openid/v1/jwks"
AZURE_AD_TOKEN_EXCHANGE = "api://AzureADTokenExchange"
"""The audience Azure AD Workload Identity asks for (and Azure AD federated credentials expect)."""
AUTHENTICATION_GROUP = "authentication.k8s.io"
DEFAULT_TOKEN_EXPIRATION_S = 3600
"""``TokenRequestSpec.expirationSeconds`` when the request leaves it out (v1 defaulting)."""
MIN_TOKEN_EXPIRATION_S = 600
"""``ValidateTokenRequest``: "may not specify a duration less than 10 minutes"."""
MAX_TOKEN_EXPIRATION_S = 1 << 32
CRD_GROUP = "aadpodidentity.k8s.io"
CRD_VERSION = "v1"
COORDINATION_GROUP = "coordination.k8s.io"
META_FIELDS = frozenset({"metadata.name", "metadata.namespace"})
EVENT_FIELDS = META_FIELDS | {
    "involvedObject.kind",
    "involvedObject.namespace",
    "involvedObject.name",
    "involvedObject.uid",
    "involvedObject.apiVersion",
    "involvedObject.resourceVersion",
    "involvedObject.fieldPath",
    "reason",
    "reportingComponent",
    "source",
    "type",
}
POD_FIELDS = META_FIELDS | {
    "spec.nodeName",
    "spec.restartPolicy",
    "spec.schedulerName",
    "spec.serviceAccountName",
    "spec.hostNetwork",
    "status.phase",
    "status.podIP",
    "status.nominatedNodeName",
}


@dataclass(frozen=True)
class ResourceType:
    plural: str
    singular: str
    kind: str
    group: str = ""
    version: str = "v1"
    field_labels: frozenset[str] = META_FIELDS
    namespaced: bool = True
    unconditional_update: bool = True
    """A PUT without ``metadata.resourceVersion`` overwrites (the strategy's AllowUnconditionalUpdate);
    otherwise it is a 422. Kinds whose real strategy says false but that were served leniently before
    (the CRDs) keep True."""
    create_on_update: bool = False
    """A PUT to a missing object creates it (the strategy's AllowCreateOnUpdate)."""
    returns_deleted: bool = True
    """An immediate DELETE answers with the object (the store's ReturnDeletedObject), else a Status."""
    short_names: tuple[str, ...] = ()
    advertised: bool = True
    """Listed in ``/api/v1`` discovery (ServiceAccounts are served but not listed; see the module doc)."""

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def core(self) -> bool:
        return not self.group

    @property
    def qualified(self) -> str:
        """``leases.coordination.k8s.io``, ``pods``: how the real server names the resource in errors."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    def details(self, name: str) -> dict[str, Any]:
        details: dict[str, Any] = {"name": name, "kind": self.plural}
        if self.group:
            details["group"] = self.group
        return details

    def not_found(self, name: str) -> ApiError:
        return ApiError(404, "NotFound", f'{self.qualified} "{name}" not found', details=self.details(name))

    def conflict(self, name: str) -> ApiError:
        return ApiError(
            409,
            "Conflict",
            f'Operation cannot be fulfilled on {self.qualified} "{name}": the object has been modified; '
            "please apply your changes to the latest version and try again",
            details=self.details(name),
        )

    def invalid(self, name: str, errors: list[FieldError], *, kind: str | None = None) -> ApiError:
        """422 ``Invalid`` as ``errors.NewInvalid``: ``kind`` defaults to ``Kind[.group]``."""
        qualified = kind or (f"{self.kind}.{self.group}" if self.group else self.kind)
        text = errors[0].text() if len(errors) == 1 else "[" + ", ".join(e.text() for e in errors) + "]"
        details: dict[str, Any] = {
            "name": name,
            "kind": qualified.split(".", 1)[0],
            "causes": [e.cause() for e in errors],
        }
        if self.group:
            details["group"] = self.group
        return ApiError(422, "Invalid", f'{qualified} "{name}" is invalid: {text}', details=details)


class GoLiteral(str):
    """A value printed as Go's ``%#v`` would, unquoted (``0x0`` for a zero resourceVersion)."""


@dataclass(frozen=True)
class FieldError:
    """One ``field.Error``: ``invalid`` (with the value) or ``required``."""

    path: str
    detail: str
    value: Any = None
    required: bool = False

    def _value(self) -> str:
        if isinstance(self.value, GoLiteral):
            return str(self.value)
        if isinstance(self.value, str):
            return json.dumps(self.value)
        if isinstance(self.value, bool):
            return "true" if self.value else "false"
        return str(self.value)

    def _body(self) -> str:
        if self.required:
            return "Required value" + (f": {self.detail}" if self.detail else "")
        return f"Invalid value: {self._value()}: {self.detail}"

    def text(self) -> str:
        return f"{self.path}: {self._body()}"

    def cause(self) -> dict[str, str]:
        reason = "FieldValueRequired" if self.required else "FieldValueInvalid"
        return {"reason": reason, "message": self._body(), "field": self.path}


RESOURCES: tuple[ResourceType, ...] = (
    ResourceType("pods", "pod", "Pod", field_labels=POD_FIELDS, short_names=("po",)),
    ResourceType("secrets", "secret", "Secret", field_labels=META_FIELDS | {"type"}),
    ResourceType(
        "serviceaccounts", "serviceaccount", "ServiceAccount", short_names=("sa",), advertised=False
    ),
    # Cluster-scoped: stored under namespace "" and served without one (MIC reads spec.providerID).
    ResourceType("nodes", "node", "Node", field_labels=frozenset({"metadata.name"}), namespaced=False),
    ResourceType("azureidentities", "azureidentity", "AzureIdentity", CRD_GROUP, CRD_VERSION),
    ResourceType(
        "azureidentitybindings", "azureidentitybinding", "AzureIdentityBinding", CRD_GROUP, CRD_VERSION
    ),
    ResourceType(
        "azureassignedidentities", "azureassignedidentity", "AzureAssignedIdentity", CRD_GROUP, CRD_VERSION
    ),
    ResourceType(
        "azurepodidentityexceptions",
        "azurepodidentityexception",
        "AzurePodIdentityException",
        CRD_GROUP,
        CRD_VERSION,
    ),
    # Leader election (coordination.k8s.io Leases; the old client-go lock is an Endpoints annotation)
    # and Events, with their real strategies' update policies.
    ResourceType(
        "leases",
        "lease",
        "Lease",
        COORDINATION_GROUP,
        "v1",
        unconditional_update=False,
        create_on_update=True,
        returns_deleted=False,
    ),
    ResourceType(
        "endpoints",
        "endpoints",
        "Endpoints",
        create_on_update=True,
        returns_deleted=False,
        short_names=("ep",),
    ),
    ResourceType(
        "events",
        "event",
        "Event",
        field_labels=EVENT_FIELDS,
        create_on_update=True,
        returns_deleted=False,
        short_names=("ev",),
    ),
)
BY_PLURAL = {r.plural: r for r in RESOURCES}
BY_KIND = {r.kind: r for r in RESOURCES}


class ApiError(Exception):
    """Becomes a ``Status`` response."""

    def __init__(
        self,
        code: int,
        reason: str,
        message: str,
        *,
        retry_after: int | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.retry_after = retry_after
        self.details = details

    def status(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        details = dict(self.details or {})
        if self.retry_after is not None:
            details["retryAfterSeconds"] = self.retry_after
        if details:
            body["details"] = details
        return body


def _token_request_invalid(name: str, error: FieldError) -> ApiError:
    """422 as ``errors.NewInvalid(TokenRequest.authentication.k8s.io, name, errs)``."""
    details = {"name": name, "group": AUTHENTICATION_GROUP, "kind": "TokenRequest", "causes": [error.cause()]}
    return ApiError(
        422,
        "Invalid",
        f'TokenRequest.{AUTHENTICATION_GROUP} "{name}" is invalid: {error.text()}',
        details=details,
    )


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- selectors -------------------------------------------------------------------------------

_SET_TERM = re.compile(r"^\s*([^\s!=()]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")
_EQ_TERM = re.compile(r"^\s*([^\s!=]+)\s*(==|=|!=)\s*([^\s,]*)\s*$")
_EXISTS = re.compile(r"^\s*(!?)\s*([^\s!=()]+)\s*$")


@dataclass(frozen=True)
class LabelRequirement:
    key: str
    op: str
    """One of ``=``, ``!=``, ``in``, ``notin``, ``exists``, ``!``."""
    values: frozenset[str] = frozenset()

    def __call__(self, labels: Mapping[str, str]) -> bool:
        value = labels.get(self.key)
        if self.op == "=":
            return value in self.values
        if self.op == "!=":
            return value not in self.values
        if self.op == "in":
            return value in self.values
        if self.op == "notin":
            return value not in self.values
        if self.op == "exists":
            return self.key in labels
        return self.key not in labels


@dataclass(frozen=True)
class FieldRequirement:
    path: str
    value: str
    negate: bool = False

    def __call__(self, obj: Mapping[str, Any]) -> bool:
        computed = _COMPUTED_FIELDS.get(self.path)
        actual = computed(obj) if computed is not None else _field_value(obj, self.path)
        return (actual == self.value) != self.negate


def _split_terms(selector: str) -> list[str]:
    terms: list[str] = []
    depth = 0
    current: list[str] = []
    for ch in selector:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            terms.append("".join(current))
            current = []
        else:
            current.append(ch)
    terms.append("".join(current))
    return [t for t in terms if t.strip()]


def parse_label_selector(selector: str) -> list[LabelRequirement]:
    reqs: list[LabelRequirement] = []
    for term in _split_terms(selector):
        if m := _SET_TERM.match(term):
            values = frozenset(v.strip() for v in m.group(3).split(",") if v.strip())
            reqs.append(LabelRequirement(m.group(1), m.group(2), values))
        elif m := _EQ_TERM.match(term):
            key, op, value = m.groups()
            reqs.append(LabelRequirement(key, "!=" if op == "!=" else "=", frozenset({value})))
        elif m := _EXISTS.match(term):
            neg, key = m.groups()
            reqs.append(LabelRequirement(key, "!" if neg else "exists"))
        else:
            raise ApiError(400, "BadRequest", f"unable to parse requirement: {term!r}")
    return reqs


def _field_value(obj: Mapping[str, Any], path: str) -> str:
    value: Any = obj
    for part in path.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


_COMPUTED_FIELDS: dict[str, Callable[[Mapping[str, Any]], str]] = {
    # Event field labels that are not paths (core/v1 names, pkg/registry/core/event/strategy.go).
    "source": lambda o: _field_value(o, "source.component") or _field_value(o, "reportingComponent"),
}


def parse_field_selector(selector: str, rtype: ResourceType) -> list[FieldRequirement]:
    reqs: list[FieldRequirement] = []
    for term in _split_terms(selector):
        m = _EQ_TERM.match(term)
        if not m:
            raise ApiError(400, "BadRequest", f"invalid field selector: {term!r}")
        key, op, value = m.groups()
        if key not in rtype.field_labels:
            raise ApiError(400, "BadRequest", f'field label not supported: "{key}"')
        reqs.append(FieldRequirement(key, value, negate=op == "!="))
    return reqs


@dataclass
class Filter:
    rtype: ResourceType
    namespace: str | None = None
    labels: list[LabelRequirement] = field(default_factory=list)
    fields: list[FieldRequirement] = field(default_factory=list)

    def matches(self, obj: Mapping[str, Any] | None) -> bool:
        if obj is None:
            return False
        meta = obj.get("metadata") or {}
        if self.namespace is not None and meta.get("namespace") != self.namespace:
            return False
        labels = meta.get("labels") or {}
        return all(p(labels) for p in self.labels) and all(p(obj) for p in self.fields)


# --- events and watches ----------------------------------------------------------------------


@dataclass
class Event:
    rv: int
    plural: str
    type: str
    old: dict[str, Any] | None
    new: dict[str, Any]
    lines: dict[str, bytes] = field(default_factory=dict)

    def line(self, etype: str) -> bytes:
        cached = self.lines.get(etype)
        if cached is None:
            cached = self.lines[etype] = (
                json.dumps({"type": etype, "object": self.new}, separators=(",", ":")) + "\n"
            ).encode()
        return cached


class Watch:
    def __init__(self, flt: Filter) -> None:
        self.filter = flt
        self.queue: deque[bytes] = deque()
        self.queued_rv = 0
        self.sent_rv = 0
        """resourceVersion of the last event or bookmark written to the stream."""
        self.wake = asyncio.Event()
        self.stalled = False
        self.closed = False
        self.end_after_flush = False

    def push(self, line: bytes, rv: int) -> None:
        self.queue.append(line)
        self.queued_rv = max(self.queued_rv, rv)
        self.wake.set()

    def offer(self, event: Event) -> None:
        if event.plural != self.filter.rtype.plural:
            return
        old_m = self.filter.matches(event.old)
        new_m = self.filter.matches(event.new)
        if event.type == "DELETED":
            if old_m or new_m:
                self.push(event.line("DELETED"), event.rv)
        elif old_m and new_m:
            self.push(event.line(event.type), event.rv)
        elif new_m:
            self.push(event.line("ADDED"), event.rv)
        elif old_m:
            self.push(event.line("DELETED"), event.rv)


WRITE_VERBS = frozenset({"create", "update", "patch", "delete"})
_METHOD_VERBS = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}


@dataclass(frozen=True)
class _Scope:
    """Which requests a fault applies to: request verbs (``get``, ``list``, ``watch``, ``create``,
    ``update``, ``patch``, ``delete``, or ``write`` for any of the last four) and resources (plurals or
    kinds, or ``plural/subresource`` such as ``serviceaccounts/token``, RBAC's name for TokenRequest;
    empty means every resource). A bare plural does not cover its subresources, as in RBAC."""

    verbs: frozenset[str]
    resources: frozenset[str] = frozenset()

    @classmethod
    def of(cls, verbs: Iterable[str], resources: Iterable[str] | str | None) -> _Scope:
        if isinstance(resources, str):
            resources = (resources,)
        plurals = frozenset(_resource_name(r) for r in resources or ())
        return cls(frozenset(verbs), plurals)

    def matches(self, verb: str, action: str, plural: str) -> bool:
        if self.resources and plural not in self.resources:
            return False
        return verb in self.verbs or action in self.verbs


def _resource_name(resource: str) -> str:
    """``pods``, ``Pod`` → ``pods``; ``ServiceAccount/token`` → ``serviceaccounts/token``."""
    base, slash, sub = resource.partition("/")
    return FakeApiServer._rtype(base).plural + slash + sub


@dataclass
class _Failure:
    status: int
    retry_after: int | None
    scope: _Scope


@dataclass
class _Delay:
    seconds: float
    scope: _Scope
    after: bool
    """Hold the answer after the request took effect, instead of before handling it."""


@dataclass
class RequestRecord:
    method: str
    path: str
    query: dict[str, str]
    verb: str
    """``get``, ``list``, ``watch``, ``write`` (any method but GET) or ``discovery``."""
    at: float
    """Loop time the request arrived."""
    user_agent: str = ""
    resource: str = ""
    """The plural the path names (``leases``, ``events``), with its subresource for one
    (``serviceaccounts/token``), or empty."""
    action: str = ""
    """The Kubernetes verb: ``verb``, writes told apart (``create``, ``update``, ``patch``, ``delete``)."""
    status: int = 0
    """The HTTP status answered (0 while in flight; for a watch, until its stream ends)."""


@dataclass(frozen=True)
class IssuedToken:
    """One service-account token minted by a TokenRequest (``FakeApiServer.issued_tokens``)."""

    namespace: str
    service_account: str
    audiences: tuple[str, ...]
    expiration_seconds: int
    """As granted (after the server's maximum), not necessarily as requested."""
    issued_at: datetime.datetime
    expires_at: datetime.datetime
    token: str
    jti: str
    kid: str
    pod: str | None = None
    """The bound pod's name, for a pod-bound token."""
    pod_uid: str | None = None
    bound_kind: str | None = None
    """``Pod``, ``Secret``, ``Node`` or None (an unbound token)."""


# --- the server ------------------------------------------------------------------------------


class FakeApiServer:
    """In-memory API server on a real socket. Writes through the Python API or over HTTP."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        tls: bool = False,
        token: str | None = None,
        history_limit: int = 10_000,
        bookmark_interval_s: float = 60.0,
        default_watch_timeout_s: float = 1800.0,
        max_requests_logged: int = 10_000,
        issuer: str | None = None,
        jwks_uri: str | None = None,
        api_audiences: Sequence[str] | None = None,
        max_token_expiration_s: int | None = 48 * 3600,
        anonymous_discovery: bool = True,
    ) -> None:
        self.host = host
        self.port = port
        self.token = token
        """When set, requests must carry ``Authorization: Bearer <token>`` (changeable at run time)."""
        self.bookmark_interval_s = bookmark_interval_s
        self.default_watch_timeout_s = default_watch_timeout_s
        self._tls = tls
        self._ca: Any = None
        self._server_ssl: ssl.SSLContext | None = None
        if tls:
            import trustme

            self._ca = trustme.CA()
            cert = self._ca.issue_cert("127.0.0.1", "localhost", "::1")
            self._server_ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            cert.configure_cert(self._server_ssl)
        self._objects: dict[str, dict[tuple[str, str], dict[str, Any]]] = {r.plural: {} for r in RESOURCES}
        self._rv = 0
        self._history: deque[Event] = deque(maxlen=history_limit)
        self._compacted_rv = 0
        self._gone_as_http = False
        self._watches: set[Watch] = set()
        self._snapshots: dict[str, tuple[int, list[dict[str, Any]], int, Filter]] = {}
        self._failures: deque[_Failure] = deque()
        self._delays: list[_Delay] = []
        self._cut_next = 0
        self._cut_clean = False
        self._paused = False
        self._listening = False
        self._changed = asyncio.Event()
        self.requests: deque[RequestRecord] = deque(maxlen=max_requests_logged)
        self._runner: web.AppRunner | None = None
        self._site: web.BaseSite | None = None
        # Service-account tokens (TokenRequest) and issuer discovery.
        self._issuer = issuer
        self._jwks_uri = jwks_uri
        self.api_audiences: tuple[str, ...] | None = tuple(api_audiences) if api_audiences else None
        """``--api-audiences``; None means the issuer, as kube-apiserver defaults it."""
        self.max_token_expiration_s = max_token_expiration_s
        """``--service-account-max-token-expiration``: longer requests are shortened, with a Warning."""
        self.anonymous_discovery = anonymous_discovery
        """Serve the discovery document and JWKS without a bearer token (RBAC's
        ``system:service-account-issuer-discovery`` bound to ``system:unauthenticated``)."""
        self.clock: Callable[[], float] = time.time
        self.issued_tokens: list[IssuedToken] = []
        self._signing_key = rsa.generate_private_key(65537, 2048)
        self._verification_keys: list[rsa.RSAPublicKey] = [self._signing_key.public_key()]

    # --- lifecycle ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"{'https' if self._tls else 'http'}://{self.host}:{self.port}"

    @property
    def ca_pem(self) -> bytes | None:
        return self._ca.cert_pem.bytes() if self._ca is not None else None

    async def start(self) -> FakeApiServer:
        app = web.Application(middlewares=[self._middleware], client_max_size=8 * 1024 * 1024)
        self._routes(app)
        # handler_cancellation: a client that goes away ends its watch handler at once.
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        await self.start_listening()
        return self

    async def stop(self) -> None:
        if self._runner is not None and self._listening:
            await self.stop_listening()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
            self._site = None
        self._listening = False

    async def __aenter__(self) -> FakeApiServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start_listening(self) -> None:
        """Accept connections (again) on the same port."""
        assert self._runner is not None
        if self._listening:
            return
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        self._site = web.SockSite(self._runner, sock, ssl_context=self._server_ssl)
        await self._site.start()
        self._listening = True

    async def stop_listening(self) -> None:
        """Refuse new connections and reset the open ones, as a crashed API server would."""
        if self._site is not None:
            await self._site.stop()
            self._site = None
        self._listening = False
        assert self._runner is not None
        server = self._runner.server
        if server is not None:
            for handler in server.connections:
                if handler.transport is not None:
                    handler.transport.abort()
        for w in list(self._watches):
            w.closed = True
            w.wake.set()

    def write_kubeconfig(
        self, path: str | Path, *, token: str | None = None, token_file: str | None = None
    ) -> Path:
        """A kubeconfig that reaches this server: the same file a client would get for a real cluster."""
        cluster: dict[str, Any] = {"server": self.url}
        if self._ca is not None:
            cluster["certificate-authority-data"] = base64.b64encode(self.ca_pem or b"").decode()
        user: dict[str, Any] = {}
        if token_file is not None:
            user["tokenFile"] = str(token_file)
        elif token or self.token:
            user["token"] = token or self.token
        doc = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "standin", "cluster": cluster}],
            "users": [{"name": "standin", "user": user}],
            "contexts": [{"name": "standin", "context": {"cluster": "standin", "user": "standin"}}],
            "current-context": "standin",
        }
        path = Path(path)
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        return path

    # --- observation -------------------------------------------------------------------------

    @property
    def resource_version(self) -> int:
        return self._rv

    @property
    def open_watches(self) -> int:
        return sum(1 for w in self._watches if not w.closed and not w.stalled)

    def delivered_rv(self, plural: str) -> int:
        """Lowest resourceVersion written (event or bookmark) across the open watches of ``plural``."""
        sent = [w.sent_rv for w in self._watches if w.filter.rtype.plural == plural and not w.closed]
        return min(sent) if sent else 0

    def watches_of(self, plural: str) -> int:
        return sum(
            1 for w in self._watches if w.filter.rtype.plural == plural and not w.closed and not w.stalled
        )

    def _touch(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        """Wait until ``predicate()`` holds; re-checked on every request and watch change."""
        async with asyncio.timeout(timeout):
            while not predicate():
                await self._changed.wait()

    # --- faults ------------------------------------------------------------------------------

    def fail_next(
        self,
        n: int,
        status: int = 500,
        *,
        retry_after: int | None = None,
        verbs: Iterable[str] = ("list", "watch", "get"),
        resources: Iterable[str] | str | None = None,
    ) -> None:
        """Answer the next ``n`` matching requests with ``status`` (a 429 may carry Retry-After).

        ``verbs``: ``get``, ``list``, ``watch``, ``create``, ``update``, ``patch``, ``delete``, or
        ``write`` for all four writes. ``resources``: plurals or kinds (``"leases"``, ``"Event"``);
        None means any. The body is the real server's Status for that code: 403 ``Forbidden`` as RBAC
        words it, 409 ``Conflict`` as an optimistic-lock failure, 404 ``NotFound``, 429, 500, 503...
        Queued failures with different scopes wait independently; the oldest that matches fires.
        """
        scope = _Scope.of(verbs, resources)
        for _ in range(n):
            self._failures.append(_Failure(status, retry_after, scope))

    def delay_requests(
        self,
        seconds: float,
        *,
        verbs: Iterable[str] = ("get", "list", "create", "update", "patch", "delete"),
        resources: Iterable[str] | str | None = None,
        after: bool = False,
    ) -> None:
        """Make matching requests slow by ``seconds`` until ``clear_delays``: before they are handled,
        or with ``after`` once they took effect (the write is stored, its answer is late, as when the
        server commits but the client times out). Delays of several matching rules add up."""
        self._delays.append(_Delay(seconds, _Scope.of(verbs, resources), after))

    def clear_delays(self) -> None:
        self._delays.clear()

    def _injected(self, failure: _Failure, request: web.Request, action: str, resource: str) -> ApiError:
        status = failure.status
        name = request.match_info.get("name", "")
        rtype = BY_PLURAL.get(resource.partition("/")[0])
        if rtype is not None and status == 403:
            namespace = request.match_info.get("namespace")
            where = f' in the namespace "{namespace}"' if namespace else " at the cluster scope"
            subject = (
                f'{rtype.qualified} "{name}" is forbidden' if name else f"{rtype.qualified} is forbidden"
            )
            return ApiError(
                403,
                "Forbidden",
                f'{subject}: User "system:serviceaccount:default:standin" cannot {action} resource '
                f'"{resource}" in API group "{rtype.group}"{where}',
                details=rtype.details(name),
            )
        if rtype is not None and status == 409:
            return rtype.conflict(name)
        if rtype is not None and status == 404:
            return rtype.not_found(name)
        reason = {
            401: "Unauthorized",
            403: "Forbidden",
            404: "NotFound",
            409: "Conflict",
            429: "TooManyRequests",
            503: "ServiceUnavailable",
            504: "Timeout",
        }.get(status, "InternalError")
        return ApiError(status, reason, f"injected failure ({status})", retry_after=failure.retry_after)

    def cut_next_event(self, n: int = 1, *, clean_end: bool = False) -> None:
        """The next ``n`` event writes send half their line, then close the connection; with
        ``clean_end`` the chunked body is terminated properly right after the half line."""
        self._cut_next += n
        self._cut_clean = clean_end

    def close_watches(self) -> None:
        """End every open watch stream abruptly (no terminating chunk)."""
        for w in self._watches:
            w.closed = True
            w.wake.set()

    def send_error_event(
        self, code: int = 500, reason: str = "InternalError", message: str = "injected"
    ) -> None:
        """Every open stream gets an ERROR event with this Status, then ends (as the server does)."""
        line = (
            json.dumps({"type": "ERROR", "object": ApiError(code, reason, message).status()}) + "\n"
        ).encode()
        for w in self._watches:
            if not w.closed and not w.stalled:
                w.push(line, self._rv)
                w.end_after_flush = True

    def stall_watches(self) -> None:
        """Open streams stay connected but never send again: a silently dead watch."""
        for w in self._watches:
            w.stalled = True
        self._touch()

    def pause_watches(self) -> None:
        """Hold events (and bookmarks) in the streams' queues until ``resume_watches``."""
        self._paused = True

    def resume_watches(self) -> None:
        self._paused = False
        for w in self._watches:
            w.wake.set()

    def compact(self, *, as_http_error: bool = False) -> None:
        """Forget the event history: any watch from an older resourceVersion gets 410 Gone."""
        self._history.clear()
        self._compacted_rv = self._rv
        self._gone_as_http = as_http_error
        self._snapshots.clear()

    # --- service-account tokens and issuer discovery -----------------------------------------

    @property
    def issuer(self) -> str:
        """``--service-account-issuer``: the ``iss`` of the tokens; by default this server's URL."""
        return self._issuer or self.url

    @property
    def jwks_uri(self) -> str:
        """``--service-account-jwks-uri``; by default ``<this server>/openid/v1/jwks``."""
        return self._jwks_uri or f"{self.url}{OIDC_JWKS_PATH}"

    @property
    def signing_key_id(self) -> str:
        return _oidc.key_id(self._signing_key.public_key())

    def openid_configuration(self) -> dict[str, Any]:
        """The document served at ``/.well-known/openid-configuration``."""
        return {
            "issuer": self.issuer,
            "jwks_uri": self.jwks_uri,
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
        }

    def jwks(self) -> dict[str, Any]:
        """The key set served at ``/openid/v1/jwks``: every key tokens are verified with."""
        return {"keys": [_oidc.jwk(key, _oidc.key_id(key)) for key in self._verification_keys]}

    def rotate_signing_key(self, *, keep_old: bool = False) -> str:
        """Sign new tokens with a fresh RSA key; returns its key id. With ``keep_old`` the old public
        keys stay in the JWKS (a rotation with both keys in ``--service-account-key-file``); without,
        tokens issued before no longer verify anywhere."""
        self._signing_key = rsa.generate_private_key(65537, 2048)
        fresh = self._signing_key.public_key()
        self._verification_keys = [fresh, *self._verification_keys] if keep_old else [fresh]
        return _oidc.key_id(fresh)

    def create_token(
        self, namespace: str, service_account: str, request: Mapping[str, Any] | None = None
    ) -> tuple[dict[str, Any], list[str]]:
        """A TokenRequest for ``service_account`` as the server's ``serviceaccounts/token`` REST
        handles it (pkg/registry/core/serviceaccount/storage/token.go): the TokenRequest answered
        (with ``status.token``) and the warnings. Raises ``ApiError`` with the real server's Status."""
        body = copy.deepcopy(dict(request or {}))
        kind = body.get("kind") or "TokenRequest"
        if kind != "TokenRequest":
            raise ApiError(
                400,
                "BadRequest",
                f"the kind in the data ({kind}) does not match the expected kind (TokenRequest)",
            )
        meta = body.get("metadata") or {}
        spec = body.get("spec") or {}
        if not isinstance(meta, dict) or not isinstance(spec, dict):
            raise ApiError(400, "BadRequest", "TokenRequest: metadata and spec must be objects")
        audiences = spec.get("audiences") or []
        expiration = spec.get("expirationSeconds")
        ref = spec.get("boundObjectRef")
        if (
            not isinstance(audiences, list)
            or not all(isinstance(a, str) for a in audiences)
            or (expiration is not None and (not isinstance(expiration, int) or isinstance(expiration, bool)))
            or (ref is not None and not isinstance(ref, dict))
        ):
            raise ApiError(
                400,
                "BadRequest",
                'TokenRequest in version "v1" cannot be handled as a TokenRequest: json: cannot unmarshal '
                "the spec (audiences: []string, expirationSeconds: int64, boundObjectRef: object)",
            )
        for fld, want, what in (
            ("name", service_account, "service account name"),
            ("namespace", namespace, "service account namespace"),
        ):
            if meta.get(fld) and meta[fld] != want:
                raise _token_request_invalid(
                    service_account,
                    FieldError(f"metadata.{fld}", f"must match the {what} if specified", meta[fld]),
                )
        sa = self._objects["serviceaccounts"].get((namespace, service_account))
        if sa is None:
            raise BY_PLURAL["serviceaccounts"].not_found(service_account)
        audiences = list(audiences) or list(self.api_audiences or (self.issuer,))
        expiration = DEFAULT_TOKEN_EXPIRATION_S if expiration is None else expiration
        now = int(self.clock())
        if expiration < MIN_TOKEN_EXPIRATION_S:
            raise _token_request_invalid(
                "",
                FieldError(
                    "spec.expirationSeconds", "may not specify a duration less than 10 minutes", expiration
                ),
            )
        if expiration > MAX_TOKEN_EXPIRATION_S:
            raise _token_request_invalid(
                "",
                FieldError(
                    "spec.expirationSeconds",
                    "may not specify a duration larger than 2^32 seconds",
                    expiration,
                ),
            )
        private: dict[str, Any] = {
            "namespace": namespace,
            "serviceaccount": {"name": service_account, "uid": sa["metadata"]["uid"]},
        }
        bound_kind, pod_name, pod_uid = self._bind(namespace, service_account, ref, private)
        warnings: list[str] = []
        ceiling = self.max_token_expiration_s
        if ceiling and expiration > ceiling:
            warnings.append(f"requested expiration of {expiration} seconds shortened to {ceiling} seconds")
            expiration = ceiling
        kid = self.signing_key_id
        jti = str(uuid.uuid4())
        claims = {
            "aud": audiences,
            "exp": now + expiration,
            "iat": now,
            "iss": self.issuer,
            "jti": jti,
            "kubernetes.io": private,
            "nbf": now,
            "sub": f"system:serviceaccount:{namespace}:{service_account}",
        }
        token = _oidc.sign_rs256(self._signing_key, {"alg": "RS256", "kid": kid}, claims)
        issued = datetime.datetime.fromtimestamp(now, datetime.UTC)
        expires = datetime.datetime.fromtimestamp(now + expiration, datetime.UTC)
        self.issued_tokens.append(
            IssuedToken(
                namespace,
                service_account,
                tuple(audiences),
                expiration,
                issued,
                expires,
                token,
                jti,
                kid,
                pod_name,
                pod_uid,
                bound_kind,
            )
        )
        out_spec: dict[str, Any] = {"audiences": audiences, "expirationSeconds": expiration}
        if ref is not None:
            out_spec["boundObjectRef"] = ref
        answer = {
            "kind": "TokenRequest",
            "apiVersion": f"{AUTHENTICATION_GROUP}/v1",
            "metadata": {
                "name": service_account,
                "namespace": namespace,
                "creationTimestamp": issued.strftime("%Y-%m-%dT%H:%M:%SZ"),
            },
            "spec": out_spec,
            "status": {"token": token, "expirationTimestamp": expires.strftime("%Y-%m-%dT%H:%M:%SZ")},
        }
        return answer, warnings

    def _bind(
        self, namespace: str, service_account: str, ref: Mapping[str, Any] | None, private: dict[str, Any]
    ) -> tuple[str | None, str | None, str | None]:
        """Check ``spec.boundObjectRef`` and add its claims: (kind, pod name, pod uid)."""
        if ref is None:
            return None, None, None
        kind, name, want_uid = str(ref.get("kind", "")), str(ref.get("name", "")), str(ref.get("uid", ""))
        api_version = str(ref.get("apiVersion", ""))
        group, _, version = api_version.rpartition("/")
        pod_name = pod_uid = None
        if group == "" and kind == "Pod":
            bound = self._objects["pods"].get((namespace, name))
            if bound is None:
                raise BY_PLURAL["pods"].not_found(name)
            # The ServiceAccount admission plugin gives every pod "default" when it names none.
            if (bound.get("spec") or {}).get("serviceAccountName", "default") != service_account:
                raise ApiError(
                    400,
                    "BadRequest",
                    f'cannot bind token for serviceaccount "{service_account}" to pod running with different '
                    "serviceaccount name.",
                )
            pod_name, pod_uid = name, bound["metadata"]["uid"]
            private["pod"] = {"name": name, "uid": pod_uid}
            node_name = (bound.get("spec") or {}).get("nodeName")
            node_obj = self._objects["nodes"].get(("", node_name)) if node_name else None
            if node_obj is not None:  # ServiceAccountTokenPodNodeInfo: the node, when it exists
                private["node"] = {"name": node_name, "uid": node_obj["metadata"]["uid"]}
        elif group == "" and kind in ("Secret", "Node"):
            plural = "secrets" if kind == "Secret" else "nodes"
            bound = self._objects[plural].get((namespace if kind == "Secret" else "", name))
            if bound is None:
                raise BY_PLURAL[plural].not_found(name)
            private[kind.lower()] = {"name": name, "uid": bound["metadata"]["uid"]}
        else:
            raise ApiError(
                400, "BadRequest", f"cannot bind token to object of type {group}/{version}, Kind={kind}"
            )
        uid = bound["metadata"]["uid"]
        if want_uid and want_uid != uid:
            raise ApiError(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on {kind} "{name}": the UID in the bound object reference '
                f"({want_uid}) does not match the UID in record. The object might have been deleted and then "
                "recreated",
                details={"name": name, "kind": kind},
            )
        return kind, pod_name, pod_uid

    # --- the store (Python API) --------------------------------------------------------------

    @staticmethod
    def _rtype(kind: str) -> ResourceType:
        rtype = BY_PLURAL.get(kind) or BY_KIND.get(kind)
        if rtype is None:
            raise ApiError(404, "NotFound", f"the server could not find the requested resource ({kind})")
        return rtype

    def _record(
        self, rtype: ResourceType, etype: str, old: dict[str, Any] | None, new: dict[str, Any]
    ) -> None:
        if self._history.maxlen is not None and len(self._history) == self._history.maxlen:
            self._compacted_rv = self._history[0].rv
        event = Event(self._rv, rtype.plural, etype, old, new)
        self._history.append(event)
        for w in self._watches:
            if not w.closed and not w.stalled:
                w.offer(event)
        self._touch()

    def _next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        obj = self._objects[self._rtype(kind).plural].get((namespace, name))
        return copy.deepcopy(obj) if obj is not None else None

    def objects(
        self,
        kind: str,
        namespace: str | None = None,
        *,
        label_selector: str = "",
        field_selector: str = "",
    ) -> list[dict[str, Any]]:
        """Stored objects of ``kind`` (plural or Kind), sorted by namespace and name; optionally one
        namespace's, filtered as a LIST with ``labelSelector``/``fieldSelector`` would be."""
        rtype = self._rtype(kind)
        flt = Filter(
            rtype,
            namespace,
            parse_label_selector(label_selector),
            parse_field_selector(field_selector, rtype),
        )
        store = self._objects[rtype.plural]
        return [copy.deepcopy(store[k]) for k in sorted(store) if flt.matches(store[k])]

    def create(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """POST: ``metadata.generateName`` makes a name if none is given; 409 if the name is taken."""
        given = obj.get("metadata") if isinstance(obj, Mapping) else None
        prefix = ""
        if isinstance(given, Mapping) and not given.get("name") and given.get("generateName"):
            prefix = str(given["generateName"])
            obj = {**obj, "metadata": {**given, "name": _generate_name(prefix)}}
        rtype, new = self._prepare(obj)
        meta = new["metadata"]
        key = (meta.get("namespace", ""), meta["name"])
        store = self._objects[rtype.plural]
        while prefix and key in store:  # generated names clashed: the real server tries again
            meta["name"] = _generate_name(prefix)
            key = (key[0], meta["name"])
        if key in store:
            raise ApiError(
                409,
                "AlreadyExists",
                f'{rtype.qualified} "{meta["name"]}" already exists',
                details=rtype.details(meta["name"]),
            )
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("creationTimestamp", _now())
        meta.pop("deletionTimestamp", None)
        meta["resourceVersion"] = self._next_rv()
        store[key] = new
        self._record(rtype, "ADDED", None, new)
        return copy.deepcopy(new)

    def update(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        rtype, new = self._prepare(obj)
        meta = new["metadata"]
        key = (meta.get("namespace", ""), meta["name"])
        store = self._objects[rtype.plural]
        old = store.get(key)
        if old is None:
            raise rtype.not_found(meta["name"])
        sent_rv = meta.get("resourceVersion")
        if sent_rv and sent_rv != old["metadata"]["resourceVersion"]:
            raise rtype.conflict(meta["name"])
        for kept in ("uid", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds"):
            if kept in old["metadata"]:
                meta[kept] = old["metadata"][kept]
            else:
                meta.pop(kept, None)
        if "deletionTimestamp" in meta and not meta.get("finalizers") and rtype.kind != "Pod":
            return self._remove(rtype, key)
        meta["resourceVersion"] = self._next_rv()
        store[key] = new
        self._record(rtype, "MODIFIED", old, new)
        return copy.deepcopy(new)

    def apply(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Create, or replace whatever is there (no resourceVersion check)."""
        rtype, new = self._prepare(obj)
        meta = new["metadata"]
        if (meta.get("namespace", ""), meta["name"]) in self._objects[rtype.plural]:
            meta.pop("resourceVersion", None)
            return self.update(new)
        return self.create(new)

    def patch(self, kind: str, namespace: str, name: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        """JSON merge patch (RFC 7386); ``metadata.deletionTimestamp`` may be set this way too.

        A ``metadata.resourceVersion`` in the patch is a precondition, as on the real server: a stale
        one is a 409 Conflict."""
        rtype = self._rtype(kind)
        old = self._objects[rtype.plural].get((namespace, name))
        if old is None:
            raise rtype.not_found(name)
        merged = _merge_patch(copy.deepcopy(old), patch)
        if not isinstance(merged.get("metadata"), dict):
            raise ApiError(400, "BadRequest", "metadata must be an object")
        for fixed in ("name", "namespace"):
            if fixed in old["metadata"] and merged["metadata"].get(fixed) != old["metadata"][fixed]:
                raise ApiError(
                    400,
                    "BadRequest",
                    f"the {fixed} of the object ({merged['metadata'].get(fixed)}) does not match the {fixed} "
                    f"on the URL ({old['metadata'][fixed]})",
                )
        merged["metadata"]["resourceVersion"] = (
            merged["metadata"].get("resourceVersion") or old["metadata"]["resourceVersion"]
        )
        deletion = (patch.get("metadata") or {}).get("deletionTimestamp")
        if deletion:
            return self._mark_deleting(rtype, merged, deletion)
        return self.update(merged)

    def delete(
        self, kind: str, namespace: str, name: str, *, graceful: bool = False
    ) -> dict[str, Any] | None:
        """Delete; with finalizers (or ``graceful`` for pods) only mark ``deletionTimestamp``."""
        rtype = self._rtype(kind)
        key = (namespace, name)
        old = self._objects[rtype.plural].get(key)
        if old is None:
            raise rtype.not_found(name)
        if old["metadata"].get("finalizers") or (graceful and rtype.kind == "Pod"):
            if "deletionTimestamp" in old["metadata"]:
                return copy.deepcopy(old)
            return self._mark_deleting(rtype, copy.deepcopy(old), _now())
        return self._remove(rtype, key)

    def _mark_deleting(self, rtype: ResourceType, obj: dict[str, Any], when: str) -> dict[str, Any]:
        key = (obj["metadata"].get("namespace", ""), obj["metadata"]["name"])
        old = self._objects[rtype.plural][key]
        obj["metadata"]["deletionTimestamp"] = when
        if rtype.kind == "Pod":
            obj["metadata"].setdefault("deletionGracePeriodSeconds", 30)
        obj["metadata"]["resourceVersion"] = self._next_rv()
        self._objects[rtype.plural][key] = obj
        self._record(rtype, "MODIFIED", old, obj)
        return copy.deepcopy(obj)

    def _remove(self, rtype: ResourceType, key: tuple[str, str]) -> dict[str, Any]:
        old = self._objects[rtype.plural].pop(key)
        final = copy.deepcopy(old)
        final["metadata"]["resourceVersion"] = self._next_rv()
        self._record(rtype, "DELETED", old, final)
        return copy.deepcopy(final)

    def _prepare(self, obj: Mapping[str, Any]) -> tuple[ResourceType, dict[str, Any]]:
        if not isinstance(obj, Mapping):
            raise ApiError(400, "BadRequest", "object must be a JSON object")
        new = copy.deepcopy(dict(obj))
        rtype = self._rtype(str(new.get("kind", "")))
        new["kind"] = rtype.kind
        new["apiVersion"] = rtype.api_version
        meta = new.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise ApiError(400, "BadRequest", "metadata must be an object")
        if not meta.get("name"):
            raise rtype.invalid(
                "", [FieldError("metadata.name", "name or generateName is required", required=True)]
            )
        if rtype.namespaced:
            meta["namespace"] = meta.get("namespace") or "default"
        else:
            meta.pop("namespace", None)
        if rtype.kind == "Secret" and "stringData" in new:
            data = new.setdefault("data", {})
            for k, v in (new.pop("stringData") or {}).items():
                data[k] = base64.b64encode(str(v).encode()).decode()
        check = _KIND_CHECKS.get(rtype.kind)
        if check is not None:
            errors = check(new)
            if errors:
                raise rtype.invalid(meta["name"], errors)
        return rtype, new

    def load(self, documents: Iterable[Mapping[str, Any]]) -> int:
        """Apply objects (``List`` kinds are unpacked); returns how many were stored."""
        count = 0
        for doc in documents:
            if not doc:
                continue
            if str(doc.get("kind", "")).endswith("List") and "items" in doc:
                count += self.load(doc["items"])
            elif doc.get("kind") == "CustomResourceDefinition":
                continue  # the four kinds are built in
            else:
                self.apply(doc)
                count += 1
        return count

    def load_yaml(self, text: str) -> int:
        return self.load(d for d in yaml.safe_load_all(text) if d)

    # --- HTTP --------------------------------------------------------------------------------

    def _routes(self, app: web.Application) -> None:
        r = app.router
        r.add_get("/api", self._api_versions)
        r.add_get("/apis", self._api_groups)
        r.add_get("/version", self._version)
        r.add_get("/healthz", self._ok)
        r.add_get("/readyz", self._ok)
        r.add_get("/livez", self._ok)
        r.add_get("/api/v1", self._resource_list_core)
        r.add_get(OIDC_DISCOVERY_PATH, self._oidc_discovery)
        r.add_get(OIDC_JWKS_PATH, self._oidc_jwks)
        r.add_post(
            "/api/{version}/namespaces/{namespace}/{plural}/{name}/{subresource}", self._create_subresource
        )
        r.add_get("/apis/{group}", self._api_group)
        r.add_get("/apis/{group}/{version}", self._resource_list_group)
        for prefix in ("/api/{version}", "/apis/{group}/{version}"):
            r.add_get(prefix + "/{plural}", self._collection)
            r.add_get(prefix + "/namespaces/{namespace}/{plural}", self._collection)
            r.add_post(prefix + "/namespaces/{namespace}/{plural}", self._create)
            r.add_get(prefix + "/namespaces/{namespace}/{plural}/{name}", self._get)
            r.add_put(prefix + "/namespaces/{namespace}/{plural}/{name}", self._update)
            r.add_patch(prefix + "/namespaces/{namespace}/{plural}/{name}", self._patch)
            r.add_delete(prefix + "/namespaces/{namespace}/{plural}/{name}", self._delete)
            # Cluster-scoped kinds (nodes); _resolve refuses namespaced kinds on these paths.
            r.add_post(prefix + "/{plural}", self._create)
            r.add_get(prefix + "/{plural}/{name}", self._get)
            r.add_put(prefix + "/{plural}/{name}", self._update)
            r.add_patch(prefix + "/{plural}/{name}", self._patch)
            r.add_delete(prefix + "/{plural}/{name}", self._delete)

    @staticmethod
    def _verb(request: web.Request) -> str:
        m = request.match_info
        if "plural" not in m:
            return "discovery"
        if request.method != "GET":
            return "write"
        if request.query.get("watch") in ("true", "1"):
            return "watch"
        return "get" if "name" in m else "list"

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Callable[..., Any]) -> web.StreamResponse:
        verb = self._verb(request)
        plural = request.match_info.get("plural", "")
        if "subresource" in request.match_info:
            plural = f"{plural}/{request.match_info['subresource']}"
        action = _METHOD_VERBS.get(request.method, verb) if verb == "write" else verb
        record = RequestRecord(
            request.method,
            request.path,
            dict(request.query),
            verb,
            asyncio.get_running_loop().time(),
            request.headers.get("User-Agent", ""),
            plural,
            action,
        )
        self.requests.append(record)
        self._touch()
        response: web.StreamResponse
        try:
            anonymous = self.anonymous_discovery and request.path in (OIDC_DISCOVERY_PATH, OIDC_JWKS_PATH)
            if (
                self.token is not None
                and not anonymous
                and request.headers.get("Authorization") != f"Bearer {self.token}"
            ):
                raise ApiError(401, "Unauthorized", "Unauthorized")
            if before := self._delay(verb, action, plural, after=False):
                await asyncio.sleep(before)
            failure = next((f for f in self._failures if f.scope.matches(verb, action, plural)), None)
            if failure is not None:
                self._failures.remove(failure)
                raise self._injected(failure, request, action, plural)
            response = await handler(request)
        except ApiError as exc:
            response = self._status(exc)
        record.status = response.status
        self._touch()
        if (after := self._delay(verb, action, plural, after=True)) and not response.prepared:
            await asyncio.sleep(after)
        return response

    def _delay(self, verb: str, action: str, plural: str, *, after: bool) -> float:
        return sum(
            d.seconds for d in self._delays if d.after == after and d.scope.matches(verb, action, plural)
        )

    @staticmethod
    def _status(exc: ApiError) -> web.Response:
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
        return web.json_response(exc.status(), status=exc.code, headers=headers)

    async def _ok(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def _version(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"major": "1", "minor": "29", "gitVersion": "v1.29.0-standin", "platform": "linux/amd64"}
        )

    async def _api_versions(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "kind": "APIVersions",
                "versions": ["v1"],
                "serverAddressByClientCIDRs": [
                    {"clientCIDR": "0.0.0.0/0", "serverAddress": f"{self.host}:{self.port}"}
                ],
            }
        )

    @staticmethod
    def _group_doc(group: str) -> dict[str, Any]:
        versions = sorted({r.version for r in RESOURCES if r.group == group})
        if not versions:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        gvs = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
        return {
            "kind": "APIGroup",
            "apiVersion": "v1",
            "name": group,
            "versions": gvs,
            "preferredVersion": gvs[0],
        }

    async def _api_groups(self, request: web.Request) -> web.Response:
        # Built-in groups first, then the CRDs' group, as the real server orders them.
        names = sorted({r.group for r in RESOURCES if r.group}, key=lambda g: (g == CRD_GROUP, g))
        groups = []
        for name in names:
            group = self._group_doc(name)
            group.pop("kind")
            group.pop("apiVersion")
            groups.append(group)
        return web.json_response({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})

    async def _api_group(self, request: web.Request) -> web.Response:
        return web.json_response(self._group_doc(request.match_info["group"]))

    @staticmethod
    def _resource_list(group_version: str, types: Iterable[ResourceType]) -> dict[str, Any]:
        verbs = ["create", "delete", "get", "list", "patch", "update", "watch"]
        return {
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": group_version,
            "resources": [
                {
                    "name": t.plural,
                    "singularName": t.singular,
                    "namespaced": t.namespaced,
                    "kind": t.kind,
                    "verbs": verbs,
                    **({"shortNames": list(t.short_names)} if t.short_names else {}),
                }
                for t in types
            ],
        }

    async def _resource_list_core(self, request: web.Request) -> web.Response:
        # Nodes are served but not advertised, which keeps the discovery document as it was.
        return web.json_response(
            self._resource_list("v1", (r for r in RESOURCES if r.core and r.namespaced and r.advertised))
        )

    async def _resource_list_group(self, request: web.Request) -> web.Response:
        m = request.match_info
        types = [r for r in RESOURCES if r.group == m["group"] and r.version == m["version"] and r.group]
        if not types:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        return web.json_response(self._resource_list(f"{m['group']}/{m['version']}", types))

    @staticmethod
    def _resolve(request: web.Request) -> ResourceType:
        m = request.match_info
        rtype = BY_PLURAL.get(m["plural"])
        group = m.get("group", "")
        if rtype is None or rtype.group != group or rtype.version != m["version"]:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if not rtype.namespaced and "namespace" in m:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if rtype.namespaced and "name" in m and "namespace" not in m:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if rtype.namespaced and request.method == "POST" and "namespace" not in m:
            raise ApiError(
                405, "MethodNotAllowed", "the server does not allow this method on the requested resource"
            )
        return rtype

    def _filter(self, request: web.Request, rtype: ResourceType) -> Filter:
        q = request.query
        return Filter(
            rtype,
            request.match_info.get("namespace"),
            parse_label_selector(q.get("labelSelector", "")),
            parse_field_selector(q.get("fieldSelector", ""), rtype),
        )

    async def _collection(self, request: web.Request) -> web.StreamResponse:
        rtype = self._resolve(request)
        flt = self._filter(request, rtype)
        if request.query.get("watch") in ("true", "1"):
            return await self._watch(request, flt)
        return web.json_response(self._list(request, flt))

    def _list(self, request: web.Request, flt: Filter) -> dict[str, Any]:
        rtype = flt.rtype
        q = request.query
        try:
            limit = int(q.get("limit", "0") or 0)
        except ValueError:
            raise ApiError(400, "BadRequest", "limit must be an integer") from None
        token = q.get("continue")
        if token:
            snap = self._snapshots.get(token)
            if snap is None or snap[0] < self._compacted_rv:
                raise ApiError(
                    410,
                    "Expired",
                    "The provided continue parameter is too old to display a consistent list result. "
                    "You can start a new list without the continue parameter.",
                )
            rv, items, offset, flt = snap
        else:
            store = self._objects[rtype.plural]
            rv, offset = self._rv, 0
            items = [store[k] for k in sorted(store) if flt.matches(store[k])]
        end = offset + limit if limit > 0 else len(items)
        meta: dict[str, Any] = {"resourceVersion": str(rv)}
        if end < len(items):
            new_token = secrets.token_urlsafe(12)
            self._snapshots[new_token] = (rv, items, end, flt)
            while len(self._snapshots) > 256:
                self._snapshots.pop(next(iter(self._snapshots)))
            meta["continue"] = new_token
            meta["remainingItemCount"] = len(items) - end
        page = items[offset:end]
        if rtype.core:
            # The real server omits kind/apiVersion on core list items; clients must cope.
            page = [{k: v for k, v in o.items() if k not in ("kind", "apiVersion")} for o in page]
        return {"kind": f"{rtype.kind}List", "apiVersion": rtype.api_version, "metadata": meta, "items": page}

    async def _watch(self, request: web.Request, flt: Filter) -> web.StreamResponse:
        q = request.query
        rv_param = q.get("resourceVersion", "")
        bookmarks = q.get("allowWatchBookmarks") in ("true", "1")
        try:
            timeout = float(q.get("timeoutSeconds") or self.default_watch_timeout_s)
            start_rv = int(rv_param) if rv_param not in ("", "0") else None
        except ValueError:
            raise ApiError(400, "BadRequest", "invalid resourceVersion or timeoutSeconds") from None
        too_old = start_rv is not None and start_rv < self._compacted_rv
        if too_old and self._gone_as_http:
            raise ApiError(410, "Expired", f"too old resource version: {start_rv} ({self._compacted_rv})")
        resp = web.StreamResponse(
            headers={"Content-Type": "application/json", "Cache-Control": "no-cache, private"}
        )
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        if too_old:
            error = ApiError(410, "Expired", f"too old resource version: {start_rv} ({self._compacted_rv})")
            await resp.write((json.dumps({"type": "ERROR", "object": error.status()}) + "\n").encode())
            await resp.write_eof()
            return resp
        watch = Watch(flt)
        # Replay and registration happen with no await in between, so no event can fall in a gap.
        if start_rv is None:
            store = self._objects[flt.rtype.plural]
            for key in sorted(store):
                obj = store[key]
                if flt.matches(obj):
                    watch.push(Event(self._rv, flt.rtype.plural, "ADDED", None, obj).line("ADDED"), self._rv)
        else:
            for event in self._history:
                if event.rv > start_rv:
                    watch.offer(event)
        self._watches.add(watch)
        self._touch()
        try:
            await self._pump(request, resp, watch, timeout, bookmarks)
        except ConnectionError:
            pass  # the client went away mid-write
        finally:
            self._watches.discard(watch)
            self._touch()
        return resp

    async def _pump(
        self, request: web.Request, resp: web.StreamResponse, watch: Watch, timeout: float, bookmarks: bool
    ) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        next_bookmark = loop.time() + self.bookmark_interval_s
        rtype = watch.filter.rtype
        while True:
            if watch.closed:
                self._abort(request)
                return
            if watch.stalled:
                # Silent for good: hold the connection until the client gives up or the server
                # goes down (stop_listening aborts the connection, which cancels this handler).
                await asyncio.Event().wait()
            now = loop.time()
            if watch.queue and not self._paused:
                data = b"".join(watch.queue)
                watch.queue.clear()
                if self._cut_next > 0:
                    self._cut_next -= 1
                    first = data.split(b"\n", 1)[0]
                    await resp.write(first[: max(1, len(first) // 2)])
                    if self._cut_clean:
                        await resp.write_eof()
                    else:
                        self._abort(request, graceful=True)
                    return
                await resp.write(data)
                watch.sent_rv = watch.queued_rv
                self._touch()
                if watch.end_after_flush:
                    await resp.write_eof()
                    return
                continue
            if now >= deadline:
                await resp.write_eof()
                return
            if bookmarks and not self._paused and now >= next_bookmark:
                bookmark = {
                    "type": "BOOKMARK",
                    "object": {
                        "kind": rtype.kind,
                        "apiVersion": rtype.api_version,
                        "metadata": {"resourceVersion": str(self._rv)},
                    },
                }
                await resp.write((json.dumps(bookmark) + "\n").encode())
                watch.sent_rv = self._rv
                self._touch()
                next_bookmark = now + self.bookmark_interval_s
                continue
            watch.wake.clear()
            # While paused, only resume_watches (or the deadline) may wake us: no bookmark timer.
            wait_until = min(deadline, next_bookmark) if bookmarks and not self._paused else deadline
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, wait_until - now)):
                    await watch.wake.wait()

    @staticmethod
    def _abort(request: web.Request, *, graceful: bool = False) -> None:
        transport = request.transport
        if transport is not None:
            # close() flushes what was written (the half line) first; abort() drops it too.
            transport.close() if graceful else transport.abort()

    async def _get(self, request: web.Request) -> web.Response:
        rtype = self._resolve(request)
        m = request.match_info
        obj = self._objects[rtype.plural].get((m.get("namespace", ""), m["name"]))
        if obj is None:
            raise rtype.not_found(m["name"])
        return web.json_response(obj)

    async def _oidc_discovery(self, request: web.Request) -> web.Response:
        return web.json_response(
            self.openid_configuration(), headers={"Cache-Control": "public, max-age=3600"}
        )

    async def _oidc_jwks(self, request: web.Request) -> web.Response:
        return web.json_response(
            self.jwks(),
            content_type="application/jwk-set+json",
            headers={"Cache-Control": "public, max-age=3600"},
        )

    async def _create_subresource(self, request: web.Request) -> web.Response:
        """POST to a subresource: only ``serviceaccounts/{name}/token`` (TokenRequest) is served."""
        rtype = self._resolve(request)
        m = request.match_info
        if rtype.plural != "serviceaccounts" or m["subresource"] != "token":
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        body = await self._body(request)
        answer, warnings = self.create_token(m["namespace"], m["name"], body)
        headers = {"Warning": ", ".join(f'299 - "{w}"' for w in warnings)} if warnings else None
        return web.json_response(answer, status=201, headers=headers)

    async def _body(self, request: web.Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except ValueError:
            raise ApiError(400, "BadRequest", "body is not JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "BadRequest", "body must be an object")
        return body

    def _check_target(self, request: web.Request, rtype: ResourceType, body: dict[str, Any]) -> None:
        body.setdefault("kind", rtype.kind)
        if body["kind"] != rtype.kind:
            raise ApiError(400, "BadRequest", f"kind {body['kind']} does not match {rtype.plural}")
        meta = body.setdefault("metadata", {})
        if rtype.namespaced:
            meta.setdefault("namespace", request.match_info["namespace"])
            if meta["namespace"] != request.match_info["namespace"]:
                raise ApiError(400, "BadRequest", "the namespace of the object does not match the request")
        if "name" in request.match_info:
            meta.setdefault("name", request.match_info["name"])
            if meta["name"] != request.match_info["name"]:
                raise ApiError(400, "BadRequest", "the name of the object does not match the request")

    async def _create(self, request: web.Request) -> web.Response:
        rtype = self._resolve(request)
        body = await self._body(request)
        self._check_target(request, rtype, body)
        return web.json_response(self.create(body), status=201)

    async def _update(self, request: web.Request) -> web.Response:
        rtype = self._resolve(request)
        body = await self._body(request)
        self._check_target(request, rtype, body)
        meta = body["metadata"]
        if (meta.get("namespace", ""), meta["name"]) not in self._objects[rtype.plural]:
            if not rtype.create_on_update:
                raise rtype.not_found(meta["name"])
            meta.pop("resourceVersion", None)
            return web.json_response(self.create(body), status=201)
        if not meta.get("resourceVersion") and not rtype.unconditional_update:
            raise rtype.invalid(
                meta["name"],
                [FieldError("metadata.resourceVersion", "must be specified for an update", GoLiteral("0x0"))],
                kind=rtype.qualified,
            )
        return web.json_response(self.update(body))

    async def _patch(self, request: web.Request) -> web.Response:
        rtype = self._resolve(request)
        if request.content_type not in (
            "application/merge-patch+json",
            "application/strategic-merge-patch+json",
        ):
            raise ApiError(
                415,
                "UnsupportedMediaType",
                f"the body of the request was in an unknown format: {request.content_type}",
            )
        body = await self._body(request)
        m = request.match_info
        if "deletionTimestamp" in (body.get("metadata") or {}):
            raise ApiError(422, "Invalid", "metadata.deletionTimestamp: field is immutable")
        return web.json_response(self.patch(rtype.plural, m.get("namespace", ""), m["name"], body))

    async def _delete(self, request: web.Request) -> web.Response:
        rtype = self._resolve(request)
        m = request.match_info
        key = (m.get("namespace", ""), m["name"])
        options = await self._body(request) if request.can_read_body else {}
        pre = options.get("preconditions") or {}
        current = self._objects[rtype.plural].get(key)
        if current is not None and isinstance(pre, dict):
            for field_name, label in (("resourceVersion", "ResourceVersion"), ("uid", "UID")):
                want, have = pre.get(field_name), current["metadata"].get(field_name)
                if want and want != have:
                    raise ApiError(
                        409,
                        "Conflict",
                        f'Operation cannot be fulfilled on {rtype.qualified} "{m["name"]}": Precondition '
                        f"failed: {label} in precondition: {want}, {label} in object meta: {have}",
                        details=rtype.details(m["name"]),
                    )
        result = self.delete(rtype.plural, *key, graceful=rtype.kind == "Pod")
        if key in self._objects[rtype.plural] or rtype.returns_deleted:
            return web.json_response(result)
        details = {**rtype.details(m["name"]), "uid": (result or {}).get("metadata", {}).get("uid", "")}
        return web.json_response(
            {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": details}
        )


def _merge_patch(target: Any, patch: Any) -> Any:
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    if not isinstance(target, dict):
        target = {}
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        else:
            target[key] = _merge_patch(target.get(key), value)
    return target


# --- names, times and per-kind validation ---------------------------------------------------

_NAME_CHARS = "bcdfghjklmnpqrstvwxz2456789"  # apiserver's SimpleNameGenerator alphabet (no vowels)


def _generate_name(prefix: str) -> str:
    return prefix[:58] + "".join(secrets.choice(_NAME_CHARS) for _ in range(5))


_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")
_RFC3339_MICRO = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}(Z|[+-]\d{2}:\d{2})$")
_GO_RFC3339 = "2006-01-02T15:04:05Z07:00"
_GO_RFC3339_MICRO = "2006-01-02T15:04:05.000000Z07:00"


def _parse_time(kind: str, value: str, *, micro: bool) -> datetime.datetime:
    """Go's ``time.Parse`` of a ``metav1.MicroTime`` (exactly six fractional digits) or a
    ``metav1.Time`` (RFC 3339, any fraction); a mismatch is the decoder's 400, as the server answers."""
    pattern, layout = (_RFC3339_MICRO, _GO_RFC3339_MICRO) if micro else (_RFC3339, _GO_RFC3339)
    parsed: datetime.datetime | None = None
    if pattern.match(value):
        with contextlib.suppress(ValueError):
            parsed = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    if parsed is None:
        raise ApiError(
            400,
            "BadRequest",
            f'{kind} in version "v1" cannot be handled as a {kind}: parsing time "{value}" as "{layout}"',
        )
    return parsed.astimezone(datetime.UTC)


def _normalize_times(obj: dict[str, Any], paths: Iterable[str], *, micro: bool) -> None:
    """Store times as the server writes them back: UTC, ``...:57.123456Z`` or whole seconds ``...:57Z``."""
    for path in paths:
        *parents, leaf = path.split(".")
        holder: Any = obj
        for part in parents:
            holder = holder.get(part) if isinstance(holder, dict) else None
        if not isinstance(holder, dict) or holder.get(leaf) is None:
            continue
        value = holder[leaf]
        if not isinstance(value, str):
            raise ApiError(400, "BadRequest", f"{obj['kind']}: {path}: a time must be a string")
        if value == "" and not micro:
            holder[leaf] = None  # an empty metav1.Time decodes to the zero time, written as null
            continue
        when = _parse_time(obj["kind"], value, micro=micro)
        holder[leaf] = when.strftime("%Y-%m-%dT%H:%M:%S.%fZ" if micro else "%Y-%m-%dT%H:%M:%SZ")


def _int_fields(obj: dict[str, Any], section: str, names: Iterable[str]) -> dict[str, Any]:
    """``obj[section]`` (an object, or 400) whose ``names`` are integers or absent (or 400)."""
    part = obj.get(section)
    if part is None:
        return {}
    if not isinstance(part, dict):
        raise ApiError(400, "BadRequest", f"{obj['kind']}: {section} must be an object")
    for name in names:
        value = part.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise ApiError(
                400,
                "BadRequest",
                f'{obj["kind"]} in version "v1" cannot be handled as a {obj["kind"]}: json: cannot unmarshal '
                f"{type(value).__name__} into Go struct field .{section}.{name} of type int32",
            )
    return part


def _check_lease(obj: dict[str, Any]) -> list[FieldError]:
    """``ValidateLeaseSpec``; acquireTime/renewTime are MicroTimes."""
    spec = _int_fields(obj, "spec", ("leaseDurationSeconds", "leaseTransitions"))
    _normalize_times(obj, ("spec.acquireTime", "spec.renewTime"), micro=True)
    errors: list[FieldError] = []
    holder = spec.get("holderIdentity")
    if holder is not None and not isinstance(holder, str):
        raise ApiError(400, "BadRequest", "Lease: spec.holderIdentity must be a string")
    duration = spec.get("leaseDurationSeconds")
    if duration is not None and duration <= 0:
        errors.append(FieldError("spec.leaseDurationSeconds", "must be greater than 0", duration))
    transitions = spec.get("leaseTransitions")
    if transitions is not None and transitions < 0:
        errors.append(FieldError("spec.leaseTransitions", "must be greater than or equal to 0", transitions))
    return errors


def _check_event(obj: dict[str, Any]) -> list[FieldError]:
    """core/v1 ``legacyValidateEvent``: the only validation the v1 API applies to Events."""
    _int_fields(obj, "involvedObject", ())
    _int_fields(obj, "series", ("count",))
    if obj.get("count") is not None and (not isinstance(obj["count"], int) or isinstance(obj["count"], bool)):
        raise ApiError(400, "BadRequest", "Event: count must be an integer")
    _normalize_times(obj, ("firstTimestamp", "lastTimestamp"), micro=False)
    _normalize_times(obj, ("eventTime", "series.lastObservedTime"), micro=True)
    namespace = obj["metadata"].get("namespace", "")
    involved_ns = str((obj.get("involvedObject") or {}).get("namespace") or "")
    mismatch = FieldError("involvedObject.namespace", "does not match event.namespace", involved_ns)
    errors: list[FieldError] = []
    if not obj.get("eventTime"):
        # An old-style event: the namespaces agree, or the object is cluster-scoped and the event
        # lives in "default" (for old clients).
        if (involved_ns and involved_ns != namespace) or (
            not involved_ns and namespace not in ("", "default")
        ):
            errors.append(mismatch)
        return errors
    if not involved_ns and namespace not in ("default", "kube-system"):
        errors.append(mismatch)
    for name, limit in (
        ("reportingComponent", 0),
        ("reportingInstance", 128),
        ("action", 128),
        ("reason", 128),
    ):
        value = str(obj.get(name) or "")
        if not value:
            errors.append(FieldError(name, "", required=True))
        elif limit and len(value) > limit:
            errors.append(FieldError(name, f"can have at most {limit} characters", ""))
    if len(str(obj.get("message") or "")) > 1024:
        errors.append(FieldError("message", "can have at most 1024 characters", ""))
    return errors


_KIND_CHECKS: dict[str, Callable[[dict[str, Any]], list[FieldError]]] = {
    "Lease": _check_lease,
    "Event": _check_event,
}


# --- object builders (tests, benchmark, demo) ------------------------------------------------

_ip_counter = itertools.count(1)


def pod(
    name: str,
    *,
    namespace: str = "default",
    node: str = "node-a",
    ip: str | None = None,
    phase: str = "Running",
    labels: Mapping[str, str] | None = None,
    host_network: bool = False,
    service_account: str | None = None,
) -> dict[str, Any]:
    """A Pod; ``service_account`` sets ``spec.serviceAccountName`` (unset means "default", as the
    ServiceAccount admission plugin would make it)."""
    if ip is None:
        n = next(_ip_counter)
        ip = f"10.244.{(n >> 8) & 255}.{n & 255}"
    spec: dict[str, Any] = {
        "nodeName": node,
        "hostNetwork": host_network,
        "containers": [{"name": "app", "image": "app"}],
    }
    if service_account is not None:
        spec["serviceAccountName"] = service_account
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": dict(labels or {})},
        "spec": spec,
        "status": {"phase": phase, "podIP": ip},
    }


def azure_identity(
    name: str,
    *,
    namespace: str = "default",
    client_id: str = "00000000-0000-0000-0000-000000000001",
    id_type: int = 0,
    resource_id: str | None = None,
    secret: tuple[str, str] | None = None,
    tenant_id: str = "",
) -> dict[str, Any]:
    spec: dict[str, Any] = {"type": id_type, "clientID": client_id}
    if id_type == 0:
        spec["resourceID"] = resource_id or (
            "/subscriptions/11111111-1111-1111-1111-111111111111/resourcegroups/rg/providers/"
            f"Microsoft.ManagedIdentity/userAssignedIdentities/{name}"
        )
    if secret is not None:
        spec["clientPassword"] = {"namespace": secret[0], "name": secret[1]}
    if tenant_id:
        spec["tenantID"] = tenant_id
    return {
        "apiVersion": f"{CRD_GROUP}/{CRD_VERSION}",
        "kind": "AzureIdentity",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def binding(name: str, identity: str, selector: str, *, namespace: str = "default") -> dict[str, Any]:
    return {
        "apiVersion": f"{CRD_GROUP}/{CRD_VERSION}",
        "kind": "AzureIdentityBinding",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"azureIdentity": identity, "selector": selector},
    }


def assigned_identity(
    pod_name: str,
    identity: Mapping[str, Any],
    *,
    pod_namespace: str = "default",
    node: str = "node-a",
    state: str = "Assigned",
    namespace: str = "default",
) -> dict[str, Any]:
    id_meta = identity["metadata"]
    return {
        "apiVersion": f"{CRD_GROUP}/{CRD_VERSION}",
        "kind": "AzureAssignedIdentity",
        "metadata": {
            "name": f"{pod_name}-{pod_namespace}-{id_meta['name']}",
            "namespace": namespace,
            "labels": {"nodename": node},
            "finalizers": ["azureassignedidentity.finalizers.aadpodidentity.k8s.io"],
        },
        "spec": {
            "azureIdentityRef": copy.deepcopy(dict(identity)),
            "pod": pod_name,
            "podNamespace": pod_namespace,
            "nodename": node,
        },
        "status": {"status": state, "availableReplicas": 1},
    }


def node(name: str, *, provider_id: str = "", labels: Mapping[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": dict(labels or {})},
        "spec": {"providerID": provider_id} if provider_id else {},
    }


def exception(name: str, pod_labels: Mapping[str, str], *, namespace: str = "default") -> dict[str, Any]:
    return {
        "apiVersion": f"{CRD_GROUP}/{CRD_VERSION}",
        "kind": "AzurePodIdentityException",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"podLabels": dict(pod_labels)},
    }


def service_account(
    name: str, *, namespace: str = "default", annotations: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """A ``v1`` ServiceAccount; Azure AD Workload Identity reads the annotations
    ``azure.workload.identity/client-id`` and (optionally) ``azure.workload.identity/tenant-id``."""
    meta: dict[str, Any] = {"name": name, "namespace": namespace}
    if annotations:
        meta["annotations"] = dict(annotations)
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta}


def secret(name: str, data: Mapping[str, str], *, namespace: str = "default") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace},
        "type": "Opaque",
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
    }


def micro_time(when: datetime.datetime | None = None) -> str:
    """A ``metav1.MicroTime`` as the server writes it: ``2026-12-07T02:32:57.123456Z``."""
    when = when or datetime.datetime.now(datetime.UTC)
    return when.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def lease(
    name: str,
    *,
    namespace: str = "default",
    holder: str | None = None,
    duration_s: int | None = 15,
    acquire_time: str | None = None,
    renew_time: str | None = None,
    transitions: int | None = None,
) -> dict[str, Any]:
    """A ``coordination.k8s.io/v1`` Lease; unset spec fields are left out, as client-go leaves them."""
    spec: dict[str, Any] = {
        "holderIdentity": holder,
        "leaseDurationSeconds": duration_s,
        "acquireTime": acquire_time,
        "renewTime": renew_time,
        "leaseTransitions": transitions,
    }
    return {
        "apiVersion": f"{COORDINATION_GROUP}/v1",
        "kind": "Lease",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {k: v for k, v in spec.items() if v is not None},
    }


def endpoints(
    name: str,
    *,
    namespace: str = "default",
    annotations: Mapping[str, str] | None = None,
    subsets: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A ``v1`` Endpoints (the old leader-election lock keeps its record in an annotation)."""
    obj: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Endpoints",
        "metadata": {"name": name, "namespace": namespace, "annotations": dict(annotations or {})},
    }
    if subsets is not None:
        obj["subsets"] = copy.deepcopy(subsets)
    return obj


def event(
    involved: Mapping[str, Any],
    reason: str,
    message: str = "",
    *,
    type_: str = "Normal",
    component: str = "standin",
    name: str | None = None,
    count: int = 1,
    at: str | None = None,
) -> dict[str, Any]:
    """A core ``v1`` Event about ``involved`` (an object as stored, or a bare reference), in its
    namespace, as client-go's recorder writes one; ``name`` None gives ``generateName``."""
    meta = involved.get("metadata") or {}
    namespace = meta.get("namespace") or involved.get("namespace") or ""
    ref = {
        "kind": involved.get("kind", ""),
        "namespace": namespace,
        "name": meta.get("name") or involved.get("name", ""),
        "uid": meta.get("uid") or involved.get("uid", ""),
        "apiVersion": involved.get("apiVersion", ""),
        "resourceVersion": meta.get("resourceVersion") or involved.get("resourceVersion", ""),
    }
    when = at or _now()
    metadata: dict[str, Any] = {"namespace": namespace or "default"}
    if name is None:
        metadata["generateName"] = f"{ref['name']}."
    else:
        metadata["name"] = name
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": metadata,
        "involvedObject": {k: v for k, v in ref.items() if v},
        "reason": reason,
        "message": message,
        "source": {"component": component},
        "firstTimestamp": when,
        "lastTimestamp": when,
        "count": count,
        "type": type_,
        "reportingComponent": "",
        "reportingInstance": "",
    }


# --- CLI -------------------------------------------------------------------------------------


async def _serve(args: argparse.Namespace) -> None:
    server = FakeApiServer(
        host=args.host,
        port=args.port,
        tls=args.tls,
        token=args.token,
        bookmark_interval_s=args.bookmark_interval,
    )
    for path in args.load or ():
        count = server.load_yaml(await asyncio.to_thread(Path(path).read_text))
        log.info("loaded %d objects from %s", count, path)
    await server.start()
    if args.kubeconfig:
        server.write_kubeconfig(args.kubeconfig)
        log.info("kubeconfig written to %s", args.kubeconfig)
    print(f"API server stand-in listening on {server.url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m standins.apiserver", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=6443)
    parser.add_argument("--load", action="append", metavar="FILE.yaml", help="objects to create (repeatable)")
    parser.add_argument("--tls", action="store_true", help="serve HTTPS with a throw-away trustme CA")
    parser.add_argument("--token", help="require this bearer token")
    parser.add_argument("--kubeconfig", help="write a kubeconfig for this server here")
    parser.add_argument("--bookmark-interval", type=float, default=60.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
