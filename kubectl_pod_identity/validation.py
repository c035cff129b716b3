"""What AKS checks before it touches the cluster, as pure functions (no I/O).

Each ``check_*`` returns the value to use or raises ``UsageError`` with a message naming the flag.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from kubectl_pod_identity.errors import UsageError
from podidentity.model import IdentityType

MAX_POD_IDENTITIES = 200
"""AKS: at most 200 pod identities per cluster (counted as ``AzureIdentity`` objects, all namespaces)."""
MAX_EXCEPTIONS = 200
"""AKS: at most 200 pod identity exceptions per cluster (``AzurePodIdentityException`` objects)."""

BINDING_SUFFIX = "-binding"
"""``add --name NAME`` creates the ``AzureIdentityBinding`` ``NAME-binding``, as the AKS add-on does."""

DNS_SUBDOMAIN_MAX = 253
DNS_LABEL_MAX = 63
LABEL_VALUE_MAX = 63
LABEL_PREFIX_MAX = 253

_DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS_SUBDOMAIN_RE = re.compile(rf"{_DNS_LABEL}(\.{_DNS_LABEL})*")
_DNS_LABEL_RE = re.compile(_DNS_LABEL)
# A label value (and the name part of a label key): alphanumeric at both ends, -_. inside.
_LABEL_VALUE_RE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
_GUID = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
_GUID_RE = re.compile(_GUID)
# The ARM ID of a user-assigned identity, matched without regard to case as ARM does. Resource
# group: 1-90 of letters (Unicode too), digits, _ - . ( ), not ending in "."; identity: 3-128 of
# ASCII letters, digits, _ -, starting with a letter or digit (Azure's naming rules for both).
_RESOURCE_ID_RE = re.compile(
    rf"/subscriptions/{_GUID}/resourcegroups/[-\w.()]{{0,89}}[-\w()]"
    r"/providers/microsoft\.managedidentity/userassignedidentities/[A-Za-z0-9][-A-Za-z0-9_]{2,127}",
    re.IGNORECASE,
)
RESOURCE_ID_SHAPE = (
    "/subscriptions/<subscription-id>/resourcegroups/<resource-group>/providers/"
    "Microsoft.ManagedIdentity/userAssignedIdentities/<name>"
)


def is_dns_subdomain(value: str) -> bool:
    """RFC 1123 DNS subdomain, as Kubernetes object names (at most 253 characters)."""
    return len(value) <= DNS_SUBDOMAIN_MAX and _DNS_SUBDOMAIN_RE.fullmatch(value) is not None


def is_dns_label(value: str) -> bool:
    """RFC 1123 DNS label, as namespace names (at most 63 characters)."""
    return len(value) <= DNS_LABEL_MAX and _DNS_LABEL_RE.fullmatch(value) is not None


def is_label_value(value: str) -> bool:
    return len(value) <= LABEL_VALUE_MAX and _LABEL_VALUE_RE.fullmatch(value) is not None


def is_label_key(key: str) -> bool:
    """A qualified name: ``[prefix/]name``, the prefix a DNS subdomain, the name 1-63 characters."""
    prefix, slash, name = key.rpartition("/")
    if slash and (not prefix or len(prefix) > LABEL_PREFIX_MAX or not _DNS_SUBDOMAIN_RE.fullmatch(prefix)):
        return False
    return bool(name) and is_label_value(name)


def check_namespace(value: str) -> str:
    if not is_dns_label(value):
        raise UsageError(
            f"--namespace {value!r} is not a valid namespace name: an RFC 1123 DNS label (lower-case "
            f"letters, digits and '-', starting and ending with a letter or digit, at most {DNS_LABEL_MAX})"
        )
    return value


def check_name(value: str, flag: str = "--name") -> str:
    if not is_dns_subdomain(value):
        raise UsageError(
            f"{flag} {value!r} must be a valid RFC 1123 DNS subdomain name (lower-case letters, digits, "
            f"'-' and '.', starting and ending with a letter or digit, at most {DNS_SUBDOMAIN_MAX})"
        )
    return value


def check_identity_name(value: str) -> str:
    """A pod identity's name: the ``AzureIdentity``'s and, with ``-binding``, its binding's."""
    check_name(value)
    if len(binding_name(value)) > DNS_SUBDOMAIN_MAX:
        raise UsageError(
            f"--name {value!r} is too long: its binding {binding_name(value)!r} would exceed "
            f"{DNS_SUBDOMAIN_MAX} characters"
        )
    return value


def binding_name(identity_name: str) -> str:
    return identity_name + BINDING_SUFFIX


def check_selector(value: str, flag: str = "--binding-selector") -> str:
    """The binding's selector is compared with the pod label ``aadpodidbinding``: a label value."""
    if not value:
        raise UsageError(f"{flag} must not be empty: an empty aadpodidbinding label selects no identity")
    if not is_label_value(value):
        raise UsageError(
            f"{flag} {value!r} is not a valid label value (letters, digits, '-', '_' and '.', starting "
            f"and ending with a letter or digit, at most {LABEL_VALUE_MAX}); pods select the binding "
            "with the label aadpodidbinding=<selector>"
        )
    return value


def check_resource_id(value: str) -> str:
    if _RESOURCE_ID_RE.fullmatch(value) is None:
        raise UsageError(
            f"--identity-resource-id {value!r} is not the resource ID of a user-assigned identity: "
            f"expected {RESOURCE_ID_SHAPE}"
        )
    return value


def check_client_id(value: str) -> str:
    if _GUID_RE.fullmatch(value) is None:
        raise UsageError(
            f"--client-id {value!r} is not a GUID (xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx): "
            "the identity's client (application) ID"
        )
    return value


IDENTITY_TYPES: dict[int, str] = {
    0: "user-assigned managed identity",
    1: "service principal (client secret)",
    2: "service principal (certificate)",
    3: "federated (workload identity)",
}


def check_identity_type(value: int) -> IdentityType:
    if value not in IDENTITY_TYPES:
        known = ", ".join(f"{k} {v}" for k, v in IDENTITY_TYPES.items())
        raise UsageError(f"--type {value} is not an identity type: {known}")
    return IdentityType(value)


def parse_pod_labels(values: Iterable[str]) -> dict[str, str]:
    """``k=v,k2=v2`` (also given as several words or repeated flags) into a label map.

    At least one label: an exception without labels would match no pod.
    """
    labels: dict[str, str] = {}
    for value in values:
        for item in value.split(","):
            item = item.strip()
            if not item:
                continue
            key, eq, label = item.partition("=")
            key = key.strip()
            label = label.strip()
            if not eq:
                raise UsageError(f"--pod-labels: {item!r} is not key=value")
            if not is_label_key(key):
                raise UsageError(
                    f"--pod-labels: {key!r} is not a valid label key ([prefix/]name: a DNS subdomain "
                    f"prefix, a name of letters, digits, '-', '_' and '.' at most {LABEL_VALUE_MAX} long)"
                )
            if not is_label_value(label):
                raise UsageError(
                    f"--pod-labels: {label!r} (for {key}) is not a valid label value (letters, digits, "
                    "'-', '_' and '.', starting and ending with a letter or digit, "
                    f"at most {LABEL_VALUE_MAX})"
                )
            if key in labels and labels[key] != label:
                raise UsageError(f"--pod-labels: {key} is given twice, as {labels[key]!r} and {label!r}")
            labels[key] = label
    if not labels:
        raise UsageError("--pod-labels: at least one key=value is required")
    return labels


def check_secret_ref(value: str, namespace: str) -> tuple[str, str]:
    """``--client-password-secret [NAMESPACE/]NAME`` into (namespace, name)."""
    ns, slash, name = value.rpartition("/")
    if not slash:
        ns = namespace
    if not is_dns_label(ns) or not is_dns_subdomain(name):
        raise UsageError(
            f"--client-password-secret {value!r} must be [NAMESPACE/]NAME of a Secret "
            "(a namespace and an RFC 1123 name)"
        )
    return ns, name
