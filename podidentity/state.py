"""The in-memory cluster state both daemons read, with O(1) indexes and change notification.

It holds every kind of the registry (``podidentity.model.KINDS``). Sources (NMI's
``--cluster-state`` file, the watch caches) write through ``apply`` / ``remove`` / ``replace``;
readers are NMI's request path and MIC's reconciler. Everything runs on the event loop, so
there are no locks: each mutation is complete before any reader runs.

Waiters (the pod-start race) call ``wait_for_change``; every mutation wakes them, so they
re-check at once instead of polling.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Iterable
from typing import TypeVar

from podidentity.model import (
    KIND_OF,
    KINDS,
    AzureAssignedIdentity,
    AzureIdentityBinding,
    KubeObject,
    ObjectKey,
    Pod,
)

T = TypeVar("T", bound=KubeObject)


class ClusterState:
    """Objects by kind and key, plus the indexes the request path needs."""

    def __init__(self) -> None:
        self._objects: dict[str, dict[ObjectKey, KubeObject]] = {k.name: {} for k in KINDS}
        self._pods_by_ip: dict[str, set[ObjectKey]] = defaultdict(set)
        self._aais_by_pod: dict[ObjectKey, set[ObjectKey]] = defaultdict(set)
        self._bindings_by_selector: dict[str, set[ObjectKey]] = defaultdict(set)
        self._by_namespace: dict[str, dict[str, set[ObjectKey]]] = {k.name: defaultdict(set) for k in KINDS}
        self._changed = asyncio.Event()
        self._synced: dict[str, bool] = {}
        self.version = 0
        """Bumped on every mutation; a waiter compares it to know whether to look again."""

    # --- sync sources -------------------------------------------------------------------

    def register_source(self, name: str) -> None:
        self._synced.setdefault(name, False)

    def mark_synced(self, name: str, synced: bool = True) -> None:
        self._synced[name] = synced
        self._notify()

    @property
    def synced(self) -> bool:
        return bool(self._synced) and all(self._synced.values())

    def sources(self) -> dict[str, bool]:
        return dict(self._synced)

    # --- writes ---------------------------------------------------------------------------

    def apply(self, obj: KubeObject) -> None:
        """Insert or replace one object."""
        self._put(obj)
        self._notify()

    def remove(self, kind: str, key: ObjectKey) -> None:
        self._drop(kind, key)
        self._notify()

    def replace(self, kind: str, objects: Iterable[KubeObject]) -> None:
        """Make ``kind`` hold exactly ``objects`` (a relist or a file reload), in one step."""
        wanted = {o.key: o for o in objects}
        for key in [k for k in self._objects[kind] if k not in wanted]:
            self._drop(kind, key)
        for obj in wanted.values():
            if self._objects[kind].get(obj.key) != obj:
                self._put(obj)
        self._notify()

    def update(
        self,
        *,
        upserted: Iterable[KubeObject] = (),
        removed: Iterable[tuple[str, ObjectKey]] = (),
    ) -> None:
        """Insert or replace ``upserted`` and drop ``removed`` (kind, key) pairs, as one mutation.

        A large source applies its changes in chunks of this, yielding to the loop between them.
        """
        for kind, key in removed:
            self._drop(kind, key)
        for obj in upserted:
            self._put(obj)
        self._notify()

    def _put(self, obj: KubeObject) -> None:
        kind = KIND_OF[type(obj)].name
        key = obj.key
        if key in self._objects[kind]:
            self._drop(kind, key)
        self._objects[kind][key] = obj
        self._by_namespace[kind][key.namespace].add(key)
        if isinstance(obj, Pod) and obj.live:
            self._pods_by_ip[obj.ip].add(key)
        elif isinstance(obj, AzureAssignedIdentity):
            self._aais_by_pod[obj.pod_key].add(key)
        elif isinstance(obj, AzureIdentityBinding):
            self._bindings_by_selector[obj.selector].add(key)

    def _drop(self, kind: str, key: ObjectKey) -> None:
        obj = self._objects[kind].pop(key, None)
        if obj is None:
            return
        _discard(self._by_namespace[kind], key.namespace, key)
        if isinstance(obj, Pod) and obj.live:
            _discard(self._pods_by_ip, obj.ip, key)
        elif isinstance(obj, AzureAssignedIdentity):
            _discard(self._aais_by_pod, obj.pod_key, key)
        elif isinstance(obj, AzureIdentityBinding):
            _discard(self._bindings_by_selector, obj.selector, key)

    def _notify(self) -> None:
        self.version += 1
        # Swap before setting so a waiter that re-arms sees a fresh, unset event.
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    # --- reads ------------------------------------------------------------------------------

    def pods_at(self, ip: str) -> list[Pod]:
        """Live pods that claim ``ip``: normally one; more is an ambiguity the caller reports."""
        keys = self._pods_by_ip.get(ip)
        if not keys:
            return []
        pods = self._objects["Pod"]
        return [pods[k] for k in keys]  # type: ignore[misc]

    def get(self, cls: type[T], key: ObjectKey) -> T | None:
        obj = self._objects[KIND_OF[cls].name].get(key)
        return obj  # type: ignore[return-value]

    def in_namespace(self, cls: type[T], namespace: str) -> list[T]:
        kind = KIND_OF[cls].name
        objects = self._objects[kind]
        return [objects[k] for k in self._by_namespace[kind].get(namespace, ())]  # type: ignore[misc]

    def all(self, cls: type[T]) -> list[T]:
        return list(self._objects[KIND_OF[cls].name].values())  # type: ignore[arg-type]

    def assigned_identities(self, pod: ObjectKey) -> list[AzureAssignedIdentity]:
        objects = self._objects["AzureAssignedIdentity"]
        return [objects[k] for k in self._aais_by_pod.get(pod, ())]  # type: ignore[misc]

    def bindings_selecting(self, selector: str) -> list[AzureIdentityBinding]:
        """Bindings in any namespace whose ``spec.selector`` is exactly ``selector``."""
        keys = self._bindings_by_selector.get(selector)
        if not keys:
            return []
        objects = self._objects["AzureIdentityBinding"]
        return [objects[k] for k in keys]  # type: ignore[misc]

    def count(self, cls: type[KubeObject]) -> int:
        return len(self._objects[KIND_OF[cls].name])

    async def wait_for_change(self, timeout: float) -> bool:
        """Wait until the next mutation or ``timeout`` seconds; True if something changed."""
        if timeout <= 0:
            return False
        try:
            async with asyncio.timeout(timeout):
                await self._changed.wait()
        except TimeoutError:
            return False
        return True


K = TypeVar("K")


def _discard(index: dict[K, set[ObjectKey]], k: K, key: ObjectKey) -> None:
    bucket = index.get(k)
    if bucket is not None:
        bucket.discard(key)
        if not bucket:
            del index[k]
