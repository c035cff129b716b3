"""MIC's view of the cluster: five watches into one ``ClusterState`` (+ nodes), and the AAI writer.

Watched, cluster-wide: pods **with the ``aadpodidbinding`` label** (a label-exists selector, so
memory and watch traffic follow the labelled pods only, mic-spec §6.1), AzureIdentities,
AzureIdentityBindings, AzureAssignedIdentities and nodes (for their providerID). Each change calls
``on_change``, which only marks the reconciler dirty.

Writes go through ``KubeClient.write`` and are applied to the cache at once (write-through), so
the next reconcile never re-POSTs an object whose watch event has not arrived (mic-spec §6.9).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from mic.metrics import KUBE_ADD, KUBE_DELETE, KUBE_STATUS, KUBE_UPDATE, MicMetrics
from mic.model import FINALIZER, Node, parse_node
from nmi.kube.caches import StateSink
from nmi.kube.client import KubeClient
from nmi.kube.errors import KubeApiError, KubeError
from nmi.kube.health import WatchHealth
from nmi.kube.settings import KubeSettings
from nmi.kube.watching import Resource, Watcher, supervise
from nmi.model import BINDING_LABEL, AzureAssignedIdentity, ObjectKey, parse_assigned_identity
from nmi.state import ClusterState

log = logging.getLogger("mic.kube")

CRD_PATH = "/apis/aadpodidentity.k8s.io/v1/"
SOURCE_PREFIX = "mic/"

RESOURCES = (
    Resource("pods", "Pod", "/api/v1/pods", label_selector=BINDING_LABEL),
    Resource("azureidentities", "AzureIdentity", CRD_PATH + "azureidentities"),
    Resource("azureidentitybindings", "AzureIdentityBinding", CRD_PATH + "azureidentitybindings"),
    Resource("azureassignedidentities", "AzureAssignedIdentity", CRD_PATH + "azureassignedidentities"),
)
NODES = Resource("nodes", "Node", "/api/v1/nodes")


class _NotifyingSink:
    """A ``StateSink`` that also reports every change."""

    def __init__(self, inner: StateSink, on_change: Callable[[], None]) -> None:
        self._inner = inner
        self._on_change = on_change

    def replace(self, objects: list[Any]) -> None:
        self._inner.replace(objects)
        self._on_change()

    def apply(self, obj: Any) -> None:
        self._inner.apply(obj)
        self._on_change()

    def remove(self, key: ObjectKey) -> None:
        self._inner.remove(key)
        self._on_change()

    def synced(self) -> None:
        self._inner.synced()
        self._on_change()


class NodeCache:
    """Node name → node; a watch sink."""

    def __init__(self, on_change: Callable[[], None]) -> None:
        self.nodes: dict[str, Node] = {}
        self.is_synced = False
        self._on_change = on_change

    def replace(self, objects: list[Any]) -> None:
        self.nodes = {n.name: n for n in objects if isinstance(n, Node)}
        self._on_change()

    def apply(self, obj: Any) -> None:
        if isinstance(obj, Node) and self.nodes.get(obj.name) != obj:
            self.nodes[obj.name] = obj
            self._on_change()

    def remove(self, key: ObjectKey) -> None:
        if self.nodes.pop(key.name, None) is not None:
            self._on_change()

    def synced(self) -> None:
        self.is_synced = True
        self._on_change()


class MicSource:
    def __init__(
        self,
        client: KubeClient,
        state: ClusterState,
        metrics: MicMetrics,
        *,
        kube: KubeSettings,
        on_change: Callable[[], None],
    ) -> None:
        self._client = client
        self._state = state
        self._metrics = metrics
        self._kube = kube
        self._on_change = on_change
        self.nodes = NodeCache(on_change)
        self.health = {r.name: WatchHealth(r.name) for r in (*RESOURCES, NODES)}
        self._tasks: list[asyncio.Task[None]] = []
        for r in RESOURCES:
            state.register_source(SOURCE_PREFIX + r.name)

    @property
    def ready(self) -> bool:
        return all(h.synced for h in self.health.values())

    def start(self) -> None:
        for r in (*RESOURCES, NODES):
            if r is NODES:
                sink: Any = self.nodes
                watcher = Watcher(
                    self._client,
                    r,
                    sink,
                    settings=self._kube,
                    metrics=self._metrics,
                    health=self.health[r.name],
                    parse=parse_node,
                )
            else:
                sink = _NotifyingSink(StateSink(self._state, r.kind, SOURCE_PREFIX + r.name), self._on_change)
                watcher = Watcher(
                    self._client,
                    r,
                    sink,
                    settings=self._kube,
                    metrics=self._metrics,
                    health=self.health[r.name],
                )
            self._tasks.append(
                asyncio.create_task(
                    supervise(
                        r.name,
                        watcher.run,
                        health=self.health[r.name],
                        restart_delay_s=self._kube.backoff_max_s,
                    ),
                    name=f"mic-watch-{r.name}",
                )
            )

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def snapshot(self) -> dict[str, Any]:
        return {name: h.snapshot() for name, h in self.health.items()}


def _aai_path(namespace: str, name: str = "") -> str:
    base = f"{CRD_PATH}namespaces/{namespace}/azureassignedidentities"
    return f"{base}/{name}" if name else base


class AaiWriter:
    """Creates, replaces, re-states and deletes AAIs; keeps the cache in step with each answer."""

    def __init__(self, client: KubeClient, state: ClusterState, metrics: MicMetrics) -> None:
        self._client = client
        self._state = state
        self._metrics = metrics

    def _cache(self, obj: dict[str, Any]) -> AzureAssignedIdentity:
        obj.setdefault("kind", "AzureAssignedIdentity")
        aai = parse_assigned_identity(obj)
        self._state.apply(aai)
        return aai

    async def _refresh(self, namespace: str, name: str) -> None:
        """After a conflict: take the server's copy so the next reconcile plans from it."""
        try:
            self._cache(await self._client.get(_aai_path(namespace, name)))
        except KubeApiError as exc:
            if exc.status == 404:
                self._state.remove("AzureAssignedIdentity", ObjectKey(namespace, name))
        except (KubeError, ValueError):
            pass

    async def create(self, body: dict[str, Any]) -> AzureAssignedIdentity | None:
        """POST; None (and the server's copy cached) if it already exists."""
        meta = body["metadata"]
        started = time.monotonic()
        try:
            obj = await self._client.write("POST", _aai_path(meta["namespace"]), body)
        except KubeApiError as exc:
            self._metrics.kube_errors.labels(KUBE_ADD).inc()
            if exc.status == 409:
                await self._refresh(meta["namespace"], meta["name"])
                return None
            raise
        except KubeError:
            self._metrics.kube_errors.labels(KUBE_ADD).inc()
            raise
        self._metrics.addition_duration.observe(time.monotonic() - started)
        self._metrics.addition_count.inc()
        return self._cache(obj)

    async def replace(self, body: dict[str, Any]) -> AzureAssignedIdentity | None:
        """PUT with the resourceVersion in ``body``; None on a conflict (server copy cached)."""
        meta = body["metadata"]
        started = time.monotonic()
        try:
            obj = await self._client.write("PUT", _aai_path(meta["namespace"], meta["name"]), body)
        except KubeApiError as exc:
            self._metrics.kube_errors.labels(KUBE_UPDATE).inc()
            if exc.status in (404, 409):
                await self._refresh(meta["namespace"], meta["name"])
                return None
            raise
        except KubeError:
            self._metrics.kube_errors.labels(KUBE_UPDATE).inc()
            raise
        self._metrics.update_duration.observe(time.monotonic() - started)
        self._metrics.update_count.inc()
        return self._cache(obj)

    async def set_status(self, aai: AzureAssignedIdentity, status: str) -> AzureAssignedIdentity:
        """Merge-patch ``status.status`` (the original sent the same change as a JSON patch)."""
        try:
            obj = await self._client.write(
                "PATCH",
                _aai_path(aai.namespace, aai.name),
                {"status": {"status": status}},
                content_type="application/merge-patch+json",
            )
        except KubeError:
            self._metrics.kube_errors.labels(KUBE_STATUS).inc()
            raise
        return self._cache(obj)

    async def delete(self, aai: AzureAssignedIdentity) -> None:
        """DELETE, then strip our finalizer if the server kept the object for it; 404 is success."""
        started = time.monotonic()
        path = _aai_path(aai.namespace, aai.name)
        try:
            try:
                obj = await self._client.write("DELETE", path)
            except KubeApiError as exc:
                if exc.status != 404:
                    raise
                obj = {}
            meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else None
            finalizers = meta.get("finalizers") if meta is not None else None
            kept = meta is not None and meta.get("deletionTimestamp") and isinstance(finalizers, list)
            if kept and isinstance(finalizers, list) and FINALIZER in finalizers:
                rest = [f for f in finalizers if f != FINALIZER]
                try:
                    await self._client.write(
                        "PATCH",
                        path,
                        {"metadata": {"finalizers": rest or None}},
                        content_type="application/merge-patch+json",
                    )
                except KubeApiError as exc:
                    if exc.status != 404:
                        raise
        except KubeError:
            self._metrics.kube_errors.labels(KUBE_DELETE).inc()
            raise
        self._state.remove("AzureAssignedIdentity", aai.key)
        self._metrics.deletion_duration.observe(time.monotonic() - started)
        self._metrics.deletion_count.inc()
