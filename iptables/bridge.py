"""Bridged-node anti-spoofing: an nftables ``bridge`` table pinning each pod's port to its MAC and IP.

On a bridged node (kubenet, Azure CNI bridge mode) every pod's host-side veth is a port of one
Linux bridge; a pod with ``NET_RAW`` can poison the node's ARP entry for a neighbour and speak
TCP with the neighbour's address (docs/security.md). ``table bridge nmi_antispoof`` stops it at
the port, before the bridge forwards the frame or hands it to the IP stack:

* frames from a pinned port must carry the pod's Ethernet source MAC;
* ARP from a pinned port must carry the pod's sender MAC and sender IP;
* metadata traffic (``ip daddr 169.254.169.254 tcp dport 80``) must carry the pod's source IP;
* metadata traffic from a port that is not pinned (yet) is dropped: fail-closed;
* ports of opted-out pods (``OPT_OUT_LABEL``, keepalived-style pods with extra addresses) are
  accepted as they are, unpinned.

Per-pod facts come only from the container runtime's CNI result cache (libcni ``cniCacheV1``
files under ``/var/lib/cni/results``), never from the neighbour table or the bridge FDB: those
are what an attacker writes. ``parse_cache`` and ``render`` are pure; ``BridgePinner`` polls the
directory (by mtime), replaces the whole table atomically (one ``nft -f -`` transaction) whenever
the wanted pins change or the table drifted, and replaces the node's neighbour entry for each newly
pinned pod with the pod's MAC (it may have been poisoned before the pin). The table is left in
place when NMI stops (fail-closed); ``remove()`` is for ``--cleanup-iptables-on-exit`` only.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import re
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from iptables.process import Completed, IptablesError, run_command

CNI_CACHE_DIR = "/var/lib/cni/results"
TABLE = "nmi_antispoof"
FAMILY = "bridge"
OPT_OUT_LABEL = "nmi.aadpodidentity.k8s.io/allow-extra-addresses"
"""A pod carrying this label with value ``"true"`` is not pinned (its port is accepted as is)."""
CACHE_KIND = "cniCacheV1"

_IFNAME = re.compile(r"[A-Za-z0-9_.@:+-]{1,15}")
_MAC = re.compile(r"[0-9a-f]{2}(?::[0-9a-f]{2}){5}")


@dataclass(frozen=True, slots=True, order=True)
class PortPin:
    """One pod as its CNI result says: its host-side bridge port, MAC and IPv4 address."""

    port: str
    mac: str
    ip: str
    container_id: str = ""

    def __post_init__(self) -> None:
        if not _IFNAME.fullmatch(self.port):
            raise ValueError(f"bad interface name {self.port!r}")
        if not _MAC.fullmatch(self.mac):
            raise ValueError(f"bad MAC address {self.mac!r}")
        if str(ipaddress.IPv4Address(self.ip)) != self.ip:
            raise ValueError(f"bad IPv4 address {self.ip!r}")


def parse_cache(data: str | bytes, *, bridges: Iterable[str] = ()) -> PortPin | None:
    """The pin a ``cniCacheV1`` file describes; ``None`` for anything else (another kind, no IPv4,
    no container interface, no host-side interface). ``bridges`` are the node's bridge devices:
    bridge plugins list the bridge, the host veth and the container interface, and only the
    container interface has a ``sandbox``; of the others, the host veth is the one that is not a
    bridge (the one listed right before the container interface when that is not enough)."""
    try:
        doc = json.loads(data)
    except ValueError:
        return None
    if not isinstance(doc, dict) or doc.get("kind") != CACHE_KIND:
        return None
    result = doc.get("result")
    if not isinstance(result, dict):
        return None
    listed_interfaces, listed_ips = result.get("interfaces"), result.get("ips")
    if not isinstance(listed_interfaces, list) or not isinstance(listed_ips, list):
        return None
    interfaces = [i for i in listed_interfaces if isinstance(i, dict)]
    ips = [i for i in listed_ips if isinstance(i, dict)]
    bridge_names = set(bridges)
    for entry in ips:
        address = str(entry.get("address", "")).split("/")[0]
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            continue
        if ip.version != 4:
            continue
        index = entry.get("interface")
        if isinstance(index, int) and 0 <= index < len(interfaces):
            container = interfaces[index]
        else:
            candidates = [i for i in interfaces if i.get("sandbox")]
            if len(candidates) != 1:
                continue
            container, index = candidates[0], interfaces.index(candidates[0])
        if not container.get("sandbox"):
            continue
        host = [i for i in interfaces if not i.get("sandbox") and str(i.get("name", "")) not in bridge_names]
        if len(host) > 1:
            # Without kernel facts: the bridge plugin's order is bridge, host veth, container.
            before = [i for i in interfaces[:index] if not i.get("sandbox")]
            host = before[-1:]
        if len(host) != 1:
            continue
        try:
            return PortPin(
                str(host[0].get("name", "")),
                str(container.get("mac", "")).lower(),
                str(ip),
                str(doc.get("containerId", "")),
            )
        except ValueError:
            continue
    return None


def _elements(items: Iterable[str]) -> str:
    listed = sorted(set(items))
    return f"; elements = {{ {', '.join(listed)} }}" if listed else ""


def render(
    pins: Iterable[PortPin],
    *,
    opted_out: Iterable[str] = (),
    metadata_ip: str = "169.254.169.254",
    metadata_port: int = 80,
) -> str:
    """``nft -f`` input replacing the whole table in one transaction (create, delete, define)."""
    pinned = sorted(set(pins))
    ports = _elements(f'"{p.port}"' for p in pinned)
    optout = _elements(f'"{port}"' for port in opted_out)
    macs = _elements(f'"{p.port}" . {p.mac}' for p in pinned)
    arps = _elements(f'"{p.port}" . {p.mac} . {p.ip}' for p in pinned)
    ips = _elements(f'"{p.port}" . {p.ip}' for p in pinned)
    owned_ips = _elements(p.ip for p in pinned)
    owned_macs = _elements(p.mac for p in pinned)
    meta = f"ip daddr {ipaddress.IPv4Address(metadata_ip)} tcp dport {int(metadata_port)}"
    lines = [
        f"table {FAMILY} {TABLE} {{",
        "}",
        f"delete table {FAMILY} {TABLE}",
        f"table {FAMILY} {TABLE} {{",
        f"  set pinned {{ type ifname{ports}; }}",
        f"  set optout {{ type ifname{optout}; }}",
        f"  set macs {{ type ifname . ether_addr{macs}; }}",
        f"  set arps {{ type ifname . ether_addr . ipv4_addr{arps}; }}",
        f"  set ips {{ type ifname . ipv4_addr{ips}; }}",
        f"  set owned_ips {{ type ipv4_addr{owned_ips}; }}",
        f"  set owned_macs {{ type ether_addr{owned_macs}; }}",
        "  chain prerouting {",
        "    type filter hook prerouting priority -300; policy accept;",
        '    iifname @optout counter accept comment "opted-out"',
        # A VLAN tag (even ID 0, a priority tag the kernel strips before ARP sees it) hides the
        # inner EtherType from the rules below: pods have no business sending tagged frames.
        '    ether type { 8021q, 8021ad } counter drop comment "vlan"',
        '    iifname @pinned iifname . ether saddr != @macs counter drop comment "mac"',
        # A port not pinned yet (a pod younger than the last poll) must not claim a pinned pod's
        # MAC or IP meanwhile: it could poison the node's entry before its own pin exists.
        '    iifname != @pinned ether saddr @owned_macs counter drop comment "mac-unpinned"',
        '    iifname != @pinned arp saddr ip @owned_ips counter drop comment "arp-unpinned"',
        "    iifname @pinned ether type arp iifname . arp saddr ether . arp saddr ip != @arps"
        ' counter drop comment "arp"',
        f'    {meta} iifname != @pinned counter drop comment "unpinned"',
        f'    {meta} iifname . ip saddr != @ips counter drop comment "metadata"',
        "  }",
        "}",
    ]
    return "\n".join(lines) + "\n"


def removal() -> str:
    return f"table {FAMILY} {TABLE} {{\n}}\ndelete table {FAMILY} {TABLE}\n"


def counters(listing: str) -> dict[str, int]:
    """Packet counters by rule comment, from ``nft list table`` output."""
    out: dict[str, int] = {}
    for match in re.finditer(r'counter packets (\d+) bytes \d+ \S+ comment "([^"]+)"', listing):
        out[match[2]] = int(match[1])
    return out


def _without_counters(listing: str) -> str:
    return re.sub(r"counter packets \d+ bytes \d+", "counter", listing)


@dataclass(frozen=True, slots=True)
class _Entry:
    stamp: tuple[int, int]
    pin: PortPin | None


class BridgePinner:
    """Watch the CNI cache, keep the table equal to it, repair drift; all operations serialised.

    ``prefix`` is prepended to ``nft`` and ``ip`` (tests use ``ip netns exec NAME``), ``netns``
    is passed to pyroute2 for the neighbour replacement.
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike[str] = CNI_CACHE_DIR,
        *,
        prefix: Sequence[str] = (),
        netns: str | None = None,
        opted_out: Callable[[], Iterable[str]] = lambda: (),
        metadata_ip: str = "169.254.169.254",
        metadata_port: int = 80,
        poll_s: float = 0.5,
        check_interval_s: float = 60.0,
        timeout_s: float = 30.0,
        logger: logging.Logger | None = None,
    ) -> None:
        self.cache_dir = Path(cache_dir)
        self._prefix = tuple(prefix)
        self._netns = netns
        self._opted_out = opted_out
        self._metadata = (metadata_ip, metadata_port)
        self.poll_s = poll_s
        self.check_interval_s = check_interval_s
        self._timeout_s = timeout_s
        self._log = logger or logging.getLogger("nmi.antispoof.bridge")
        self._lock = asyncio.Lock()
        self._files: dict[str, _Entry] = {}
        self._bridges: frozenset[str] | None = None
        self._installed_text: str | None = None
        """The wanted ``render`` output last installed."""
        self._listing: str | None = None
        """``nft list table`` (counters stripped) right after that install: the drift baseline."""
        self._neigh_done: dict[str, str] = {}
        self._last_check = 0.0
        self.pinned_count = 0
        """Ports pinned by the table last installed."""
        self.installs = 0
        self.repairs = 0
        self.last_install_s: float | None = None
        self.healthy = False
        self.last_error: str | None = None
        self.installed = asyncio.Event()

    # -- the cache ------------------------------------------------------------------------------

    def pins(self) -> list[PortPin]:
        """The wanted pins (one per port, the newest file wins), without opted-out pods' ports."""
        by_port: dict[str, PortPin] = {}
        for name in sorted(self._files):
            pin = self._files[name].pin
            if pin is not None:
                by_port[pin.port] = pin
        return sorted(by_port.values())

    def scan(self) -> bool:
        """Re-read changed cache files (by mtime and size); returns whether anything changed."""
        seen: dict[str, tuple[int, int]] = {}
        try:
            with os.scandir(self.cache_dir) as entries:
                for entry in entries:
                    try:
                        if entry.is_file():
                            st = entry.stat()
                            seen[entry.name] = (st.st_mtime_ns, st.st_size)
                    except OSError:
                        continue
        except FileNotFoundError:
            pass
        changed = set(self._files) - set(seen)
        for name in changed:
            del self._files[name]
        for name, stamp in seen.items():
            old = self._files.get(name)
            if old is not None and old.stamp == stamp:
                continue
            try:
                data = (self.cache_dir / name).read_bytes()
            except OSError:
                continue
            try:
                pin = parse_cache(data, bridges=self._bridges or ())
            except Exception:  # a malformed file of any shape is no pin, never a stopped pinner
                self._log.warning("unreadable CNI cache file %s: not pinned", name, exc_info=True)
                pin = None
            self._files[name] = _Entry(stamp, pin)
            changed.add(name)
        return bool(changed)

    async def _refresh_bridges(self) -> None:
        result = await self._run(("ip", "-j", "link", "show", "type", "bridge"))
        names = frozenset(str(link.get("ifname")) for link in json.loads(result.stdout or "[]"))
        if names != self._bridges:
            self._bridges = names
            self._files.clear()  # parse again with the bridge names known

    # -- the table ------------------------------------------------------------------------------

    def wanted(self) -> tuple[str, list[PortPin]]:
        pins = self.pins()
        optout_ips = set(self._opted_out())
        kept = [p for p in pins if p.ip not in optout_ips]
        optout_ports = [p.port for p in pins if p.ip in optout_ips]
        ip, port = self._metadata
        return render(kept, opted_out=optout_ports, metadata_ip=ip, metadata_port=port), kept

    async def sync(self, *, check: bool = False) -> bool:
        """Install when the wanted table changed, or (``check``) when the kernel's drifted.
        Returns whether the table was (re)written."""
        async with self._lock:
            try:
                if self._bridges is None:
                    await self._refresh_bridges()
                # Stats every file and reads the changed ones: off the loop, as at 1,000 pods
                # the first scan reads them all.
                await asyncio.to_thread(self.scan)
                text, pins = self.wanted()
                drifted = False
                if check or self._listing is None:
                    drifted = await self._drifted()
                if text == self._installed_text and not drifted:
                    self.healthy, self.last_error = True, None
                    rewritten = False
                else:
                    await self._install(text, pins, drifted=drifted)
                    rewritten = True
            except Exception as exc:  # the pinner must outlive any one failure: report, retry
                self.healthy, self.last_error = False, f"{type(exc).__name__}: {exc}"
                self._log.warning("bridge anti-spoofing reconcile failed: %s", self.last_error)
                return False
        if check:
            # The node's entries are what an attacker writes (from a port before its pin existed, or
            # through a hole found later): every drift check puts the pinned pods' MACs back.
            self._neigh_done.clear()
        if rewritten or check:
            await self._fix_neighbours(pins)
        return rewritten

    async def _install(self, text: str, pins: list[PortPin], *, drifted: bool) -> None:
        """Replace the table with ``text``; the caller holds the lock."""
        started = time.perf_counter()
        await self._run(("nft", "-f", "-"), stdin=text)
        self.last_install_s = time.perf_counter() - started
        self._installed_text = text
        self.pinned_count = len(pins)
        self._listing = await self._list()
        if drifted and self.installed.is_set():
            self.repairs += 1
            self._log.warning("bridge anti-spoofing table drifted and was replaced")
        self.installs += 1
        self.installed.set()
        self.healthy, self.last_error = True, None
        self._log.info(
            "bridge anti-spoofing: %d ports pinned (table replaced in %.1f ms)",
            len(pins),
            self.last_install_s * 1000,
        )

    async def _list(self) -> str | None:
        try:
            result = await self._run(("nft", "list", "table", FAMILY, TABLE))
        except IptablesError:
            return None
        return _without_counters(result.stdout)

    async def _drifted(self) -> bool:
        return self._listing is None or await self._list() != self._listing

    async def listing(self) -> str:
        return (await self._run(("nft", "list", "table", FAMILY, TABLE))).stdout

    async def remove(self) -> bool:
        async with self._lock:
            if await self._list() is None:
                return False
            await self._run(("nft", "-f", "-"), stdin=removal())
            self._installed_text = self._listing = None
            self._log.info("removed nftables table %s %s", FAMILY, TABLE)
            return True

    async def run(self) -> None:
        """Poll every ``poll_s``; a full drift check every ``check_interval_s``. Never returns."""
        while True:
            now = time.monotonic()
            check = now - self._last_check >= self.check_interval_s
            if check:
                self._last_check = now
                with contextlib.suppress(IptablesError, OSError, ValueError):
                    await self._refresh_bridges()
            await self.sync(check=check)
            await asyncio.sleep(self.poll_s)

    # -- neighbours -----------------------------------------------------------------------------

    async def _fix_neighbours(self, pins: Sequence[PortPin]) -> None:
        """Replace the node's neighbour entry of each newly pinned IP with the pod's MAC."""
        current = {p.ip: p.mac for p in pins}
        for ip in [ip for ip in self._neigh_done if ip not in current]:
            del self._neigh_done[ip]
        todo = [p for p in pins if self._neigh_done.get(p.ip) != p.mac]
        if not todo:
            return
        try:
            try:
                await asyncio.to_thread(replace_neighbours, todo, netns=self._netns)
            except ImportError:  # no pyroute2 here: the same requests through iproute2, one batch
                links = json.loads((await self._run(("ip", "-j", "link", "show"))).stdout or "[]")
                masters = {str(link.get("ifname")): link.get("master") for link in links}
                batch = [
                    f"neigh replace {p.ip} lladdr {p.mac} dev {masters[p.port]} nud reachable"
                    for p in todo
                    if masters.get(p.port)
                ]
                if batch:
                    await self._run(("ip", "-batch", "-"), stdin="\n".join(batch) + "\n")
        except Exception as exc:  # pyroute2 missing or netlink refusal: retried on the next change
            self._log.warning("cannot replace neighbour entries of pinned pods: %s", exc)
            return
        for p in todo:
            self._neigh_done[p.ip] = p.mac

    async def _run(self, argv: Sequence[str], *, stdin: str | None = None) -> Completed:
        return await run_command((*self._prefix, *argv), stdin=stdin, timeout_s=self._timeout_s)


def replace_neighbours(pins: Sequence[PortPin], *, netns: str | None = None) -> int:
    """``neigh replace <ip> lladdr <mac> dev <the port's bridge>`` (REACHABLE) for each pin whose
    port is a bridge port (blocking, pyroute2). Returns how many were replaced."""
    from pyroute2 import IPRoute

    nud_reachable = 0x02
    done = 0
    with IPRoute(netns=netns, flags=0) as ipr:
        links: dict[str, Any] = {str(link.get_attr("IFLA_IFNAME")): link for link in ipr.get_links()}
        for pin in pins:
            link = links.get(pin.port)
            master = int(link.get_attr("IFLA_MASTER") or 0) if link is not None else 0
            if not master:
                continue
            ipr.neigh("replace", dst=pin.ip, lladdr=pin.mac, ifindex=master, state=nud_reachable)
            done += 1
    return done


def opted_out_ips(pods: Iterable[Any], namespaces: Collection[str]) -> list[str]:
    """The addresses of live pods labelled ``OPT_OUT_LABEL: "true"`` in one of ``namespaces``: the
    operator's list, since whoever writes a pod can label it."""
    out = []
    for pod in pods:
        if getattr(pod, "namespace", None) not in namespaces:
            continue
        labels: Mapping[str, str] = getattr(pod, "labels", {}) or {}
        if getattr(pod, "live", True) and labels.get(OPT_OUT_LABEL, "").casefold() == "true":
            out.append(str(pod.ip))
    return sorted(out)
