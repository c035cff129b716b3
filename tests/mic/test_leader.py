"""Leader election timing and safety over locks with optimistic concurrency (in memory).

The API server stand-in runs the same electors end to end in test_leader_e2e.py; here the locks
are in memory so faults (a dead leader, an unreachable API server) are exact and fast.
"""

from __future__ import annotations

import asyncio
import copy
import json
import time
from collections.abc import Callable
from typing import Any

import pytest

from mic.leader import (
    ENDPOINTS_ANNOTATION,
    EndpointsLock,
    LeaderElector,
    LeaderRecord,
    LeaseLock,
    _ObjectLock,
)
from podidentity.kube.errors import KubeApiError, KubeUnavailable

pytestmark = pytest.mark.timeout(60)

D = 0.4  # lease duration: renew deadline 0.2 s, retry period 0.1 s


class Store:
    """Objects by path with resourceVersions, as the API server keeps them; ``down`` fails every call."""

    def __init__(self) -> None:
        self.objects: dict[str, dict[str, Any]] = {}
        self.rv = 0
        self.down: set[str] = set()
        """Identities whose requests fail (their network to the API server is gone)."""

    def get(self, who: str, path: str) -> dict[str, Any]:
        self._check(who)
        if path not in self.objects:
            raise KubeApiError(404, "NotFound", path)
        return copy.deepcopy(self.objects[path])

    def write(self, who: str, method: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        self._check(who)
        name = body["metadata"]["name"]
        key = path if method == "PUT" else f"{path}/{name}"
        if method == "POST":
            if key in self.objects:
                raise KubeApiError(409, "AlreadyExists", key)
        elif self.objects.get(key, {}).get("metadata", {}).get("resourceVersion") != body["metadata"].get(
            "resourceVersion"
        ):
            raise KubeApiError(409, "Conflict", "the object has been modified")
        self.rv += 1
        stored = copy.deepcopy(body)
        stored["metadata"]["resourceVersion"] = str(self.rv)
        self.objects[key] = stored
        return copy.deepcopy(stored)

    def _check(self, who: str) -> None:
        if who in self.down:
            raise KubeUnavailable("connection refused")


class FakeClient:
    """The two calls the locks make, against the store, as ``who``."""

    def __init__(self, store: Store, who: str) -> None:
        self.store, self.who = store, who

    async def get(self, path: str, params: Any = None) -> dict[str, Any]:
        await asyncio.sleep(0)
        return self.store.get(self.who, path)

    async def write(self, method: str, path: str, body: Any = None, **_: Any) -> dict[str, Any]:
        await asyncio.sleep(0)
        return self.store.write(self.who, method, path, body)


class Replica:
    def __init__(self, store: Store, who: str, *, endpoints: bool = True) -> None:
        client: Any = FakeClient(store, who)
        locks: list[_ObjectLock] = [LeaseLock(client, "kube-system", "mic")]
        if endpoints:
            locks.insert(0, EndpointsLock(client, "kube-system", "mic"))
        self.log: list[tuple[str, float]] = []
        self.elector = LeaderElector(
            locks,
            who,
            lease_duration_s=D,
            on_started_leading=lambda: self.log.append(("start", time.monotonic())),
            on_stopped_leading=lambda: self.log.append(("stop", time.monotonic())),
        )
        self.task: asyncio.Task[None] | None = None

    def start(self) -> Replica:
        self.task = asyncio.create_task(self.elector.run())
        return self

    async def kill(self) -> None:
        """SIGKILL: the process is gone, nothing is released."""
        assert self.task is not None
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


async def until(predicate: Callable[[], bool], timeout: float) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)
    return time.monotonic() - start


async def watch_single_leader(replicas: list[Replica], seconds: float) -> int:
    """Sample who leads; never two at once. Returns how many samples had a leader."""
    led = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        leaders = [r.elector.identity for r in replicas if r.elector.leading]
        assert len(leaders) <= 1, leaders
        led += bool(leaders)
        await asyncio.sleep(0.003)
    return led


async def test_two_replicas_one_leader_and_a_kill_hands_over_within_one_lease() -> None:
    store = Store()
    a, b = Replica(store, "mic-a").start(), Replica(store, "mic-b").start()
    try:
        await until(lambda: a.elector.leading or b.elector.leading, D)
        assert await watch_single_leader([a, b], 3 * D) > 0
        leader, standby = (a, b) if a.elector.leading else (b, a)
        await leader.kill()
        killed = time.monotonic()
        took = await until(lambda: standby.elector.leading, 3 * D)
        # Takeover needs the record unchanged for D as the standby saw it, plus one retry (jittered).
        assert took <= D + D / 4 * (1 + 1.2) + 0.1, took
        assert took >= D * 0.5  # and it did wait: no takeover of a lease that may still be valid
        assert standby.log[-1][0] == "start" and standby.log[-1][1] >= killed
        assert await watch_single_leader([standby], D) > 0
    finally:
        for r in (a, b):
            await r.kill()


async def test_a_leader_cut_off_steps_down_before_anyone_can_take_over_and_stays_standby() -> None:
    store = Store()
    a = Replica(store, "mic-a").start()
    await until(lambda: a.elector.leading, D)
    b = Replica(store, "mic-b").start()
    try:
        await asyncio.sleep(D / 2)
        store.down.add("mic-a")  # mic-a can no longer reach the API server
        cut = time.monotonic()
        await until(lambda: not a.elector.leading, D)
        stepped_down = time.monotonic()
        await until(lambda: b.elector.leading, 3 * D)
        took_over = time.monotonic()
        assert stepped_down - cut <= D / 2 + 0.1
        assert stepped_down < took_over  # never two leaders
        assert a.task is not None and not a.task.done()  # back to standby, not exited
        store.down.clear()
        assert await watch_single_leader([a, b], 2 * D) > 0
        assert b.elector.leading and not a.elector.leading
    finally:
        await a.kill()
        await b.kill()


async def test_release_on_clean_stop_hands_over_within_a_retry_period() -> None:
    store = Store()
    a = Replica(store, "mic-a").start()
    await until(lambda: a.elector.leading, D)
    b = Replica(store, "mic-b").start()
    try:
        await asyncio.sleep(D)
        assert not b.elector.leading
        await a.kill()
        await a.elector.release()
        took = await until(lambda: b.elector.leading, 2 * D)
        assert took <= D / 4 * (1 + 1.2) + 0.1, took
    finally:
        await b.kill()


async def test_a_go_mic_holding_the_endpoints_lock_keeps_us_standing_by() -> None:
    store = Store()
    path = "/api/v1/namespaces/kube-system/endpoints/mic"

    def go_mic_renews() -> None:
        now = time.time()
        record = {
            "holderIdentity": "go-mic-7d9f",
            "leaseDurationSeconds": 15,
            "acquireTime": "2026-12-07T00:00:00Z",
            "renewTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
            "leaderTransitions": 3,
        }
        current = store.objects.get(path)
        body = {
            "apiVersion": "v1",
            "kind": "Endpoints",
            "metadata": {
                "name": "mic",
                "namespace": "kube-system",
                "annotations": {ENDPOINTS_ANNOTATION: json.dumps(record)},
                **({"resourceVersion": current["metadata"]["resourceVersion"]} if current else {}),
            },
        }
        store.write("go-mic", "PUT" if current else "POST", path if current else path.rsplit("/", 1)[0], body)

    go_mic_renews()
    ours = Replica(store, "mic-py").start()
    try:
        for _ in range(int(3 * D / 0.05)):
            go_mic_renews()
            await asyncio.sleep(0.05)
            assert not ours.elector.leading
        assert ours.elector.holder == "go-mic-7d9f"
        # The Go MIC is stopped (rolling upgrade): we take both locks over.
        await until(lambda: ours.elector.leading, 3 * D)
        lease = store.objects["/apis/coordination.k8s.io/v1/namespaces/kube-system/leases/mic"]
        annotation = json.loads(store.objects[path]["metadata"]["annotations"][ENDPOINTS_ANNOTATION])
        assert lease["spec"]["holderIdentity"] == annotation["holderIdentity"] == "mic-py"
        assert annotation["leaderTransitions"] == 4  # the Go MIC's count, carried on
        assert lease["spec"]["renewTime"].endswith("Z") and "." in lease["spec"]["renewTime"]
    finally:
        await ours.kill()


async def test_without_the_endpoints_lock_only_the_lease_is_written() -> None:
    store = Store()
    a = Replica(store, "mic-a", endpoints=False).start()
    try:
        await until(lambda: a.elector.leading, D)
        assert list(store.objects) == ["/apis/coordination.k8s.io/v1/namespaces/kube-system/leases/mic"]
        assert a.elector.status()["role"] == "leader"
    finally:
        await a.kill()


def test_records_round_trip_through_both_lock_formats() -> None:
    client: Any = None
    record = LeaderRecord("mic-a", 15, 1_800_000_000.25, 1_800_000_010.5, 7)
    lease = LeaseLock(client, "ns", "n")
    back = lease.record_of(lease.with_record({"metadata": {"name": "n"}}, record))
    assert back == record
    endpoints = EndpointsLock(client, "ns", "n")
    back = endpoints.record_of(endpoints.with_record({"metadata": {"name": "n"}}, record))
    # The annotation has whole seconds, as client-go's metav1.Time.
    assert back == LeaderRecord("mic-a", 15, 1_800_000_000.0, 1_800_000_010.0, 7)
    assert endpoints.record_of({"metadata": {"annotations": {ENDPOINTS_ANNOTATION: "not json"}}}) is None
