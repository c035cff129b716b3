"""The ARM identity PATCH bodies for a VM or VMSS (mic-spec §3.7): pure functions.

A PATCH carries only the delta: ``"<id>": {}`` attaches, ``"<id>": null`` detaches; identities
already in the wanted state are left out. ``type`` keeps a system-assigned identity alive:

* user identities remain → ``UserAssigned``, or ``SystemAssigned, UserAssigned`` when the resource
  has a system-assigned identity;
* none remain → ``SystemAssigned`` or ``None``, and ``userAssignedIdentities`` is omitted.

Unlike the original, an empty delta never sends a PATCH, so a removal of IDs that are already gone
cannot strip a lone system-assigned identity (mic-spec §6.15). Deltas over ``limit`` entries (ARM
accepts 150 per request) are split into sequential PATCHes, each typed for the state it leaves.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

MAX_IDENTITIES_PER_PATCH = 150
SYSTEM = "SystemAssigned"
USER = "UserAssigned"
BOTH = "SystemAssigned, UserAssigned"
NONE = "None"


def identity_of(resource: Mapping[str, Any] | None) -> Mapping[str, Any]:
    identity = (resource or {}).get("identity")
    return identity if isinstance(identity, Mapping) else {}


def user_identities(resource: Mapping[str, Any] | None) -> dict[str, str]:
    """Folded resource ID → ARM's spelling, of the user-assigned identities on a VM/VMSS."""
    ids = identity_of(resource).get("userAssignedIdentities")
    if not isinstance(ids, Mapping):
        return {}
    return {str(k).casefold(): str(k) for k in ids}


def has_system_assigned(resource: Mapping[str, Any] | None) -> bool:
    kind = identity_of(resource).get("type")
    return isinstance(kind, str) and SYSTEM.casefold() in kind.casefold().replace(" ", "").split(",")


def identity_patches(
    resource: Mapping[str, Any] | None,
    add: Iterable[str],
    remove: Iterable[str],
    *,
    limit: int = MAX_IDENTITIES_PER_PATCH,
) -> list[dict[str, Any]]:
    """The PATCH bodies that bring ``resource`` (its GET answer) to existing + add - remove.

    An ID in both ``add`` and ``remove`` is kept (adds win, as the original). Empty list: no PATCH.
    """
    existing = user_identities(resource)
    system = has_system_assigned(resource)
    adds = {a.casefold(): a for a in add}
    removes = {r.casefold(): existing[r.casefold()] for r in remove if r.casefold() in existing}
    for folded in adds:
        removes.pop(folded, None)
    delta: list[tuple[str, str, bool]] = [(f, a, True) for f, a in sorted(adds.items()) if f not in existing]
    delta += [(f, r, False) for f, r in sorted(removes.items())]
    bodies: list[dict[str, Any]] = []
    current = set(existing)
    for start in range(0, len(delta), max(1, limit)):
        chunk = delta[start : start + max(1, limit)]
        for folded, _, attach in chunk:
            (current.add if attach else current.discard)(folded)
        identity: dict[str, Any]
        if current:
            identity = {
                "type": BOTH if system else USER,
                "userAssignedIdentities": {spelled: {} if attach else None for _, spelled, attach in chunk},
            }
        else:
            identity = {"type": SYSTEM if system else NONE}
        bodies.append({"identity": identity})
    return bodies
