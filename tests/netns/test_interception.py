"""The rules on a real kernel: pod traffic is intercepted, the node's own is not, nothing leaks."""

from __future__ import annotations

import sys

import pytest

from iptables.drift import Problem
from iptables.rules import HostNetworkInterception, RuleSpec
from tests.netns.common import METADATA_IP, add_foreign_rules, runner_for, save
from tests.netns.harness import Node, Recorder


@pytest.fixture(params=["nft", "legacy"])
def variant(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def imds(node: Node) -> Recorder:
    return node.start_recorder(node.ns, METADATA_IP, 80, name="imds")


@pytest.fixture
def nmi(node: Node) -> Recorder:
    return node.start_recorder(node.ns, "127.0.0.1", 0, name="nmi")


async def test_pod_traffic_reaches_nmi_with_its_own_source_and_node_traffic_does_not(
    node: Node, imds: Recorder, nmi: Recorder, variant: str
) -> None:
    add_foreign_rules(node, variant)
    rules = runner_for(node, RuleSpec(target_port=nmi.port), variant)
    await rules.install()
    assert (await rules.check()).ok, "rendered rules must match iptables-save's spelling"
    assert rules.backend == ("legacy" if variant == "legacy" else "nf_tables")

    for pod in node.pods:
        answer = await node.http_get(pod.ns, METADATA_IP, 80)
        assert answer["ok"], answer
        assert answer["body"] == {"server": "nmi", "client": pod.ip}
    assert [hit["client"] for hit in nmi.hits()] == [pod.ip for pod in node.pods]

    from_node = await node.http_get(node.ns, METADATA_IP, 80)
    assert from_node["ok"] and from_node["body"]["server"] == "imds"
    assert len(imds.hits()) == 1
    assert len(nmi.hits()) == len(node.pods)


async def test_installing_twice_adds_no_duplicate_rules(node: Node, nmi: Recorder, variant: str) -> None:
    add_foreign_rules(node, variant)
    rules = runner_for(node, RuleSpec(target_port=nmi.port), variant)
    await rules.install()
    once = save(node, variant)
    assert (await rules.install()).ok
    assert save(node, variant) == once
    assert once.count("-j aad-metadata") == 1
    nat = save(node, variant, "nat").splitlines()
    assert nat[nat.index(":aad-metadata - [0:0]") :].count("-A PREROUTING -j aad-metadata") == 1
    assert next(line for line in nat if line.startswith("-A PREROUTING")) == "-A PREROUTING -j aad-metadata"


async def test_adopts_rules_left_by_the_original_nmi(node: Node, nmi: Recorder) -> None:
    """The original inserted the same chain and jump with ``iptables -N/-A/-I``: nothing to change."""
    original = RuleSpec(target_port=nmi.port).prerouting_hook()
    node.run_in(node.ns, ["iptables", "-t", "nat", "-N", original.chain])
    for rule in original.rules:
        node.run_in(node.ns, ["iptables", "-t", "nat", "-A", original.chain, *rule.split()])
    node.run_in(node.ns, ["iptables", "-t", "nat", "-I", "PREROUTING", "1", "-j", original.chain])
    assert (await runner_for(node, RuleSpec(target_port=nmi.port)).check()).ok


async def test_route_localnet_is_required_and_ensured() -> None:
    with Node(pods=1, route_localnet=False) as node:
        nmi = node.start_recorder(node.ns, "127.0.0.1", 0, name="nmi")
        imds = node.start_recorder(node.ns, METADATA_IP, 80, name="imds")
        await runner_for(node, RuleSpec(target_port=nmi.port)).install()
        pod = node.pods[0]

        dropped = await node.http_get(pod.ns, METADATA_IP, 80, timeout=0.5)
        assert not dropped["ok"] and "timed out" in dropped["error"], dropped
        assert nmi.hits() == [] and imds.hits() == []

        ensure = "from nmi.netsetup import ensure_route_localnet as e; print(e(), e())"
        result = await node.arun_in(node.ns, [sys.executable, "-c", ensure])
        assert result.stdout.strip() == "['all'] []"

        answer = await node.http_get(pod.ns, METADATA_IP, 80)
        assert answer["ok"] and answer["body"] == {"server": "nmi", "client": pod.ip}


async def test_fails_closed_when_nmi_is_not_listening(node: Node, imds: Recorder) -> None:
    stopped = node.start_recorder(node.ns, "127.0.0.1", 0, name="stopped")
    stopped.stop()
    rules = runner_for(node, RuleSpec(target_port=stopped.port))
    await rules.install()
    answer = await node.http_get(node.pods[0].ns, METADATA_IP, 80)
    assert not answer["ok"] and "ConnectionRefusedError" in answer["error"], answer
    assert imds.hits() == []


@pytest.mark.parametrize("host_network", [False, True])
async def test_remove_deletes_exactly_our_rules(
    node: Node, imds: Recorder, nmi: Recorder, variant: str, host_network: bool
) -> None:
    add_foreign_rules(node, variant)
    before = save(node, variant)
    interception = HostNetworkInterception(exempt_uids=(4242,)) if host_network else None
    rules = runner_for(node, RuleSpec(target_port=nmi.port, host_network=interception), variant)
    await rules.install()
    assert save(node, variant) != before
    assert await rules.remove() is True
    assert save(node, variant) == before
    assert await rules.remove() is False
    # Only an explicit removal opens the path to the real IMDS again.
    answer = await node.http_get(node.pods[0].ns, METADATA_IP, 80)
    assert answer["body"]["server"] == "imds"


async def test_host_network_opt_in_intercepts_local_traffic_except_the_exempt_uid(
    node: Node, imds: Recorder, nmi: Recorder
) -> None:
    spec = RuleSpec(target_port=nmi.port, host_network=HostNetworkInterception(exempt_uids=(4242,)))
    rules = runner_for(node, spec)
    await rules.install()
    assert (await rules.check()).ok

    as_root = await node.http_get(node.ns, METADATA_IP, 80)
    assert as_root["ok"] and as_root["body"]["server"] == "nmi", as_root
    exempt = await node.http_get(node.ns, METADATA_IP, 80, uid=4242)
    assert exempt["ok"] and exempt["body"]["server"] == "imds", exempt
    from_pod = await node.http_get(node.pods[0].ns, METADATA_IP, 80)
    assert from_pod["body"] == {"server": "nmi", "client": node.pods[0].ip}


async def test_host_network_cgroup_exemption_is_installed_and_matches(
    node: Node, imds: Recorder, nmi: Recorder
) -> None:
    # Every process is in a descendant of the cgroup v2 root, so "/" exempts the whole node;
    # enough to prove the rule's spelling round-trips and the match is live.
    spec = RuleSpec(target_port=nmi.port, host_network=HostNetworkInterception(exempt_cgroups=("/",)))
    rules = runner_for(node, spec)
    await rules.install()
    assert (await rules.check()).ok
    answer = await node.http_get(node.ns, METADATA_IP, 80)
    assert answer["ok"] and answer["body"]["server"] == "imds", answer


async def test_opting_out_of_host_network_removes_its_chain(
    node: Node, imds: Recorder, nmi: Recorder
) -> None:
    opted_in = RuleSpec(target_port=nmi.port, host_network=HostNetworkInterception(exempt_uids=(4242,)))
    await runner_for(node, opted_in).install()
    plain = runner_for(node, RuleSpec(target_port=nmi.port))
    assert (await plain.check()).problems == {Problem.STALE_CHAIN}
    await plain.repair()
    assert "aad-metadata-output" not in save(node, "", "nat")
    answer = await node.http_get(node.ns, METADATA_IP, 80)
    assert answer["ok"] and answer["body"]["server"] == "imds", answer
