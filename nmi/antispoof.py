"""Anti-spoofing for metadata traffic: which mode is in effect, from the node's real topology.

NMI names the caller by its source address, so its security is the node's anti-spoofing
(docs/security.md). ``--anti-spoofing``:

``routed``
    The raw-table strict reverse-path rule (``iptables.rules.RuleSpec.anti_spoofing``) is
    installed and reconciled with the interception rules, whatever the topology.
``auto`` (default)
    The topology is read from the kernel for the pods NMI knows: the route to a pod's address
    leaving through a veth that is not a bridge port means *routed* (Azure CNI transparent
    mode, Calico, Cilium with legacy routing) and the rule is installed; a route through a
    bridge, or through a bridge port, means *bridged* (kubenet, Azure CNI bridge mode): the
    rule would not stop a neighbour on the bridge, so nothing is installed, and NMI warns once
    and reports the node as unprotected (readiness detail and metrics, never failing). With no
    pod to look at yet the decision waits; a routed decision is kept when the pods go away.
    Never decided from kubelet flags (kubenet + Calico defeats that).
``off``
    Nothing is installed; a rule left by an earlier run is removed as stale.
``bridge`` (opt-in)
    An nftables ``bridge`` table pins each pod's bridge port to its MAC and IPv4 address, from
    the container runtime's CNI result cache (``iptables.bridge``; run by
    ``nmi.interception``). The raw-table rule is not wanted (a stale one is removed). The node
    is reported protected once the table is installed and while its reconcile succeeds.

``classify`` is pure; ``read_routes`` is the netlink adapter (pyroute2), blocking: call it in a
thread.
"""

from __future__ import annotations

import enum
import logging
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Gauge

from nmi.settings import AntiSpoofingMode
from podidentity.model import Pod
from podidentity.state import ClusterState

log = logging.getLogger("nmi.antispoof")

__all__ = ["AntiSpoofing", "AntiSpoofingMode", "Effect", "RouteFact", "Topology", "classify", "read_routes"]

UNPROTECTED_ADVICE = (
    "a pod with NET_RAW on this bridged node can forge another pod's address and be served its "
    "token; drop NET_RAW from pods by policy (deploy/policy, the Gatekeeper constraint), or move "
    "the node to a routed CNI where --anti-spoofing=routed protects it (docs/security.md)"
)


class Topology(enum.StrEnum):
    ROUTED = "routed"
    BRIDGED = "bridged"
    UNKNOWN = "unknown"


class Effect(enum.StrEnum):
    """What the node gets; the ``mode`` label of ``nmi_antispoofing_mode``."""

    ROUTED = "routed"
    """The reverse-path rule is wanted."""
    UNPROTECTED = "unprotected"
    """``auto`` on a bridged node: nothing installed."""
    DETECTING = "detecting"
    """``auto`` with no pod to look at yet: nothing installed so far."""
    OFF = "off"
    BRIDGE = "bridge"
    """``--anti-spoofing=bridge``: the nftables bridge table pins each pod's port."""


@dataclass(frozen=True, slots=True)
class RouteFact:
    """What the kernel says about the route to one pod address."""

    ip: str
    device: str | None
    """Name of the route's output device; ``None`` when there is no route."""
    kind: str | None
    """Link kind of that device (``veth``, ``bridge``, ``vxlan``, ...); ``None`` for a plain NIC."""
    bridge_port: bool = False
    """The device is enslaved to a bridge."""

    @property
    def topology(self) -> Topology:
        if self.kind == "bridge" or self.bridge_port:
            return Topology.BRIDGED
        if self.kind == "veth":
            return Topology.ROUTED
        return Topology.UNKNOWN


def classify(facts: Iterable[RouteFact]) -> Topology:
    """Bridged if any pod is reached through a bridge (it is unprotected); else routed if any is
    reached through its own veth; else unknown."""
    seen = {fact.topology for fact in facts}
    if Topology.BRIDGED in seen:
        return Topology.BRIDGED
    if Topology.ROUTED in seen:
        return Topology.ROUTED
    return Topology.UNKNOWN


def pod_addresses(pods: Iterable[Pod]) -> list[str]:
    """The IPv4 addresses of live, non-host-network pods, sorted and unique."""
    ips = {pod.ip for pod in pods if pod.live and ":" not in pod.ip}
    return sorted(ips)


def read_routes(ips: Sequence[str], *, netns: str | None = None) -> list[RouteFact]:
    """One ``RouteFact`` per address, from ``RTM_GETROUTE`` and the link table (blocking)."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    if not ips:
        return []
    facts = []
    with IPRoute(netns=netns, flags=0) as ipr:
        links: dict[int, Any] = {int(link["index"]): link for link in ipr.get_links()}

        def kind(index: int) -> str | None:
            link = links.get(index)
            info = link.get_attr("IFLA_LINKINFO") if link is not None else None
            value = info.get_attr("IFLA_INFO_KIND") if info is not None else None
            return str(value) if value else None

        for ip in ips:
            try:
                routes = ipr.route("get", dst=ip, family=socket.AF_INET)
            except NetlinkError:
                facts.append(RouteFact(ip, None, None))
                continue
            oif = int(routes[0].get_attr("RTA_OIF") or 0) if routes else 0
            link = links.get(oif)
            if link is None:
                facts.append(RouteFact(ip, None, None))
                continue
            master = int(link.get_attr("IFLA_MASTER") or 0)
            port = bool(master) and kind(master) == "bridge"
            facts.append(RouteFact(ip, str(link.get_attr("IFLA_IFNAME")), kind(oif), bridge_port=port))
    return facts


def detect_topology(ips: Sequence[str], *, netns: str | None = None) -> Topology:
    return classify(read_routes(ips, netns=netns))


class AntiSpoofing:
    """Decides, on every reconcile pass, whether the reverse-path rule is wanted; reports it."""

    def __init__(
        self,
        mode: AntiSpoofingMode,
        state: ClusterState,
        *,
        detect: Callable[[Sequence[str]], Topology] = detect_topology,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.mode = mode
        self._state = state
        self._detect = detect
        self.topology = Topology.UNKNOWN
        self.effect = {"routed": Effect.ROUTED, "off": Effect.OFF, "bridge": Effect.BRIDGE}.get(
            mode, Effect.DETECTING
        )
        self.bridge_pinned: Callable[[], bool] = lambda: False
        """Whether the bridge table is installed and its latest reconcile succeeded (set by the owner)."""
        self.bridge_detail: Callable[[], dict[str, object]] = dict
        self._warned: set[str] = set()
        self._gauge: Gauge | None = None
        if registry is not None:
            self._gauge = Gauge(
                "nmi_antispoofing_mode",
                "Anti-spoofing of metadata traffic in effect on this node (1 for the current mode)",
                ["mode"],
                registry=registry,
            )
            protected = Gauge(
                "nmi_antispoofing_protected",
                "Whether a pod forging another pod's address toward the metadata endpoint is stopped",
                registry=registry,
            )
            protected.set_function(lambda: float(self.protected))
        self._publish()

    @property
    def wanted(self) -> bool:
        """Whether the raw-table rule should be installed now."""
        return self.effect is Effect.ROUTED

    @property
    def protected(self) -> bool:
        if self.effect is Effect.BRIDGE:
            return self.bridge_pinned()
        return self.effect is Effect.ROUTED and self.topology is not Topology.BRIDGED

    @property
    def undetermined(self) -> bool:
        return self.mode == "auto" and self.effect is Effect.DETECTING

    def detail(self) -> dict[str, object]:
        """For the readiness report: never failing, always saying what is (not) protected."""
        out: dict[str, object] = {
            "mode": self.mode,
            "effect": str(self.effect),
            "topology": str(self.topology),
            "protected": self.protected,
        }
        if self.effect is Effect.UNPROTECTED or (self.mode == "routed" and self.topology is Topology.BRIDGED):
            out["advice"] = UNPROTECTED_ADVICE
        if self.effect is Effect.BRIDGE:
            out.update(self.bridge_detail())
        return out

    def update(self, topology: Topology) -> bool:
        """Take a fresh topology reading; returns ``wanted``. Pure apart from logging and gauges."""
        previous = self.effect
        if topology is not Topology.UNKNOWN:
            self.topology = topology
        if self.mode == "auto":
            if topology is Topology.ROUTED:
                self.effect = Effect.ROUTED
            elif topology is Topology.BRIDGED:
                self.effect = Effect.UNPROTECTED
            # UNKNOWN (no pods): keep the last decision, DETECTING at first.
        if self.effect is not previous:
            log.info("anti-spoofing: %s -> %s (topology %s)", previous, self.effect, self.topology)
        if self.effect is Effect.UNPROTECTED:
            self._warn_once(
                "unprotected",
                "anti-spoofing: pods reach this node through a bridge; the node is NOT protected "
                "against source-address spoofing toward the metadata endpoint: " + UNPROTECTED_ADVICE,
            )
        if self.mode == "bridge" and self.topology is Topology.ROUTED:
            self._warn_once(
                "bridge-on-routed",
                "anti-spoofing: --anti-spoofing=bridge on a routed node: pods are not behind bridge ports, "
                "the bridge table pins nothing; use --anti-spoofing=routed (docs/security.md)",
            )
        if self.mode == "routed" and self.topology is Topology.BRIDGED:
            self._warn_once(
                "routed-on-bridge",
                "anti-spoofing: --anti-spoofing=routed on a bridged node: the rule is installed but does not "
                "stop a pod on the same bridge from forging a neighbour's address: " + UNPROTECTED_ADVICE,
            )
        self._publish()
        return self.wanted

    async def decide(self) -> bool:
        """Read the topology (in a thread) when it matters, and return whether the rule is wanted."""
        import asyncio

        if self.mode == "off":
            return False
        ips = pod_addresses(self._state.all(Pod))
        topology = await asyncio.to_thread(self._detect, ips) if ips else Topology.UNKNOWN
        return self.update(topology)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("%s", message)

    def _publish(self) -> None:
        if self._gauge is None:
            return
        for effect in Effect:
            self._gauge.labels(mode=str(effect)).set(1.0 if effect is self.effect else 0.0)
