"""MIC's own views: the ARM resource (VM or scale set) a node runs on.

Pods, identities, bindings, AzureAssignedIdentities and nodes are the core's views
(``podidentity.model``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from podidentity.model import Node

FINALIZER = "azureassignedidentity.finalizers.aadpodidentity.k8s.io"
NODENAME_LABEL = "nodename"
DEFAULT_AAI_NAMESPACE = "default"
"""Where AAIs live outside namespaced mode, for backward compatibility (mic-spec §1.4)."""

ResourceKind = Literal["virtualMachines", "virtualMachineScaleSets"]


@dataclass(frozen=True, slots=True)
class ArmTarget:
    """One VM or VMSS: the unit ARM identity PATCHes apply to."""

    subscription: str
    resource_group: str
    kind: ResourceKind
    name: str

    @property
    def is_vmss(self) -> bool:
        return self.kind == "virtualMachineScaleSets"

    @property
    def path(self) -> str:
        return (
            f"/subscriptions/{self.subscription}/resourceGroups/{self.resource_group}"
            f"/providers/Microsoft.Compute/{self.kind}/{self.name}"
        )

    @property
    def folded(self) -> tuple[str, str, str, str]:
        """Identity for grouping: ARM names are case-insensitive."""
        return (self.subscription.casefold(), self.resource_group.casefold(), self.kind, self.name.casefold())

    def __str__(self) -> str:
        return f"{'vmss' if self.is_vmss else 'vm'}/{self.resource_group}/{self.name}"


_PROVIDER_ID = re.compile(
    r"^azure:///subscriptions/(?P<sub>[^/]+)/resourceGroups/(?P<rg>[^/]+)/providers/Microsoft\.Compute/"
    r"(?:(?P<vmss>virtualMachineScaleSets)/(?P<set>[^/]+)/virtualMachines/[^/]+"
    r"|virtualMachines/(?P<vm>[^/]+))/?$",
    re.IGNORECASE,
)


def parse_provider_id(provider_id: str) -> ArmTarget | None:
    """The VM or VMSS of a node's ``spec.providerID``; None when it is not an Azure compute ID."""
    m = _PROVIDER_ID.match(provider_id.strip())
    if m is None:
        return None
    if m.group("vmss"):
        return ArmTarget(m.group("sub"), m.group("rg"), "virtualMachineScaleSets", m.group("set"))
    return ArmTarget(m.group("sub"), m.group("rg"), "virtualMachines", m.group("vm"))


def target_of(node: Node, *, subscription: str, resource_group: str) -> ArmTarget:
    """Route a node from its providerID (its own subscription and resource group: an allowed
    improvement, mic-spec §8); without one, the original's rule: a VM named like the node in the
    configured resource group."""
    target = parse_provider_id(node.provider_id)
    if target is not None:
        return target
    return ArmTarget(subscription, resource_group, "virtualMachines", node.name)


_RESOURCE_ID = re.compile(
    r"^/subscriptions/[^/]+/resourcegroups/[^/]+/providers/microsoft\.managedidentity/"
    r"userassignedidentities/[^/]+$",
    re.IGNORECASE,
)


def valid_resource_id(resource_id: str) -> bool:
    """The shape check of the original's ``ValidateResourceID`` (case-insensitive)."""
    return _RESOURCE_ID.match(resource_id) is not None
