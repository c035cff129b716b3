"""An Azure Resource Manager stand-in for VM and VMSS identities, on a real socket.

Serves ``GET``/``PATCH`` of
``/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Compute/{virtualMachines|virtualMachineScaleSets}/{name}``
with ARM's identity semantics, as MIC uses them:

* ``api-version`` is required (400 ``MissingApiVersionParameter``), a bearer token too (401);
* a PATCH body ``{"identity": {"type": ..., "userAssignedIdentities": {id: {} | null}}}`` merges the
  map into the resource's identities (``{}`` attaches, ``null`` detaches; IDs compare
  case-insensitively); ``type`` ``None`` drops everything, ``SystemAssigned`` drops the user
  identities, a type without ``SystemAssigned`` drops the system-assigned principal, one with it keeps
  the principal (or creates one); a type with ``UserAssigned`` but no user identity left is a 400;
* a PATCH is a long-running operation answered as Microsoft.Compute does: **200** with the resource
  as the PATCH leaves it (the new model) and ``provisioningState: Updating``, plus
  ``Azure-AsyncOperation``, ``Location`` and ``Retry-After``. The model is what ARM shows (the PATCH
  answer and every GET meanwhile), but nothing is **in effect** (``identities(...)``: what IMDS on
  the instances would serve) until the operation turns ``Succeeded`` after its LRO duration. An
  operation that ends ``Failed``/``Canceled`` applies nothing: the model returns to what is in effect
  and ``provisioningState`` becomes ``Failed``;
* the operation status URL answers ``{"status": "InProgress"}`` (+ ``Retry-After``), then
  ``Succeeded``, or ``Failed``/``Canceled`` with ``error: {code, message}``; the Location URL answers
  202 while in progress, then 200, or the operation's error with status 500;
* identities in ``forbidden`` make the whole PATCH fail with 403 ``LinkedAuthorizationFailed``,
  naming them the way ARM does, and nothing is applied.

Knobs: ``patch_status`` (200, or 201/202 as other APIs answer), ``lro_headers`` (which of
``Azure-AsyncOperation``/``Location`` a PATCH answer carries; ``()`` for none), ``lro_delay_s`` and
``set_lro_delay(name, s)`` (operation duration, per VM/VMSS name), ``delay_s`` and
``set_request_delay(name, s)`` (slowness of every request, per resource name), ``poll_retry_after``.
Faults: ``fail_next`` (any status/code, optional Retry-After, per method and resource name),
``refuse_patches(name, ...)`` / ``allow_patches(name)`` (every PATCH of one VM/VMSS refused with a
given status/code until allowed again), ``fail_next_operation(n, status=Failed|Canceled, name=...)``
(the LRO is accepted but ends ``Failed``/``Canceled``).
Observation: ``calls`` (every request, with its body), ``identities(...)`` (in effect),
``model_identities(...)`` (what ARM shows), ``principal_id(...)``, ``operations`` (each LRO's state).
Test set-up: ``add_vm``, ``add_vmss``, ``set_identities`` (e.g. a manual removal; with ``lro_s`` it
runs as an operation of its own, like another actor's update).
"""

from __future__ import annotations

import asyncio
import base64
import copy
import itertools
import json
import ssl
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import trustme
from aiohttp import web

VM = "virtualMachines"
VMSS = "virtualMachineScaleSets"
ASYNC_OPERATION = "Azure-AsyncOperation"
LOCATION = "Location"
_PREFIX = "/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Compute/{kind}/{name}"
_OPERATION_ERRORS = {
    "Failed": ("InternalExecutionError", "An internal execution error occurred."),
    "Canceled": ("OperationPreempted", "Operation execution has been preempted by a more recent operation."),
}


@dataclass
class Call:
    method: str
    path: str
    query: dict[str, str]
    body: Any
    at: float
    """``time.monotonic()`` on arrival."""
    status: int = 0


@dataclass
class _Fault:
    status: int
    code: str
    retry_after: str | None
    methods: frozenset[str]
    name: str | None


@dataclass
class _Refusal:
    status: int
    code: str
    message: str
    left: int | None
    """PATCHes still to refuse; None: until ``allow_patches``."""


@dataclass
class _OperationFault:
    status: str
    code: str
    message: str
    name: str | None


@dataclass
class Operation:
    """One long-running operation, as the stand-in tracks it (``ArmStandIn.operations``)."""

    id: str
    resource: str
    """The VM/VMSS name."""
    status: str = "InProgress"
    error: dict[str, str] | None = None
    started: float = 0.0
    ended: float | None = None
    """``time.monotonic()`` when it turned terminal."""


@dataclass
class _Resource:
    kind: str
    subscription: str
    resource_group: str
    name: str
    user: dict[str, str] = field(default_factory=dict)
    """In effect: folded ID → the spelling it was attached with."""
    principal_id: str | None = None
    provisioning: str = "Succeeded"
    deleting: bool = False
    goal: tuple[dict[str, str], str | None] | None = None
    """The model while an operation runs (user identities, principal); None when it equals ``user``."""

    @property
    def id(self) -> str:
        return (
            f"/subscriptions/{self.subscription}/resourceGroups/{self.resource_group}"
            f"/providers/Microsoft.Compute/{self.kind}/{self.name}"
        )

    def model(self) -> tuple[dict[str, str], str | None]:
        return self.goal if self.goal is not None else (self.user, self.principal_id)

    def body(self, tenant_id: str) -> dict[str, Any]:
        user, principal = self.model()
        parts = (["SystemAssigned"] if principal else []) + (["UserAssigned"] if user else [])
        identity: dict[str, Any] = {"type": ", ".join(parts) if parts else "None"}
        if principal:
            identity["principalId"] = principal
            identity["tenantId"] = tenant_id
        if user:
            identity["userAssignedIdentities"] = {
                spelled: {"principalId": _stable_uuid("p" + folded), "clientId": _stable_uuid("c" + folded)}
                for folded, spelled in sorted(user.items())
            }
        return {
            "id": self.id,
            "name": self.name,
            "type": f"Microsoft.Compute/{self.kind}",
            "location": "westeurope",
            "identity": identity,
            "properties": {"provisioningState": "Deleting" if self.deleting else self.provisioning},
        }


def _stable_uuid(text: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, text))


class ArmError(Exception):
    def __init__(self, status: int, code: str, message: str, retry_after: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after

    def response(self) -> web.Response:
        headers = {"Retry-After": self.retry_after} if self.retry_after is not None else None
        return web.json_response(
            {"error": {"code": self.code, "message": self.message}}, status=self.status, headers=headers
        )


class ArmStandIn:
    def __init__(
        self,
        *,
        token: str | None = None,
        expect_audience: str | None = None,
        lro_delay_s: float = 0.2,
        poll_retry_after: str = "1",
        patch_status: int = 200,
        lro_headers: tuple[str, ...] = (ASYNC_OPERATION, LOCATION),
        tenant_id: str = "72f988bf-0000-4000-8000-000000000000",
        ca: trustme.CA | None = None,
    ) -> None:
        self.ca = ca
        """When set, ARM is served over HTTPS with a certificate of this CA (a private cloud's)."""
        self.token = token
        """When set, requests must carry exactly ``Bearer <token>``; otherwise any non-empty bearer."""
        self.expect_audience = expect_audience
        """When set, the bearer must be a JWT whose ``aud`` is this (e.g. ``https://management.azure.com/``)."""
        self.lro_delay_s = lro_delay_s
        """How long an operation runs, unless ``set_lro_delay`` says otherwise for its resource."""
        self.poll_retry_after = poll_retry_after
        self.patch_status = patch_status
        """The status of an accepted PATCH: 200 (Compute, with the Updating resource), 201 (with it), 202
        (empty body)."""
        self.lro_headers = lro_headers
        """The polling headers an accepted PATCH carries (``ASYNC_OPERATION``, ``LOCATION``)."""
        self.tenant_id = tenant_id
        self.delay_s = 0.0
        """Slowness of every request; ``set_request_delay`` adds to it per resource."""
        self.forbidden: set[str] = set()
        """Folded identity IDs MIC may not assign: PATCHes adding them fail LinkedAuthorizationFailed."""
        self.calls: list[Call] = []
        self.operations: dict[str, Operation] = {}
        self._lro_delays: dict[str, float] = {}
        self._request_delays: dict[str, float] = {}
        self._refusals: dict[str, _Refusal] = {}
        self._resources: dict[tuple[str, str, str, str], _Resource] = {}
        self._faults: deque[_Fault] = deque()
        self._operation_faults: deque[_OperationFault] = deque()
        self._tasks: set[asyncio.Task[None]] = set()
        self._runner: web.AppRunner | None = None
        self._ids = itertools.count(1)
        self.host = "127.0.0.1"
        self.port = 0

    # --- set-up and observation ---------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"{'https' if self.ca is not None else 'http'}://{self.host}:{self.port}"

    @staticmethod
    def _key(kind: str, subscription: str, resource_group: str, name: str) -> tuple[str, str, str, str]:
        return (kind, subscription.casefold(), resource_group.casefold(), name.casefold())

    def _add(self, kind: str, subscription: str, resource_group: str, name: str, system: bool) -> None:
        res = _Resource(kind, subscription, resource_group, name)
        if system:
            res.principal_id = str(uuid.uuid4())
        self._resources[self._key(kind, subscription, resource_group, name)] = res

    def add_vm(
        self, subscription: str, resource_group: str, name: str, *, system_assigned: bool = False
    ) -> None:
        self._add(VM, subscription, resource_group, name, system_assigned)

    def add_vmss(
        self, subscription: str, resource_group: str, name: str, *, system_assigned: bool = False
    ) -> None:
        self._add(VMSS, subscription, resource_group, name, system_assigned)

    def _get(self, kind: str, subscription: str, resource_group: str, name: str) -> _Resource:
        res = self._resources.get(self._key(kind, subscription, resource_group, name))
        if res is None:
            raise ArmError(
                404,
                "ResourceNotFound",
                f"The Resource 'Microsoft.Compute/{kind}/{name}' under resource group "
                f"'{resource_group}' was not found.",
            )
        return res

    def identities(self, kind: str, subscription: str, resource_group: str, name: str) -> set[str]:
        """Folded user-assigned identity IDs in effect on the resource (what its instances can use)."""
        return set(self._get(kind, subscription, resource_group, name).user)

    def model_identities(self, kind: str, subscription: str, resource_group: str, name: str) -> set[str]:
        """Folded user-assigned identity IDs ARM shows (the model, ahead of ``identities`` while an
        operation runs)."""
        return set(self._get(kind, subscription, resource_group, name).model()[0])

    def provisioning_state(self, kind: str, subscription: str, resource_group: str, name: str) -> str:
        return self._get(kind, subscription, resource_group, name).provisioning

    def principal_id(self, kind: str, subscription: str, resource_group: str, name: str) -> str | None:
        return self._get(kind, subscription, resource_group, name).principal_id

    def set_identities(
        self,
        kind: str,
        subscription: str,
        resource_group: str,
        name: str,
        ids: set[str],
        *,
        lro_s: float | None = None,
    ) -> Operation | None:
        """Replace the user identities out of band (a person using the portal). With ``lro_s``, as an
        operation of that length: the model shows them at once (``Updating``), in effect only at its end."""
        res = self._get(kind, subscription, resource_group, name)
        user = {i.casefold(): i for i in ids}
        if lro_s is None:
            res.user, res.goal = user, None
            return None
        return self._begin(res, user, res.model()[1], lro_s)

    def patches(self, name: str | None = None) -> list[Call]:
        return [
            c for c in self.calls if c.method == "PATCH" and (name is None or c.path.endswith("/" + name))
        ]

    def set_lro_delay(self, name: str, seconds: float | None) -> None:
        """Operations on the VM/VMSS ``name`` run ``seconds`` (None: back to ``lro_delay_s``)."""
        if seconds is None:
            self._lro_delays.pop(name.casefold(), None)
        else:
            self._lro_delays[name.casefold()] = seconds

    def set_request_delay(self, name: str, seconds: float | None) -> None:
        """Every request about the VM/VMSS ``name`` (GET, PATCH, its operations' polls) is answered
        ``seconds`` later, on top of ``delay_s`` (None: no extra delay)."""
        if seconds is None:
            self._request_delays.pop(name.casefold(), None)
        else:
            self._request_delays[name.casefold()] = seconds

    def refuse_patches(
        self,
        name: str,
        status: int = 409,
        *,
        code: str = "OperationNotAllowed",
        message: str | None = None,
        times: int | None = None,
    ) -> None:
        """Refuse PATCHes of the VM/VMSS ``name`` with this error, ``times`` times or until
        ``allow_patches``; nothing is applied."""
        self._refusals[name.casefold()] = _Refusal(
            status, code, message or f"The operation is not allowed on '{name}'.", times
        )

    def allow_patches(self, name: str) -> None:
        self._refusals.pop(name.casefold(), None)

    def fail_next(
        self,
        n: int = 1,
        status: int = 500,
        *,
        code: str = "InternalServerError",
        retry_after: str | None = None,
        methods: tuple[str, ...] = ("GET", "PATCH"),
        name: str | None = None,
    ) -> None:
        """Answer the next ``n`` matching requests (method, resource name) with this error."""
        for _ in range(n):
            self._faults.append(_Fault(status, code, retry_after, frozenset(methods), name))

    def fail_next_operation(
        self,
        n: int = 1,
        *,
        status: str = "Failed",
        code: str | None = None,
        message: str | None = None,
        name: str | None = None,
    ) -> None:
        """The next ``n`` PATCH operations (of resource ``name``, or any) are accepted but end
        ``status`` (``Failed`` or ``Canceled``) with ARM's error object, and nothing is applied."""
        if status not in _OPERATION_ERRORS:
            raise ValueError(f"an operation ends Failed or Canceled, not {status!r}")
        default_code, default_message = _OPERATION_ERRORS[status]
        for _ in range(n):
            self._operation_faults.append(
                _OperationFault(status, code or default_code, message or default_message, name)
            )

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> ArmStandIn:
        app = web.Application()
        app.router.add_route("GET", _PREFIX, self._get_resource)
        app.router.add_route("PATCH", _PREFIX, self._patch_resource)
        app.router.add_route("GET", "/operations/{op}", self._operation)
        app.router.add_route("GET", "/locations/{op}", self._location)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        context = None
        if self.ca is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self.ca.issue_cert(host, "localhost").configure_cert(context)
        await web.TCPSite(self._runner, host, port, ssl_context=context).start()
        self.host, self.port = self._runner.addresses[0][:2]
        return self

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> ArmStandIn:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- HTTP -----------------------------------------------------------------------------------

    async def _admit(self, request: web.Request, resource: str | None = None) -> Call:
        body: Any = None
        if request.can_read_body:
            try:
                body = await request.json()
            except ValueError:
                body = "<not json>"
        call = Call(request.method, request.path, dict(request.query), body, time.monotonic())
        self.calls.append(call)
        name = request.match_info.get("name") or resource
        delay = self.delay_s + (self._request_delays.get(name.casefold(), 0.0) if name else 0.0)
        if delay:
            await asyncio.sleep(delay)
        auth = request.headers.get("Authorization", "")
        bearer = auth[len("Bearer ") :] if auth.startswith("Bearer ") else ""
        if not bearer or (self.token is not None and bearer != self.token) or not self._audience_ok(bearer):
            raise ArmError(401, "InvalidAuthenticationToken", "The access token is invalid.")
        if "api-version" not in request.query:
            raise ArmError(400, "MissingApiVersionParameter", "The api-version query parameter is required.")
        for fault in self._faults:
            if request.method in fault.methods and (fault.name is None or fault.name == name):
                self._faults.remove(fault)
                raise ArmError(fault.status, fault.code, f"injected {fault.status}", fault.retry_after)
        return call

    def _audience_ok(self, bearer: str) -> bool:
        if self.expect_audience is None:
            return True
        try:
            payload = bearer.split(".")[1]
            claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        except (IndexError, ValueError):
            return False
        return isinstance(claims, dict) and claims.get("aud") == self.expect_audience

    async def _get_resource(self, request: web.Request) -> web.Response:
        try:
            call = await self._admit(request)
            m = request.match_info
            res = self._get(_kind(m["kind"]), m["sub"], m["rg"], m["name"])
            response = web.json_response(res.body(self.tenant_id))
        except ArmError as exc:
            response = exc.response()
            if self.calls:
                self.calls[-1].status = exc.status
            return response
        call.status = 200
        return response

    async def _patch_resource(self, request: web.Request) -> web.Response:
        try:
            call = await self._admit(request)
            m = request.match_info
            res = self._get(_kind(m["kind"]), m["sub"], m["rg"], m["name"])
            if res.deleting:
                raise ArmError(409, "OperationNotAllowed", "The resource is being deleted.")
            refusal = self._refusals.get(res.name.casefold())
            if refusal is not None:
                if refusal.left is not None:
                    refusal.left -= 1
                    if refusal.left <= 0:
                        self._refusals.pop(res.name.casefold(), None)
                raise ArmError(refusal.status, refusal.code, refusal.message)
            new_user, new_principal = self._apply(res, call.body)
        except ArmError as exc:
            if self.calls:
                self.calls[-1].status = exc.status
            return exc.response()
        op = self._begin(res, new_user, new_principal, self._lro_delays.get(res.name.casefold()))
        call.status = self.patch_status
        query = f"?api-version={request.query['api-version']}"
        headers = {"Retry-After": self.poll_retry_after}
        if ASYNC_OPERATION in self.lro_headers:
            headers[ASYNC_OPERATION] = f"{self.url}/operations/{op.id}{query}"
        if LOCATION in self.lro_headers:
            headers[LOCATION] = f"{self.url}/locations/{op.id}{query}"
        body = None if self.patch_status == 202 else res.body(self.tenant_id)
        return web.json_response(body, status=self.patch_status, headers=headers)

    def _begin(
        self, res: _Resource, user: dict[str, str], principal: str | None, lro_s: float | None
    ) -> Operation:
        """Start an operation: the model shows the change at once, it takes effect at the end."""
        op = Operation(f"op-{next(self._ids)}", res.name, started=time.monotonic())
        fault = next(
            (f for f in self._operation_faults if f.name is None or f.name.casefold() == res.name.casefold()),
            None,
        )
        if fault is not None:
            self._operation_faults.remove(fault)
        self.operations[op.id] = op
        res.provisioning = "Updating"
        res.goal = (user, principal)
        delay = self.lro_delay_s if lro_s is None else lro_s
        task = asyncio.create_task(self._complete(op, res, user, principal, fault, delay))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return op

    def _apply(self, res: _Resource, body: Any) -> tuple[dict[str, str], str | None]:
        """Validate a PATCH and compute the identities it leaves (in effect when the LRO ends)."""
        identity = body.get("identity") if isinstance(body, dict) else None
        if not isinstance(identity, dict) or not isinstance(identity.get("type"), str):
            raise ArmError(400, "InvalidParameter", "identity.type is required.")
        parts = {p.strip().casefold() for p in identity["type"].split(",")}
        if not parts <= {"none", "systemassigned", "userassigned"} or ("none" in parts and len(parts) > 1):
            raise ArmError(400, "InvalidParameter", f"Invalid identity type '{identity['type']}'.")
        delta = identity.get("userAssignedIdentities") or {}
        if not isinstance(delta, dict):
            raise ArmError(400, "InvalidParameter", "userAssignedIdentities must be an object.")
        denied = [k for k, v in delta.items() if v is not None and k.casefold() in self.forbidden]
        if denied:
            raise ArmError(
                403,
                "LinkedAuthorizationFailed",
                "The client 'mic' with object id '00000000-0000-0000-0000-00000000abcd' has permission to "
                f"perform action 'Microsoft.Compute/{res.kind}/write' on scope '{res.id}'; however, it does "
                "not have permission to perform action "
                "'Microsoft.ManagedIdentity/userAssignedIdentities/assign/action' on the linked scope(s) "
                f"'{','.join(denied)}' or the linked scope(s) are invalid.",
            )
        model_user, model_principal = res.model()
        user = dict(model_user)
        if "userassigned" in parts:
            for k, v in delta.items():
                if v is None:
                    user.pop(k.casefold(), None)
                else:
                    user.setdefault(k.casefold(), k)
            if not user:
                raise ArmError(
                    400, "InvalidParameter", "Type 'UserAssigned' needs at least one user-assigned identity."
                )
        else:
            if delta:
                raise ArmError(
                    400, "InvalidParameter", "userAssignedIdentities is only allowed with type UserAssigned."
                )
            user = {}
        principal = model_principal if "systemassigned" in parts else None
        if "systemassigned" in parts and principal is None:
            principal = str(uuid.uuid4())
        return user, principal

    async def _complete(
        self,
        op: Operation,
        res: _Resource,
        user: dict[str, str],
        principal: str | None,
        fault: _OperationFault | None,
        delay: float,
    ) -> None:
        await asyncio.sleep(delay)
        latest = res.goal == (user, principal)
        if fault is not None:
            op.status = fault.status
            op.error = {"code": fault.code, "message": fault.message}
            if latest:
                res.goal = None  # nothing applied: the model is what is in effect
                res.provisioning = "Failed"
        else:
            res.user = user
            res.principal_id = principal
            op.status = "Succeeded"
            if latest:
                res.goal = None
                res.provisioning = "Succeeded"
        op.ended = time.monotonic()

    async def _operation(self, request: web.Request) -> web.Response:
        op = self.operations.get(request.match_info["op"])
        try:
            call = await self._admit(request, op.resource if op else None)
        except ArmError as exc:
            return exc.response()
        if op is None:
            call.status = 404
            return ArmError(404, "NotFound", "No such operation.").response()
        call.status = 200
        body: dict[str, Any] = {"name": op.id, "status": op.status}
        if op.error is not None:
            body["error"] = copy.deepcopy(op.error)
        headers = {"Retry-After": self.poll_retry_after} if op.status == "InProgress" else None
        return web.json_response(body, headers=headers)

    async def _location(self, request: web.Request) -> web.Response:
        op = self.operations.get(request.match_info["op"])
        try:
            call = await self._admit(request, op.resource if op else None)
        except ArmError as exc:
            return exc.response()
        if op is None:
            call.status = 404
            return ArmError(404, "NotFound", "No such operation.").response()
        if op.status == "InProgress":
            call.status = 202
            return web.Response(status=202, headers={"Retry-After": self.poll_retry_after})
        if op.error is not None:
            call.status = 500
            return web.json_response({"error": op.error}, status=500)
        call.status = 200
        return web.json_response({})


def _kind(segment: str) -> str:
    for kind in (VM, VMSS):
        if segment.casefold() == kind.casefold():
            return kind
    raise ArmError(400, "InvalidResourceType", f"The resource type '{segment}' is not supported here.")
