"""The commands' API calls: check against the cluster, then write, and undo what a failure left.

Every request goes through the core's ``KubeClient``. A refusal (``KubeApiError``) or an
unreachable server (``KubeUnavailable``) becomes ``Refused`` with the object named. ``add`` writes
the ``AzureIdentity`` first and its binding second (a binding must never name a missing identity);
if the binding cannot be created the identity is deleted again, guarded by its uid so that only
the object this run created is removed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote

from kubectl_pod_identity.errors import Refused
from kubectl_pod_identity.objects import IdentityRow, binding_body, exception_body, identity_rows
from kubectl_pod_identity.validation import MAX_EXCEPTIONS, MAX_POD_IDENTITIES, binding_name
from podidentity.errors import ConfigError
from podidentity.kube.client import KubeClient
from podidentity.kube.errors import KubeApiError, KubeError, KubeUnavailable
from podidentity.model import (
    CRD_PATH,
    GROUP_VERSION,
    KIND_NAMED,
    AzureIdentityBinding,
    AzurePodIdentityException,
    Kind,
    parse_binding,
    parse_exception,
    parse_identity,
)

IDENTITY = KIND_NAMED["AzureIdentity"]
BINDING = KIND_NAMED["AzureIdentityBinding"]
EXCEPTION = KIND_NAMED["AzurePodIdentityException"]
_GROUP = GROUP_VERSION.split("/", 1)[0]

T = TypeVar("T")


def resource(kind: Kind, name: str) -> str:
    """``azureidentity.aadpodidentity.k8s.io/NAME``, as kubectl names what it changed."""
    return f"{kind.name.lower()}.{_GROUP}/{name}"


class Api:
    """GET, LIST (paged), POST, PUT and DELETE of the pod-identity kinds."""

    def __init__(self, client: KubeClient, *, page_size: int = 500) -> None:
        self._client = client
        self._page_size = page_size

    @staticmethod
    def _path(kind: Kind, namespace: str | None, name: str | None = None) -> str:
        path = CRD_PATH + (f"namespaces/{quote(namespace, safe='')}/" if namespace else "") + kind.plural
        return path + (f"/{quote(name, safe='')}" if name else "")

    async def get(self, kind: Kind, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return await self._client.get(self._path(kind, namespace, name))
        except KubeApiError as exc:
            if exc.status == 404 and _not_missing_kind(exc):
                return None
            raise _refused(f"cannot read {kind.name} {namespace}/{name}", exc) from exc
        except KubeError as exc:
            raise _refused(f"cannot read {kind.name} {namespace}/{name}", exc) from exc

    async def list(self, kind: Kind, namespace: str | None) -> list[dict[str, Any]]:
        """Every object of ``kind`` in ``namespace`` (None: all namespaces), page by page."""
        items: list[dict[str, Any]] = []
        params = {"limit": str(self._page_size)}
        where = f"in namespace {namespace}" if namespace else "in all namespaces"
        while True:
            try:
                page = await self._client.get(self._path(kind, namespace), params)
            except KubeApiError as exc:
                raise _refused(f"cannot list {kind.plural} {where}", exc) from exc
            except KubeError as exc:
                raise _refused(f"cannot list {kind.plural} {where}", exc) from exc
            items.extend(i for i in page.get("items") or () if isinstance(i, dict))
            token = (page.get("metadata") or {}).get("continue")
            if not token:
                return items
            params = {"limit": str(self._page_size), "continue": str(token)}

    async def create(self, kind: Kind, body: Mapping[str, Any]) -> dict[str, Any]:
        meta = body["metadata"]
        try:
            return await self._client.write("POST", self._path(kind, meta["namespace"]), body)
        except KubeApiError as exc:
            if exc.status == 409:
                raise Refused(f"{kind.name} {meta['namespace']}/{meta['name']} already exists") from exc
            raise _refused(f"cannot create {kind.name} {meta['namespace']}/{meta['name']}", exc) from exc
        except KubeError as exc:
            raise _refused(f"cannot create {kind.name} {meta['namespace']}/{meta['name']}", exc) from exc

    async def replace(self, kind: Kind, body: Mapping[str, Any]) -> dict[str, Any]:
        meta = body["metadata"]
        where = f"{kind.name} {meta['namespace']}/{meta['name']}"
        try:
            return await self._client.write("PUT", self._path(kind, meta["namespace"], meta["name"]), body)
        except KubeApiError as exc:
            if exc.status == 409:
                raise Refused(f"{where} was changed by someone else meanwhile; try again") from exc
            if exc.status == 404:
                raise Refused(f"{where} was deleted meanwhile") from exc
            raise _refused(f"cannot update {where}", exc) from exc
        except KubeError as exc:
            raise _refused(f"cannot update {where}", exc) from exc

    async def delete(self, kind: Kind, namespace: str, name: str, *, uid: str | None = None) -> bool:
        """True if deleted, False if it was not there; with ``uid``, only that very object."""
        body = {"kind": "DeleteOptions", "apiVersion": "v1", "preconditions": {"uid": uid}} if uid else None
        try:
            await self._client.write("DELETE", self._path(kind, namespace, name), body)
        except KubeApiError as exc:
            if exc.status == 404 and _not_missing_kind(exc):
                return False
            raise _refused(f"cannot delete {kind.name} {namespace}/{name}", exc) from exc
        except KubeError as exc:
            raise _refused(f"cannot delete {kind.name} {namespace}/{name}", exc) from exc
        return True


def _not_missing_kind(exc: KubeApiError) -> bool:
    """A 404 for an object, not for the whole resource (the CRDs not installed)."""
    return "could not find the requested resource" not in exc.message


def _refused(what: str, exc: KubeError) -> Refused:
    text = str(exc)
    if isinstance(exc, KubeApiError) and exc.status == 404 and not _not_missing_kind(exc):
        text += f" (are the {GROUP_VERSION} CRDs installed? deploy/crds.yaml)"
    return Refused(f"{what}: {text}")


def _parsed(
    items: list[dict[str, Any]], parse: Callable[[dict[str, Any]], T], warnings: list[str]
) -> list[T]:
    out: list[T] = []
    for item in items:
        try:
            out.append(parse(item))
        except ConfigError as exc:
            warnings.append(f"skipped: {exc}")
    return out


# --- pod identities ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AddIdentity:
    namespace: str
    name: str
    selector: str
    identity: dict[str, Any]
    """The ``AzureIdentity`` body (``objects.identity_body``)."""


async def add_identity(api: Api, request: AddIdentity) -> list[str]:
    ns, name = request.namespace, request.name
    existing = await api.list(IDENTITY, None)
    if any(_key(i) == (ns, name) for i in existing):
        raise Refused(f"pod identity {ns}/{name} already exists (AzureIdentity {ns}/{name})")
    if len(existing) >= MAX_POD_IDENTITIES:
        raise Refused(
            f"the cluster has {len(existing)} pod identities (AzureIdentity objects); "
            f"at most {MAX_POD_IDENTITIES} are allowed"
        )
    bname = binding_name(name)
    if await api.get(BINDING, ns, bname) is not None:
        raise Refused(f"AzureIdentityBinding {ns}/{bname} already exists; delete it or choose another --name")
    created = await api.create(IDENTITY, request.identity)
    uid = str((created.get("metadata") or {}).get("uid") or "") or None
    try:
        await api.create(BINDING, binding_body(ns, bname, identity_name=name, selector=request.selector))
    except BaseException as exc:
        # Nothing half-created: the identity goes again, and the error says what happened.
        # A timeout or an interruption leaves it open whether the binding was stored.
        unknown = not isinstance(exc, Refused) or isinstance(exc.__cause__, KubeUnavailable)
        rollback = await _rollback(api, ns, name, bname, uid, binding_unknown=unknown)
        if isinstance(exc, Refused):
            raise Refused(f"{exc}; {rollback}") from exc
        raise
    return [f"{resource(IDENTITY, name)} created", f"{resource(BINDING, bname)} created"]


async def _rollback(
    api: Api, ns: str, name: str, bname: str, uid: str | None, *, binding_unknown: bool
) -> str:
    try:
        async with asyncio.timeout(30):
            if binding_unknown:
                # Interrupted mid-request: the binding may exist; remove it only if it is ours.
                found = await api.get(BINDING, ns, bname)
                if found is not None and (found.get("spec") or {}).get("azureIdentity") == name:
                    await api.delete(BINDING, ns, bname)
            await api.delete(IDENTITY, ns, name, uid=uid)
    except (Refused, TimeoutError) as exc:
        return f"AND the rollback failed, AzureIdentity {ns}/{name} is left without a binding: {exc}"
    return f"rolled back: AzureIdentity {ns}/{name} was deleted again"


async def delete_identity(api: Api, namespace: str, name: str) -> list[str]:
    bindings = [
        b for b in await api.list(BINDING, namespace) if (b.get("spec") or {}).get("azureIdentity") == name
    ]
    identity = await api.get(IDENTITY, namespace, name)
    if identity is None and not bindings:
        raise Refused(f"pod identity {namespace}/{name} not found")
    done: list[str] = []
    # Bindings first: no pod may select an identity that is going away.
    for b in sorted(bindings, key=_key):
        bname = str(b["metadata"]["name"])
        if await api.delete(BINDING, namespace, bname):
            done.append(f"{resource(BINDING, bname)} deleted")
    if identity is not None and await api.delete(IDENTITY, namespace, name):
        done.append(f"{resource(IDENTITY, name)} deleted")
    return done


async def list_identities(api: Api, namespace: str | None) -> tuple[list[IdentityRow], list[str]]:
    warnings: list[str] = []
    identities = _parsed(await api.list(IDENTITY, namespace), parse_identity, warnings)
    bindings: list[AzureIdentityBinding] = _parsed(
        await api.list(BINDING, namespace), parse_binding, warnings
    )
    return identity_rows(identities, bindings), warnings


# --- exceptions ----------------------------------------------------------------------------------


async def add_exception(api: Api, namespace: str, name: str, pod_labels: Mapping[str, str]) -> list[str]:
    existing = await api.list(EXCEPTION, None)
    if any(_key(e) == (namespace, name) for e in existing):
        raise Refused(
            f"pod identity exception {namespace}/{name} already exists; use 'exception update' to change it"
        )
    if len(existing) >= MAX_EXCEPTIONS:
        raise Refused(
            f"the cluster has {len(existing)} pod identity exceptions (AzurePodIdentityException objects); "
            f"at most {MAX_EXCEPTIONS} are allowed"
        )
    await api.create(EXCEPTION, exception_body(namespace, name, pod_labels))
    return [f"{resource(EXCEPTION, name)} created"]


async def update_exception(api: Api, namespace: str, name: str, pod_labels: Mapping[str, str]) -> list[str]:
    current = await api.get(EXCEPTION, namespace, name)
    if current is None:
        raise Refused(
            f"pod identity exception {namespace}/{name} not found; use 'exception add' to create it"
        )
    body = dict(current)
    body["spec"] = {**(current.get("spec") or {}), "podLabels": dict(pod_labels)}
    await api.replace(EXCEPTION, body)  # carries metadata.resourceVersion: a concurrent change is a 409
    return [f"{resource(EXCEPTION, name)} updated"]


async def delete_exception(api: Api, namespace: str, name: str) -> list[str]:
    if not await api.delete(EXCEPTION, namespace, name):
        raise Refused(f"pod identity exception {namespace}/{name} not found")
    return [f"{resource(EXCEPTION, name)} deleted"]


async def list_exceptions(
    api: Api, namespace: str | None
) -> tuple[list[AzurePodIdentityException], list[str]]:
    warnings: list[str] = []
    found = _parsed(await api.list(EXCEPTION, namespace), parse_exception, warnings)
    return sorted(found, key=lambda e: (e.namespace, e.name)), warnings


def _key(obj: Mapping[str, Any]) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return str(meta.get("namespace") or "default"), str(meta.get("name") or "")
