"""One list+watch loop per resource, in kopf's shape, feeding a sink (the cluster state).

1. **List** with ``limit``/``continue`` pages; hand the sink every object in one ``replace`` (so
   objects deleted while we were away disappear), and mark the source synced.
2. **Watch** from the list's ``resourceVersion`` with bookmarks, a server ``timeoutSeconds`` and a
   client inactivity timeout (a silently dead stream is noticed). Each event is applied at once;
   every event, bookmarks included, advances the resourceVersion we resume from.
3. The server ending the stream is normal: watch again from the last resourceVersion at once.
4. ``410 Gone`` (an ERROR event or the HTTP status) means our resourceVersion was compacted away:
   list again. Any other failure (connection, 5xx, 429, stall, truncated event) keeps the
   resourceVersion and reconnects after a jittered exponential backoff that honours Retry-After,
   so an outage costs a watch reconnect rather than a full list, unless the outage outlived the
   server's event window.

An empty list for a kind whose cache holds objects is not trusted at once (a server or proxy that
answers nothing for a moment must not make every pod lose its identities): the list is repeated
after ``EMPTY_LIST_RECHECK_S``, and only if it is empty again is the cache emptied (and logged).

A malformed object is logged, counted and dropped from the cache (the last good copy could be
stale in a way that matters, e.g. an AAI's state); it never stops the watch.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from podidentity.kube.client import KubeClient
from podidentity.kube.errors import (
    KubeApiError,
    KubeError,
    KubeUnavailable,
    WatchStalled,
    api_error_from_status,
)
from podidentity.kube.health import WatchHealth
from podidentity.kube.settings import KubeSettings
from podidentity.model import Kind, KubeObject, ObjectKey, parse_object

log = logging.getLogger("podidentity.kube")

RETRY_AFTER_CAP_S = 120.0
"""A server's Retry-After is honoured even past our own backoff ceiling, up to this."""
EMPTY_LIST_RECHECK_S = 1.0
"""How long to wait before listing again when a list suddenly returns nothing for a non-empty cache."""
QUICK_END_S = 1.0
"""A stream the server ends this fast without any event counts as a failure, so a proxy that closes
every watch at once cannot make us spin."""


@dataclass(frozen=True, slots=True)
class Resource:
    """One watch: a kind of the registry, narrowed by selectors."""

    kind: Kind
    label_selector: str = ""
    field_selector: str = ""

    @property
    def name(self) -> str:
        """Plural, e.g. ``pods``; names the task, the health entry and the state source."""
        return self.kind.plural

    @property
    def path(self) -> str:
        return self.kind.path

    def selectors(self) -> dict[str, str]:
        params: dict[str, str] = {}
        if self.label_selector:
            params["labelSelector"] = self.label_selector
        if self.field_selector:
            params["fieldSelector"] = self.field_selector
        return params


class _Increment(Protocol):
    def inc(self, amount: float = 1.0) -> None: ...


class _ByLabels(Protocol):
    def labels(self, *values: str, **by_name: str) -> _Increment: ...


class WatchMetrics(Protocol):
    """What a watcher records: NMI's ``Metrics`` and MIC's metrics both have it."""

    @property
    def kube_errors(self) -> _ByLabels: ...


class Sink(Protocol):
    def replace(self, objects: list[KubeObject]) -> None: ...

    def apply(self, obj: KubeObject) -> None: ...

    def remove(self, key: ObjectKey) -> None: ...

    def synced(self) -> None: ...

    def count(self) -> int:
        """How many objects the cache holds now."""
        ...


class Backoff:
    """Doubling delays from ``initial`` to ``maximum``, each drawn from [d/2, d) to spread reconnects."""

    def __init__(self, initial: float, maximum: float, *, rng: Callable[[], float] = random.random) -> None:
        self._initial = initial
        self._maximum = maximum
        self._rng = rng
        self._attempt = 0

    @property
    def attempt(self) -> int:
        return self._attempt

    def next(self, at_least: float | None = None) -> float:
        # The exponent is capped: a day-long outage must not overflow the float.
        ceiling: float = min(self._maximum, self._initial * 2.0 ** min(self._attempt, 40))
        self._attempt += 1
        delay = ceiling * (0.5 + self._rng() / 2)
        if at_least is not None:
            delay = max(delay, min(at_least, RETRY_AFTER_CAP_S))
        return delay

    def reset(self) -> None:
        self._attempt = 0


def _key(obj: Mapping[str, Any]) -> ObjectKey | None:
    meta = obj.get("metadata")
    if not isinstance(meta, Mapping):
        return None
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        return None
    namespace = meta.get("namespace")
    return ObjectKey(namespace if isinstance(namespace, str) and namespace else "default", name)


def _resource_version(obj: Mapping[str, Any]) -> str | None:
    meta = obj.get("metadata")
    if isinstance(meta, Mapping):
        rv = meta.get("resourceVersion")
        if isinstance(rv, str) and rv:
            return rv
    return None


class Watcher:
    """Keeps one resource's sink in step with the API server, forever."""

    def __init__(
        self,
        client: KubeClient,
        resource: Resource,
        sink: Sink,
        *,
        settings: KubeSettings,
        metrics: WatchMetrics,
        health: WatchHealth,
        rng: Callable[[], float] = random.random,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,  # tests may record waits
    ) -> None:
        self._client = client
        self._resource = resource
        self._sink = sink
        self._settings = settings
        self._health = health
        self._rng = rng
        self._sleep = sleep
        self._backoff = Backoff(settings.backoff_initial_s, settings.backoff_max_s, rng=rng)
        # Label children resolved once: each .labels() call locks and allocates.
        self._list_errors = metrics.kube_errors.labels(operation_type=f"list_{resource.name}")
        self._watch_errors = metrics.kube_errors.labels(operation_type=f"watch_{resource.name}")
        self._parse_errors = metrics.kube_errors.labels(operation_type=f"parse_{resource.name}")
        self._rv: str | None = None
        self._stalled = False
        self._gone_in_a_row = 0

    @property
    def resource_version(self) -> str | None:
        return self._rv

    async def run(self) -> None:
        name = self._resource.name
        while True:
            try:
                if self._rv is None:
                    await self._list()
                await self._watch()
            except KubeApiError as exc:
                if exc.gone:
                    self._rv = None
                    self._gone_in_a_row += 1
                    log.info("watch %s: resourceVersion expired (%s); listing again", name, exc.message)
                    if self._gone_in_a_row == 1:
                        continue  # the normal case: relist at once
                await self._failed(exc, exc.retry_after)
            except KubeUnavailable as exc:
                await self._failed(exc, None)

    async def _failed(self, exc: KubeError, retry_after: float | None) -> None:
        (self._list_errors if self._rv is None else self._watch_errors).inc()
        self._stalled = isinstance(exc, WatchStalled)
        self._health.failed(str(exc))
        delay = self._backoff.next(retry_after)
        log.warning(
            "watch %s: attempt #%d failed: %s; will retry in %.2fs%s",
            self._resource.name,
            self._backoff.attempt,
            exc,
            delay,
            "" if self._rv is None else f" from resourceVersion {self._rv}",
        )
        await self._sleep(delay)

    async def _list(self) -> None:
        resource = self._resource
        objects, rv = await self._list_once()
        held = self._sink.count()
        if not objects and held:
            log.warning(
                "watch %s: the list returned no objects while the cache holds %d; listing again in %.1fs",
                resource.name,
                held,
                EMPTY_LIST_RECHECK_S,
            )
            await self._sleep(EMPTY_LIST_RECHECK_S)
            objects, rv = await self._list_once()
            if not objects:
                log.warning(
                    "watch %s: listed no objects twice; the %d cached ones are really gone",
                    resource.name,
                    self._sink.count(),
                )
        self._sink.replace(objects)
        self._sink.synced()
        self._rv = rv
        self._health.listed()
        self._stalled = False
        self._backoff.reset()
        log.info("watch %s: listed %d objects at resourceVersion %s", resource.name, len(objects), rv)

    async def _list_once(self) -> tuple[list[KubeObject], str]:
        resource = self._resource
        params = {"limit": str(self._settings.list_page_size), **resource.selectors()}
        objects: list[KubeObject] = []
        while True:
            body = await self._client.get(resource.path, params)
            items = body.get("items") or []
            if not isinstance(items, list):
                raise KubeUnavailable(f"list {resource.path}: items is not a list")
            for raw in items:
                obj = self._parse(raw)
                if obj is not None:
                    objects.append(obj)
            meta = body.get("metadata") or {}
            cont = meta.get("continue") if isinstance(meta, Mapping) else None
            if not cont:
                break
            params["continue"] = str(cont)
        rv = _resource_version(body)
        if rv is None:
            raise KubeUnavailable(f"list {resource.path}: no resourceVersion in the answer")
        return objects, rv

    async def _watch(self) -> None:
        assert self._rv is not None
        resource = self._resource
        timeout_s = max(1, int(self._settings.watch_timeout_s * (1 + self._rng())))
        params = {
            "watch": "true",
            "resourceVersion": self._rv,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(timeout_s),
            **resource.selectors(),
        }
        started = time.monotonic()
        received = 0
        async with self._client.watch(
            resource.path, params, inactivity_timeout_s=self._settings.inactivity_timeout_s
        ) as stream:
            if not self._stalled:
                # Accepted from our resourceVersion: nothing was missed. After a stall, wait for
                # proof of life instead, or a server that accepts and then hangs would look healthy.
                self._health.connected()
            async for event in stream:
                self._handle(event)
                received += 1
                if received == 1:
                    self._stalled = False
                    self._gone_in_a_row = 0
                    self._backoff.reset()
                self._health.event()
        if received == 0 and time.monotonic() - started < QUICK_END_S:
            raise KubeUnavailable(f"watch {resource.path}: server ended the stream at once")

    def _handle(self, event: Mapping[str, Any]) -> None:
        kind = event["type"]
        obj = event.get("object")
        if not isinstance(obj, dict):
            raise KubeUnavailable(f"watch {self._resource.path}: {kind} event without an object")
        if kind == "ERROR":
            raise api_error_from_status(500, obj, None)
        rv = _resource_version(obj)
        if kind in ("ADDED", "MODIFIED"):
            parsed = self._parse(obj)
            if parsed is not None:
                self._sink.apply(parsed)
            else:
                key = _key(obj)
                if key is not None:
                    self._sink.remove(key)
        elif kind == "DELETED":
            key = _key(obj)
            if key is not None:
                self._sink.remove(key)
        elif kind != "BOOKMARK":
            log.warning("watch %s: ignoring event of unknown type %r", self._resource.name, kind)
        if rv is not None:
            self._rv = rv

    def _parse(self, raw: Any) -> KubeObject | None:
        if not isinstance(raw, dict):
            self._parse_errors.inc()
            log.warning("watch %s: skipping a non-object item", self._resource.name)
            return None
        # List items come without kind; watch objects have it. Either way it is this resource's.
        raw.setdefault("kind", self._resource.kind.name)
        try:
            parsed: KubeObject = parse_object(raw)
            return parsed
        except Exception as exc:
            # Any shape error (ConfigError, or a TypeError from a type we did not foresee) must
            # cost this object only, never the watch.
            self._parse_errors.inc()
            key = _key(raw)
            log.warning(
                "watch %s: skipping invalid object %s: %s",
                self._resource.name,
                key if key is not None else "?",
                exc,
            )
            return None


async def supervise(
    name: str,
    run: Callable[[], Awaitable[None]],
    *,
    health: WatchHealth,
    restart_delay_s: float,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> None:
    """Run an eternal coroutine; if it ever returns or raises, log it loudly and start it again."""
    while True:
        try:
            await run()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            health.failed(f"crashed: {exc!r}")
            log.exception("watch %s crashed; restarting in %.1fs", name, restart_delay_s)
        else:
            health.failed("exited")
            log.error("watch %s exited unexpectedly; restarting in %.1fs", name, restart_delay_s)
        await sleep(restart_delay_s)
