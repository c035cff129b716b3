"""The objects the plugin writes and how it shows what it reads, as pure functions (no I/O).

Bodies use the CRDs' field names (``deploy/crds.yaml``); listings are built from the core's typed
views (``podidentity.model``), so the plugin reads objects exactly as NMI and MIC do.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import yaml

from kubectl_pod_identity.validation import IDENTITY_TYPES
from podidentity.model import (
    GROUP_VERSION,
    AzureIdentity,
    AzureIdentityBinding,
    AzurePodIdentityException,
    IdentityType,
)

OutputFormat = Literal["table", "json", "yaml"]
NONE = "<none>"


def _object(kind: str, namespace: str, name: str, spec: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": GROUP_VERSION,
        "kind": kind,
        "metadata": {"name": name, "namespace": namespace},
        "spec": dict(spec),
    }


def identity_body(
    namespace: str,
    name: str,
    *,
    id_type: IdentityType,
    client_id: str,
    resource_id: str = "",
    tenant_id: str = "",
    secret: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """An ``AzureIdentity``: ``resourceID`` for a user-assigned identity, ``tenantID`` and
    ``clientPassword`` (a Secret reference) for a service principal."""
    spec: dict[str, Any] = {"type": int(id_type), "clientID": client_id}
    if resource_id:
        spec["resourceID"] = resource_id
    if tenant_id:
        spec["tenantID"] = tenant_id
    if secret is not None:
        spec["clientPassword"] = {"namespace": secret[0], "name": secret[1]}
    return _object("AzureIdentity", namespace, name, spec)


def binding_body(namespace: str, name: str, *, identity_name: str, selector: str) -> dict[str, Any]:
    return _object(
        "AzureIdentityBinding", namespace, name, {"azureIdentity": identity_name, "selector": selector}
    )


def exception_body(namespace: str, name: str, pod_labels: Mapping[str, str]) -> dict[str, Any]:
    return _object("AzurePodIdentityException", namespace, name, {"podLabels": dict(pod_labels)})


# --- listings ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IdentityRow:
    """One pod identity: the ``AzureIdentity`` and the bindings in its namespace that name it."""

    identity: AzureIdentity
    bindings: tuple[AzureIdentityBinding, ...]

    @property
    def selectors(self) -> list[str]:
        return sorted({b.selector for b in self.bindings})


def identity_rows(
    identities: Iterable[AzureIdentity], bindings: Iterable[AzureIdentityBinding]
) -> list[IdentityRow]:
    by_identity: dict[tuple[str, str], list[AzureIdentityBinding]] = {}
    for b in bindings:
        by_identity.setdefault((b.namespace, b.identity_name), []).append(b)
    return [
        IdentityRow(i, tuple(sorted(by_identity.get((i.namespace, i.name), ()), key=lambda b: b.name)))
        for i in sorted(identities, key=lambda i: (i.namespace, i.name))
    ]


def identity_record(row: IdentityRow) -> dict[str, Any]:
    i = row.identity
    record: dict[str, Any] = {
        "namespace": i.namespace,
        "name": i.name,
        "type": int(i.type),
        "clientID": i.client_id,
        "resourceID": i.resource_id,
    }
    if i.tenant_id:
        record["tenantID"] = i.tenant_id
    if i.client_password is not None:
        record["clientPassword"] = {"namespace": i.client_password.namespace, "name": i.client_password.name}
    record["bindings"] = [{"name": b.name, "selector": b.selector} for b in row.bindings]
    return record


def exception_record(exception: AzurePodIdentityException) -> dict[str, Any]:
    return {
        "namespace": exception.namespace,
        "name": exception.name,
        "podLabels": dict(sorted(exception.pod_labels.items())),
    }


def _what(row: IdentityRow) -> str:
    i = row.identity
    if i.type == IdentityType.USER_ASSIGNED_MSI:
        return i.resource_id or NONE
    return f"type {int(i.type)}: {IDENTITY_TYPES.get(int(i.type), 'unknown')}"


IDENTITY_HEADERS = ("NAMESPACE", "NAME", "CLIENT ID", "RESOURCE ID/TYPE", "SELECTOR")
EXCEPTION_HEADERS = ("NAMESPACE", "NAME", "POD LABELS")


def identity_table(rows: Sequence[IdentityRow]) -> str:
    return table(
        IDENTITY_HEADERS,
        [
            (
                r.identity.namespace,
                r.identity.name,
                r.identity.client_id,
                _what(r),
                ",".join(r.selectors) or NONE,
            )
            for r in rows
        ],
    )


def exception_table(exceptions: Sequence[AzurePodIdentityException]) -> str:
    return table(
        EXCEPTION_HEADERS,
        [
            (e.namespace, e.name, ",".join(f"{k}={v}" for k, v in sorted(e.pod_labels.items())) or NONE)
            for e in exceptions
        ],
    )


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns three spaces apart, as ``kubectl get`` prints them."""
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows, strict=False)]
    lines = []
    for line in (headers, *rows):
        cells = [str(c).ljust(w) for c, w in zip(line, widths, strict=True)]
        lines.append("   ".join(cells).rstrip())
    return "\n".join(lines) + "\n"


def dump(records: list[dict[str, Any]], fmt: Literal["json", "yaml"]) -> str:
    if fmt == "json":
        return json.dumps(records, indent=2) + "\n"
    return yaml.safe_dump(records, sort_keys=False, default_flow_style=False) if records else "[]\n"
