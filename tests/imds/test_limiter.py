"""The upstream limiter: concurrency cap, rate, deadlines, the shared pause, FIFO order."""

from __future__ import annotations

import asyncio

import pytest

from podidentity.errors import UpstreamUnavailable
from podidentity.imds.limiter import SlotTimeout, UpstreamLimiter

pytestmark = pytest.mark.timeout(10)


def now() -> float:
    return asyncio.get_running_loop().time()


async def test_concurrency_never_exceeds_the_cap() -> None:
    limiter = UpstreamLimiter(3, 0)
    inside = 0
    peak = 0
    release = asyncio.Event()

    async def worker() -> None:
        nonlocal inside, peak
        async with limiter.slot(deadline=now() + 5):
            inside += 1
            peak = max(peak, inside)
            await release.wait()
            inside -= 1

    tasks = [asyncio.create_task(worker()) for _ in range(10)]
    await asyncio.sleep(0)  # let every worker reach the limiter
    assert (inside, limiter.in_flight, limiter.waiting) == (3, 3, 7)
    release.set()
    await asyncio.gather(*tasks)
    assert peak == 3 and limiter.in_flight == 0 and limiter.waiting == 0


async def test_waiters_are_served_in_arrival_order() -> None:
    limiter = UpstreamLimiter(1, 0)
    order: list[int] = []
    gate = asyncio.Event()

    async def worker(i: int) -> None:
        async with limiter.slot(deadline=now() + 5):
            order.append(i)
            await gate.wait()

    first = asyncio.create_task(worker(0))
    await asyncio.sleep(0)
    rest = []
    for i in range(1, 6):
        rest.append(asyncio.create_task(worker(i)))
        await asyncio.sleep(0)  # arrival order is creation order
    gate.set()
    await asyncio.gather(first, *rest)
    assert order == [0, 1, 2, 3, 4, 5]


async def test_a_newcomer_does_not_overtake_a_waiter_when_a_slot_frees() -> None:
    limiter = UpstreamLimiter(1, 0)
    order: list[str] = []
    hold = asyncio.Event()

    async def worker(name: str) -> None:
        async with limiter.slot(deadline=now() + 5):
            order.append(name)

    async def holder() -> None:
        async with limiter.slot(deadline=now() + 5):
            order.append("holder")
            await hold.wait()
        # The slot is free and the waiter woken, but it has not run yet: a barging limiter
        # would hand the slot to this newcomer without it ever suspending.
        await worker("newcomer")

    h = asyncio.create_task(holder())
    await asyncio.sleep(0)
    waiter = asyncio.create_task(worker("waiter"))
    await asyncio.sleep(0)
    hold.set()
    await asyncio.gather(h, waiter)
    assert order == ["holder", "waiter", "newcomer"]


async def test_rate_is_respected_after_the_burst() -> None:
    limiter = UpstreamLimiter(2, 20.0)  # burst 2, then one slot every 50 ms
    started = now()
    for _ in range(8):
        async with limiter.slot(deadline=now() + 5):
            pass
    elapsed = now() - started
    assert 0.29 <= elapsed < 0.6  # 6 slots beyond the burst at 20/s = 0.3 s


async def test_rate_refill_follows_the_injected_clock() -> None:
    fake = [0.0]
    limiter = UpstreamLimiter(1, 1.0, clock=lambda: fake[0])
    async with limiter.slot(deadline=10.0):
        pass
    fake[0] = 1.0  # a whole token refilled without any real time passing
    async with asyncio.timeout(0.5):
        async with limiter.slot(deadline=10.0):
            pass


async def test_deadline_passing_while_waiting_raises_and_passes_the_turn_on() -> None:
    limiter = UpstreamLimiter(1, 0)
    hold = asyncio.Event()
    got_it = asyncio.Event()

    async def holder() -> None:
        async with limiter.slot(deadline=now() + 5):
            await hold.wait()

    async def patient() -> None:
        async with limiter.slot(deadline=now() + 5):
            got_it.set()

    h = asyncio.create_task(holder())
    await asyncio.sleep(0)
    started = now()
    impatient = asyncio.create_task(limiter.slot(deadline=started + 0.1).__aenter__())
    await asyncio.sleep(0)
    p = asyncio.create_task(patient())
    with pytest.raises(SlotTimeout) as caught:
        await impatient
    assert isinstance(caught.value, UpstreamUnavailable)
    assert 0.09 <= now() - started < 0.3
    assert limiter.waiting == 1
    hold.set()
    await asyncio.wait_for(got_it.wait(), 1)
    await asyncio.gather(h, p)
    assert limiter.in_flight == 0


async def test_expired_deadline_fails_at_once() -> None:
    limiter = UpstreamLimiter(1, 0)
    with pytest.raises(SlotTimeout):
        async with limiter.slot(deadline=now() - 0.01):
            pass
    assert limiter.in_flight == 0


async def test_pause_holds_every_caller_until_it_ends() -> None:
    limiter = UpstreamLimiter(5, 0)
    started = now()
    limiter.pause_until(started + 0.2)
    limiter.pause_until(started + 0.05)  # a shorter pause never cuts the longer one
    assert limiter.paused_until == pytest.approx(started + 0.2)

    async def one() -> float:
        async with limiter.slot(deadline=now() + 5):
            return now()

    times = await asyncio.gather(*(one() for _ in range(3)))
    assert all(t >= started + 0.19 for t in times)
    assert max(times) < started + 0.5


async def test_pause_past_the_deadline_fails_at_the_deadline() -> None:
    limiter = UpstreamLimiter(5, 0)
    started = now()
    limiter.pause_until(started + 5)
    with pytest.raises(SlotTimeout):
        async with limiter.slot(deadline=started + 0.1):
            pass
    assert now() - started < 0.3


async def test_cancelled_waiter_leaves_the_queue() -> None:
    limiter = UpstreamLimiter(1, 0)
    hold = asyncio.Event()

    async def holder() -> None:
        async with limiter.slot(deadline=now() + 5):
            await hold.wait()

    h = asyncio.create_task(holder())
    await asyncio.sleep(0)
    waiter = asyncio.create_task(limiter.slot(deadline=now() + 5).__aenter__())
    await asyncio.sleep(0)
    assert limiter.waiting == 1
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert limiter.waiting == 0
    hold.set()
    await h
    async with limiter.slot(deadline=now() + 1):
        assert limiter.in_flight == 1


def test_zero_concurrency_is_rejected() -> None:
    with pytest.raises(ValueError, match="max_concurrent"):
        UpstreamLimiter(0, 1.0)


# --- fairness between keys (upstream outages) ------------------------------------------------------


async def test_round_robin_fewest_turns_first_then_longest_waiting() -> None:
    limiter = UpstreamLimiter(1, 0)
    order: list[str] = []
    gate = asyncio.Event()

    async def worker(key: str) -> None:
        async with limiter.slot(deadline=now() + 5, key=key):
            order.append(key)
            await gate.wait()

    # "a" and "b" had a turn each ("a" first); "new" had none. Queued b, a, new, they are served
    # new (no turn yet), then a (its turn is older), then b.
    for key in ("a", "b"):
        async with limiter.slot(deadline=now() + 5, key=key):
            pass
    blocker = asyncio.create_task(worker("blocker"))
    await asyncio.sleep(0)
    tasks = [asyncio.create_task(worker(key)) for key in ("b", "a", "new")]
    await asyncio.sleep(0)
    gate.set()
    await asyncio.gather(blocker, *tasks)
    assert order == ["blocker", "new", "a", "b"]


async def test_a_key_keeps_its_place_when_its_caller_gives_up_and_asks_again() -> None:
    limiter = UpstreamLimiter(1, 0)
    gate = asyncio.Event()
    order: list[str] = []

    async def worker(key: str, deadline: float) -> None:
        async with limiter.slot(deadline=deadline, key=key):
            order.append(key)
            await gate.wait()

    blocker = asyncio.create_task(worker("blocker", now() + 5))
    await asyncio.sleep(0)
    impatient = asyncio.create_task(worker("early", now() + 0.05))
    await asyncio.sleep(0)
    later = asyncio.create_task(worker("late", now() + 5))
    with pytest.raises(SlotTimeout):
        await impatient  # its SDK timed out...
    again = asyncio.create_task(worker("early", now() + 5))  # ...and asked again, after "late"
    await asyncio.sleep(0)
    gate.set()
    await asyncio.gather(blocker, later, again)
    assert order == ["blocker", "early", "late"]


async def test_a_refusal_says_when_to_come_back() -> None:
    limiter = UpstreamLimiter(1, 10.0)
    limiter.pause_until(now() + 3.0)
    with pytest.raises(SlotTimeout) as caught:
        async with limiter.slot(deadline=now() + 0.05, key="k"):
            pass
    assert caught.value.retry_after is not None and 2.5 < caught.value.retry_after <= 3.0


async def test_a_resend_inside_a_slot_spends_a_rate_token() -> None:
    limiter = UpstreamLimiter(5, 10.0, burst=2)
    async with limiter.slot(deadline=now() + 5, key="k"):  # one token
        started = now()
        await limiter.charge(deadline=now() + 5)  # the second
        await limiter.charge(deadline=now() + 5)  # a third: waits for the refill (0.1 s)
        assert now() - started >= 0.08
    with pytest.raises(SlotTimeout):
        await limiter.charge(deadline=now() + 0.01)
