"""Which identity a pod may use for a request: pure decisions over the cluster state.

Standard mode reads the pod's ``AzureAssignedIdentity`` objects; managed mode matches the pod's
``aadpodidbinding`` label against ``AzureIdentityBinding`` selectors in its namespace. Both
return a ``Decision``; waiting and I/O are the caller's business.

Rules that differ from aad-pod-identity on purpose:
- client_id and resource-ID matching is case-insensitive everywhere (nmi-spec §9.11);
- when no identity is named and several are allowed, the choice is deterministic: identities in
  the pod's own namespace first, then by namespace and name (nmi-spec §9.13);
- a named identity the pod may not use is refused, never replaced by another one;
- nothing is trusted by pod name (no ``^mic-`` short-circuit, nmi-spec §9.9);
- an empty ``aadpodidbinding`` label matches no binding (nmi-spec §9.26).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from nmi.model import (
    ASSIGNED,
    BINDING_LABEL,
    CREATED,
    AzureIdentity,
    AzureIdentityBinding,
    AzurePodIdentityException,
    ObjectKey,
    Pod,
)
from nmi.settings import IdentitySettings
from nmi.state import ClusterState


@dataclass(frozen=True, slots=True)
class IdentityQuery:
    """The identity a request names, already case-folded; both empty means "any"."""

    client_id: str = ""
    resource_id: str = ""

    @property
    def named(self) -> bool:
        return bool(self.client_id or self.resource_id)

    def matches(self, identity: AzureIdentity) -> bool:
        if self.client_id and identity.client_id_folded == self.client_id:
            return True
        return bool(self.resource_id) and identity.resource_id_folded == self.resource_id


@dataclass(frozen=True, slots=True)
class Grant:
    identity: AzureIdentity


@dataclass(frozen=True, slots=True)
class PassThrough:
    exception: ObjectKey


@dataclass(frozen=True, slots=True)
class Pending:
    """Not allowed yet, but it may become so shortly (identity not yet assigned by MIC)."""

    reason: str


@dataclass(frozen=True, slots=True)
class Deny:
    reason: str


Decision = Grant | PassThrough | Pending | Deny


def excepted_by(pod: Pod, exceptions: Iterable[AzurePodIdentityException]) -> ObjectKey | None:
    """The exception that lets ``pod`` reach IMDS directly, if any.

    As in aad-pod-identity, one matching label of one exception in the pod's own namespace is
    enough, the value compared case-insensitively: shipped exceptions rely on it.
    """
    labels = pod.labels
    for exception in sorted(exceptions, key=lambda e: e.name):
        for key, value in exception.pod_labels.items():
            have = labels.get(key)
            if have is not None and have.casefold() == value.casefold():
                return exception.key
    return None


def _order(pod: Pod, identities: Iterable[AzureIdentity]) -> list[AzureIdentity]:
    return sorted(identities, key=lambda i: (i.namespace != pod.namespace, i.namespace, i.name))


def _choose(pod: Pod, allowed: list[AzureIdentity], query: IdentityQuery) -> AzureIdentity | None:
    if query.named:
        for identity in _order(pod, allowed):
            if query.matches(identity):
                return identity
        return None
    ordered = _order(pod, allowed)
    return ordered[0] if ordered else None


def _standard_candidates(
    state: ClusterState, pod: Pod, settings: IdentitySettings
) -> tuple[list[AzureIdentity], list[AzureIdentity], bool]:
    """The pod's assigned and still-created identities, and whether it has any record at all."""
    assigned: list[AzureIdentity] = []
    created: list[AzureIdentity] = []
    records = state.assigned_identities(pod.key)
    for record in records:
        identity = record.identity
        if (settings.force_namespaced or identity.namespaced) and identity.namespace != pod.namespace:
            continue
        # An empty state comes from MIC 1.3/1.4 and counts as assigned, as in the original.
        if record.state in (ASSIGNED, ""):
            assigned.append(identity)
        elif record.state == CREATED:
            created.append(identity)
    return assigned, created, bool(records)


def _managed_candidates(state: ClusterState, pod: Pod) -> list[AzureIdentity]:
    selector = pod.labels.get(BINDING_LABEL, "")
    if not selector:
        return []
    names = {
        b.identity_name
        for b in state.in_namespace(AzureIdentityBinding, pod.namespace)
        if b.selector == selector
    }
    return [
        identity
        for name in names
        if (identity := state.get(AzureIdentity, ObjectKey(pod.namespace, name))) is not None
    ]


def allowed_identities(state: ClusterState, pod: Pod, settings: IdentitySettings) -> list[AzureIdentity]:
    """Every identity ``pod`` may use right now, in the order a default request would pick."""
    if settings.operation_mode == "managed":
        return _order(pod, _managed_candidates(state, pod))
    return _order(pod, _standard_candidates(state, pod, settings)[0])


def resolve_standard(
    state: ClusterState,
    pod: Pod,
    query: IdentityQuery,
    settings: IdentitySettings,
    *,
    now: float,
) -> Decision:
    assigned, created, has_records = _standard_candidates(state, pod, settings)
    chosen = _choose(pod, assigned, query)
    if chosen is not None:
        return Grant(chosen)
    if any(not query.named or query.matches(i) for i in created):
        return Pending("identity not yet assigned to the node")
    if not has_records and _young(pod, now, settings.identity_wait_timeout_s):
        return Pending("no identity assigned to the pod yet")
    if query.named:
        return Deny("the requested identity is not assigned to this pod")
    return Deny("no identity is assigned to this pod")


def _young(pod: Pod, now: float, window_s: float) -> bool:
    """A pod started recently may still get identities from MIC; an old one will not."""
    return pod.created_at == 0.0 or now - pod.created_at < 2 * window_s


def resolve_managed(state: ClusterState, pod: Pod, query: IdentityQuery) -> Decision:
    if not pod.labels.get(BINDING_LABEL, ""):
        return Deny(f"pod has no {BINDING_LABEL} label")
    chosen = _choose(pod, _managed_candidates(state, pod), query)
    if chosen is not None:
        return Grant(chosen)
    if query.named:
        return Deny("the requested identity is not bound to this pod")
    return Deny("no identity is bound to this pod")


def resolve(
    state: ClusterState,
    pod: Pod,
    query: IdentityQuery,
    settings: IdentitySettings,
    *,
    now: float,
) -> Decision:
    exception = excepted_by(pod, state.in_namespace(AzurePodIdentityException, pod.namespace))
    if exception is not None:
        return PassThrough(exception)
    if settings.operation_mode == "managed":
        return resolve_managed(state, pod, query)
    return resolve_standard(state, pod, query, settings, now=now)
