"""Per-caller admission to the node's upstream budget.

The limiter in front of IMDS is one queue for the whole node (Azure's budget is per VM). Without
a per-caller bound, one pod asking for many different tokens at once (or for failing ones, which
are not cached) fills that queue and every other pod's first request waits behind it. Here each
caller may have at most ``limit`` cold fetches in the queue; its further ones wait on its own
turn, not in front of other pods.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Hashable
from contextlib import asynccontextmanager

from podidentity.errors import UpstreamUnavailable


class _Slot:
    __slots__ = ("semaphore", "users")

    def __init__(self, limit: int) -> None:
        self.semaphore = asyncio.Semaphore(limit)
        self.users = 0


class CallerSlots:
    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self._limit = limit
        self._slots: dict[Hashable, _Slot] = {}

    def __len__(self) -> int:
        return len(self._slots)

    @asynccontextmanager
    async def hold(self, caller: Hashable, *, deadline: float) -> AsyncIterator[None]:
        slot = self._slots.get(caller)
        if slot is None:
            slot = self._slots[caller] = _Slot(self._limit)
        slot.users += 1
        try:
            try:
                async with asyncio.timeout_at(deadline):
                    await slot.semaphore.acquire()
            except TimeoutError:
                raise UpstreamUnavailable(
                    "this pod already has too many token requests waiting for upstream"
                ) from None
            try:
                yield
            finally:
                slot.semaphore.release()
        finally:
            slot.users -= 1
            if slot.users == 0:
                del self._slots[caller]
