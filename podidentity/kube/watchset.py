"""A set of watches into one ``ClusterState``: it owns their watchers, tasks, health and stop.

NMI watches its node's pods and the identity kinds; MIC watches labelled pods, the identity kinds
and nodes. Both describe what to watch as ``Resource`` values and hand the rest to a ``WatchSet``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from podidentity.kube.client import KubeClient
from podidentity.kube.health import WatchHealth
from podidentity.kube.settings import KubeSettings
from podidentity.kube.sink import StateSink
from podidentity.kube.watching import Resource, Watcher, WatchMetrics, supervise
from podidentity.model import KubeObject
from podidentity.state import ClusterState


class WatchSet:
    def __init__(
        self,
        resources: Sequence[Resource],
        state: ClusterState,
        *,
        settings: KubeSettings,
        metrics: WatchMetrics,
        source_prefix: str,
        task_prefix: str,
        on_added: Mapping[str, Callable[[KubeObject], None]] | None = None,  # by kind name
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.resources = tuple(resources)
        self._state = state
        self._settings = settings
        self._metrics = metrics
        self._task_prefix = task_prefix
        self._health_changed = asyncio.Event()
        self.health = {r.name: WatchHealth(r.name, on_change=self._on_health_change) for r in self.resources}
        self._sinks = {
            r.name: StateSink(
                state,
                r.kind,
                source_prefix + r.name,
                on_added=(on_added or {}).get(r.kind.name),
                on_change=on_change,
            )
            for r in self.resources
        }
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def ready(self) -> bool:
        """Every watch has listed at least once (and keeps its last good state after that)."""
        return all(h.synced for h in self.health.values())

    @property
    def running(self) -> bool:
        return bool(self._tasks)

    def start(self, client: KubeClient) -> None:
        """One supervised task per watch; returns at once."""
        if self._tasks:
            return
        for r in self.resources:
            health = self.health[r.name]
            watcher = Watcher(
                client, r, self._sinks[r.name], settings=self._settings, metrics=self._metrics, health=health
            )
            task = asyncio.create_task(
                supervise(r.name, watcher.run, health=health, restart_delay_s=self._settings.backoff_max_s),
                name=f"{self._task_prefix}-watch-{r.name}",
            )
            self._tasks.append(task)

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Per watch: ``synced``, ``broken_since``, ``last_event_age``, ``last_error``, ``restarts``,
        ``relists``, and ``objects`` (how many the state holds of its kind)."""
        result = {}
        for r in self.resources:
            entry = self.health[r.name].snapshot()
            entry["objects"] = self._state.count(r.kind.cls)
            result[r.name] = entry
        return result

    def _on_health_change(self) -> None:
        changed, self._health_changed = self._health_changed, asyncio.Event()
        changed.set()

    async def wait_health_change(self, timeout: float) -> bool:
        """Wait until some watch's health changes (synced, broke, recovered); False on timeout."""
        try:
            async with asyncio.timeout(timeout):
                await self._health_changed.wait()
        except TimeoutError:
            return False
        return True

    async def wait_ready(self, timeout: float) -> bool:
        """Wait until every watch has listed once, or ``timeout`` seconds; True if ready."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self.ready:
            remaining = deadline - loop.time()
            if remaining <= 0 or not await self._state.wait_for_change(remaining):
                return self.ready
        return True
