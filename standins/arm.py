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
* a PATCH is a long-running operation: 202 with ``Azure-AsyncOperation``, ``Location`` and
  ``Retry-After``; the change is applied ``lro_delay_s`` later, when the operation turns
  ``Succeeded``; meanwhile GET shows the old identities with ``provisioningState: Updating``;
* identities in ``forbidden`` make the whole PATCH fail with 403 ``LinkedAuthorizationFailed``,
  naming them the way ARM does, and nothing is applied.

Faults: ``fail_next`` (any status/code, optional Retry-After, per method and resource name),
``delay_s`` (slowness per request), ``fail_next_operation`` (the LRO ends ``Failed``).
Observation: ``calls`` (every request, with its body), ``identities(...)``, ``principal_id(...)``.
Test set-up: ``add_vm``, ``add_vmss``, ``set_identities`` (e.g. a manual removal).
"""

from __future__ import annotations

import asyncio
import base64
import copy
import itertools
import json
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

VM = "virtualMachines"
VMSS = "virtualMachineScaleSets"
_PREFIX = "/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Compute/{kind}/{name}"


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
class _Resource:
    kind: str
    subscription: str
    resource_group: str
    name: str
    user: dict[str, str] = field(default_factory=dict)
    """Folded ID → the spelling it was attached with."""
    principal_id: str | None = None
    provisioning: str = "Succeeded"
    deleting: bool = False

    @property
    def id(self) -> str:
        return (
            f"/subscriptions/{self.subscription}/resourceGroups/{self.resource_group}"
            f"/providers/Microsoft.Compute/{self.kind}/{self.name}"
        )

    def identity_type(self) -> str:
        parts = (["SystemAssigned"] if self.principal_id else []) + (["UserAssigned"] if self.user else [])
        return ", ".join(parts) if parts else "None"

    def body(self, tenant_id: str) -> dict[str, Any]:
        identity: dict[str, Any] = {"type": self.identity_type()}
        if self.principal_id:
            identity["principalId"] = self.principal_id
            identity["tenantId"] = tenant_id
        if self.user:
            identity["userAssignedIdentities"] = {
                spelled: {"principalId": _stable_uuid("p" + folded), "clientId": _stable_uuid("c" + folded)}
                for folded, spelled in sorted(self.user.items())
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
        tenant_id: str = "72f988bf-0000-4000-8000-000000000000",
    ) -> None:
        self.token = token
        """When set, requests must carry exactly ``Bearer <token>``; otherwise any non-empty bearer."""
        self.expect_audience = expect_audience
        """When set, the bearer must be a JWT whose ``aud`` is this (e.g. ``https://management.azure.com/``)."""
        self.lro_delay_s = lro_delay_s
        self.poll_retry_after = poll_retry_after
        self.tenant_id = tenant_id
        self.delay_s = 0.0
        self.forbidden: set[str] = set()
        """Folded identity IDs MIC may not assign: PATCHes adding them fail LinkedAuthorizationFailed."""
        self.calls: list[Call] = []
        self._resources: dict[tuple[str, str, str, str], _Resource] = {}
        self._faults: deque[_Fault] = deque()
        self._operations: dict[str, dict[str, Any]] = {}
        self._fail_operations = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._runner: web.AppRunner | None = None
        self._ids = itertools.count(1)
        self.host = "127.0.0.1"
        self.port = 0

    # --- set-up and observation ---------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

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
        """Folded user-assigned identity IDs now on the resource."""
        return set(self._get(kind, subscription, resource_group, name).user)

    def principal_id(self, kind: str, subscription: str, resource_group: str, name: str) -> str | None:
        return self._get(kind, subscription, resource_group, name).principal_id

    def set_identities(
        self, kind: str, subscription: str, resource_group: str, name: str, ids: set[str]
    ) -> None:
        """Replace the user identities out of band (a person using the portal)."""
        self._get(kind, subscription, resource_group, name).user = {i.casefold(): i for i in ids}

    def patches(self, name: str | None = None) -> list[Call]:
        return [
            c for c in self.calls if c.method == "PATCH" and (name is None or c.path.endswith("/" + name))
        ]

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

    def fail_next_operation(self, n: int = 1) -> None:
        """The next ``n`` PATCH operations are accepted (202) but end ``Failed`` with nothing applied."""
        self._fail_operations += n

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> ArmStandIn:
        app = web.Application()
        app.router.add_route("GET", _PREFIX, self._get_resource)
        app.router.add_route("PATCH", _PREFIX, self._patch_resource)
        app.router.add_route("GET", "/operations/{op}", self._operation)
        app.router.add_route("GET", "/locations/{op}", self._location)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port).start()
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

    async def _admit(self, request: web.Request) -> Call:
        body: Any = None
        if request.can_read_body:
            try:
                body = await request.json()
            except ValueError:
                body = "<not json>"
        call = Call(request.method, request.path, dict(request.query), body, time.monotonic())
        self.calls.append(call)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        auth = request.headers.get("Authorization", "")
        bearer = auth[len("Bearer ") :] if auth.startswith("Bearer ") else ""
        if not bearer or (self.token is not None and bearer != self.token) or not self._audience_ok(bearer):
            raise ArmError(401, "InvalidAuthenticationToken", "The access token is invalid.")
        if "api-version" not in request.query:
            raise ArmError(400, "MissingApiVersionParameter", "The api-version query parameter is required.")
        name = request.match_info.get("name")
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
            new_user, new_principal = self._apply(res, call.body)
        except ArmError as exc:
            if self.calls:
                self.calls[-1].status = exc.status
            return exc.response()
        op = f"op-{next(self._ids)}"
        failing = self._fail_operations > 0
        if failing:
            self._fail_operations -= 1
        self._operations[op] = {"status": "InProgress"}
        res.provisioning = "Updating"
        task = asyncio.create_task(self._complete(op, res, new_user, new_principal, failing))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        call.status = 202
        query = f"?api-version={request.query['api-version']}"
        return web.json_response(
            None,
            status=202,
            headers={
                "Azure-AsyncOperation": f"{self.url}/operations/{op}{query}",
                "Location": f"{self.url}/locations/{op}{query}",
                "Retry-After": self.poll_retry_after,
            },
        )

    def _apply(self, res: _Resource, body: Any) -> tuple[dict[str, str], str | None]:
        """Validate a PATCH and compute the identities it leaves (applied when the LRO ends)."""
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
        user = dict(res.user)
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
        principal = res.principal_id if "systemassigned" in parts else None
        if "systemassigned" in parts and principal is None:
            principal = str(uuid.uuid4())
        return user, principal

    async def _complete(
        self, op: str, res: _Resource, user: dict[str, str], principal: str | None, failing: bool
    ) -> None:
        await asyncio.sleep(self.lro_delay_s)
        res.provisioning = "Succeeded"
        if failing:
            self._operations[op] = {
                "status": "Failed",
                "error": {
                    "code": "InternalExecutionError",
                    "message": "An internal execution error occurred.",
                },
            }
            return
        res.user = user
        res.principal_id = principal
        self._operations[op] = {"status": "Succeeded"}

    async def _operation(self, request: web.Request) -> web.Response:
        try:
            call = await self._admit(request)
        except ArmError as exc:
            return exc.response()
        state = self._operations.get(request.match_info["op"])
        if state is None:
            call.status = 404
            return ArmError(404, "NotFound", "No such operation.").response()
        call.status = 200
        headers = {"Retry-After": self.poll_retry_after} if state["status"] == "InProgress" else None
        return web.json_response({"name": request.match_info["op"], **copy.deepcopy(state)}, headers=headers)

    async def _location(self, request: web.Request) -> web.Response:
        try:
            call = await self._admit(request)
        except ArmError as exc:
            return exc.response()
        state = self._operations.get(request.match_info["op"])
        if state is None:
            return ArmError(404, "NotFound", "No such operation.").response()
        if state["status"] == "InProgress":
            call.status = 202
            return web.Response(status=202, headers={"Retry-After": self.poll_retry_after})
        if state["status"] == "Failed":
            return web.json_response({"error": state["error"]}, status=500)
        call.status = 200
        return web.json_response({})


def _kind(segment: str) -> str:
    for kind in (VM, VMSS):
        if segment.casefold() == kind.casefold():
            return kind
    raise ArmError(400, "InvalidResourceType", f"The resource type '{segment}' is not supported here.")
