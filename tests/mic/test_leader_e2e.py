"""Two real MIC processes against the stand-ins: one leads, the other stands by with warm caches;
the leader is SIGKILLed (no release) and the standby finishes the work within one lease duration."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from mic.leader import ENDPOINTS_ANNOTATION
from standins import apiserver as k8s

from .conftest import RG, SUB, Env, identity, uami, until

pytestmark = pytest.mark.timeout(90)

LEASE_S = 2.0
CLIENT_A = "aaaaaaaa-0000-0000-0000-00000000000a"
CLIENT_B = "bbbbbbbb-0000-0000-0000-00000000000b"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Mic:
    def __init__(self, name: str, env: Env, tmp: Path) -> None:
        self.name = name
        self.probe = _free_port()
        self.metrics = _free_port()
        azure = tmp / "azure.json"
        azure.write_text(
            json.dumps({"subscriptionId": SUB, "resourceGroup": RG, "cloud": "AzurePublicCloud"})
        )
        token = tmp / "arm-token"
        token.write_text(env.arm.token or "token")
        self.log = tmp / f"{name}.log"
        argv = [
            sys.executable,
            "-m",
            "mic",
            f"--kubeconfig={env.kubeconfig}",
            f"--cloudconfig={azure}",
            f"--arm-endpoint={env.arm.url}",
            f"--arm-token-file={token}",
            f"-leader-election-instance={name}",
            "--leader-election-namespace=kube-system",
            f"--leader-election-duration={LEASE_S}s",
            f"--http-probe-port={self.probe}",
            f"--prometheus-port={self.metrics}",
        ]
        self.proc = subprocess.Popen(argv, stdout=self.log.open("wb"), stderr=subprocess.STDOUT)

    async def health(self) -> tuple[int, dict[str, Any]]:
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{self.probe}/healthz?verbose") as resp,
        ):
            return resp.status, await resp.json()

    async def stop(self) -> None:
        # Waited for without blocking the loop: the stand-ins MIC talks to on its way out run on it.
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.to_thread(self.proc.wait), 10)
            except TimeoutError:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
async def two_mics(env: Env, tmp_path: Path) -> AsyncIterator[tuple[Mic, Mic]]:
    # The processes read a fixed bearer token from --arm-token-file (no audience to check).
    env.arm.token = "token-for-mic"
    env.arm.expect_audience = None
    env.api.create(identity("id-a", CLIENT_A))
    env.api.create(identity("id-b", CLIENT_B))
    env.api.create(k8s.binding("bind-a", "id-a", "sel-a"))
    env.api.create(k8s.binding("bind-b", "id-b", "sel-b"))
    mics = (Mic("mic-a", env, tmp_path), Mic("mic-b", env, tmp_path))
    try:
        yield mics
    finally:
        for mic in mics:
            await mic.stop()
        for mic in mics:
            print(f"--- {mic.name} ---\n{mic.log.read_text()[-3000:]}")


def _holders(env: Env) -> tuple[str, str]:
    lease = env.api.get("Lease", "kube-system", "aad-pod-identity-mic") or {}
    endpoints = env.api.get("endpoints", "kube-system", "aad-pod-identity-mic") or {}
    annotation = (endpoints.get("metadata", {}).get("annotations") or {}).get(ENDPOINTS_ANNOTATION, "{}")
    return lease.get("spec", {}).get("holderIdentity", ""), json.loads(annotation).get("holderIdentity", "")


async def _eventually(check: Callable[[], Any], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if await check():
                return
        except (aiohttp.ClientError, OSError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.05)


async def test_a_killed_leader_is_replaced_within_one_lease_and_the_standby_finishes(
    env: Env, two_mics: tuple[Mic, Mic]
) -> None:
    env.api.create(k8s.pod("p1", node="aks-pool-0", labels={"aadpodidbinding": "sel-a"}))
    await until(lambda: env.status("p1-default-id-a") == "Assigned", 20.0, "p1 Assigned")
    lease_holder, endpoints_holder = _holders(env)
    assert lease_holder == endpoints_holder and lease_holder in ("mic-a", "mic-b")
    leader, standby = two_mics if two_mics[0].name == lease_holder else two_mics[::-1]

    async def both_healthy() -> bool:
        (s1, h1), (s2, h2) = await leader.health(), await standby.health()
        return (
            s1 == s2 == 200
            and h1["leader_election"]["role"] == "leader"
            and (h2["leader_election"]["role"] == "standby" and h2["watches"]["pods"]["synced"])
        )

    await _eventually(both_healthy, 10.0)

    leader.proc.send_signal(signal.SIGKILL)
    leader.proc.wait()
    killed = time.monotonic()
    env.api.create(k8s.pod("p2", node="aks-pool-1", labels={"aadpodidbinding": "sel-b"}))
    await until(lambda: _holders(env) == (standby.name, standby.name), 3 * LEASE_S, "takeover")
    took = time.monotonic() - killed
    # One lease duration as the standby saw the last renewal, plus one jittered retry period.
    assert took <= LEASE_S + LEASE_S / 4 * 2.2 + 0.5, took
    await until(lambda: env.status("p2-default-id-b") == "Assigned", 10.0, "p2 Assigned by the new leader")
    assert uami("id-b").casefold() in env.pool_ids()
    status, health = await standby.health()
    assert status == 200 and health["leader_election"]["role"] == "leader"
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{standby.metrics}/metrics") as resp,
    ):
        text = await resp.text()
    assert "mic_leader 1.0" in text and "aadpodidentity_mic_new_leader_election_count 1.0" in text


async def test_sigterm_releases_the_lock_for_a_fast_handover(env: Env, two_mics: tuple[Mic, Mic]) -> None:
    await until(lambda: _holders(env)[0] in ("mic-a", "mic-b"), 10.0, "a leader")
    holder = _holders(env)[0]
    leader, standby = two_mics if two_mics[0].name == holder else two_mics[::-1]
    started = time.monotonic()
    await leader.stop()
    assert leader.proc.returncode == 0
    await until(lambda: _holders(env)[0] == standby.name, 3 * LEASE_S, "takeover after release")
    assert time.monotonic() - started < LEASE_S  # released: no need to wait out the lease
