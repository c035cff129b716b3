"""Keep the rules in place: install at once, then re-check every ``interval_s`` and repair drift.

Unlike the original, where any iptables error was fatal (nmi-spec §9.7), a failed pass is
logged, counted and retried with backoff; the state is exposed for the health endpoint. The
rules are never removed here: on exit they stay (fail closed) unless the caller removes them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import NoReturn, Protocol

from iptables.drift import Drift


class RuleManager(Protocol):
    async def repair(self) -> Drift: ...


class _Counter(Protocol):
    def inc(self, amount: float = 1) -> None: ...


class ReconcileMetrics(Protocol):
    """What the reconciler counts; ``nmi.metrics.Metrics`` satisfies it."""

    @property
    def iptables_repairs(self) -> _Counter: ...

    @property
    def iptables_errors(self) -> _Counter: ...


class Reconciler:
    def __init__(
        self,
        rules: RuleManager,
        *,
        interval_s: float,
        metrics: ReconcileMetrics | None = None,
        retry_backoff_s: Sequence[float] = (1.0, 2.0, 5.0, 10.0, 30.0),
        on_change: Callable[[Drift], Awaitable[None]] | None = None,
        logger: logging.Logger | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``on_change`` runs after every pass that changed the table, before ``installed`` is set
        on the first one: the place for a conntrack purge. Its failures are logged and counted but
        do not make the rules unhealthy."""
        if not retry_backoff_s:
            raise ValueError("retry_backoff_s must not be empty")
        self._rules = rules
        self.interval_s = interval_s
        self._metrics = metrics
        self._backoff = tuple(retry_backoff_s)
        self._on_change = on_change
        self._log = logger or logging.getLogger("nmi.iptables")
        self._clock = clock
        self._wake = asyncio.Event()
        self._waiters: list[asyncio.Future[bool]] = []

        self.installed = asyncio.Event()
        """Set after the first successful install; stays set."""
        self.healthy = False
        """Whether the latest pass succeeded."""
        self.last_error: str | None = None
        self.last_success: float | None = None
        """``clock()`` at the end of the latest successful pass."""
        self.repairs = 0
        self.failures = 0
        """Consecutive failed passes."""

    def wake(self) -> asyncio.Future[bool]:
        """Run a pass now. The future resolves with its success once a pass that started after
        this call has finished, so callers can await the outcome without polling."""
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._wake.set()
        return waiter

    async def run(self) -> NoReturn:
        waiters: list[asyncio.Future[bool]] = []
        try:
            while True:
                # Taken before the pass: a wake() during the pass asks for another one.
                waiters, self._waiters = self._waiters, []
                self._wake.clear()
                ok = await self._pass()
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_result(ok)
                waiters = []
                await self._sleep(self._next_delay())
        finally:
            for waiter in waiters + self._waiters:
                waiter.cancel()

    def _next_delay(self) -> float:
        if not self.failures:
            return self.interval_s
        return min(self._backoff[min(self.failures, len(self._backoff)) - 1], self.interval_s)

    async def _sleep(self, delay: float) -> None:
        try:
            async with asyncio.timeout(delay):
                await self._wake.wait()
        except TimeoutError:
            pass

    async def _pass(self) -> bool:
        try:
            drift = await self._rules.repair()
        except Exception as exc:
            self._failed(exc)
            return False
        if drift.payload is not None and self._on_change is not None:
            await self._run_on_change(self._on_change, drift)
        if not self.installed.is_set():
            if drift.ok:
                self._log.info("iptables rules already in place")
            else:
                self._log.info("iptables rules installed (%s)", drift.describe())
            self.installed.set()
        elif not drift.ok:
            self.repairs += 1
            if self._metrics is not None:
                self._metrics.iptables_repairs.inc()
            self._log.warning("iptables rules drifted and were repaired: %s", drift.describe())
        else:
            self._log.debug("iptables rules in sync")
        if self.failures:
            self._log.info("iptables reconcile recovered after %d failed attempts", self.failures)
        self.failures = 0
        self.healthy = True
        self.last_error = None
        self.last_success = self._clock()
        return True

    def _failed(self, exc: Exception) -> None:
        self.failures += 1
        self.healthy = False
        self.last_error = f"{type(exc).__name__}: {exc}"
        if self._metrics is not None:
            self._metrics.iptables_errors.inc()
        self._log.warning(
            "iptables reconcile attempt #%d failed: %s; will retry in %g s",
            self.failures,
            self.last_error,
            self._next_delay(),
        )

    async def _run_on_change(self, hook: Callable[[Drift], Awaitable[None]], drift: Drift) -> None:
        try:
            await hook(drift)
        except Exception:
            if self._metrics is not None:
                self._metrics.iptables_errors.inc()
            self._log.exception("post-change hook failed after iptables changes")
