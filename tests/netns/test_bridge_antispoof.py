"""Bridged-node anti-spoofing (issue 16, ``--anti-spoofing=bridge``): the nftables bridge table.

The node is the harness's kubenet-like bridge; it writes a CNI result cache file for each pod as
a container runtime would, and ``BridgePinner`` reads only those. The attacker pod forges the
victim's source address (raw-socket SYN) or claims the victim's address in a gratuitous ARP; the
table's counters (by rule comment) and the nat DNAT counter say where each packet ended.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from iptables.bridge import CACHE_KIND, BridgePinner, PortPin, counters, opted_out_ips, parse_cache, render
from iptables.rules import RuleSpec
from nmi.antispoof import AntiSpoofing, Effect, Topology
from nmi.cli import parse
from podidentity.model import Pod
from podidentity.state import ClusterState
from standins.netns import HELPER, Node, Recorder
from tests.netns.common import METADATA_IP, runner_for

DNAT = "-j DNAT --to-destination"


# --- pure: the cache files and the table ---------------------------------------------------------


def cache(interfaces: list[dict[str, Any]], ips: list[dict[str, Any]], **extra: Any) -> str:
    doc = {"kind": CACHE_KIND, "containerId": "abc", "ifName": "eth0", "networkName": "kubenet"}
    doc.update(extra)
    doc["result"] = {"cniVersion": "1.0.0", "interfaces": interfaces, "ips": ips}
    return json.dumps(doc)


BRIDGE_PLUGIN = cache(
    [
        {"name": "cbr0", "mac": "aa:aa:aa:aa:aa:01"},
        {"name": "veth1a2b", "mac": "aa:aa:aa:aa:aa:02"},
        {"name": "eth0", "mac": "0A:58:0A:F4:00:0A", "sandbox": "/var/run/netns/cni-1"},
    ],
    [{"address": "10.244.0.10/24", "gateway": "10.244.0.1", "interface": 2}],
)


def test_the_host_port_is_the_interface_without_a_sandbox_that_is_not_the_bridge() -> None:
    expected = PortPin("veth1a2b", "0a:58:0a:f4:00:0a", "10.244.0.10", "abc")
    assert parse_cache(BRIDGE_PLUGIN, bridges={"cbr0"}) == expected
    # Without kernel facts, the bridge plugin's order decides (bridge, host veth, container).
    assert parse_cache(BRIDGE_PLUGIN) == expected


@pytest.mark.parametrize(
    "data",
    [
        "not json",
        json.dumps({"kind": "something-else"}),
        cache([{"name": "eth0", "mac": "0a:58:0a:f4:00:0a", "sandbox": "x"}], [{"address": "10.0.0.2/24"}]),
        cache(
            [
                {"name": "veth0", "mac": "aa:aa:aa:aa:aa:02"},
                {"name": "eth0", "mac": "0a:0a:0a:0a:0a:0a", "sandbox": "x"},
            ],
            [{"address": "fd00::2/64", "interface": 1}],
        ),
        cache(
            [
                {"name": "veth0;drop", "mac": "aa:aa:aa:aa:aa:02"},
                {"name": "eth0", "mac": "0a:0a:0a:0a:0a:0a", "sandbox": "x"},
            ],
            [{"address": "10.0.0.2/24", "interface": 1}],
        ),
    ],
    ids=["not-json", "other-kind", "no-host-port", "ipv6-only", "unsafe-name"],
)
def test_anything_but_a_usable_cache_file_pins_nothing(data: str) -> None:
    assert parse_cache(data) is None


def test_the_table_is_replaced_whole_and_pins_mac_arp_and_metadata_source() -> None:
    pins = [
        PortPin("veth0", "0a:00:00:00:00:01", "10.244.0.2"),
        PortPin("veth1", "0a:00:00:00:00:02", "10.244.0.3"),
    ]
    text = render(pins, opted_out=["veth9"])
    head = text.splitlines()[:4]
    assert head == [
        "table bridge nmi_antispoof {",
        "}",
        "delete table bridge nmi_antispoof",
        "table bridge nmi_antispoof {",
    ]
    assert '"veth0" . 0a:00:00:00:00:01 . 10.244.0.2' in text
    assert 'set optout { type ifname; elements = { "veth9" }; }' in text
    assert 'ip daddr 169.254.169.254 tcp dport 80 iifname != @pinned counter drop comment "unpinned"' in text
    empty = render([])
    assert "elements" not in empty and "@ips" in empty
    listing = (
        'counter packets 3 bytes 180 drop comment "metadata"\ncounter packets 0 bytes 0 drop comment "arp"'
    )
    assert counters(listing) == {"metadata": 3, "arp": 0}


def test_opt_out_is_by_label_on_live_pods_in_the_operators_namespaces_only() -> None:
    label = {"nmi.aadpodidentity.k8s.io/allow-extra-addresses": "true"}
    pods = [
        Pod("infra", "vrrp", "u1", "10.244.0.7", "Running", label, "node"),
        Pod("infra", "web", "u2", "10.244.0.8", "Running", {}, "node"),
        # Whoever writes a pod can label it: outside the operator's list the label is ignored.
        Pod("apps", "attacker", "u3", "10.244.0.9", "Running", label, "node"),
    ]
    assert opted_out_ips(pods, {"infra"}) == ["10.244.0.7"]
    assert opted_out_ips(pods, frozenset()) == []


def test_tagged_frames_and_unpinned_claims_of_pinned_addresses_are_dropped() -> None:
    text = render([PortPin("veth0", "0a:00:00:00:00:01", "10.244.0.2")])
    assert 'ether type { 8021q, 8021ad } counter drop comment "vlan"' in text
    assert "set owned_ips { type ipv4_addr; elements = { 10.244.0.2 }; }" in text
    assert 'iifname != @pinned arp saddr ip @owned_ips counter drop comment "arp-unpinned"' in text
    assert 'iifname != @pinned ether saddr @owned_macs counter drop comment "mac-unpinned"' in text
    # Only an operator-listed opt-out comes before the VLAN rule.
    assert text.index('"opted-out"') < text.index('"vlan"') < text.index('comment "mac"')


@pytest.mark.parametrize(
    "result",
    [{"interfaces": 1, "ips": []}, {"interfaces": [], "ips": True}, {"interfaces": None, "ips": None}],
)
def test_malformed_cache_shapes_are_no_pin(result: dict[str, object]) -> None:
    assert parse_cache(json.dumps({"kind": CACHE_KIND, "result": result})) is None


def test_cli_accepts_bridge_and_the_cache_dir() -> None:
    base = ["--cluster-state", "x.yaml", "--node", "n"]
    settings = parse([*base, "--anti-spoofing=bridge", "--cni-cache-dir", "/run/cni"])
    assert settings.iptables.anti_spoofing == "bridge" and settings.iptables.cni_cache_dir == "/run/cni"
    assert parse(base).iptables.cni_cache_dir == "/var/lib/cni/results"
    assert parse(base).iptables.anti_spoofing_opt_out_namespaces == frozenset()
    listed = parse([*base, "--anti-spoofing-opt-out-namespaces", "infra, net-tools"]).iptables
    assert listed.anti_spoofing_opt_out_namespaces == {"infra", "net-tools"}


async def test_bridge_mode_wants_no_raw_rule_and_is_protected_only_once_pinned() -> None:
    anti = AntiSpoofing("bridge", ClusterState(), detect=lambda ips: Topology.BRIDGED)
    assert anti.effect is Effect.BRIDGE
    assert await anti.decide() is False and not anti.protected
    anti.bridge_pinned = lambda: True
    anti.bridge_detail = lambda: {"pinned_ports": 2}
    assert anti.protected and anti.detail()["pinned_ports"] == 2


# --- on a real kernel: a bridged node, NMI played by a recorder ---------------------------------


def wait_for(probe: Callable[[], object], timeout: float = 3.0, step: float = 0.02) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(step)


async def await_for(probe: Callable[[], Awaitable[object]], timeout: float = 3.0) -> float | None:
    """Seconds until ``probe`` is truthy, or ``None`` after ``timeout``."""
    started = time.monotonic()
    while time.monotonic() - started <= timeout:
        if await probe():
            return time.monotonic() - started
        await asyncio.sleep(0.02)
    return None


class Bed:
    def __init__(self, node: Node, nmi: Recorder, pinner: BridgePinner) -> None:
        self.node, self.nmi, self.pinner = node, nmi, pinner

    def table(self) -> dict[str, int]:
        text = self.node.run_in(self.node.ns, ["nft", "list", "table", "bridge", "nmi_antispoof"]).stdout
        return counters(text)

    def dnat(self) -> int:
        return self.node.rule_packets("nat", DNAT) or 0

    async def get(self, ns: str, timeout: float = 1.0) -> dict[str, Any]:
        return await self.node.http_get(ns, METADATA_IP, 80, timeout=timeout)

    def spoof(self, attacker: str, victim_ip: str) -> None:
        self.node.run_in(attacker, [*HELPER, "spoof-syn", "--src", victim_ip, "--dst", METADATA_IP])

    def neighbour(self, ip: str) -> str | None:
        entries = json.loads(self.node.run_in(self.node.ns, ["ip", "-j", "neigh", "show", ip]).stdout)
        return str(entries[0].get("lladdr")) if entries and entries[0].get("lladdr") else None


@pytest.fixture
async def bed() -> AsyncIterator[Callable[..., Awaitable[Bed]]]:
    made: list[tuple[Node, asyncio.Task[None] | None]] = []

    async def build(*, pins: bool = True, pods: int = 3, withhold: int | None = None) -> Bed:
        node = Node(pods=pods).create()
        made.append((node, None))
        if withhold is not None:
            node.remove_cni_cache(node.pods[withhold])
        nmi = node.start_recorder(node.ns, "127.0.0.1", 0, name="nmi")
        await runner_for(node, RuleSpec(target_port=nmi.port)).install()
        pinner = BridgePinner(
            node.cni_cache_dir, prefix=node.wrap(node.ns, []), netns=node.ns, check_interval_s=1.0
        )
        if pins:
            assert await pinner.sync(), pinner.last_error
            made[-1] = (node, asyncio.create_task(pinner.run()))
        return Bed(node, nmi, pinner)

    yield build
    for node, task in made:
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        node.destroy()


@pytest.mark.parametrize("mode", ["bridge", "off"])
async def test_a_forged_syn_from_a_neighbour_is_dropped_at_its_port(
    bed: Callable[..., Awaitable[Bed]], mode: str
) -> None:
    b = await bed(pins=mode == "bridge")
    victim, attacker = b.node.pods[:2]
    answer = await b.get(victim.ns)
    assert answer["body"] == {"server": "nmi", "client": victim.ip}
    before = b.dnat()
    b.spoof(attacker.ns, victim.ip)
    if mode == "bridge":
        assert wait_for(lambda: b.table().get("metadata") == 1), b.table()
        await asyncio.sleep(0.3)
        assert b.dnat() == before, "the forged SYN must never reach the DNAT"
    else:
        assert wait_for(lambda: b.dnat() == before + 1), "without the table it reaches NMI"
    again = await b.get(victim.ns)
    assert again["body"] == {"server": "nmi", "client": victim.ip}, "the victim keeps being answered"
    assert [hit["client"] for hit in b.nmi.hits()] == [victim.ip, victim.ip]


@pytest.mark.parametrize("mode", ["bridge", "off"])
async def test_a_gratuitous_arp_claiming_the_victims_address_is_dropped(
    bed: Callable[..., Awaitable[Bed]], mode: str
) -> None:
    b = await bed(pins=mode == "bridge")
    victim, attacker = b.node.pods[:2]
    assert (await b.get(victim.ns))["ok"]  # the node now has a neighbour entry for the victim
    victim_mac = b.node.mac_of(victim.ns, "eth0")
    attacker_mac = b.node.mac_of(attacker.ns, "eth0")
    assert b.neighbour(victim.ip) == victim_mac
    await asyncio.sleep(1.1)  # past the neighbour's locktime, so an unfiltered claim would override it
    b.node.run_in(attacker.ns, [*HELPER, "garp", "--ip", victim.ip, "--count", "2"])
    if mode == "bridge":
        assert wait_for(lambda: b.table().get("arp") == 2), b.table()
        assert b.neighbour(victim.ip) == victim_mac
    else:
        assert wait_for(lambda: b.neighbour(victim.ip) == attacker_mac), "without the table the ARP poisons"


@pytest.mark.parametrize("mode", ["bridge", "off"])
async def test_a_priority_tagged_arp_cannot_slip_past_the_pins(
    bed: Callable[..., Awaitable[Bed]], mode: str
) -> None:
    # VLAN ID 0: nft sees EtherType 0x8100, the kernel strips the tag and hands the ARP to arp_rcv.
    b = await bed(pins=mode == "bridge")
    victim, attacker = b.node.pods[:2]
    assert (await b.get(victim.ns))["ok"]
    victim_mac = b.node.mac_of(victim.ns, "eth0")
    attacker_mac = b.node.mac_of(attacker.ns, "eth0")
    await asyncio.sleep(1.1)
    b.node.run_in(attacker.ns, [*HELPER, "garp", "--ip", victim.ip, "--count", "2", "--vlan", "0"])
    if mode == "bridge":
        assert wait_for(lambda: b.table().get("vlan") == 2), b.table()
        assert b.neighbour(victim.ip) == victim_mac
        assert (await b.get(victim.ns))["body"] == {"server": "nmi", "client": victim.ip}
    else:
        assert wait_for(lambda: b.neighbour(victim.ip) == attacker_mac), "a tagged ARP poisons too"


async def test_pinning_replaces_a_poisoned_neighbour_entry(bed: Callable[..., Awaitable[Bed]]) -> None:
    b = await bed(pins=False)
    victim, attacker = b.node.pods[:2]
    attacker_mac = b.node.mac_of(attacker.ns, "eth0")
    b.node.run_in(b.node.ns, ["ip", "neigh", "replace", victim.ip, "lladdr", attacker_mac, "dev", "cbr0"])
    assert await b.pinner.sync()
    assert b.neighbour(victim.ip) == b.node.mac_of(victim.ns, "eth0")
    assert (await b.get(victim.ns))["body"] == {"server": "nmi", "client": victim.ip}


async def test_a_drift_check_puts_back_a_neighbour_entry_poisoned_after_pinning(
    bed: Callable[..., Awaitable[Bed]],
) -> None:
    b = await bed(pins=True)
    victim, attacker = b.node.pods[:2]
    attacker_mac = b.node.mac_of(attacker.ns, "eth0")
    b.node.run_in(b.node.ns, ["ip", "neigh", "replace", victim.ip, "lladdr", attacker_mac, "dev", "cbr0"])
    assert not await b.pinner.sync()  # nothing changed in the cache: a plain poll leaves it
    assert b.neighbour(victim.ip) == attacker_mac
    assert not await b.pinner.sync(check=True)  # the table is intact, the entry is repaired
    assert b.neighbour(victim.ip) == b.node.mac_of(victim.ns, "eth0")


async def test_unpinned_ports_cannot_reach_the_metadata_address_and_pins_follow_the_cache(
    bed: Callable[..., Awaitable[Bed]],
) -> None:
    b = await bed(withhold=2)
    newcomer = b.node.pods[2]
    assert b.pinner.pinned_count == 2
    refused = await b.get(newcomer.ns, timeout=0.5)
    assert not refused["ok"], refused
    assert b.table().get("unpinned", 0) >= 1

    b.node.write_cni_cache(newcomer)  # the runtime's ADD finished
    pinned_in = await await_for(lambda: _ok(b, newcomer.ns))
    assert pinned_in is not None and pinned_in <= 1.0, pinned_in
    assert b.pinner.pinned_count == 3

    b.node.remove_cni_cache(newcomer)  # the runtime's DEL
    started = time.monotonic()
    assert await await_for(lambda: _pinned(b, newcomer.host_veth, False), timeout=2.0) is not None
    gone_in = time.monotonic() - started
    assert gone_in <= 1.0, gone_in
    assert not (await b.get(newcomer.ns, timeout=0.5))["ok"]


async def _ok(b: Bed, ns: str) -> bool:
    return bool((await b.get(ns, timeout=0.2))["ok"])


async def _pinned(b: Bed, port: str, expected: bool) -> bool:
    text = (
        await b.node.arun_in(b.node.ns, ["nft", "list", "set", "bridge", "nmi_antispoof", "pinned"])
    ).stdout
    return (f'"{port}"' in text) == expected


async def test_drift_is_repaired_and_the_table_outlives_the_pinner_until_removed(
    bed: Callable[..., Awaitable[Bed]],
) -> None:
    b = await bed()
    victim = b.node.pods[0]
    installed = b.pinner.installs
    b.node.run_in(b.node.ns, ["nft", "flush", "chain", "bridge", "nmi_antispoof", "prerouting"])
    b.node.run_in(
        b.node.ns,
        ["nft", "delete", "element", "bridge", "nmi_antispoof", "ips", f'{{ "veth0" . {victim.ip} }}'],
    )
    assert await await_for(lambda: _installs_above(b, installed), timeout=2.5) is not None
    assert b.pinner.repairs >= 1
    b.node.run_in(b.node.ns, ["nft", "delete", "table", "bridge", "nmi_antispoof"])
    assert await await_for(lambda: _installs_above(b, installed + 1), timeout=2.5) is not None
    assert (await b.get(victim.ns))["ok"]
    # Only --cleanup-iptables-on-exit removes it (Interception.remove).
    assert await b.pinner.remove()
    assert "nmi_antispoof" not in b.node.run_in(b.node.ns, ["nft", "list", "tables"]).stdout


async def _installs_above(b: Bed, count: int) -> bool:
    return b.pinner.installs > count and b.pinner.healthy


# --- measurements -------------------------------------------------------------------------------


def synthetic(directory: Path, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        mac = f"0a:58:0a:{(i >> 16) & 255:02x}:{(i >> 8) & 255:02x}:{i & 255:02x}"
        doc = cache(
            [
                {"name": "cbr0", "mac": "aa:aa:aa:aa:aa:01"},
                {"name": f"veth{i:05d}", "mac": "aa:aa:aa:aa:aa:02"},
                {"name": "eth0", "mac": mac, "sandbox": f"/var/run/netns/cni-{i}"},
            ],
            [{"address": f"10.{100 + (i >> 16)}.{(i >> 8) & 255}.{i & 255}/16", "interface": 2}],
            containerId=f"{i:064x}",
        )
        (directory / f"kubenet-{i:064x}-eth0").write_text(doc)


@pytest.mark.parametrize("pods", [250, 1000])
async def test_measure_install_and_churn(
    pods: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with Node(pods=0, cni_cache=False) as node:
        node.run_in(node.ns, ["ip", "link", "add", "cbr0", "type", "bridge"], check=False)
        synthetic(tmp_path, pods)
        pinner = BridgePinner(tmp_path, prefix=node.wrap(node.ns, []), netns=node.ns)
        started = time.perf_counter()
        assert await pinner.sync(), pinner.last_error
        install = time.perf_counter() - started
        assert pinner.pinned_count == pods
        nft_install = pinner.last_install_s or 0.0
        churn = []
        for round_ in range(5):
            synthetic(tmp_path, 1, start=pods + round_)
            started = time.perf_counter()
            assert await pinner.sync()
            added = time.perf_counter() - started
            os.unlink(tmp_path / f"kubenet-{pods + round_:064x}-eth0")
            started = time.perf_counter()
            assert await pinner.sync()
            churn.append((added, time.perf_counter() - started))
        started = time.perf_counter()
        assert not await pinner.sync(check=True)
        check = time.perf_counter() - started
        with capsys.disabled():
            adds = sorted(a for a, _ in churn)
            dels = sorted(d for _, d in churn)
            print(
                f"\n[bridge pin] {pods} ports: install {install * 1000:.0f} ms "
                f"(nft {nft_install * 1000:.0f} ms); "
                f"churn add median {adds[2] * 1000:.0f} ms, delete median {dels[2] * 1000:.0f} ms; "
                f"drift check {check * 1000:.0f} ms"
            )


async def test_nmi_wiring_reports_the_pinner_and_opts_out_labelled_pods(tmp_path: Path) -> None:
    from nmi.interception import bridge_pinner
    from nmi.settings import IptablesSettings, Settings

    (tmp_path / "kubenet-abc-eth0").write_text(BRIDGE_PLUGIN)
    settings = Settings(
        iptables=IptablesSettings(
            anti_spoofing="bridge",
            cni_cache_dir=str(tmp_path),
            anti_spoofing_opt_out_namespaces=frozenset({"default"}),
        )
    )
    state = ClusterState()
    anti = AntiSpoofing("bridge", state, detect=lambda ips: Topology.BRIDGED)
    pinner = bridge_pinner(settings, anti, state, RuleSpec(target_port=2579))
    assert pinner.cache_dir == tmp_path and not anti.protected
    pinner.scan()
    text, pins = pinner.wanted()
    assert [p.port for p in pins] == ["veth1a2b"]
    label = {"nmi.aadpodidentity.k8s.io/allow-extra-addresses": "true"}
    state.apply(Pod("default", "vrrp", "u1", "10.244.0.10", "Running", label, "node"))
    text, pins = pinner.wanted()
    assert pins == [] and 'set optout { type ifname; elements = { "veth1a2b" }; }' in text
    pinner.installed.set()
    pinner.healthy = True
    assert anti.protected and anti.detail()["cni_cache_dir"] == str(tmp_path)
