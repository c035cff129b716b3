"""Current AAIs against desired ones, then the work per VM/VMSS: pure functions, no I/O.

Change detection compares content (pod, node, binding name, the identity's fields), not
resourceVersions, so metadata-only edits of an identity or binding rewrite nothing (mic-spec §6.17).

Per VM/VMSS (a "target", from the node's providerID) the work is: AAIs to create, replace,
confirm (present but not yet ``Assigned``) and delete, plus the identity resource IDs to add and to
remove. An identity is removed only if it was confirmed (``Assigned``, or empty for legacy objects),
is type 0, is not immutable, and no desired assignment on the same target uses the same resource ID:
pods are told apart by namespace and name (mic-spec §6.14 fixed) and a VMSS counts as one target.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

from mic.desired import Assignment
from mic.model import ArmTarget
from podidentity.model import ASSIGNED, AzureAssignedIdentity, AzureIdentity, IdentityType, ObjectKey

Pair = tuple[AzureAssignedIdentity, Assignment]


@dataclass(frozen=True, slots=True)
class Plan:
    create: tuple[Assignment, ...] = ()
    """Desired, absent: POST with status ``Created``."""
    update: tuple[Pair, ...] = ()
    """Present under the same name with other content: PUT with status ``Created``."""
    confirm: tuple[Pair, ...] = ()
    """Present and current, but not ``Assigned`` yet: assign on Azure again."""
    keep: tuple[Pair, ...] = ()
    """Present, current and ``Assigned``: nothing to do, except drift repair."""
    delete: tuple[AzureAssignedIdentity, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.create or self.update or self.confirm or self.delete)


def _content(identity: AzureIdentity) -> AzureIdentity:
    return dataclasses.replace(identity, resource_version="")


def same_content(current: AzureAssignedIdentity, desired: Assignment) -> bool:
    return (
        current.pod_name == desired.pod_name
        and current.pod_namespace == desired.pod_namespace
        and current.node_name == desired.node_name
        and current.binding_name == desired.binding.name
        and _content(current.identity) == _content(desired.identity)
    )


def confirmed(state: str) -> bool:
    """``Assigned``, or empty: a legacy object from before states, treated as assigned."""
    return state in (ASSIGNED, "")


def diff(desired: Mapping[ObjectKey, Assignment], current: Iterable[AzureAssignedIdentity]) -> Plan:
    create: list[Assignment] = []
    update: list[Pair] = []
    confirm: list[Pair] = []
    keep: list[Pair] = []
    delete: list[AzureAssignedIdentity] = []
    seen: set[ObjectKey] = set()
    for aai in sorted(current, key=lambda a: (a.namespace, a.name)):
        want = desired.get(aai.key)
        if want is None:
            delete.append(aai)
            continue
        seen.add(aai.key)
        if not same_content(aai, want):
            update.append((aai, want))
        elif confirmed(aai.state):
            keep.append((aai, want))
        else:
            confirm.append((aai, want))
    for key in sorted(desired, key=lambda k: (k.namespace, k.name)):
        if key not in seen:
            create.append(desired[key])
    return Plan(tuple(create), tuple(update), tuple(confirm), tuple(keep), tuple(delete))


@dataclass(slots=True)
class TargetWork:
    target: ArmTarget
    create: list[Assignment] = field(default_factory=list)
    update: list[Pair] = field(default_factory=list)
    confirm: list[Pair] = field(default_factory=list)
    delete: list[AzureAssignedIdentity] = field(default_factory=list)
    remove_ids: dict[str, str] = field(default_factory=dict)
    """Folded resource ID → as written, for identities that may leave this VM/VMSS."""
    expected_ids: dict[str, str] = field(default_factory=dict)
    """Folded resource ID → as written, of ``Assigned`` identities that stay: drift repair input."""

    @property
    def has_changes(self) -> bool:
        return bool(self.create or self.update or self.confirm or self.delete or self.remove_ids)


@dataclass(slots=True)
class Work:
    targets: dict[tuple[str, str, str, str], TargetWork] = field(default_factory=dict)
    node_gone: list[AzureAssignedIdentity] = field(default_factory=list)
    """AAIs whose node no longer exists: deleted without touching Azure (mic-spec §3.10)."""
    waiting_for_node: int = 0
    """Desired AAIs skipped because their node is not (yet) known."""

    def at(self, target: ArmTarget) -> TargetWork:
        work = self.targets.get(target.folded)
        if work is None:
            work = self.targets[target.folded] = TargetWork(target)
        return work


def in_use(
    desired: Iterable[Assignment], node_targets: Mapping[str, ArmTarget]
) -> dict[tuple[str, str, str, str], set[str]]:
    """Folded resource IDs each target must keep, from every desired type-0 assignment on it."""
    used: dict[tuple[str, str, str, str], set[str]] = defaultdict(set)
    for a in desired:
        target = node_targets.get(a.node_name)
        if target is not None and a.needs_arm:
            used[target.folded].add(a.identity.resource_id_folded)
    return used


def removable(aai: AzureAssignedIdentity, immutable: Collection[str]) -> bool:
    """Was attached by us and may be detached: confirmed, type 0, not immutable (case-insensitive)."""
    return (
        confirmed(aai.state)
        and aai.identity.type == IdentityType.USER_ASSIGNED_MSI
        and bool(aai.identity.resource_id)
        and aai.identity.client_id_folded not in immutable
    )


def plan_work(
    plan: Plan,
    desired: Mapping[ObjectKey, Assignment],
    node_targets: Mapping[str, ArmTarget],
    *,
    immutable: Collection[str] = frozenset(),  # folded client IDs
) -> Work:
    """Group a plan by VM/VMSS. ``node_targets`` holds every known node; a missing node is gone."""
    work = Work()
    used = in_use(desired.values(), node_targets)

    def release(aai: AzureAssignedIdentity) -> bool:
        target = node_targets.get(aai.node_name)
        if target is None or not removable(aai, immutable):
            return False
        rid = aai.identity.resource_id_folded
        if rid in used.get(target.folded, ()):
            return False
        work.at(target).remove_ids[rid] = aai.identity.resource_id
        return True

    for a in plan.create:
        target = node_targets.get(a.node_name)
        if target is None:
            work.waiting_for_node += 1
        else:
            work.at(target).create.append(a)
    for old, new in plan.update:
        target = node_targets.get(new.node_name)
        if target is None:
            work.waiting_for_node += 1
            continue
        # The old identity may leave the old node's VM/VMSS (a no-op when it is still in use there).
        release(old)
        work.at(target).update.append((old, new))
    for old, new in plan.confirm:
        target = node_targets.get(new.node_name)
        if target is None:
            work.waiting_for_node += 1
        else:
            work.at(target).confirm.append((old, new))
    for _old, new in plan.keep:
        target = node_targets.get(new.node_name)
        if target is not None and new.needs_arm:
            work.at(target).expected_ids[new.identity.resource_id_folded] = new.identity.resource_id
    for aai in plan.delete:
        target = node_targets.get(aai.node_name)
        if target is None:
            work.node_gone.append(aai)
            continue
        release(aai)
        work.at(target).delete.append(aai)
    return work
