"""The AzureAssignedIdentities the cluster should have: a pure function of pods, bindings, identities.

Rules (mic-spec §3.4 step 3, with the allowed phase improvement of §8):

* a pod counts when it is scheduled, its ``aadpodidbinding`` label is non-empty, and it is
  ``Pending`` or ``Running`` (Succeeded/Failed pods release their identities);
* a binding matches when ``spec.selector`` equals the label value exactly; its identity is
  ``<binding namespace>/<spec.azureIdentity>``;
* namespaced (``--forceNamespaced`` or the identity's ``Behavior: namespaced`` annotation): pod,
  binding and identity must share one namespace, and the AAI lives there; otherwise the binding may
  be in any namespace and the AAI lives in ``default`` (mic-spec §1.4);
* type-0 identities whose resourceID is not a user-assigned identity ID are ignored, as the original;
* federated identities (type 3) are ignored: they need no assignment;
* name ``<pod>-<podNamespace>-<identity>``; on a name clash the first (sorted) wins.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from mic.model import DEFAULT_AAI_NAMESPACE, FINALIZER, NODENAME_LABEL, valid_resource_id
from podidentity.binding import binds
from podidentity.model import (
    BEHAVIOR_ANNOTATION,
    BINDING_LABEL,
    GROUP_VERSION,
    LIVE_PHASES,
    AzureIdentity,
    AzureIdentityBinding,
    IdentityType,
    ObjectKey,
    Pod,
)


@dataclass(frozen=True, slots=True)
class Assignment:
    """One desired AAI: this pod may use this identity through this binding."""

    namespace: str
    name: str
    pod_namespace: str
    pod_name: str
    node_name: str
    identity: AzureIdentity
    binding: AzureIdentityBinding

    @property
    def key(self) -> ObjectKey:
        return ObjectKey(self.namespace, self.name)

    @property
    def pod_key(self) -> ObjectKey:
        return ObjectKey(self.pod_namespace, self.pod_name)

    @property
    def needs_arm(self) -> bool:
        """Only user-assigned managed identities are attached to VMs (types 1/2 are secrets)."""
        return self.identity.type == IdentityType.USER_ASSIGNED_MSI


def aai_name(pod_name: str, pod_namespace: str, identity_name: str) -> str:
    return f"{pod_name}-{pod_namespace}-{identity_name}"


def usable(identity: AzureIdentity) -> bool:
    return identity.type != IdentityType.USER_ASSIGNED_MSI or valid_resource_id(identity.resource_id)


def desired_assignments(
    pods: Iterable[Pod],
    identities: Iterable[AzureIdentity],
    bindings: Iterable[AzureIdentityBinding],
    *,
    force_namespaced: bool = False,
    clashes: list[str] | None = None,  # collects "name: kept X, dropped Y" for the caller to log
) -> dict[ObjectKey, Assignment]:
    # Federated identities (type 3) need nothing on a VM: NMI exchanges the pod's service-account
    # token itself, and no AzureAssignedIdentity is written for them.
    by_key = {i.key: i for i in identities if usable(i) and i.type is not IdentityType.FEDERATED}
    by_selector: dict[str, list[AzureIdentityBinding]] = defaultdict(list)
    for b in sorted(bindings, key=lambda b: (b.namespace, b.name)):
        by_selector[b.selector].append(b)
    result: dict[ObjectKey, Assignment] = {}
    for pod in sorted(pods, key=lambda p: (p.namespace, p.name)):
        label = pod.labels.get(BINDING_LABEL, "")
        if not pod.node_name or not label or pod.phase not in LIVE_PHASES:
            continue
        for b in by_selector.get(label, ()):
            identity = by_key.get(ObjectKey(b.namespace, b.identity_name))
            if identity is None or not binds(b, identity, pod, force_namespaced=force_namespaced):
                continue
            namespaced = force_namespaced or identity.namespaced
            a = Assignment(
                namespace=identity.namespace if namespaced else DEFAULT_AAI_NAMESPACE,
                name=aai_name(pod.name, pod.namespace, identity.name),
                pod_namespace=pod.namespace,
                pod_name=pod.name,
                node_name=pod.node_name,
                identity=identity,
                binding=b,
            )
            kept = result.get(a.key)
            if kept is not None:
                if clashes is not None and kept.binding != b:
                    clashes.append(f"{a.key}: kept binding {kept.binding.key}, ignored {b.key}")
                continue
            result[a.key] = a
    return result


def identity_snapshot(identity: AzureIdentity) -> dict[str, Any]:
    """``spec.azureIdentityRef``: the fields NMI reads, in the v1 camelCase keys (mic-spec §8.3).

    Built from the typed view rather than copied, so ``last-applied-configuration`` and other
    annotations do not bloat every AAI (mic-spec §6.18).
    """
    meta: dict[str, Any] = {"name": identity.name, "namespace": identity.namespace}
    if identity.resource_version:
        meta["resourceVersion"] = identity.resource_version
    if identity.namespaced:
        meta["annotations"] = {BEHAVIOR_ANNOTATION: "namespaced"}
    spec: dict[str, Any] = {"type": int(identity.type), "clientID": identity.client_id}
    if identity.resource_id:
        spec["resourceID"] = identity.resource_id
    if identity.client_password is not None:
        spec["clientPassword"] = {
            "name": identity.client_password.name,
            "namespace": identity.client_password.namespace,
        }
    if identity.tenant_id:
        spec["tenantID"] = identity.tenant_id
    if identity.auxiliary_tenant_ids:
        spec["auxiliaryTenantIDs"] = list(identity.auxiliary_tenant_ids)
    if identity.ad_endpoint:
        spec["adEndpoint"] = identity.ad_endpoint
    return {"apiVersion": GROUP_VERSION, "kind": "AzureIdentity", "metadata": meta, "spec": spec}


def binding_snapshot(binding: AzureIdentityBinding) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": binding.name, "namespace": binding.namespace}
    if binding.resource_version:
        meta["resourceVersion"] = binding.resource_version
    return {
        "apiVersion": GROUP_VERSION,
        "kind": "AzureIdentityBinding",
        "metadata": meta,
        "spec": {"azureIdentity": binding.identity_name, "selector": binding.selector},
    }


def render(a: Assignment, *, status: str, resource_version: str = "") -> dict[str, Any]:
    """The AAI object as MIC writes it (mic-spec §1.4)."""
    meta: dict[str, Any] = {
        "name": a.name,
        "namespace": a.namespace,
        "labels": {NODENAME_LABEL: a.node_name},
        "finalizers": [FINALIZER],
    }
    if resource_version:
        meta["resourceVersion"] = resource_version
    return {
        "apiVersion": GROUP_VERSION,
        "kind": "AzureAssignedIdentity",
        "metadata": meta,
        "spec": {
            "azureIdentityRef": identity_snapshot(a.identity),
            "azureBindingRef": binding_snapshot(a.binding),
            "pod": a.pod_name,
            "podNamespace": a.pod_namespace,
            "nodename": a.node_name,
        },
        "status": {"status": status, "availableReplicas": 1},
    }
