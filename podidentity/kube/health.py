"""Per-watch health: listed at least once, and since when the stream has been failing.

``synced`` never goes back to False: after a successful list the cache keeps serving its last good
state through API-server outages, and ``broken_since`` says how stale that may be.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


class WatchHealth:
    __slots__ = (
        "_clock",
        "_on_change",
        "broken_since",
        "last_error",
        "last_event_at",
        "name",
        "relists",
        "restarts",
        "synced",
        "synced_at",
    )

    def __init__(
        self,
        name: str,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.name = name
        self._clock = clock
        self._on_change = on_change
        self.synced = False
        self.synced_at: float | None = None
        self.broken_since: float | None = None
        """Monotonic time of the first failure not yet followed by a working stream."""
        self.last_event_at: float | None = None
        self.last_error = ""
        self.restarts = 0
        """Failed lists or streams since start."""
        self.relists = 0

    def listed(self) -> None:
        now = self._clock()
        if not self.synced:
            self.synced_at = now
        self.synced = True
        self.last_event_at = now
        self.broken_since = None
        self.relists += 1
        self._changed()

    def connected(self) -> None:
        """A watch was accepted from our resourceVersion: the cache is current again."""
        if self.broken_since is not None:
            self.broken_since = None
            self._changed()

    def event(self) -> None:
        self.last_event_at = self._clock()
        if self.broken_since is not None:
            self.broken_since = None
            self._changed()

    def failed(self, error: str) -> None:
        if self.broken_since is None:
            self.broken_since = self._clock()
        self.last_error = error
        self.restarts += 1
        self._changed()

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change()

    def snapshot(self) -> dict[str, Any]:
        now = self._clock()
        return {
            "synced": self.synced,
            "broken_since": None if self.broken_since is None else round(now - self.broken_since, 3),
            "last_event_age": None if self.last_event_at is None else round(now - self.last_event_at, 3),
            "last_error": self.last_error,
            "restarts": self.restarts,
            "relists": self.relists,
        }
