"""Anti-spoofing of metadata traffic (issue 16): a pod forging a neighbour's source address.

The attacker is a pod namespace sending a TCP SYN from a raw socket with the victim's source
address toward 169.254.169.254:80 (``standins.netns spoof-syn``: only ``NET_RAW`` is needed).
On a routed node the raw-table strict reverse-path rule drops it before conntrack and the DNAT;
without the rule it reaches the DNAT (and NMI would answer the victim's address). Counters, not
packet captures, tell which.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from iptables.rules import RuleSpec
from nmi.antispoof import AntiSpoofing, Effect, RouteFact, Topology, classify, read_routes
from nmi.cli import parse
from podidentity.model import Pod
from podidentity.state import ClusterState
from standins.netns import HELPER, Node, cleanup_prefix, unique_prefix
from standins.sandbox import Sandbox
from tests.netns.common import METADATA_IP, runner_for

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "cluster-state.yaml"
RPFILTER = "-m rpfilter --invert -j DROP"
DNAT = "-j DNAT --to-destination"
SPOOF_CHAIN = "aad-metadata-spoof"
RAW_RULE = f"-A {SPOOF_CHAIN} -d 169.254.169.254/32 -p tcp -m tcp --dport 80 -m rpfilter --invert -j DROP"


# --- pure: topology and decisions ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("facts", "topology"),
    [
        ([RouteFact("10.0.0.2", "veth0", "veth"), RouteFact("10.0.0.3", "veth1", "veth")], Topology.ROUTED),
        ([RouteFact("10.0.0.2", "cbr0", "bridge")], Topology.BRIDGED),
        ([RouteFact("10.0.0.2", "veth0", "veth", bridge_port=True)], Topology.BRIDGED),
        # One pod behind a bridge makes the node unprotected, whatever the others.
        ([RouteFact("10.0.0.2", "veth0", "veth"), RouteFact("10.0.0.3", "cbr0", "bridge")], Topology.BRIDGED),
        ([RouteFact("10.0.0.2", "eth0", None), RouteFact("10.0.0.3", None, None)], Topology.UNKNOWN),
        ([], Topology.UNKNOWN),
    ],
)
def test_topology_is_classified_from_the_route_to_each_pod(
    facts: list[RouteFact], topology: Topology
) -> None:
    assert classify(facts) is topology


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def pod(ip: str, **extra: Any) -> Pod:
    return Pod("default", f"p{ip}", "uid", ip, "Running", {}, "node", **extra)


async def test_auto_waits_for_pods_then_follows_the_topology_and_reports_it() -> None:
    registry = CollectorRegistry()
    state = ClusterState()
    readings: list[Sequence[str]] = []
    answer = [Topology.ROUTED]

    def detect(ips: Sequence[str]) -> Topology:
        readings.append(list(ips))
        return answer[0]

    anti = AntiSpoofing("auto", state, detect=detect, registry=registry)
    assert await anti.decide() is False and anti.effect is Effect.DETECTING and readings == []
    assert sample(registry, "nmi_antispoofing_mode", mode="detecting") == 1.0

    state.apply(pod("10.0.0.3"))
    state.apply(pod("10.0.0.2"))
    state.apply(pod("10.0.0.9", host_network=True))
    assert await anti.decide() is True
    assert readings == [["10.0.0.2", "10.0.0.3"]]
    assert sample(registry, "nmi_antispoofing_mode", mode="routed") == 1.0
    assert sample(registry, "nmi_antispoofing_mode", mode="detecting") == 0.0
    assert sample(registry, "nmi_antispoofing_protected") == 1.0

    # The pods go: the routed decision is kept (the rule stays).
    for p in state.all(Pod):
        state.remove("Pod", p.key)
    assert await anti.decide() is True

    answer[0] = Topology.BRIDGED
    state.apply(pod("10.0.0.4"))
    assert await anti.decide() is False
    assert anti.effect is Effect.UNPROTECTED
    assert sample(registry, "nmi_antispoofing_mode", mode="unprotected") == 1.0
    assert sample(registry, "nmi_antispoofing_protected") == 0.0
    assert "NET_RAW" in str(anti.detail()["advice"])


async def test_explicit_modes_need_no_pods_and_routed_on_a_bridge_is_not_called_protected() -> None:
    state = ClusterState()
    off = AntiSpoofing("off", state, detect=lambda ips: pytest.fail("off reads nothing"))
    assert await off.decide() is False and not off.protected
    state.apply(pod("10.0.0.2"))
    routed = AntiSpoofing("routed", state, detect=lambda ips: Topology.BRIDGED)
    assert await routed.decide() is True
    assert not routed.protected and "advice" in routed.detail()
    bridge = AntiSpoofing("bridge", state, detect=lambda ips: Topology.BRIDGED)
    assert await bridge.decide() is False and bridge.effect is Effect.BRIDGE


def test_cli_default_is_auto_and_bridge_is_opt_in() -> None:
    base = ["--cluster-state", "x.yaml", "--node", "n"]
    assert parse(base).iptables.anti_spoofing == "auto"
    assert parse([*base, "--anti-spoofing=routed"]).iptables.anti_spoofing == "routed"
    assert parse([*base, "--anti-spoofing", "off"]).iptables.anti_spoofing == "off"
    assert parse([*base, "--anti-spoofing=bridge"]).iptables.anti_spoofing == "bridge"


# --- the rule on a real kernel, NMI played by a recorder ----------------------------------------


def spoof(node: Node, attacker: str, victim_ip: str) -> None:
    node.run_in(attacker, [*HELPER, "spoof-syn", "--src", victim_ip, "--dst", METADATA_IP])


def wait_for(probe: Callable[[], object], timeout: float = 3.0) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


def settle() -> None:
    time.sleep(0.5)  # a packet that was going to be counted has been by now (veth is synchronous)


@pytest.mark.parametrize("topology", ["routed", "bridge"])
async def test_topology_is_read_from_the_kernel(topology: str) -> None:
    with Node(pods=2, topology=topology) as node:
        facts = await asyncio.to_thread(read_routes, [p.ip for p in node.pods], netns=node.ns)
        expected = Topology.ROUTED if topology == "routed" else Topology.BRIDGED
        assert classify(facts) is expected
        assert all(f.topology is expected for f in facts), facts


@pytest.mark.parametrize("rule", [True, False], ids=["rule", "no-rule"])
async def test_forged_source_is_dropped_in_raw_on_a_routed_node(rule: bool) -> None:
    with Node(pods=2, topology="routed") as node:
        nmi = node.start_recorder(node.ns, "127.0.0.1", 0, name="nmi")
        runner = runner_for(node, RuleSpec(target_port=nmi.port, anti_spoofing=rule))
        await runner.install()
        assert (await runner.check()).ok
        victim, attacker = node.pods
        answer = await node.http_get(victim.ns, METADATA_IP, 80)
        assert answer["body"] == {"server": "nmi", "client": victim.ip}

        dropped = node.rule_packets("raw", RPFILTER)
        dnat = node.rule_packets("nat", DNAT)
        assert dnat == 1 and dropped == (0 if rule else None)
        spoof(node, attacker.ns, victim.ip)
        if rule:
            assert wait_for(lambda: node.rule_packets("raw", RPFILTER) == 1)
            settle()
            assert node.rule_packets("nat", DNAT) == 1, "the forged SYN must never reach the DNAT"
        else:
            assert wait_for(lambda: node.rule_packets("nat", DNAT) == 2), "without the rule it reaches NMI"
        # The victim is unaffected either way.
        again = await node.http_get(victim.ns, METADATA_IP, 80)
        assert again["body"] == {"server": "nmi", "client": victim.ip}
        assert [hit["client"] for hit in nmi.hits()] == [victim.ip, victim.ip]


# --- the real NMI in a sandbox ----------------------------------------------------------------------


@pytest.fixture
def up_sandbox(tmp_path: Path) -> Iterator[Callable[..., Sandbox]]:
    made: list[Sandbox] = []

    def up(**options: Any) -> Sandbox:
        options.setdefault("prefix", unique_prefix())
        sandbox = Sandbox.up(EXAMPLE, state_dir=tmp_path, ready_timeout=30.0, **options)
        made.append(sandbox)
        return sandbox

    yield up
    for sandbox in made:
        try:
            sandbox.down()
        finally:
            cleanup_prefix(f"{sandbox.prefix}-")


def packets(sandbox: Sandbox, table: str, needle: str) -> int | None:
    text = sandbox.run(sandbox.node_ns, ["iptables-save", "-c", "-t", table], check=True).stdout
    for line in text.splitlines():
        if line.startswith("[") and needle in line:
            return int(line[1:].split(":")[0])
    return None


def sandbox_spoof(sandbox: Sandbox, attacker: str, victim: str) -> None:
    netns = sandbox.pod(attacker).netns
    assert netns is not None
    argv = [*HELPER, "spoof-syn", "--src", sandbox.pod(victim).ip, "--dst", METADATA_IP]
    sandbox.run(netns, argv, check=True)


def metric(sandbox: Sandbox, name: str) -> float | None:
    for line in sandbox.metrics().splitlines():
        if line.split(" ")[0] == name:
            return float(line.split(" ")[1])
    return None


def token_ok(sandbox: Sandbox, pod_name: str = "web") -> bool:
    answer = sandbox.token_from(pod_name)
    return answer["status"] == 200 and "access_token" in answer["body"]


def test_auto_on_a_routed_node_installs_the_rule_and_stops_a_forged_syn(
    up_sandbox: Callable[..., Sandbox],
) -> None:
    sandbox = up_sandbox(topology="routed", nmi_args=["--ipt-update-interval-sec", "1"])
    assert token_ok(sandbox)
    assert wait_for(lambda: RAW_RULE in sandbox.raw_rules()), sandbox.raw_rules()
    assert "-A PREROUTING -j aad-metadata-spoof" in sandbox.raw_rules().splitlines()
    assert 'nmi_antispoofing_mode{mode="routed"} 1.0' in sandbox.metrics()
    assert metric(sandbox, "nmi_antispoofing_protected") == 1.0
    detail = sandbox.readiness()["body"]["checks"]["antispoofing"]
    assert detail["ok"] and detail["detail"]["effect"] == "routed" and detail["detail"]["protected"]

    dnat = packets(sandbox, "nat", DNAT)
    sandbox_spoof(sandbox, "batch", "web")
    assert wait_for(lambda: packets(sandbox, "raw", RPFILTER) == 1)
    settle()
    assert packets(sandbox, "nat", DNAT) == dnat, "NMI never sees the forged connection attempt"
    assert token_ok(sandbox), "the victim keeps getting its token"


def test_off_lets_the_forged_syn_reach_nmi(up_sandbox: Callable[..., Sandbox]) -> None:
    sandbox = up_sandbox(topology="routed", nmi_args=["--anti-spoofing=off"])
    assert SPOOF_CHAIN not in sandbox.raw_rules()
    assert 'nmi_antispoofing_mode{mode="off"} 1.0' in sandbox.metrics()
    assert token_ok(sandbox)
    dnat = packets(sandbox, "nat", DNAT)
    assert dnat is not None
    sandbox_spoof(sandbox, "batch", "web")
    assert wait_for(lambda: packets(sandbox, "nat", DNAT) == dnat + 1), "the forged SYN reaches NMI"
    assert token_ok(sandbox)


def test_auto_on_a_bridged_node_installs_nothing_and_says_so(up_sandbox: Callable[..., Sandbox]) -> None:
    sandbox = up_sandbox(topology="bridge")
    assert token_ok(sandbox)
    ready = sandbox.readiness()
    assert ready["status"] == 200, ready
    detail = ready["body"]["checks"]["antispoofing"]
    assert detail["ok"] is True
    assert detail["detail"]["effect"] == "unprotected" and detail["detail"]["protected"] is False
    assert "NET_RAW" in detail["detail"]["advice"]
    assert SPOOF_CHAIN not in sandbox.raw_rules()
    assert 'nmi_antispoofing_mode{mode="unprotected"} 1.0' in sandbox.metrics()
    assert metric(sandbox, "nmi_antispoofing_protected") == 0.0
    log = Path(sandbox.state["processes"]["nmi"]["log"]).read_text()
    assert log.count("NOT protected against source-address spoofing") == 1


def test_the_rule_survives_sigterm_and_sigkill_and_comes_back_after_deletion(
    up_sandbox: Callable[..., Sandbox],
) -> None:
    args = ["--ipt-update-interval-sec", "1"]
    sandbox = up_sandbox(topology="routed", nmi_args=args)
    assert wait_for(lambda: RAW_RULE in sandbox.raw_rules())
    installed = sandbox.raw_rules()

    for sig in (signal.SIGTERM, signal.SIGKILL):
        sandbox.stop_nmi(sig)
        assert sandbox.raw_rules() == installed, f"the rule must stay after {sig.name} (fail closed)"
        sandbox.start_nmi(args)
        assert token_ok(sandbox)

    for deletion in (["-F", SPOOF_CHAIN], ["-D", "PREROUTING", "-j", SPOOF_CHAIN]):
        sandbox.run(sandbox.node_ns, ["iptables", "-w", "5", "-t", "raw", *deletion], check=True)
        assert sandbox.raw_rules() != installed
        started = time.monotonic()
        assert wait_for(lambda: sandbox.raw_rules() == installed, timeout=5.0), sandbox.raw_rules()
        assert time.monotonic() - started < 2.5, "back within one reconcile interval (1 s) plus a pass"

    # Only the uninstall flag removes it.
    sandbox.stop_nmi()
    sandbox.start_nmi([*args, "--cleanup-iptables-on-exit"])
    sandbox.stop_nmi()
    assert SPOOF_CHAIN not in sandbox.raw_rules()


@pytest.mark.parametrize("variant", ["nft", "legacy"])
async def test_turning_anti_spoofing_off_removes_the_chain_on_either_backend(variant: str) -> None:
    with Node(pods=1, topology="routed") as node:
        await runner_for(node, RuleSpec(target_port=1, anti_spoofing=True), variant).install()
        assert node.rule_packets("raw", RPFILTER) == 0 or variant == "legacy"
        plain = runner_for(node, RuleSpec(target_port=1), variant)
        drift = await plain.repair()
        assert {f.chain for f in drift.findings} == {SPOOF_CHAIN}
        assert (await plain.check()).ok
        saved = node.run_in(node.ns, [f"iptables-{variant}-save", "-t", "raw"]).stdout
        assert SPOOF_CHAIN not in saved
