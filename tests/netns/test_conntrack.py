"""Flows opened before the rules keep reaching the real IMDS until their conntrack entries go."""

from __future__ import annotations

import asyncio
import errno
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from iptables.rules import RuleSpec
from nmi import netsetup
from nmi.netsetup import ConntrackUnavailable, purge_conntrack
from tests.netns.common import METADATA_IP, add_foreign_rules, runner_for
from tests.netns.harness import Node, list_namespaces, unique_prefix


class Flow:
    """One kept-alive HTTP connection from inside a namespace."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def line(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        raw = await asyncio.wait_for(self.proc.stdout.readline(), timeout=10)
        parsed: dict[str, Any] = json.loads(raw)
        return parsed

    async def get(self) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"get\n")
        await self.proc.stdin.drain()
        return await self.line()


@asynccontextmanager
async def flow(node: Node, ns: str) -> AsyncIterator[Flow]:
    argv = [*node.client_argv(METADATA_IP, 80, timeout=2), "--interactive"]
    proc = await asyncio.create_subprocess_exec(
        *node.wrap(ns, argv), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
    )
    try:
        opened = Flow(proc)
        assert "connected" in await opened.line()
        yield opened
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), timeout=5)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def test_purge_cuts_flows_that_bypass_the_dnat_and_spares_intercepted_ones(node: Node) -> None:
    add_foreign_rules(node)  # conntrack is active on every real node (kube-proxy)
    imds = node.start_recorder(node.ns, METADATA_IP, 80, name="imds")
    nmi = node.start_recorder(node.ns, "127.0.0.1", 0, name="nmi")
    pod = node.pods[0]

    async with flow(node, pod.ns) as early:
        assert (await early.get())["body"]["server"] == "imds"
        await runner_for(node, RuleSpec(target_port=nmi.port)).install()
        assert (await early.get())["body"]["server"] == "imds", "pre-existing flow bypasses the new DNAT"

        async with flow(node, pod.ns) as late:
            assert (await late.get())["body"]["server"] == "nmi"

            purged = await asyncio.to_thread(
                purge_conntrack, METADATA_IP, 80, spare=("127.0.0.1", nmi.port), netns=node.ns
            )

            assert purged == 1
            cut = await early.get()
            assert not cut["ok"], cut
            assert len(imds.hits()) == 2
            assert (await late.get())["body"]["server"] == "nmi", "intercepted flow survives the purge"

    fresh = await node.http_get(pod.ns, METADATA_IP, 80)
    assert fresh["body"]["server"] == "nmi"
    assert (
        await asyncio.to_thread(
            purge_conntrack, METADATA_IP, 80, spare=("127.0.0.1", nmi.port), netns=node.ns
        )
        == 0
    )


def test_missing_namespace_is_a_clear_error_and_is_not_created() -> None:
    missing = f"{unique_prefix()}-missing"
    with pytest.raises(ConntrackUnavailable, match="may still reach IMDS directly"):
        purge_conntrack(METADATA_IP, 80, netns=missing)
    assert missing not in list_namespaces()


def test_kernel_without_conntrack_netlink_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    class NoConntrack:
        def __init__(self, **kwargs: object) -> None:
            raise OSError(errno.EPROTONOSUPPORT, "Protocol not supported")

    monkeypatch.setattr(netsetup, "Conntrack", NoConntrack)
    with pytest.raises(ConntrackUnavailable, match=r"unavailable or failing .*Protocol not supported"):
        purge_conntrack(METADATA_IP, 80)
