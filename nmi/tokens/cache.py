"""The token cache: serve from memory, fetch once per key, refresh ahead of expiry.

The original NMI had no cache (nmi-spec §3.6, §9.1): every request went upstream, so one busy
pod could exhaust the node's IMDS quota for all. This cache sits in front of the token sources.

Serving. A hit is one dict lookup and two float compares (``peek``/``get``), no task, no await.
A token is served while it is more than ``expiry_safety_s`` from expiry.

Single flight. At most one upstream fetch per key runs at a time, whether started by a miss or
by a refresh. Callers await it through ``asyncio.shield`` under their own deadline: a caller that
is cancelled or whose deadline passes leaves (the latter with ``UpstreamUnavailable``) and the
fetch carries on for the others and for the cache. The fetch's own deadline is the longest of
the first caller's and ``fetch_timeout_s``, so one impatient caller cannot cut it short.

Errors are not cached: every request after a failure gets a real upstream answer. To protect
upstream from a storm against a failing key, a new fetch for a key starts no sooner than
``FAILURE_HOLDOFF_S`` after the previous failed one started; requests arriving meanwhile join
that delayed fetch. We chose waiting over replaying the last error for a second: a replay is an
error cache, and a client would see an answer that upstream never gave it.

Refreshing. Each entry has one timer (``loop.call_at``) at its policy refresh time
(``policy.refresh_at``: half-life or margin before expiry, jittered earlier). When it fires, an
entry served since it was stored is refreshed in the background; an idle entry is not, and is
dropped when it stops being servable. So upstream load is bounded by what pods use, not by what
they once asked for. A hit past the refresh time also starts the refresh (a clock jump, or an
idle entry used again). Refresh attempts per key are at least ``min_refresh_interval_s`` apart;
a failed refresh keeps the old token, which is served while servable, and is retried after that
interval. A refresh may return a token that expires no later than the old one (IMDS hands out
its own cached token); the interval is what stops that from becoming a refresh loop.

Bounds. At most ``max_entries`` tokens; when full, the entry fetched longest ago is evicted
(an entry moves to the back when it is fetched or refreshed, and only used entries are
refreshed, so this approximates least recently used without touching the dict on a hit).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

from nmi.metrics import Metrics
from nmi.settings import TokenCacheSettings
from nmi.tokens.policy import IDENTITY_KIND, CacheKey, cache_key, refresh_at
from podidentity.errors import UpstreamUnavailable
from podidentity.model import AzureIdentity, ObjectKey
from podidentity.tokens import Token, TokenRequest, TokenSource

FAILURE_HOLDOFF_S = 1.0
"""A key whose fetch failed is not fetched again sooner than this after the failed attempt began."""
FETCH_TIMEOUT_S = 30.0
"""Deadline of a shared fetch or a refresh; the source's per-attempt cap and backoff usually end it sooner."""
RECENT_IDENTITIES = 4096
RECENT_PER_IDENTITY = 16
_TIMER_SLACK_S = 0.5
"""Loop and wall clocks drift apart; a timer this close to its wall-clock time counts as on time."""


class _Entry:
    __slots__ = (
        "next_attempt",
        "refresh_at",
        "request",
        "serve_until",
        "source",
        "timer",
        "timer_at",
        "token",
        "used",
    )

    def __init__(
        self,
        request: TokenRequest,
        source: TokenSource,
        token: Token,
        serve_until: float,
        refresh_at: float,
        next_attempt: float,
    ) -> None:
        self.request = request
        self.source = source
        self.token = token
        self.serve_until = serve_until
        """Wall clock."""
        self.refresh_at = refresh_at
        """Wall clock."""
        self.next_attempt = next_attempt
        """Loop clock: no refresh attempt before this."""
        self.used = False
        """Served since stored: only used entries are refreshed."""
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = 0.0


class _Flight:
    __slots__ = ("background", "task", "waiters")

    def __init__(self, background: bool) -> None:
        self.background = background
        self.waiters = 0
        self.task: asyncio.Task[Token]


def _retrieve(task: asyncio.Task[Token]) -> None:
    # A refresh nobody waited for still fails visibly through metrics; mark its exception seen so
    # asyncio does not log "Task exception was never retrieved" on top.
    if not task.cancelled():
        task.exception()


def _current_task() -> asyncio.Task[object] | None:
    try:
        return asyncio.current_task()
    except RuntimeError:  # Called outside the loop (a synchronous watcher callback).
        return None


class TokenCache:
    def __init__(
        self,
        settings: TokenCacheSettings,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.time,
        loop: asyncio.AbstractEventLoop | None = None,
        rand: Callable[[], float] = random.random,
        fetch_timeout_s: float = FETCH_TIMEOUT_S,
    ) -> None:
        self._settings = settings
        self._clock = clock
        self._loop = loop
        self._rand = rand
        self._fetch_timeout_s = fetch_timeout_s
        self._entries: dict[CacheKey, _Entry] = {}
        self._flights: dict[CacheKey, _Flight] = {}
        self._tasks: set[asyncio.Task[Token]] = set()
        self._failed_at: dict[CacheKey, float] = {}
        self._recent: dict[ObjectKey, dict[str, None]] = {}
        self._closed = False
        # Label children resolved once: .labels() locks and allocates.
        self._m_hit = metrics.token_cache.labels("hit")
        self._m_miss = metrics.token_cache.labels("miss")
        self._m_stale = metrics.token_cache.labels("stale")
        self._m_prefetch = metrics.token_cache.labels("prefetch")
        self._m_refreshed = metrics.token_refreshes.labels("success")
        self._m_refresh_failed = metrics.token_refreshes.labels("failed")

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    def __len__(self) -> int:
        return len(self._entries)

    # --- serving ----------------------------------------------------------------------------

    def peek(self, request: TokenRequest) -> Token | None:
        """The cached token if servable now, else ``None``; never awaits (the handler's fast path)."""
        return self.peek_key(cache_key(request))

    def peek_key(self, key: CacheKey) -> Token | None:
        """``peek`` for a key the caller kept from an earlier request."""
        token = self._serve(key, True)
        if token is not None:
            self._m_hit.inc()
        return token

    async def get(
        self,
        request: TokenRequest,
        source: TokenSource,
        *,
        deadline: float,
        admit: Callable[[], AbstractAsyncContextManager[None]] | None = None,
    ) -> Token:
        """A servable token for ``request``, fetched from ``source`` if needed, by ``deadline`` (loop time).

        ``admit`` guards a miss only (a caller's share of the upstream, say); a hit never waits for it.
        Raises what the source raises, or ``UpstreamUnavailable`` when the deadline passes first.
        """
        key = cache_key(request)
        token = self._serve(key, True)
        if token is not None:
            self._m_hit.inc()
            return token
        if admit is None:
            return await self._miss(key, request, source, deadline)
        async with admit():
            # Another caller's fetch may have filled the entry while this one waited to be admitted.
            token = self._serve(key, True)
            if token is not None:
                self._m_hit.inc()
                return token
            return await self._miss(key, request, source, deadline)

    async def _miss(
        self, key: CacheKey, request: TokenRequest, source: TokenSource, deadline: float
    ) -> Token:
        if key in self._entries:
            self._m_stale.inc()
            self._drop(key)
        else:
            self._m_miss.inc()
        token = await self._join(key, request, source, deadline)
        self._remember(key)
        return token

    async def prefetch(self, request: TokenRequest, source: TokenSource, *, deadline: float) -> Token:
        """Warm the cache for a pod that has not asked yet (counted as ``prefetch``, not hit or miss).

        The entry is not marked used, so a token nobody asks for is dropped instead of refreshed.
        """
        self._m_prefetch.inc()
        key = cache_key(request)
        token = self._serve(key, False)
        if token is not None:
            return token
        self._drop(key)
        return await self._join(key, request, source, deadline)

    def _serve(self, key: CacheKey, use: bool) -> Token | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        now = self._clock()
        if now >= entry.serve_until:
            return None
        if use:
            entry.used = True
            if now >= entry.refresh_at:
                self._kick(key, entry)
        return entry.token

    # --- fetching ---------------------------------------------------------------------------

    async def _join(
        self, key: CacheKey, request: TokenRequest, source: TokenSource, deadline: float
    ) -> Token:
        if self._closed:
            raise UpstreamUnavailable("NMI is shutting down")
        loop = self.loop
        now = loop.time()
        if deadline <= now:
            raise UpstreamUnavailable("no time was left to get a token")
        flight = self._flights.get(key)
        if flight is None:
            flight = self._start(key, request, source, False, max(deadline, now + self._fetch_timeout_s))
        flight.waiters += 1
        try:
            async with asyncio.timeout_at(deadline):
                return await asyncio.shield(flight.task)
        except TimeoutError:
            raise UpstreamUnavailable("timed out waiting for a token from upstream") from None
        except asyncio.CancelledError:
            # The shared fetch was cancelled (shutdown, or its identity was invalidated) while this
            # caller was not: that is an upstream outcome for the caller, not its own cancellation.
            me = asyncio.current_task()
            if flight.task.cancelled() and me is not None and not me.cancelling():
                raise UpstreamUnavailable("the token fetch was abandoned") from None
            raise
        finally:
            flight.waiters -= 1
            if flight.waiters == 0 and not flight.background and not flight.task.done():
                # Everyone who asked has left (disconnected or out of time): the fetch would only
                # hold a place in the node's upstream budget ahead of pods that are still waiting.
                flight.task.cancel()

    def _start(
        self, key: CacheKey, request: TokenRequest, source: TokenSource, background: bool, deadline: float
    ) -> _Flight:
        flight = _Flight(background)
        name = "nmi-token-refresh" if background else "nmi-token-fetch"
        flight.task = self.loop.create_task(self._fetch(key, flight, request, source, deadline), name=name)
        self._tasks.add(flight.task)
        flight.task.add_done_callback(self._tasks.discard)
        flight.task.add_done_callback(_retrieve)
        self._flights[key] = flight
        return flight

    async def _fetch(
        self, key: CacheKey, flight: _Flight, request: TokenRequest, source: TokenSource, deadline: float
    ) -> Token:
        loop = self.loop
        try:
            failed_at = self._failed_at.get(key)
            if failed_at is not None:
                wait = failed_at + FAILURE_HOLDOFF_S - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
            started = loop.time()
            try:
                token = await source.fetch(request, deadline=deadline)
            except asyncio.CancelledError:
                raise
            except Exception:
                if self._flights.get(key) is flight:
                    self._note_failure(key, started)
                    if flight.background:
                        self._m_refresh_failed.inc()
                        self._retry_later(key)
                raise
            if self._flights.get(key) is flight:
                self._failed_at.pop(key, None)
                if flight.background:
                    self._m_refreshed.inc()
                    self._remember(key)
                self._store(key, request, source, token, started)
            return token
        finally:
            if self._flights.get(key) is flight:
                del self._flights[key]

    def _note_failure(self, key: CacheKey, started: float) -> None:
        failed = self._failed_at
        failed[key] = started
        if len(failed) > self._settings.max_entries:
            cutoff = started - FAILURE_HOLDOFF_S
            for k in [k for k, t in failed.items() if t < cutoff]:
                del failed[k]

    # --- entries and timers -----------------------------------------------------------------

    def _store(
        self, key: CacheKey, request: TokenRequest, source: TokenSource, token: Token, started: float
    ) -> None:
        settings = self._settings
        now = self._clock()
        self._drop(key)
        serve_until = token.expires_on - settings.expiry_safety_s
        if now >= serve_until:
            return  # Returned to its callers, but too short-lived to serve anyone else.
        entries = self._entries
        while entries and len(entries) >= settings.max_entries:
            self._drop(next(iter(entries)))
        at = refresh_at(
            token,
            margin_s=settings.refresh_margin_s,
            jitter_fraction=settings.jitter_fraction,
            rand=self._rand(),
        )
        entry = _Entry(request, source, token, serve_until, at, started + settings.min_refresh_interval_s)
        entries[key] = entry
        self._arm(key, entry, max(self._loop_time_of(at, now), entry.next_attempt))

    def _drop(self, key: CacheKey) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None and entry.timer is not None:
            entry.timer.cancel()
            entry.timer = None

    def _loop_time_of(self, wall: float, now: float) -> float:
        return self.loop.time() + (wall - now)

    def _arm(self, key: CacheKey, entry: _Entry, when: float) -> None:
        if entry.timer is not None:
            if entry.timer_at == when:
                return
            entry.timer.cancel()
        entry.timer_at = when
        entry.timer = self.loop.call_at(when, self._on_timer, key, entry)

    def _on_timer(self, key: CacheKey, entry: _Entry) -> None:
        entry.timer = None
        if self._entries.get(key) is not entry:
            return
        now = self._clock()
        slack = now + _TIMER_SLACK_S
        if slack >= entry.serve_until:
            self._drop(key)
        elif slack < entry.refresh_at:
            # The wall clock went back since the timer was set: wait for the policy time again.
            self._arm(key, entry, self._loop_time_of(entry.refresh_at, now))
        elif not entry.used or key in self._flights:
            # Idle: dropped once not servable. Or a fetch runs already, which replaces the entry
            # or re-arms it; the timer then only makes sure the entry cannot outlive its token.
            self._arm(key, entry, self._loop_time_of(entry.serve_until, now))
        else:
            self._kick(key, entry)

    def _kick(self, key: CacheKey, entry: _Entry) -> None:
        """Start a background refresh unless one runs or the last attempt was too recent."""
        if self._closed or key in self._flights:
            return
        now = self.loop.time()
        if now < entry.next_attempt:
            self._arm(key, entry, entry.next_attempt)
            return
        entry.next_attempt = now + self._settings.min_refresh_interval_s
        self._start(key, entry.request, entry.source, True, now + self._fetch_timeout_s)

    def _retry_later(self, key: CacheKey) -> None:
        entry = self._entries.get(key)
        if entry is not None:
            self._arm(key, entry, entry.next_attempt)

    # --- invalidation, warm start, shutdown -------------------------------------------------

    def invalidate(self, predicate: Callable[[CacheKey], bool]) -> int:
        """Drop the entries whose key matches; returns how many were dropped.

        Fetches in flight for matching keys are detached so their results are not cached (their
        callers still get them); those nobody waits for are cancelled. A fetch calling this
        itself (a source that noticed rotated credentials mid-fetch) already uses the new
        credentials and is left alone.
        """
        dropped = [k for k in self._entries if predicate(k)]
        for k in dropped:
            self._drop(k)
        me = _current_task()
        for k in [k for k in self._flights if predicate(k)]:
            flight = self._flights[k]
            if flight.task is me:
                continue
            del self._flights[k]
            if flight.waiters == 0:
                flight.task.cancel()
        for k in [k for k in self._failed_at if predicate(k)]:
            del self._failed_at[k]
        return len(dropped)

    def invalidate_identity(self, identity: ObjectKey | AzureIdentity) -> None:
        """Drop every token of the AzureIdentity ``namespace/name`` (deleted, or credentials rotated)."""
        namespace, name = identity.namespace, identity.name
        self.invalidate(
            lambda k: (
                k.identity.kind == IDENTITY_KIND
                and k.identity.namespace == namespace
                and k.identity.name == name
            )
        )

    def recent_resources(self, identity: ObjectKey | AzureIdentity) -> list[str]:
        """Resources recently fetched for the AzureIdentity ``namespace/name``, most recent first."""
        resources = self._recent.get(ObjectKey(identity.namespace, identity.name))
        return list(reversed(resources)) if resources else []

    def _remember(self, key: CacheKey) -> None:
        ident = key.identity
        if ident.kind != IDENTITY_KIND:
            return
        recent = self._recent
        okey = ObjectKey(ident.namespace, ident.name)
        resources = recent.pop(okey, None) or {}
        recent[okey] = resources
        resources.pop(key.resource, None)
        resources[key.resource] = None
        if len(resources) > RECENT_PER_IDENTITY:
            del resources[next(iter(resources))]
        if len(recent) > RECENT_IDENTITIES:
            del recent[next(iter(recent))]

    async def close(self) -> None:
        """Cancel every timer and fetch and wait for them; the cache serves nothing afterwards."""
        self._closed = True
        for entry in self._entries.values():
            if entry.timer is not None:
                entry.timer.cancel()
                entry.timer = None
        self._entries.clear()
        self._flights.clear()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
