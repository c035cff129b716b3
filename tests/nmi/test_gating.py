"""Node start-up gating against the API server stand-in: the taint goes only once NMI is ready,
only that taint, only on its own node, and a concurrent change of the node is not lost."""

from __future__ import annotations

from typing import Any

import pytest

from nmi.gating import STARTUP_TAINT, without_taint
from standins import apiserver as k8s
from tests.nmi.conftest import NODE, eventually

pytestmark = pytest.mark.timeout(60)

GATE = {"key": STARTUP_TAINT, "value": "true", "effect": "NoSchedule"}
OTHER = {"key": "example.com/dedicated", "value": "gpu", "effect": "NoExecute"}


def tainted(name: str, *taints: dict[str, str]) -> dict[str, Any]:
    node = k8s.node(name)
    node["spec"]["taints"] = [dict(t) for t in taints]
    return node


def taints_of(api: Any, name: str) -> list[dict[str, Any]]:
    return list((api.get("nodes", "", name) or {}).get("spec", {}).get("taints") or [])


def test_without_taint_removes_exactly_that_key() -> None:
    assert without_taint([GATE, OTHER], STARTUP_TAINT) == [OTHER]
    assert without_taint([GATE], STARTUP_TAINT) == []
    assert without_taint([OTHER], STARTUP_TAINT) is None
    assert without_taint(None, STARTUP_TAINT) is None


async def test_the_taint_goes_only_after_readiness_and_other_taints_stay(cluster_factory: Any) -> None:
    c = await cluster_factory(objects=[tainted(NODE, GATE, OTHER), tainted("node-b", GATE)])
    await eventually(lambda: _async(lambda: taints_of(c.api, NODE) == [OTHER]))
    assert taints_of(c.api, NODE) == [OTHER]
    assert (await c.ready()).status == 200
    assert taints_of(c.api, "node-b") == [GATE]  # never another node's


async def test_a_node_stays_gated_while_nmi_is_not_ready(cluster_factory: Any) -> None:
    def pods_list_fails_for_a_while(api: Any) -> None:
        api.fail_next(6, 500, verbs=("list",), resources="pods")

    c = await cluster_factory(objects=[tainted(NODE, GATE)], before_start=pods_list_fails_for_a_while)
    await eventually(lambda: _async(lambda: taints_of(c.api, NODE) == []))
    assert (await c.ready()).status == 200
    # The API server recorded no node PATCH before the pod watch had listed (NMI was not ready).
    writes = [r for r in c.api.requests if r.resource == "nodes" and r.action == "patch"]
    lists = [r for r in c.api.requests if r.resource == "pods" and r.verb == "list" and r.status == 200]
    assert writes and lists and lists[0].at < writes[0].at


async def test_a_concurrent_change_of_the_node_is_not_lost(cluster_factory: Any) -> None:
    c = await cluster_factory(objects=[tainted(NODE, OTHER)])
    # Another controller adds a taint between NMI's read and its write: NMI's precondition fails (409)
    # and it reads again; both the old and the new taint survive.
    c.api.patch("nodes", "", NODE, {"spec": {"taints": [OTHER, GATE]}})
    c.api.fail_next(1, 409, verbs=("patch",), resources="nodes")
    await eventually(lambda: _async(lambda: taints_of(c.api, NODE) == [OTHER]), timeout=10)
    assert taints_of(c.api, NODE) == [OTHER]


async def _async(check: Any) -> bool:
    return bool(check())
