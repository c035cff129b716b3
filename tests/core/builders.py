"""Small builders of Kubernetes-shaped objects for tests."""

from __future__ import annotations

from typing import Any

GROUP = "aadpodidentity.k8s.io/v1"


def pod(
    name: str,
    ip: str,
    *,
    ns: str = "default",
    node: str = "node-1",
    phase: str = "Running",
    labels: dict[str, str] | None = None,
    uid: str | None = None,
    deleting: bool = False,
    host_network: bool = False,
    created: str | None = None,
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "namespace": ns,
        "uid": uid or f"uid-{ns}-{name}",
        "labels": labels or {},
    }
    if deleting:
        meta["deletionTimestamp"] = "2026-11-29T00:00:00Z"
    if created:
        meta["creationTimestamp"] = created
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": meta,
        "spec": {"nodeName": node, "hostNetwork": host_network},
        "status": {"podIP": ip, "phase": phase},
    }


def identity(
    name: str,
    client_id: str,
    *,
    ns: str = "default",
    type_: int = 0,
    resource_id: str = "",
    namespaced: bool = False,
    **spec: Any,
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": ns}
    if namespaced:
        meta["annotations"] = {"aadpodidentity.k8s.io/Behavior": "namespaced"}
    return {
        "apiVersion": GROUP,
        "kind": "AzureIdentity",
        "metadata": meta,
        "spec": {"type": type_, "clientID": client_id, "resourceID": resource_id, **spec},
    }


def binding(name: str, identity_name: str, selector: str, *, ns: str = "default") -> dict[str, Any]:
    return {
        "apiVersion": GROUP,
        "kind": "AzureIdentityBinding",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"azureIdentity": identity_name, "selector": selector},
    }


def assigned(
    pod_name: str,
    ident: dict[str, Any],
    *,
    pod_ns: str = "default",
    state: str = "Assigned",
    node: str = "node-1",
    ns: str = "default",
) -> dict[str, Any]:
    name = f"{pod_name}-{ident['metadata']['namespace']}-{ident['metadata']['name']}"
    return {
        "apiVersion": GROUP,
        "kind": "AzureAssignedIdentity",
        "metadata": {"name": name, "namespace": ns, "labels": {"nodename": node}},
        "spec": {
            "pod": pod_name,
            "podNamespace": pod_ns,
            "nodename": node,
            "azureIdentityRef": {k: v for k, v in ident.items() if k != "kind"},
        },
        "status": {"status": state},
    }


def exception(name: str, labels: dict[str, str], *, ns: str = "default") -> dict[str, Any]:
    return {
        "apiVersion": GROUP,
        "kind": "AzurePodIdentityException",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"podLabels": labels},
    }
