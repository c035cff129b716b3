"""Host network preparation around the iptables rules: node address, sysctls, kubenet, conntrack.

Blocking functions (netlink, /proc); call them with ``asyncio.to_thread``. ``netns`` parameters
name a network namespace under /run/netns and exist for tests; ``None`` is the caller's own.

Note on ``route_localnet``: it makes 127.0.0.0/8 routable from the enabled interfaces, which is
what lets the DNAT to 127.0.0.1 work, and also lets anything adjacent on those interfaces reach
services bound to 127.0.0.1 (CVE-2020-8558). kube-proxy pairs it with a DROP of non-local
sources to 127.0.0.0/8 that are not DNAT results; clusters without kube-proxy need the same.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import re
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pyroute2 import Conntrack, IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

log = logging.getLogger("nmi.netsetup")

KUBENET_REFUSAL = (
    "AAD Pod Identity is not supported for Kubenet. Review "
    "https://azure.github.io/aad-pod-identity/docs/configure/aad_pod_identity_on_kubenet/ for more details."
)
_KUBENET_FLAG = re.compile(r"""--network-plugin[= ]["']?kubenet\b""")
_MAIN_TABLE = 254
_SCOPE_UNIVERSE = 0


class NetSetupError(Exception):
    """A host network step failed; the message says what and what it means for interception."""


class ConntrackUnavailable(NetSetupError):
    pass


def node_ipv4(*, netns: str | None = None) -> str | None:
    """The first global IPv4 address on the interface of the main table's default route."""
    with IPRoute(netns=netns, flags=0) as ipr:
        defaults = [
            route
            for route in ipr.route("dump", family=socket.AF_INET)
            if route["dst_len"] == 0 and (route.get_attr("RTA_TABLE") or route["table"]) == _MAIN_TABLE
        ]
        defaults.sort(key=lambda route: route.get_attr("RTA_PRIORITY") or 0)
        for route in defaults:
            for index in _route_interfaces(route):
                for addr in ipr.addr("dump", family=socket.AF_INET, index=index):
                    if addr["index"] == index and addr["scope"] == _SCOPE_UNIVERSE:
                        value = addr.get_attr("IFA_LOCAL") or addr.get_attr("IFA_ADDRESS")
                        if value:
                            return str(value)
    return None


def _route_interfaces(route: Any) -> list[int]:
    oif = route.get_attr("RTA_OIF")
    if oif:
        return [int(oif)]
    return [int(hop["oif"]) for hop in route.get_attr("RTA_MULTIPATH") or ()]


def ensure_route_localnet(
    interfaces: Sequence[str] | Literal["all"] = "all", *, proc_sys: Path = Path("/proc/sys")
) -> list[str]:
    """Set ``net.ipv4.conf.<if>.route_localnet=1`` and read it back; returns the ones changed.

    Without it the kernel drops pod packets DNATed to 127.0.0.1 as martians, so interception
    silently fails (nmi-spec §4.5; the original relied on kube-proxy having set it). The kernel
    ORs ``all`` with the per-interface value, so ``"all"`` covers every pod interface.
    """
    names = ["all"] if interfaces == "all" else list(interfaces)
    changed: list[str] = []
    for name in names:
        if not name or "/" in name or name in (".", ".."):
            raise NetSetupError(f"invalid interface name {name!r}")
        path = proc_sys / "net" / "ipv4" / "conf" / name / "route_localnet"
        try:
            if path.read_text().strip() != "1":
                path.write_text("1\n")
                changed.append(name)
                log.info(
                    "enabled route_localnet on %s: pod traffic DNATed to 127.0.0.1 is dropped as martian "
                    "without it",
                    name,
                )
            value = path.read_text().strip()
        except OSError as exc:
            raise NetSetupError(
                f"cannot set {path}: {exc}; pod traffic DNATed to 127.0.0.1 will be dropped"
            ) from exc
        if value != "1":
            raise NetSetupError(f"{path} reads {value!r} after writing 1")
    return changed


def is_kubenet(kubelet_config: str | Path) -> bool:
    """Whether the kubelet flags file selects ``--network-plugin=kubenet``.

    Unlike the original (nmi-spec §9.21), a missing or unreadable file, or a directory, is not
    fatal: it is logged and treated as "not kubenet" (the flag was removed in Kubernetes 1.24,
    and non-AKS nodes have no such file).
    """
    path = Path(kubelet_config)
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        log.info("kubelet config %s not found; assuming the network plugin is not kubenet", path)
        return False
    except IsADirectoryError:
        log.warning("kubelet config %s is a directory; assuming the network plugin is not kubenet", path)
        return False
    except OSError as exc:
        log.warning("cannot read kubelet config %s (%s); assuming it is not kubenet", path, exc)
        return False
    return any(_KUBENET_FLAG.search(line) for line in text.splitlines() if not line.lstrip().startswith("#"))


def _purge(ct: Any, wanted: NFCTAttrTuple, spare: tuple[str, int] | None) -> int:
    # Collect first: pyroute2's dump generator cannot be interleaved with other requests.
    entries = list(ct.dump_entries(tuple_orig=wanted))
    deleted = 0
    for entry in entries:
        reply = entry.tuple_reply
        if spare is not None and (reply.saddr, reply.sport) == spare:
            continue
        try:
            ct.delete(entry)
        except NetlinkError as exc:
            if exc.code != errno.ENOENT:  # already gone: the flow ended meanwhile
                raise
            continue
        deleted += 1
    return deleted


def purge_conntrack(
    metadata_ip: str,
    metadata_port: int,
    *,
    spare: tuple[str, int] | None = None,
    netns: str | None = None,
) -> int:
    """Delete conntrack entries of TCP flows originally addressed to ``metadata_ip:metadata_port``.

    Such flows, opened before the DNAT existed, keep reaching the real IMDS (nmi-spec §4.3).
    Flows whose reply comes from ``spare`` (the NMI listener) were already intercepted and are
    kept, so the purge is safe to repeat after every rule repair. Returns the number deleted.
    """
    address = ipaddress.ip_address(metadata_ip)
    family = socket.AF_INET if address.version == 4 else socket.AF_INET6
    wanted = NFCTAttrTuple(family=family, proto=socket.IPPROTO_TCP, daddr=str(address), dport=metadata_port)
    try:
        # flags=0: never create the named namespace as a side effect (pyroute2's default does).
        ct = Conntrack(nfgen_family=family, netns=netns, flags=0)
        try:
            deleted = _purge(ct, wanted, spare)
        finally:
            ct.close()
    except (OSError, NetlinkError) as exc:
        raise ConntrackUnavailable(
            f"conntrack netlink unavailable or failing ({exc}); connections to {metadata_ip}:{metadata_port} "
            "opened before the rules existed may still reach IMDS directly"
        ) from exc
    if deleted:
        log.info("deleted %d conntrack entries for %s:%d", deleted, metadata_ip, metadata_port)
    return deleted
