from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import pytest
from prometheus_client import CollectorRegistry

from iptables.drift import Drift, Finding, Problem
from iptables.reconcile import Reconciler
from nmi.metrics import Metrics

IN_SYNC = Drift()
INSTALL = Drift((Finding(Problem.CHAIN_MISSING, "aad-metadata"),), "*nat\nCOMMIT\n")
FLUSHED = Drift((Finding(Problem.CHAIN_CONTENT, "aad-metadata"),), "*nat\nCOMMIT\n")


class FakeRules:
    """Returns (or raises) the scripted outcomes in order, then stays in sync."""

    def __init__(self, *outcomes: Drift | Exception) -> None:
        self.outcomes = list(outcomes)
        self.calls = 0
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()

    async def repair(self) -> Drift:
        self.calls += 1
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        outcome = self.outcomes.pop(0) if self.outcomes else IN_SYNC
        if isinstance(outcome, Exception):
            raise outcome
        return outcome


def sample(metrics: Metrics, name: str) -> float:
    return metrics.registry.get_sample_value(name) or 0.0


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


@pytest.fixture
async def started() -> AsyncIterator[list[asyncio.Task[None]]]:
    tasks: list[asyncio.Task[None]] = []
    yield tasks
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def start(reconciler: Reconciler, tasks: list[asyncio.Task[None]]) -> None:
    tasks.append(asyncio.create_task(reconciler.run(), name="reconciler"))  # type: ignore[arg-type]


def make(rules: FakeRules, metrics: Metrics, **kwargs: object) -> Reconciler:
    # Long interval and backoff: only wake() drives passes, so tests never depend on timing.
    options: dict[str, object] = {"interval_s": 3600, "retry_backoff_s": (3600,), "clock": lambda: 1234.5}
    options.update(kwargs)
    return Reconciler(rules, metrics=metrics, **options)  # type: ignore[arg-type]


async def test_first_pass_installs_and_sets_installed(
    metrics: Metrics, started: list[asyncio.Task[None]]
) -> None:
    reconciler = make(FakeRules(INSTALL), metrics)
    assert not reconciler.healthy and not reconciler.installed.is_set()
    first = reconciler.wake()
    start(reconciler, started)
    assert await first is True
    assert reconciler.installed.is_set()
    assert reconciler.healthy and reconciler.last_error is None and reconciler.last_success == 1234.5
    assert reconciler.repairs == 0 and sample(metrics, "nmi_iptables_repairs_total") == 0


async def test_drift_after_install_is_a_counted_and_logged_repair(
    metrics: Metrics, started: list[asyncio.Task[None]], caplog: pytest.LogCaptureFixture
) -> None:
    reconciler = make(FakeRules(INSTALL, IN_SYNC, FLUSHED), metrics)
    start(reconciler, started)
    await reconciler.installed.wait()
    assert await reconciler.wake() is True
    assert reconciler.repairs == 0
    with caplog.at_level(logging.WARNING, logger="nmi.iptables"):
        assert await reconciler.wake() is True
    assert reconciler.repairs == 1 and sample(metrics, "nmi_iptables_repairs_total") == 1
    assert "aad-metadata: chain content differs" in caplog.text


async def test_errors_never_crash_and_are_exposed_until_a_pass_succeeds(
    metrics: Metrics, started: list[asyncio.Task[None]]
) -> None:
    rules = FakeRules(RuntimeError("xtables lock held"), RuntimeError("again"), INSTALL)
    reconciler = make(rules, metrics)
    first = reconciler.wake()
    start(reconciler, started)
    assert await first is False
    assert not reconciler.healthy and not reconciler.installed.is_set()
    assert reconciler.last_error == "RuntimeError: xtables lock held" and reconciler.last_success is None
    assert await reconciler.wake() is False
    assert reconciler.failures == 2 and sample(metrics, "nmi_iptables_errors_total") == 2
    assert await reconciler.wake() is True
    assert reconciler.healthy and reconciler.installed.is_set() and reconciler.failures == 0
    assert not started[0].done()


async def test_failed_pass_is_retried_after_backoff_not_the_interval(
    metrics: Metrics, started: list[asyncio.Task[None]]
) -> None:
    rules = FakeRules(RuntimeError("boom"), INSTALL)
    reconciler = make(rules, metrics, retry_backoff_s=(0.01,))
    start(reconciler, started)
    await asyncio.wait_for(reconciler.installed.wait(), timeout=5)
    assert rules.calls == 2


async def test_wake_during_a_pass_waits_for_the_next_pass(
    metrics: Metrics, started: list[asyncio.Task[None]]
) -> None:
    rules = FakeRules(INSTALL, FLUSHED)
    rules.gate = asyncio.Event()
    reconciler = make(rules, metrics)
    start(reconciler, started)
    await rules.entered.wait()
    woken = reconciler.wake()  # first pass already read the table
    rules.gate.set()
    await reconciler.installed.wait()
    assert await woken is True
    assert rules.calls == 2 and reconciler.repairs == 1


async def test_on_change_runs_after_changes_only_and_its_failure_is_not_fatal(
    metrics: Metrics, started: list[asyncio.Task[None]]
) -> None:
    seen: list[Drift] = []

    async def on_change(drift: Drift) -> None:
        seen.append(drift)
        if len(seen) == 2:
            raise OSError("conntrack unavailable")

    reconciler = make(FakeRules(INSTALL, IN_SYNC, FLUSHED), metrics, on_change=on_change)
    start(reconciler, started)
    await reconciler.installed.wait()
    assert seen == [INSTALL]
    assert await reconciler.wake() is True
    assert seen == [INSTALL]
    assert await reconciler.wake() is True
    assert seen == [INSTALL, FLUSHED]
    assert reconciler.healthy and sample(metrics, "nmi_iptables_errors_total") == 1


async def test_cancelling_run_cancels_pending_wakes(metrics: Metrics) -> None:
    rules = FakeRules()
    rules.gate = asyncio.Event()
    reconciler = make(rules, metrics)
    task = asyncio.create_task(reconciler.run())  # type: ignore[arg-type]
    woken = reconciler.wake()
    await rules.entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert woken.cancelled()


def test_empty_backoff_is_refused(metrics: Metrics) -> None:
    with pytest.raises(ValueError):
        Reconciler(FakeRules(), interval_s=1, retry_backoff_s=())
