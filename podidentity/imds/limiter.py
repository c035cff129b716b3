"""The per-node budget for upstream token requests: a concurrency cap, a rate, and a shared pause.

IMDS throttles per VM (5 concurrent identity requests, 20 per second), so one noisy pod must not
spend the budget of every other pod on the node (nmi-spec §9.1). Every upstream attempt takes a
slot; a 429 from upstream pauses every caller, not only the one that saw it.

Waiting is first come, first served: only the head of the queue ever checks the budget, so a
late arrival can never overtake a caller that has been waiting longer.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from podidentity.errors import UpstreamUnavailable


class SlotTimeout(UpstreamUnavailable):
    """The caller's deadline passed while it waited for its turn upstream."""


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
        self._queue: deque[asyncio.Event] = deque()

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

    @asynccontextmanager
    async def slot(self, *, deadline: float) -> AsyncIterator[None]:
        await self._acquire(deadline)
        try:
            yield
        finally:
            self._in_use -= 1
            self._wake_head()

    def _now(self) -> float:
        if self._clock is None:
            self._clock = asyncio.get_running_loop().time
        return self._clock()

    async def _acquire(self, deadline: float) -> None:
        if self._now() >= deadline:
            raise SlotTimeout("no time left to ask the upstream")
        if not self._queue and self._take():
            return
        me = asyncio.Event()
        self._queue.append(me)
        try:
            async with asyncio.timeout_at(deadline):
                while True:
                    # Cleared before checking, so a release between the check and the wait still wakes us.
                    me.clear()
                    if self._queue[0] is me:
                        if self._take():
                            return
                        delay = self._delay()
                        if delay is not None:
                            await asyncio.sleep(delay)
                            continue
                    await me.wait()
        except TimeoutError:
            raise SlotTimeout("the upstream request budget stayed exhausted until the deadline") from None
        finally:
            was_head = self._queue[0] is me
            self._queue.remove(me)
            if was_head:
                self._wake_head()

    def _wake_head(self) -> None:
        if self._queue:
            self._queue[0].set()

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
