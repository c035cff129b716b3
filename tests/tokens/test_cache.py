"""The token cache against a fake source, under virtual time.

Virtual time: the loop's clock jumps to the next timer whenever the loop would otherwise sleep,
so hour-long token lifetimes run in milliseconds and timings are exact. The wall clock the cache
sees is the loop clock plus an offset (``skew`` models wall-clock jumps). Every test waits on
events from the fake source, not on elapsed time; ``asyncio.sleep`` only advances the clocks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import itertools
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from nmi.metrics import Metrics
from nmi.settings import TokenCacheSettings
from nmi.tokens.cache import FAILURE_HOLDOFF_S, FETCH_TIMEOUT_S, RECENT_PER_IDENTITY, TokenCache
from podidentity.errors import UpstreamRefused, UpstreamUnavailable
from podidentity.model import AzureIdentity, IdentityType, ObjectKey
from podidentity.tokens import Token, TokenRequest

EPOCH = 1_700_000_000.0
GUARD_S = 100_000.0
"""Virtual seconds a wait may take before the test fails: jumps there at once if nothing happens."""
VAULT = "https://vault.azure.net"
IDENT = AzureIdentity("team-a", "reader", IdentityType.USER_ASSIGNED_MSI, "client-a")
OTHER = AzureIdentity("team-b", "writer", IdentityType.USER_ASSIGNED_MSI, "client-b")


def request(identity: AzureIdentity | None = IDENT, resource: str = VAULT) -> TokenRequest:
    return TokenRequest(identity=identity, resource=resource, api_version="2018-02-01")


REQ = request()


class VirtualTime:
    def __init__(self, start: float) -> None:
        self.now = start
        self.skew = 0.0
        self._offset = EPOCH - start

    def time(self) -> float:
        return self.now

    def wall(self) -> float:
        return self.now + self._offset + self.skew


@dataclasses.dataclass
class Call:
    at: float
    request: TokenRequest
    deadline: float


class FakeSource:
    """Counts calls; can be held at a gate, made to fail, or made to return a fixed expiry."""

    def __init__(self, vt: VirtualTime) -> None:
        self.vt = vt
        self.lifetime = 3600.0
        self.expires_on: float | None = None
        self.gate: asyncio.Event | None = None
        self.error: Callable[[], Exception] | None = None
        self.on_fetch: Callable[[], None] | None = None
        self.calls: list[Call] = []
        self.finished = 0
        self.cancelled = 0
        self._changed = asyncio.Event()

    async def fetch(self, request: TokenRequest, *, deadline: float) -> Token:
        self.calls.append(Call(self.vt.now, request, deadline))
        number = len(self.calls)
        self._changed.set()
        try:
            if self.on_fetch is not None:
                self.on_fetch()
            if self.gate is not None:
                await self.gate.wait()
            if self.error is not None:
                raise self.error()
            now = self.vt.wall()
            expires = self.expires_on if self.expires_on is not None else now + self.lifetime
            return Token(f"token-{number}", request.resource, "Bearer", "cid", expires, now, now)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            # Set before the cache sees the outcome; it handles it in the same loop step, so a
            # test woken by this sees the cache's state after the fetch.
            self.finished += 1
            self._changed.set()

    async def _until(self, done: Callable[[], bool]) -> None:
        async with asyncio.timeout(GUARD_S):
            while not done():
                self._changed.clear()
                await self._changed.wait()

    async def started(self, n: int) -> None:
        await self._until(lambda: len(self.calls) >= n)

    async def settled(self, n: int) -> None:
        await self._until(lambda: self.finished >= n)


class Env:
    def __init__(self, vt: VirtualTime, **settings: Any) -> None:
        self.vt = vt
        self.metrics = Metrics(CollectorRegistry())
        self.source = FakeSource(vt)
        self.cache = TokenCache(TokenCacheSettings(**settings), self.metrics, clock=vt.wall, rand=lambda: 0.0)

    def deadline(self, seconds: float = 10.0) -> float:
        return self.vt.now + seconds

    async def get(self, req: TokenRequest = REQ, *, seconds: float = 10.0) -> Token:
        return await self.cache.get(req, self.source, deadline=self.deadline(seconds))

    def spawn(self, req: TokenRequest = REQ, *, seconds: float = 10.0) -> asyncio.Task[Token]:
        return asyncio.get_running_loop().create_task(self.get(req, seconds=seconds))

    def count(self, result: str) -> float:
        return (
            self.metrics.registry.get_sample_value("nmi_token_cache_requests_total", {"result": result}) or 0
        )

    def refreshes(self, outcome: str) -> float:
        value = self.metrics.registry.get_sample_value("nmi_token_refreshes_total", {"outcome": outcome})
        return value or 0


@pytest.fixture
async def vt() -> AsyncIterator[VirtualTime]:
    loop = asyncio.get_running_loop()
    assert isinstance(loop, asyncio.SelectorEventLoop), "virtual time patches the selector"
    selector = loop._selector  # type: ignore[attr-defined]
    real_select = selector.select
    clock = VirtualTime(loop.time())

    def select(timeout: float | None = None) -> Any:
        if timeout is not None:
            clock.now += timeout
            return real_select(0)
        return real_select(None)

    loop.time = clock.time  # type: ignore[method-assign]
    selector.select = select
    try:
        yield clock
    finally:
        selector.select = real_select
        del loop.time


@pytest.fixture
async def env(vt: VirtualTime) -> AsyncIterator[Env]:
    environment = Env(vt)
    yield environment
    await environment.cache.close()
    pending = asyncio.all_tasks() - {asyncio.current_task()}
    assert not pending, f"tasks left after close(): {pending}"


def make_env(vt: VirtualTime, **settings: Any) -> Env:
    return Env(vt, **settings)


# --- hit, miss, single flight -------------------------------------------------------------------


async def test_miss_then_hit_fetches_once(env: Env) -> None:
    first = await env.get()
    second = await env.get()
    assert second is first
    assert env.cache.peek(REQ) is first
    assert len(env.source.calls) == 1
    assert (env.count("miss"), env.count("hit"), env.count("stale")) == (1, 2, 0)
    assert len(env.cache) == 1


async def test_peek_misses_without_fetching(env: Env) -> None:
    assert env.cache.peek(REQ) is None
    assert env.source.calls == []
    assert env.count("hit") == env.count("miss") == 0


async def test_thousand_concurrent_cold_gets_share_one_fetch(env: Env) -> None:
    env.source.gate = asyncio.Event()
    tasks = [env.spawn() for _ in range(1000)]
    await env.source.started(1)
    env.source.gate.set()
    tokens = await asyncio.gather(*tasks)
    assert len(env.source.calls) == 1
    assert all(t is tokens[0] for t in tokens)
    assert env.count("miss") == 1000


async def test_different_keys_fetch_separately(env: Env) -> None:
    env.source.gate = asyncio.Event()
    requests = [REQ, request(resource="https://management.azure.com/"), request(OTHER), request(None)]
    tasks = [env.spawn(r) for r in requests for _ in range(3)]
    await env.source.started(4)
    env.source.gate.set()
    await asyncio.gather(*tasks)
    assert len(env.source.calls) == 4
    assert {c.request for c in env.source.calls} == set(requests)
    assert len(env.cache) == 4


async def test_cancelled_waiter_does_not_cancel_the_fetch_for_others(env: Env) -> None:
    env.source.gate = asyncio.Event()
    leaving, staying = env.spawn(), env.spawn()
    await env.source.started(1)
    leaving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leaving
    env.source.gate.set()
    token = await staying
    assert env.source.cancelled == 0
    assert len(env.source.calls) == 1
    assert env.cache.peek(REQ) is token


async def test_waiter_deadline_gives_unavailable_while_fetch_continues(env: Env) -> None:
    env.source.gate = asyncio.Event()
    start = env.vt.now
    impatient, patient = env.spawn(seconds=1), env.spawn(seconds=20)
    await env.source.started(1)
    with pytest.raises(UpstreamUnavailable):
        await impatient
    assert env.vt.now == pytest.approx(start + 1)
    assert not patient.done()
    env.source.gate.set()
    token = await patient
    assert env.source.cancelled == 0
    assert env.source.calls[0].deadline >= start + FETCH_TIMEOUT_S, "one caller's deadline cuts no fetch"
    assert env.cache.peek(REQ) is token


async def test_all_waiters_leaving_cancels_the_fetch(env: Env) -> None:
    """A fetch nobody waits for would only hold a place in the node's upstream budget."""
    env.source.gate = asyncio.Event()
    waiter = env.spawn(seconds=1)
    await env.source.started(1)
    with pytest.raises(UpstreamUnavailable):
        await waiter
    await env.source.settled(1)
    assert env.source.cancelled == 1
    assert env.cache.peek(REQ) is None
    env.source.gate.set()
    assert await env.spawn(seconds=5) is not None
    assert len(env.source.calls) == 2


async def test_deadline_already_passed_fetches_nothing(env: Env) -> None:
    with pytest.raises(UpstreamUnavailable):
        await env.cache.get(REQ, env.source, deadline=env.vt.now)
    assert env.source.calls == []


# --- errors ---------------------------------------------------------------------------------------


def refused() -> Exception:
    return UpstreamRefused("invalid_request", "identity not found", upstream_status=400)


async def test_fetch_error_reaches_every_waiter_and_is_not_cached(env: Env) -> None:
    env.source.gate = asyncio.Event()
    env.source.error = refused
    tasks = [env.spawn() for _ in range(50)]
    await env.source.started(1)
    env.source.gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, UpstreamRefused) for r in results)
    assert len(env.source.calls) == 1
    assert len(env.cache) == 0

    env.source.error = None
    env.source.gate = None
    token = await env.get()
    assert token.access_token == "token-2"
    assert len(env.source.calls) == 2


async def test_failing_key_is_fetched_at_most_once_per_holdoff(env: Env) -> None:
    env.source.error = refused
    for _ in range(5):
        with pytest.raises(UpstreamRefused):
            await env.get()
    times = [c.at for c in env.source.calls]
    assert len(times) == 5
    assert all(b - a >= FAILURE_HOLDOFF_S - 1e-9 for a, b in itertools.pairwise(times))


async def test_storm_after_failure_joins_one_delayed_fetch(env: Env) -> None:
    env.source.error = refused
    with pytest.raises(UpstreamRefused):
        await env.get()
    failed_at = env.source.calls[0].at
    storm = [env.spawn() for _ in range(200)]
    results = await asyncio.gather(*storm, return_exceptions=True)
    assert all(isinstance(r, UpstreamRefused) for r in results), "each got a real upstream answer"
    assert len(env.source.calls) == 2
    assert env.source.calls[1].at == pytest.approx(failed_at + FAILURE_HOLDOFF_S)


async def test_failing_refresh_leaves_no_unretrieved_task_exception(env: Env) -> None:
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    try:
        await env.get()
        env.cache.peek(REQ)
        env.source.error = refused
        await env.source.settled(2)
        await asyncio.sleep(0)  # let the done callbacks run, then collect the task
        gc.collect()
    finally:
        loop.set_exception_handler(previous)
    assert env.refreshes("failed") == 1
    assert reported == []


# --- refresh ------------------------------------------------------------------------------------


async def test_used_entry_is_refreshed_in_background_at_policy_time(env: Env) -> None:
    start = env.vt.now
    first = await env.get()
    assert env.cache.peek(REQ) is first  # used since stored
    await env.source.settled(2)
    # 1 h token, default 300 s margin, no jitter: half-life comes first.
    assert env.source.calls[1].at == pytest.approx(start + 1800)
    refreshed = env.cache.peek(REQ)
    assert refreshed is not None and refreshed.access_token == "token-2"
    assert env.refreshes("success") == 1
    assert env.count("miss") == 1


async def test_jittered_refresh_time_is_used(vt: VirtualTime) -> None:
    env = make_env(vt)
    env.cache = TokenCache(TokenCacheSettings(), env.metrics, clock=vt.wall, rand=lambda: 0.5)
    start = vt.now
    await env.get()
    env.cache.peek(REQ)
    await env.source.settled(2)
    assert env.source.calls[1].at == pytest.approx(start + 1800 - 0.5 * 0.1 * 3600)
    await env.cache.close()


async def test_idle_entry_is_not_refreshed_and_is_dropped_at_expiry(env: Env) -> None:
    await env.get()
    await asyncio.sleep(3600)
    assert len(env.source.calls) == 1
    assert len(env.cache) == 0


async def test_entry_used_after_its_refresh_time_is_refreshed_on_that_hit(env: Env) -> None:
    start = env.vt.now
    first = await env.get()
    await asyncio.sleep(2000)  # past refresh time, idle: nothing happened
    assert len(env.source.calls) == 1
    assert env.cache.peek(REQ) is first, "still served while refreshing"
    await env.source.settled(2)
    assert env.source.calls[1].at == pytest.approx(start + 2000)
    assert env.cache.peek(REQ) is not first


async def test_refresh_failure_keeps_serving_and_retries_after_interval(env: Env) -> None:
    first = await env.get()
    env.cache.peek(REQ)
    env.source.error = lambda: UpstreamUnavailable("IMDS down")
    await env.source.settled(2)
    assert env.refreshes("failed") == 1
    assert env.cache.peek(REQ) is first
    env.source.error = None
    await env.source.settled(3)
    assert env.source.calls[2].at == pytest.approx(env.source.calls[1].at + 30)
    fresh = env.cache.peek(REQ)
    assert fresh is not None and fresh.access_token == "token-3"
    assert env.refreshes("success") == 1


async def test_failed_refresh_is_retried_without_further_traffic(env: Env) -> None:
    await env.get()
    env.cache.peek(REQ)
    env.source.error = lambda: UpstreamUnavailable("IMDS down")
    await env.source.settled(2)
    env.source.error = None
    await env.source.settled(3)
    assert env.source.calls[2].at == pytest.approx(env.source.calls[1].at + 30)
    assert env.refreshes("success") == 1


async def test_at_most_one_refresh_attempt_per_interval_under_traffic(env: Env) -> None:
    await env.get()
    env.cache.peek(REQ)
    env.source.error = lambda: UpstreamUnavailable("IMDS down")
    await env.source.settled(2)
    for _ in range(300):  # a hit every second for five minutes
        assert env.cache.peek(REQ) is not None
        await asyncio.sleep(1)
    attempts = [c.at for c in env.source.calls[1:]]
    assert all(b - a >= 30 - 1e-6 for a, b in itertools.pairwise(attempts))
    assert 10 <= len(attempts) <= 11


async def test_refresh_returning_the_same_expiry_does_not_loop(env: Env) -> None:
    # IMDS may hand back its own cached token: a short remaining lifetime, refreshed "now" again.
    env.source.expires_on = env.vt.wall() + 250
    start = env.vt.now
    await env.get()
    for _ in range(120):
        env.cache.peek(REQ)
        await asyncio.sleep(1)
    attempts = [c.at - start for c in env.source.calls]
    assert all(b - a >= 30 - 1e-6 for a, b in itertools.pairwise(attempts))
    assert 4 <= len(attempts) <= 5, "refreshed, but once per interval"


async def test_wall_clock_going_back_delays_the_refresh(env: Env) -> None:
    start = env.vt.now
    await env.get()
    env.cache.peek(REQ)
    env.vt.skew = -600.0
    await env.source.settled(2)
    assert env.source.calls[1].at == pytest.approx(start + 2400)


# --- expiry and keys ------------------------------------------------------------------------------


async def test_expired_token_is_not_served(env: Env) -> None:
    first = await env.get()
    env.vt.skew = 3600.0  # wall clock jumps past expiry; no timer has fired
    assert env.cache.peek(REQ) is None
    second = await env.get()
    assert second is not first
    assert len(env.source.calls) == 2
    assert env.count("stale") == 1


async def test_token_in_safety_window_is_not_served(env: Env) -> None:
    await env.get()
    env.vt.skew = 3600 - 61
    assert env.cache.peek(REQ) is not None
    env.vt.skew = 3600 - 60
    assert env.cache.peek(REQ) is None


async def test_token_shorter_than_safety_window_is_returned_not_cached(env: Env) -> None:
    env.source.lifetime = 30
    token = await env.get()
    assert token.access_token == "token-1"
    assert len(env.cache) == 0
    await env.get()
    assert len(env.source.calls) == 2


async def test_changed_identity_never_gets_the_old_token(env: Env) -> None:
    old = await env.get()
    edited = dataclasses.replace(IDENT, client_id="client-z")
    new = await env.get(request(edited))
    assert new is not old
    assert len(env.source.calls) == 2
    unrelated_edit = dataclasses.replace(IDENT, resource_version="42")
    assert await env.get(request(unrelated_edit)) is old


# --- invalidation, eviction -----------------------------------------------------------------------


async def test_invalidate_identity_drops_only_its_entries(env: Env) -> None:
    await env.get()
    await env.get(request(resource="https://storage.azure.com/"))
    kept = await env.get(request(OTHER))
    env.cache.invalidate_identity(ObjectKey("team-a", "reader"))
    assert len(env.cache) == 1
    assert env.cache.peek(request(OTHER)) is kept
    assert env.cache.peek(REQ) is None
    await env.get()
    assert len(env.source.calls) == 4


async def test_invalidate_accepts_an_identity_and_a_predicate(env: Env) -> None:
    await env.get()
    await env.get(request(OTHER))
    env.cache.invalidate_identity(IDENT)
    assert env.cache.peek(REQ) is None
    assert env.cache.invalidate(lambda k: k.identity.name == "writer") == 1
    assert len(env.cache) == 0


async def test_invalidate_cancels_a_background_refresh(env: Env) -> None:
    await env.get()
    env.cache.peek(REQ)
    env.source.gate = asyncio.Event()
    await env.source.started(2)
    env.cache.invalidate_identity(IDENT)
    await env.source.settled(2)
    assert env.source.cancelled == 1
    assert len(env.cache) == 0
    assert env.refreshes("success") == env.refreshes("failed") == 0


async def test_fetch_in_flight_during_invalidate_serves_its_callers_but_is_not_cached(env: Env) -> None:
    env.source.gate = asyncio.Event()
    waiter = env.spawn()
    await env.source.started(1)
    env.cache.invalidate_identity(IDENT)
    env.source.gate.set()
    token = await waiter
    assert token.access_token == "token-1"
    assert len(env.cache) == 0
    env.source.gate = None
    await env.get()
    assert len(env.source.calls) == 2


async def test_source_reporting_rotated_credentials_mid_fetch_keeps_its_own_result(env: Env) -> None:
    env.source.on_fetch = lambda: env.cache.invalidate_identity(IDENT)
    token = await env.get()
    assert env.cache.peek(REQ) is token
    assert env.source.cancelled == 0


async def test_max_entries_evicts_the_longest_fetched(vt: VirtualTime) -> None:
    env = make_env(vt, max_entries=3)
    resources = [f"https://r{i}.example/" for i in range(4)]
    for resource in resources:
        await env.get(request(resource=resource))
        await asyncio.sleep(1)
    assert len(env.cache) == 3
    assert env.cache.peek(request(resource=resources[0])) is None
    assert all(env.cache.peek(request(resource=r)) is not None for r in resources[1:])
    await env.cache.close()


# --- warm start, prefetch, shutdown ---------------------------------------------------------------


async def test_recent_resources_most_recent_first_and_bounded(env: Env) -> None:
    for i in range(RECENT_PER_IDENTITY + 4):
        await env.get(request(resource=f"https://r{i}.example/"))
    await env.get(request(OTHER, "https://other.example/"))
    await env.get(request(None, "https://node.example/"))
    recent = env.cache.recent_resources(IDENT)
    assert len(recent) == RECENT_PER_IDENTITY
    assert recent[0] == f"https://r{RECENT_PER_IDENTITY + 3}.example/"
    assert "https://r0.example/" not in recent
    assert env.cache.recent_resources(ObjectKey("team-b", "writer")) == ["https://other.example/"]


async def test_failed_resource_is_not_remembered(env: Env) -> None:
    env.source.error = refused
    with pytest.raises(UpstreamRefused):
        await env.get()
    assert env.cache.recent_resources(IDENT) == []


async def test_prefetch_counts_apart_and_does_not_keep_an_idle_token_alive(env: Env) -> None:
    token = await env.cache.prefetch(REQ, env.source, deadline=env.deadline())
    assert env.count("prefetch") == 1
    assert env.count("miss") == env.count("hit") == 0
    assert await env.cache.prefetch(REQ, env.source, deadline=env.deadline()) is token
    await asyncio.sleep(3600)
    assert len(env.source.calls) == 1, "never used, so never refreshed"


async def test_prefetched_token_serves_the_pod(env: Env) -> None:
    token = await env.cache.prefetch(REQ, env.source, deadline=env.deadline())
    assert await env.get() is token
    assert env.count("hit") == 1


async def test_close_cancels_everything_and_fails_waiters_cleanly(vt: VirtualTime) -> None:
    env = make_env(vt)
    await env.get()
    env.cache.peek(REQ)
    env.source.gate = asyncio.Event()
    await env.source.started(2)  # a background refresh is in flight
    waiter = env.spawn(request(OTHER))  # and a miss with a caller
    await env.source.started(3)
    await env.cache.close()
    with pytest.raises(UpstreamUnavailable):
        await waiter
    assert env.source.cancelled == 2
    assert len(env.cache) == 0
    assert asyncio.all_tasks() == {asyncio.current_task()}
    with pytest.raises(UpstreamUnavailable):
        await env.get()
    assert len(env.source.calls) == 3
