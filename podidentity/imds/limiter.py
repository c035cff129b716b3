"""The per-node budget for upstream token requests: a concurrency cap, a rate, and a shared pause.

IMDS throttles per VM (5 concurrent identity requests, 20 per second), so one noisy pod must not
spend the budget of every other pod on the node (nmi-spec §9.1). Every upstream attempt takes a
slot; a 429 from upstream pauses every caller, not only the one that saw it.

Waiting is fair between keys (a key is what is being fetched: an identity and resource), round
robin: a key that has had fewer turns lately goes first, and among equals the one that has waited
longest (since its last turn, or since it first started waiting, which it keeps when its caller
gives up and a new one asks again). So during an outage every waiting key is tried once before any
is tried twice, instead of the first few keys being retried while the others, re-queued at the back
each time their SDK times out and asks again, never reach the front.
Only the head of the queue ever checks the budget, so nobody overtakes a better-ranked waiter.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Callable, Hashable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from podidentity.errors import UpstreamUnavailable


class SlotTimeout(UpstreamUnavailable):
    """The caller's deadline passed while it waited for its turn upstream."""


RANK_MEMORY_S = 120.0
"""How long a key's place (its first wait, its last turn) is remembered after it was last used."""
HOLD_PLACE_S = 1.5
"""How long a key whose caller gave up keeps its turn against worse-ranked keys (SDKs ask again
within a second or two)."""


@dataclass(order=True, slots=True)
class _Waiter:
    rank: tuple[int, float]
    """(turns the key had lately, since when it has waited)."""
    seq: int
    event: asyncio.Event = field(compare=False, default_factory=asyncio.Event)


class UpstreamLimiter:
    """Grants upstream slots under ``max_concurrent`` and a token bucket of ``rate_per_s``.

    ``clock`` must share ``loop.time()``'s timebase, because deadlines are ``loop.time()`` values;
    it defaults to the running loop's clock. ``rate_per_s <= 0`` disables the rate.

    Example::

        limiter = UpstreamLimiter(5, 15.0)
        async with limiter.slot(deadline=loop.time() + 2):
            ...  # one upstream attempt
    """

    def __init__(
        self,
        max_concurrent: int,
        rate_per_s: float,
        *,
        burst: float | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if max_concurrent < 1:
            raise ValueError("max_concurrent must be at least 1")
        self._max = max_concurrent
        self._rate = rate_per_s
        # A burst as large as the concurrency cap lets an idle node answer a cold start at once.
        self._burst = float(burst if burst is not None else max_concurrent)
        self._clock = clock
        self._tokens = self._burst
        self._refilled_at: float | None = None
        self._in_use = 0
        self._paused_until = 0.0
        self._queue: list[_Waiter] = []
        self._seq = itertools.count()
        self._first_wait: dict[Hashable, float] = {}
        self._turns: dict[Hashable, tuple[int, float]] = {}
        """Per key: how many turns lately, and when the last one was."""
        self._absent: dict[Hashable, tuple[tuple[int, float], float]] = {}
        """Keys whose caller left the queue unserved: (their rank, until when their place is kept)."""

    @property
    def in_flight(self) -> int:
        return self._in_use

    @property
    def waiting(self) -> int:
        return len(self._queue)

    @property
    def paused_until(self) -> float:
        return self._paused_until

    def pause_until(self, when: float) -> None:
        """Hold every new slot until ``when`` (a clock value); a shorter pause never cuts a longer one."""
        self._paused_until = max(self._paused_until, when)

    def retry_after_hint(self) -> float:
        """Seconds a refused caller should wait before asking again: the pause, else the queue's turn."""
        now = self._now()
        if now < self._paused_until:
            return self._paused_until - now
        if self._rate > 0:
            return (len(self._queue) + 1) / self._rate
        return 1.0

    @asynccontextmanager
    async def slot(self, *, deadline: float, key: Hashable | None = None) -> AsyncIterator[None]:
        await self._acquire(deadline, key)
        try:
            yield
        finally:
            self._in_use -= 1
            self._wake_head()

    def _now(self) -> float:
        if self._clock is None:
            self._clock = asyncio.get_running_loop().time
        return self._clock()

    async def _acquire(self, deadline: float, key: Hashable | None) -> None:
        now = self._now()
        if now >= deadline:
            raise SlotTimeout("no time left to ask the upstream", retry_after=self.retry_after_hint())
        rank = self._rank(key, now)
        self._absent.pop(key, None)
        if not self._queue and self._held_for(rank, now) is None and self._take():
            self._served(key, now)
            return
        me = _Waiter(rank, next(self._seq))
        self._queue.append(me)
        self._wake_head()  # a better-ranked newcomer may be the head now
        served = False
        try:
            async with asyncio.timeout_at(deadline):
                while True:
                    # Cleared before checking, so a release between the check and the wait still wakes us.
                    me.event.clear()
                    if self._head() is me:
                        now = self._now()
                        held = self._held_for(rank, now)
                        if held is None and self._take():
                            self._served(key, now)
                            served = True
                            return
                        if held is not None:
                            # Woken early if the absent key comes back (and takes the head) or
                            # its place is otherwise settled, rather than sleeping the hold out.
                            with contextlib.suppress(TimeoutError):
                                async with asyncio.timeout(held - now):
                                    await me.event.wait()
                            continue
                        delay = self._delay()
                        if delay is not None:
                            await asyncio.sleep(delay)
                            continue
                    await me.event.wait()
        except TimeoutError:
            raise SlotTimeout(
                "the upstream request budget stayed exhausted until the deadline",
                retry_after=self.retry_after_hint(),
            ) from None
        finally:
            self._queue.remove(me)
            if not served and key is not None:
                # Its caller gave up (an SDK's timeout): it will most likely ask again in a moment,
                # and keeps its place for a while so that whoever asks first meanwhile does not take it.
                self._absent[key] = (rank, self._now() + HOLD_PLACE_S)
            self._wake_head()

    def _held_for(self, rank: tuple[int, float], now: float) -> float | None:
        """Until when a better-ranked key that left the queue a moment ago keeps its turn, if any."""
        until: float | None = None
        for key, (theirs, expires) in list(self._absent.items()):
            if expires <= now:
                del self._absent[key]
            elif theirs < rank:
                until = expires if until is None else min(until, expires)
        return until

    async def charge(self, *, deadline: float) -> None:
        """One more upstream call inside a slot already held (a transport's own resend): it takes a
        rate token too, waiting for one (and for a pause to end) up to ``deadline``."""
        while True:
            now = self._now()
            if now >= self._paused_until:
                if self._rate <= 0:
                    return
                self._refill(now)
                if self._tokens >= 1.0:
                    self._tokens -= 1.0
                    return
            delay = self._delay()
            if delay is None or now + delay >= deadline:
                raise SlotTimeout("no upstream budget left for a resend", retry_after=self.retry_after_hint())
            await asyncio.sleep(delay)

    def _head(self) -> _Waiter | None:
        return min(self._queue) if self._queue else None

    def _wake_head(self) -> None:
        head = self._head()
        if head is not None:
            head.event.set()

    def _rank(self, key: Hashable | None, now: float) -> tuple[int, float]:
        if key is None:
            return (0, now)
        if len(self._first_wait) + len(self._turns) > 10_000:
            self._forget(now)
        turns = self._turns.get(key)
        if turns is not None and now - turns[1] <= RANK_MEMORY_S:
            return turns
        first = self._first_wait.get(key)
        if first is None or now - first > RANK_MEMORY_S:
            first = self._first_wait[key] = now  # a wait given up long ago is no claim to go first
        return (0, first)

    def _served(self, key: Hashable | None, now: float) -> None:
        if key is not None:
            self._first_wait.pop(key, None)
            count, last = self._turns.get(key, (0, now))
            self._turns[key] = (count + 1 if now - last <= RANK_MEMORY_S else 1, now)

    def _forget(self, now: float) -> None:
        cutoff = now - RANK_MEMORY_S
        for k in [k for k, t in self._first_wait.items() if t < cutoff]:
            del self._first_wait[k]
        for k in [k for k, (_, t) in self._turns.items() if t < cutoff]:
            del self._turns[k]

    def _refill(self, now: float) -> None:
        if self._refilled_at is not None and self._rate > 0:
            self._tokens = min(self._burst, self._tokens + (now - self._refilled_at) * self._rate)
        self._refilled_at = now

    def _take(self) -> bool:
        now = self._now()
        if now < self._paused_until or self._in_use >= self._max:
            return False
        if self._rate > 0:
            self._refill(now)
            if self._tokens < 1.0:
                return False
            self._tokens -= 1.0
        self._in_use += 1
        return True

    def _delay(self) -> float | None:
        """Seconds until time alone could let the head through; ``None`` when only a release can."""
        now = self._now()
        if now < self._paused_until:
            return self._paused_until - now
        if self._rate > 0:
            self._refill(now)
            if self._tokens < 1.0:
                return (1.0 - self._tokens) / self._rate
        return None
