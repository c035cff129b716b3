"""Plain typed views of the Kubernetes objects both daemons read, parsed from their API shape, and
the one registry of those kinds (``KINDS``): view class, parser and API path, written once.

Everything past this module sees these frozen objects, never raw dicts or client models. Parsing
is strict about what the code relies on and says which object and field is wrong.
"""

from __future__ import annotations

import base64
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import IntEnum
from types import MappingProxyType
from typing import Any

from podidentity.errors import ConfigError

GROUP_VERSION = "aadpodidentity.k8s.io/v1"
BINDING_LABEL = "aadpodidbinding"
BEHAVIOR_ANNOTATION = "aadpodidentity.k8s.io/Behavior"
ASSIGNED = "Assigned"
CREATED = "Created"
UNASSIGNED = "Unassigned"
LIVE_PHASES = frozenset({"Pending", "Running"})


class IdentityType(IntEnum):
    USER_ASSIGNED_MSI = 0
    SERVICE_PRINCIPAL = 1
    SERVICE_PRINCIPAL_CERTIFICATE = 2
    FEDERATED = 3
    """Workload identity: the pod's service-account token exchanged for an Azure AD token."""


SERVICE_PRINCIPAL_TYPES = frozenset(
    {IdentityType.SERVICE_PRINCIPAL, IdentityType.SERVICE_PRINCIPAL_CERTIFICATE}
)
"""The types with their own credential in a Secret (and auxiliary tenants)."""


# Azure AD Workload Identity's conventions, as its webhook reads them.
WORKLOAD_IDENTITY_LABEL = "azure.workload.identity/use"
WORKLOAD_CLIENT_ID_ANNOTATION = "azure.workload.identity/client-id"
WORKLOAD_TENANT_ID_ANNOTATION = "azure.workload.identity/tenant-id"


@dataclass(frozen=True, slots=True)
class ObjectKey:
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class Pod:
    namespace: str
    name: str
    uid: str
    ip: str
    phase: str
    labels: Mapping[str, str]
    node_name: str
    deleting: bool = False
    host_network: bool = False
    resource_version: str = ""
    created_at: float = 0.0
    """Epoch seconds from ``metadata.creationTimestamp``; 0 when unknown."""
    service_account: str = "default"
    """``spec.serviceAccountName``."""

    @property
    def key(self) -> ObjectKey:
        return ObjectKey(self.namespace, self.name)

    @property
    def live(self) -> bool:
        """Whether this pod may own its caller address (nmi-spec §3.1).

        Host-network pods share the node's address, so the address says nothing about which of
        them called: they are never indexed by IP.
        """
        return self.phase in LIVE_PHASES and not self.deleting and bool(self.ip) and not self.host_network


@dataclass(frozen=True, slots=True)
class SecretRef:
    namespace: str
    name: str


@dataclass(frozen=True, slots=True)
class AzureIdentity:
    namespace: str
    name: str
    type: IdentityType
    client_id: str
    resource_id: str = ""
    tenant_id: str = ""
    auxiliary_tenant_ids: tuple[str, ...] = ()
    ad_endpoint: str = ""
    client_password: SecretRef | None = None
    namespaced: bool = False
    """The ``aadpodidentity.k8s.io/Behavior: namespaced`` annotation."""
    resource_version: str = ""

    @property
    def key(self) -> ObjectKey:
        return ObjectKey(self.namespace, self.name)

    @property
    def client_id_folded(self) -> str:
        return self.client_id.casefold()

    @property
    def resource_id_folded(self) -> str:
        return self.resource_id.casefold()


@dataclass(frozen=True, slots=True)
class AzureIdentityBinding:
    namespace: str
    name: str
    identity_name: str
    selector: str
    resource_version: str = ""

    @property
    def key(self) -> ObjectKey:
        return ObjectKey(self.namespace, self.name)


@dataclass(frozen=True, slots=True)
class AzureAssignedIdentity:
    namespace: str
    name: str
    pod_namespace: str
    pod_name: str
    identity: AzureIdentity
    """The copy MIC embedded; the live AzureIdentity wins when NMI has it."""
    state: str
    node_name: str = ""
    binding_name: str = ""
    resource_version: str = ""

    @property
    def key(self) -> ObjectKey:
        return ObjectKey(self.namespace, self.name)

    @property
    def pod_key(self) -> ObjectKey:
        return ObjectKey(self.pod_namespace, self.pod_name)


@dataclass(frozen=True, slots=True)
class AzurePodIdentityException:
    namespace: str
    name: str
    pod_labels: Mapping[str, str]
    resource_version: str = ""

    @property
    def key(self) -> ObjectKey:
        return ObjectKey(self.namespace, self.name)


@dataclass(frozen=True, slots=True)
class Secret:
    namespace: str
    name: str
    data: Mapping[str, bytes]
    resource_version: str = ""

    @property
    def key(self) -> ObjectKey:
        return ObjectKey(self.namespace, self.name)


@dataclass(frozen=True, slots=True)
class ServiceAccount:
    """Only what workload identity reads: the client and tenant a service account is federated with."""

    namespace: str
    name: str
    client_id: str = ""
    """``azure.workload.identity/client-id``; empty when the service account is not federated."""
    tenant_id: str = ""
    resource_version: str = ""

    @property
    def key(self) -> ObjectKey:
        return ObjectKey(self.namespace, self.name)


@dataclass(frozen=True, slots=True)
class Node:
    name: str
    provider_id: str = ""
    resource_version: str = ""

    @property
    def key(self) -> ObjectKey:
        # Nodes are cluster-scoped; the watch layer files objects without a namespace under "default".
        return ObjectKey("default", self.name)


KubeObject = (
    Pod
    | AzureIdentity
    | AzureIdentityBinding
    | AzureAssignedIdentity
    | AzurePodIdentityException
    | Secret
    | Node
    | ServiceAccount
)


def _where(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    return f"{obj.get('kind', '?')} {meta.get('namespace', 'default')}/{meta.get('name', '?')}"


def _str(value: Any, what: str, obj: Mapping[str, Any], *, required: bool = False) -> str:
    if value is None:
        if required:
            raise ConfigError(f"{_where(obj)}: {what} is required")
        return ""
    if not isinstance(value, str):
        raise ConfigError(f"{_where(obj)}: {what} must be a string, got {type(value).__name__}")
    if required and not value:
        raise ConfigError(f"{_where(obj)}: {what} must not be empty")
    return value


_intern = sys.intern
"""Strings many objects share (namespaces, node names, phases, label keys and values, states) are
interned: one copy per distinct value instead of one per object, with tens of thousands of objects."""
_NO_LABELS: Mapping[str, str] = MappingProxyType({})


def _str_map(value: Any, what: str, obj: Mapping[str, Any]) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ConfigError(f"{_where(obj)}: {what} must be a map of strings")
    return {_intern(k): _intern(v) for k, v in value.items()}


def _meta(obj: Mapping[str, Any]) -> tuple[str, str, Mapping[str, Any]]:
    meta = obj.get("metadata")
    if not isinstance(meta, Mapping):
        raise ConfigError(f"{_where(obj)}: metadata is required")
    name = _str(meta.get("name"), "metadata.name", obj, required=True)
    namespace = _intern(_str(meta.get("namespace"), "metadata.namespace", obj) or "default")
    return namespace, name, meta


def _section(obj: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = obj.get(name)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{_where(obj)}: {name} must be an object")
    return value


def parse_pod(obj: Mapping[str, Any]) -> Pod:
    namespace, name, meta = _meta(obj)
    spec = _section(obj, "spec")
    status = _section(obj, "status")
    return Pod(
        namespace=namespace,
        name=name,
        uid=_str(meta.get("uid"), "metadata.uid", obj),
        ip=_str(status.get("podIP"), "status.podIP", obj),
        phase=_intern(_str(status.get("phase"), "status.phase", obj) or "Pending"),
        labels=_str_map(meta.get("labels"), "metadata.labels", obj) or _NO_LABELS,
        node_name=_intern(_str(spec.get("nodeName"), "spec.nodeName", obj)),
        deleting=meta.get("deletionTimestamp") is not None,
        host_network=bool(spec.get("hostNetwork", False)),
        resource_version=_str(meta.get("resourceVersion"), "metadata.resourceVersion", obj),
        created_at=_timestamp(meta.get("creationTimestamp"), "metadata.creationTimestamp", obj),
        service_account=_str(spec.get("serviceAccountName"), "spec.serviceAccountName", obj) or "default",
    )


def _timestamp(value: Any, what: str, obj: Mapping[str, Any]) -> float:
    if value is None or value == "":
        return 0.0
    if isinstance(value, datetime):
        return value.timestamp()
    text = _str(value, what, obj)
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        raise ConfigError(f"{_where(obj)}: {what} is not an RFC 3339 time: {text!r}") from None


def _identity_type(value: Any, obj: Mapping[str, Any]) -> IdentityType:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{_where(obj)}: spec.type must be 0, 1, 2 or 3")
    try:
        return IdentityType(value)
    except ValueError:
        raise ConfigError(f"{_where(obj)}: spec.type must be 0, 1, 2 or 3, got {value}") from None


def parse_identity(obj: Mapping[str, Any]) -> AzureIdentity:
    namespace, name, meta = _meta(obj)
    spec = _section(obj, "spec")
    id_type = _identity_type(spec.get("type", 0), obj)
    password = spec.get("clientPassword")
    ref: SecretRef | None = None
    if password is not None:
        if not isinstance(password, Mapping):
            raise ConfigError(f"{_where(obj)}: spec.clientPassword must be an object")
        ref = SecretRef(
            namespace=_str(password.get("namespace"), "spec.clientPassword.namespace", obj) or namespace,
            name=_str(password.get("name"), "spec.clientPassword.name", obj, required=True),
        )
    aux = spec.get("auxiliaryTenantIDs") or []
    if not isinstance(aux, list) or not all(isinstance(t, str) for t in aux):
        raise ConfigError(f"{_where(obj)}: spec.auxiliaryTenantIDs must be a list of strings")
    annotations = _str_map(meta.get("annotations"), "metadata.annotations", obj)
    return AzureIdentity(
        namespace=namespace,
        name=name,
        type=id_type,
        client_id=_str(spec.get("clientID"), "spec.clientID", obj, required=True),
        resource_id=_str(spec.get("resourceID"), "spec.resourceID", obj),
        tenant_id=_intern(_str(spec.get("tenantID"), "spec.tenantID", obj)),
        auxiliary_tenant_ids=tuple(aux),
        ad_endpoint=_intern(_str(spec.get("adEndpoint"), "spec.adEndpoint", obj)),
        client_password=ref,
        namespaced=annotations.get(BEHAVIOR_ANNOTATION, "").casefold() == "namespaced",
        resource_version=_str(meta.get("resourceVersion"), "metadata.resourceVersion", obj),
    )


def parse_binding(obj: Mapping[str, Any]) -> AzureIdentityBinding:
    namespace, name, meta = _meta(obj)
    spec = _section(obj, "spec")
    return AzureIdentityBinding(
        namespace=namespace,
        name=name,
        identity_name=_str(spec.get("azureIdentity"), "spec.azureIdentity", obj, required=True),
        selector=_str(spec.get("selector"), "spec.selector", obj),
        resource_version=_str(meta.get("resourceVersion"), "metadata.resourceVersion", obj),
    )


def parse_assigned_identity(obj: Mapping[str, Any]) -> AzureAssignedIdentity:
    namespace, name, meta = _meta(obj)
    spec = _section(obj, "spec")
    status = _section(obj, "status")
    ref = spec.get("azureIdentityRef")
    if not isinstance(ref, Mapping):
        raise ConfigError(f"{_where(obj)}: spec.azureIdentityRef is required")
    embedded = dict(ref)
    embedded.setdefault("kind", "AzureIdentity")
    binding = spec.get("azureBindingRef")
    binding_name = ""
    if isinstance(binding, Mapping):
        binding_meta = binding.get("metadata")
        if isinstance(binding_meta, Mapping):
            binding_name = str(binding_meta.get("name", ""))
    labels = _str_map(meta.get("labels"), "metadata.labels", obj)
    return AzureAssignedIdentity(
        namespace=namespace,
        name=name,
        pod_namespace=_intern(_str(spec.get("podNamespace"), "spec.podNamespace", obj, required=True)),
        pod_name=_str(spec.get("pod"), "spec.pod", obj, required=True),
        identity=parse_identity(embedded),
        state=_intern(_str(status.get("status"), "status.status", obj)),
        node_name=_intern(_str(spec.get("nodename"), "spec.nodename", obj) or labels.get("nodename", "")),
        binding_name=binding_name,
        resource_version=_str(meta.get("resourceVersion"), "metadata.resourceVersion", obj),
    )


def parse_exception(obj: Mapping[str, Any]) -> AzurePodIdentityException:
    namespace, name, meta = _meta(obj)
    spec = _section(obj, "spec")
    return AzurePodIdentityException(
        namespace=namespace,
        name=name,
        pod_labels=_str_map(spec.get("podLabels"), "spec.podLabels", obj),
        resource_version=_str(meta.get("resourceVersion"), "metadata.resourceVersion", obj),
    )


def parse_secret(obj: Mapping[str, Any]) -> Secret:
    namespace, name, meta = _meta(obj)
    data: dict[str, bytes] = {}
    raw = obj.get("data") or {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{_where(obj)}: data must be a map")
    for key, value in raw.items():
        try:
            data[str(key)] = base64.b64decode(str(value), validate=True)
        except ValueError:
            raise ConfigError(f"{_where(obj)}: data.{key} is not valid base64") from None
    for key, value in _str_map(obj.get("stringData"), "stringData", obj).items():
        data[key] = value.encode()
    return Secret(
        namespace=namespace,
        name=name,
        data=data,
        resource_version=_str(meta.get("resourceVersion"), "metadata.resourceVersion", obj),
    )


def parse_service_account(obj: Mapping[str, Any]) -> ServiceAccount:
    namespace, name, meta = _meta(obj)
    annotations = _str_map(meta.get("annotations"), "metadata.annotations", obj)
    return ServiceAccount(
        namespace=namespace,
        name=name,
        client_id=annotations.get(WORKLOAD_CLIENT_ID_ANNOTATION, "").strip(),
        tenant_id=annotations.get(WORKLOAD_TENANT_ID_ANNOTATION, "").strip(),
        resource_version=_str(meta.get("resourceVersion"), "metadata.resourceVersion", obj),
    )


def parse_node(obj: Mapping[str, Any]) -> Node:
    meta = obj.get("metadata")
    if not isinstance(meta, Mapping) or not isinstance(meta.get("name"), str) or not meta["name"]:
        raise ConfigError("Node: metadata.name is required")
    spec = obj.get("spec") or {}
    provider_id = spec.get("providerID", "") if isinstance(spec, Mapping) else ""
    if not isinstance(provider_id, str):
        raise ConfigError(f"Node {meta['name']}: spec.providerID must be a string")
    rv = meta.get("resourceVersion", "")
    return Node(
        name=meta["name"], provider_id=provider_id, resource_version=rv if isinstance(rv, str) else ""
    )


CRD_PATH = "/apis/aadpodidentity.k8s.io/v1/"
CORE_PATH = "/api/v1/"


@dataclass(frozen=True, slots=True)
class Kind:
    """One kind both daemons know: its view class, parser and API collection."""

    name: str
    cls: type[KubeObject]
    parse: Callable[[Mapping[str, Any]], KubeObject]
    plural: str
    api_prefix: str

    @property
    def path(self) -> str:
        """The all-namespaces collection path, e.g. ``/api/v1/pods``."""
        return self.api_prefix + self.plural

    @property
    def custom(self) -> bool:
        return self.api_prefix == CRD_PATH


KINDS: tuple[Kind, ...] = (
    Kind("Pod", Pod, parse_pod, "pods", CORE_PATH),
    Kind("AzureIdentity", AzureIdentity, parse_identity, "azureidentities", CRD_PATH),
    Kind("AzureIdentityBinding", AzureIdentityBinding, parse_binding, "azureidentitybindings", CRD_PATH),
    Kind(
        "AzureAssignedIdentity",
        AzureAssignedIdentity,
        parse_assigned_identity,
        "azureassignedidentities",
        CRD_PATH,
    ),
    Kind(
        "AzurePodIdentityException",
        AzurePodIdentityException,
        parse_exception,
        "azurepodidentityexceptions",
        CRD_PATH,
    ),
    Kind("Secret", Secret, parse_secret, "secrets", CORE_PATH),
    Kind("Node", Node, parse_node, "nodes", CORE_PATH),
    Kind("ServiceAccount", ServiceAccount, parse_service_account, "serviceaccounts", CORE_PATH),
)
KIND_NAMED: dict[str, Kind] = {k.name: k for k in KINDS}
KIND_OF: dict[type[Any], Kind] = {k.cls: k for k in KINDS}


def parse_object(obj: Mapping[str, Any]) -> KubeObject:
    """Parse one object in its Kubernetes shape; ``ConfigError`` names what is wrong."""
    if not isinstance(obj, Mapping):
        raise ConfigError(f"expected an object, got {type(obj).__name__}")
    name = obj.get("kind")
    kind = KIND_NAMED.get(name) if isinstance(name, str) else None
    if kind is None:
        raise ConfigError(f"{_where(obj)}: unsupported kind {name!r}")
    api_version = obj.get("apiVersion")
    if kind.custom and api_version not in (None, GROUP_VERSION):
        raise ConfigError(f"{_where(obj)}: apiVersion must be {GROUP_VERSION}")
    return kind.parse(obj)
