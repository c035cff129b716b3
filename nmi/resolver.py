"""Which identity a pod may use for a request: pure decisions over the cluster state.

Standard mode grants what the pod's ``AzureAssignedIdentity`` objects say, and waits (``Pending``)
only where MIC may still assign: a record still ``Created``, or a binding that selects the pod;
anything else is refused at once, so SDKs stop instead of retrying. Managed mode matches the pod's
``aadpodidbinding`` label against ``AzureIdentityBinding`` selectors in its namespace. Both
return a ``Decision``; waiting and I/O are the caller's business.

Rules that differ from aad-pod-identity on purpose:
- client_id and resource-ID matching is case-insensitive everywhere (nmi-spec §9.11);
- when no identity is named and several are allowed, the choice is deterministic: identities in
  the pod's own namespace first, then by namespace and name (nmi-spec §9.13);
- a named identity the pod may not use is refused, never replaced by another one; every selector
  named must agree on one identity, and selectors that name different ones are refused;
- nothing is trusted by pod name (no ``^mic-`` short-circuit, nmi-spec §9.9);
- an empty ``aadpodidbinding`` label matches no binding (nmi-spec §9.26).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from functools import lru_cache

from nmi.selectors import IdentityQuery
from nmi.settings import IdentitySettings
from podidentity.binding import binds
from podidentity.model import (
    ASSIGNED,
    BINDING_LABEL,
    CREATED,
    WORKLOAD_IDENTITY_LABEL,
    AzureIdentity,
    AzurePodIdentityException,
    IdentityType,
    ObjectKey,
    Pod,
    ServiceAccount,
)
from podidentity.state import ClusterState

NO_OBJECT_IDS: Mapping[str, str] = {}


def object_id_key(identity: AzureIdentity) -> str:
    """What an object id learned from a token belongs to: the client in its tenant at its authority
    (one multi-tenant app has an object id per tenant; an identity pointing at another authority
    must not teach NMI the object id of a client it merely names)."""
    return "|".join(
        (
            str(int(identity.type)),
            identity.tenant_id.casefold(),
            identity.ad_endpoint.casefold(),
            identity.client_id_folded,
        )
    )


def match(query: IdentityQuery, identity: AzureIdentity, object_ids: Mapping[str, str]) -> bool | None:
    """Whether ``identity`` is the one ``query`` names: every named property must agree.

    ``None`` when only an object id not learned yet stands between (``object_ids`` maps an
    ``object_id_key`` to the folded object id, ``""`` when it cannot be learned).
    """
    if query.client_id and identity.client_id_folded != query.client_id:
        return False
    if query.resource_id and identity.resource_id_folded != query.resource_id:
        return False
    if query.object_id:
        known = object_ids.get(object_id_key(identity))
        if known is None:
            return None
        return known == query.object_id
    return True


def _disagrees(query: IdentityQuery, identity: AzureIdentity, object_ids: Mapping[str, str]) -> bool:
    """Some selector names ``identity`` and another does not: the selectors contradict each other."""
    hits = misses = 0
    for named, have in (
        (query.client_id, identity.client_id_folded),
        (query.resource_id, identity.resource_id_folded),
        (query.object_id, object_ids.get(object_id_key(identity))),
    ):
        if named and have is not None:
            if named == have:
                hits += 1
            else:
                misses += 1
    return hits > 0 and misses > 0


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


class Refusal(Enum):
    """How a denial is answered; see ``TokenService.denied``."""

    NOT_FOUND = "not_found"
    """Final: IMDS's own answer for an identity the VM does not have (400), so SDKs stop at once."""
    TIMED_OUT = "timed_out"
    """The bounded wait for MIC ended: the original's 404, which SDKs retry."""
    CONFLICT = "conflict"
    """The request's selectors name different identities (400)."""
    AMBIGUOUS = "ambiguous"
    """Several identities and none named, with ``--reject-ambiguous-identity`` (IMDS's 400)."""


@dataclass(frozen=True, slots=True)
class Deny:
    reason: str
    refusal: Refusal = Refusal.NOT_FOUND


@dataclass(frozen=True, slots=True)
class Learn:
    """The request names an object id; these allowed identities' object ids are not known yet.

    The caller learns them (from the ``oid`` claim of a token it gets for each, which it would
    cache anyway) and decides again.
    """

    identities: tuple[AzureIdentity, ...]


Decision = Grant | PassThrough | Pending | Deny | Learn


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
    # Two bindings (or records) of one identity are still one identity, not an ambiguity.
    unique = {i.key: i for i in identities}.values()
    return sorted(unique, key=lambda i: (i.namespace != pod.namespace, i.namespace, i.name))


def _choose(
    pod: Pod,
    allowed: list[AzureIdentity],
    query: IdentityQuery,
    object_ids: Mapping[str, str],
    *,
    reject_ambiguous: bool,
) -> Grant | Deny | Learn | None:
    """Pick among ``allowed`` (already ordered); ``None`` when none of them is the one named."""
    if not query.named:
        if not allowed:
            return None
        if reject_ambiguous and len(allowed) > 1:
            return Deny("several identities and the request names none", Refusal.AMBIGUOUS)
        return Grant(allowed[0])
    unknown: list[AzureIdentity] = []
    for identity in allowed:
        verdict = match(query, identity, object_ids)
        if verdict:
            return Grant(identity)
        if verdict is None:
            unknown.append(identity)
    if unknown:
        return Learn(tuple(unknown))
    return None


def _pick(
    pod: Pod,
    allowed: list[AzureIdentity],
    coming: Iterable[AzureIdentity],
    query: IdentityQuery,
    object_ids: Mapping[str, str],
    settings: IdentitySettings,
) -> Grant | Deny | Learn | None:
    """The decision ``allowed`` (ordered) makes, or ``None`` when none of them is the one asked for.

    Selectors that disagree are refused even when only an identity still ``coming`` shows it.
    """
    chosen = _choose(pod, allowed, query, object_ids, reject_ambiguous=settings.reject_ambiguous_identity)
    if isinstance(chosen, Grant | Deny):
        return chosen
    return _conflict(query, (*allowed, *coming), object_ids) or chosen


def _could_be(
    query: IdentityQuery, identities: Iterable[AzureIdentity], object_ids: Mapping[str, str]
) -> bool:
    return any(match(query, i, object_ids) is not False for i in identities)


def _conflict(
    query: IdentityQuery, identities: Iterable[AzureIdentity], object_ids: Mapping[str, str]
) -> Deny | None:
    if any(_disagrees(query, i, object_ids) for i in identities):
        return Deny("the request's identity selectors name different identities", Refusal.CONFLICT)
    return None


def _standard_candidates(
    state: ClusterState, pod: Pod, settings: IdentitySettings
) -> tuple[list[AzureIdentity], list[AzureIdentity]]:
    """The pod's assigned and still-created identities."""
    assigned: list[AzureIdentity] = []
    created: list[AzureIdentity] = []
    for record in state.assigned_identities(pod.key):
        identity = record.identity
        if (settings.force_namespaced or identity.namespaced) and identity.namespace != pod.namespace:
            continue
        # An empty state comes from MIC 1.3/1.4 and counts as assigned, as in the original.
        if record.state in (ASSIGNED, ""):
            assigned.append(identity)
        elif record.state == CREATED:
            created.append(identity)
    return assigned, created


def selected_identities(state: ClusterState, pod: Pod, *, force_namespaced: bool) -> list[AzureIdentity]:
    """The identities MIC would assign to ``pod``: bindings whose selector is its label (mic-spec §3.4).

    A binding selects pods of every namespace unless the identity is namespaced (by the flag or
    its annotation), when pod, binding and identity must share one namespace.
    """
    selector = pod.labels.get(BINDING_LABEL, "")
    if not selector:
        return []
    found: list[AzureIdentity] = []
    for binding in state.bindings_selecting(selector):
        identity = state.get(AzureIdentity, ObjectKey(binding.namespace, binding.identity_name))
        if identity is not None and binds(binding, identity, pod, force_namespaced=force_namespaced):
            found.append(identity)
    return found


def _managed_candidates(state: ClusterState, pod: Pod) -> list[AzureIdentity]:
    # Managed mode has no MIC to widen the match: bindings and identities of the pod's namespace.
    return [*selected_identities(state, pod, force_namespaced=True), *_workload_identity(state, pod)]


def _federated_candidates(state: ClusterState, pod: Pod) -> list[AzureIdentity]:
    """Federated identities need no assignment: those the pod's bindings select (type 3), and its
    own service account's, if it follows workload identity's conventions.

    A type-3 identity is always namespaced: its credential is the pod's own service-account token,
    so a binding and identity of another namespace must never get to present it (with no MIC in
    between, a cross-namespace binding would hand another team the pod's token).
    """
    bound = selected_identities(state, pod, force_namespaced=True)
    return [*(i for i in bound if i.type is IdentityType.FEDERATED), *_workload_identity(state, pod)]


def _workload_identity(state: ClusterState, pod: Pod) -> tuple[AzureIdentity, ...]:
    """The identity of the pod's own service account, as Azure AD Workload Identity's webhook reads
    it: the pod labelled ``azure.workload.identity/use: "true"``, its service account annotated
    ``azure.workload.identity/client-id``. Never another service account's."""
    if pod.labels.get(WORKLOAD_IDENTITY_LABEL, "").casefold() != "true":
        return ()
    account = state.get(ServiceAccount, ObjectKey(pod.namespace, pod.service_account))
    if account is None or not account.client_id:
        return ()
    return (_account_identity(pod.namespace, account.name, account.client_id, account.tenant_id),)


@lru_cache(maxsize=4096)
def _account_identity(namespace: str, account: str, client_id: str, tenant_id: str) -> AzureIdentity:
    # One object per service account and content, so token cache keys built from it are shared.
    return AzureIdentity(
        namespace=namespace,
        name=f"serviceaccount:{account}",
        type=IdentityType.FEDERATED,
        client_id=client_id,
        tenant_id=tenant_id,
    )


def allowed_identities(state: ClusterState, pod: Pod, settings: IdentitySettings) -> list[AzureIdentity]:
    """Every identity ``pod`` may use right now, in the order a default request would pick."""
    if settings.operation_mode == "managed":
        return _order(pod, _managed_candidates(state, pod))
    assigned = _standard_candidates(state, pod, settings)[0]
    return _order(pod, [*assigned, *_federated_candidates(state, pod)])


def _unbound(pod: Pod) -> str:
    if not pod.labels.get(BINDING_LABEL, ""):
        return f"pod has no {BINDING_LABEL} label"
    return f"no AzureIdentityBinding selects {BINDING_LABEL}={pod.labels[BINDING_LABEL]}"


def resolve_standard(
    state: ClusterState,
    pod: Pod,
    query: IdentityQuery,
    settings: IdentitySettings,
    object_ids: Mapping[str, str] = NO_OBJECT_IDS,
) -> Decision:
    assigned, created = _standard_candidates(state, pod, settings)
    assigned += _federated_candidates(state, pod)
    selected = selected_identities(state, pod, force_namespaced=settings.force_namespaced)
    picked = _pick(pod, _order(pod, assigned), (*created, *selected), query, object_ids, settings)
    if picked is not None:
        return picked
    # Wait only where MIC may still assign what was asked for; anything else is final at once.
    if _could_be(query, created, object_ids):
        return Pending("identity not yet assigned to the node")
    if _could_be(query, selected, object_ids):
        return Pending("identity not yet assigned to the pod")
    if not state.synced:
        return Pending("the cluster state is not synced yet")
    if query.named:
        return Deny("the requested identity is not bound to this pod")
    if assigned or created:
        return Deny("no identity is assigned to this pod")
    return Deny(_unbound(pod))


def resolve_managed(
    state: ClusterState,
    pod: Pod,
    query: IdentityQuery,
    settings: IdentitySettings,
    object_ids: Mapping[str, str] = NO_OBJECT_IDS,
) -> Decision:
    picked = _pick(pod, _order(pod, _managed_candidates(state, pod)), (), query, object_ids, settings)
    if picked is not None:
        return picked
    if query.named:
        return Deny("the requested identity is not bound to this pod")
    return Deny(_unbound(pod))


def resolve(
    state: ClusterState,
    pod: Pod,
    query: IdentityQuery,
    settings: IdentitySettings,
    object_ids: Mapping[str, str] = NO_OBJECT_IDS,
) -> Decision:
    exception = excepted_by(pod, state.in_namespace(AzurePodIdentityException, pod.namespace))
    if exception is not None:
        return PassThrough(exception)
    if settings.operation_mode == "managed":
        return resolve_managed(state, pod, query, settings, object_ids)
    return resolve_standard(state, pod, query, settings, object_ids)
