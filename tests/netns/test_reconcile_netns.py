"""The reconciler against the real iptables: each kind of drift is repaired on wake() and counted."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from prometheus_client import CollectorRegistry

from iptables.drift import Problem
from iptables.reconcile import Reconciler
from iptables.rules import RuleSpec
from iptables.runner import IptablesRunner
from nmi.metrics import Metrics
from tests.netns.common import METADATA_IP, add_foreign_rules, iptables, runner_for, save
from tests.netns.harness import Node, Recorder

DNAT = "-d 169.254.169.254/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 127.0.0.1:{port}"


@dataclass
class Running:
    node: Node
    nmi: Recorder
    rules: IptablesRunner
    reconciler: Reconciler
    metrics: Metrics

    def repairs(self) -> float:
        return self.metrics.registry.get_sample_value("nmi_iptables_repairs_total") or 0.0


@pytest.fixture
async def running(node: Node) -> AsyncIterator[Running]:
    add_foreign_rules(node)
    nmi = node.start_recorder(node.ns, "127.0.0.1", 0, name="nmi")
    rules = runner_for(node, RuleSpec(target_port=nmi.port))
    metrics = Metrics(CollectorRegistry())
    # A long interval: passes happen only on wake(), so nothing depends on timing.
    reconciler = Reconciler(rules, interval_s=3600, metrics=metrics, retry_backoff_s=(3600,))
    task = asyncio.create_task(reconciler.run(), name="reconciler")  # type: ignore[arg-type]
    try:
        await asyncio.wait_for(reconciler.installed.wait(), timeout=10)
        yield Running(node, nmi, rules, reconciler, metrics)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


MUTATIONS = {
    "chain flushed": (["-F", "aad-metadata"], {Problem.CHAIN_CONTENT}),
    "rule edited": (["-R", "aad-metadata", "1", *DNAT.format(port=9).split()], {Problem.CHAIN_CONTENT}),
    "rule appended after RETURN": (
        ["-A", "aad-metadata", "-s", "10.0.0.1/32", "-j", "ACCEPT"],
        {Problem.CHAIN_CONTENT},
    ),
    "jump deleted": (["-D", "PREROUTING", "-j", "aad-metadata"], {Problem.JUMP_MISSING}),
    "rule inserted above the jump": (
        ["-I", "PREROUTING", "1", "-s", "10.9.9.9/32", "-j", "RETURN"],
        {Problem.JUMP_NOT_FIRST},
    ),
    "duplicate jump": (["-A", "PREROUTING", "-j", "aad-metadata"], {Problem.DUPLICATE_JUMPS}),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
async def test_drift_is_repaired_on_wake_and_counted(running: Running, mutation: str) -> None:
    args, problems = MUTATIONS[mutation]
    in_sync = save(running.node, "", "nat")
    iptables(running.node, *args)
    assert (await running.rules.check()).problems == problems

    assert await running.reconciler.wake() is True

    assert running.repairs() == 1 and running.reconciler.repairs == 1
    assert (await running.rules.check()).ok
    repaired = save(running.node, "", "nat")
    if mutation == "rule inserted above the jump":
        # Someone else's rule is kept, below ours.
        assert repaired.replace("-A PREROUTING -s 10.9.9.9/32 -j RETURN\n", "") == in_sync
    else:
        assert repaired == in_sync
    pod = running.node.pods[0]
    answer = await running.node.http_get(pod.ns, METADATA_IP, 80)
    assert answer["body"] == {"server": "nmi", "client": pod.ip}


async def test_pass_without_drift_counts_nothing(running: Running) -> None:
    assert await running.reconciler.wake() is True
    assert running.repairs() == 0 and running.reconciler.healthy


async def test_rules_stay_when_the_reconciler_stops(node: Node) -> None:
    """Fail closed: stopping (or crashing) leaves the DNAT in place; only remove() deletes it."""
    rules = runner_for(node, RuleSpec(target_port=1))
    reconciler = Reconciler(rules, interval_s=3600)
    task = asyncio.create_task(reconciler.run())  # type: ignore[arg-type]
    await asyncio.wait_for(reconciler.installed.wait(), timeout=10)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert (await rules.check()).ok
