"""What NMI watches on its node, per mode, and the ``KubeSource`` that runs those watches.

Both modes: this node's pods, AzureIdentities, AzureIdentityBindings and exceptions. Standard
mode adds the AzureAssignedIdentities MIC labelled ``nodename=<node>`` (every AAI when scale
features are off, as the original).

Identities, bindings and exceptions are watched cluster-wide rather than per namespace with pods
on this node: they are few and small (AKS caps both at 200 per cluster), one watch each costs the
API server far less than a watch per namespace that would come and go with pods, and a pod that is
the first of its namespace on this node must find its binding already cached, not wait for a new
watch to list.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from nmi.errors import ConfigError
from nmi.kube.client import KubeClient
from nmi.kube.config import load_connection
from nmi.kube.health import WatchHealth
from nmi.kube.secrets import SecretReader
from nmi.kube.settings import KubeSettings
from nmi.kube.watching import Resource, Watcher, supervise
from nmi.metrics import Metrics
from nmi.model import (
    AzureAssignedIdentity,
    AzureIdentity,
    AzureIdentityBinding,
    AzurePodIdentityException,
    KubeObject,
    ObjectKey,
    Pod,
)
from nmi.settings import Settings
from nmi.state import KIND_OF, ClusterState

log = logging.getLogger("nmi.kube")

CRD_PATH = "/apis/aadpodidentity.k8s.io/v1/"
SOURCE_PREFIX = "kube/"


def watched_resources(settings: Settings) -> list[Resource]:
    node = settings.cluster.node_name
    resources = [
        Resource("pods", "Pod", "/api/v1/pods", field_selector=f"spec.nodeName={node}"),
        # Both modes: managed mode decides from them; standard mode tells from them whether MIC may
        # still assign an identity to a pod (a bounded wait) or never will (a final answer at once).
        Resource("azureidentities", "AzureIdentity", CRD_PATH + "azureidentities"),
        Resource("azureidentitybindings", "AzureIdentityBinding", CRD_PATH + "azureidentitybindings"),
    ]
    if settings.identity.operation_mode != "managed":
        selector = f"nodename={node}" if settings.cluster.enable_scale_features else ""
        resources.append(
            Resource(
                "azureassignedidentities",
                "AzureAssignedIdentity",
                CRD_PATH + "azureassignedidentities",
                label_selector=selector,
            )
        )
    resources.append(
        Resource(
            "azurepodidentityexceptions", "AzurePodIdentityException", CRD_PATH + "azurepodidentityexceptions"
        )
    )
    return resources


_CLASSES: dict[str, type[KubeObject]] = {
    "Pod": Pod,
    "AzureIdentity": AzureIdentity,
    "AzureIdentityBinding": AzureIdentityBinding,
    "AzureAssignedIdentity": AzureAssignedIdentity,
    "AzurePodIdentityException": AzurePodIdentityException,
}


class StateSink:
    """Writes one kind into ``ClusterState``; tells ``on_added`` about keys it had not seen."""

    def __init__(
        self,
        state: ClusterState,
        kind: str,
        source: str,
        *,
        on_added: Callable[[Any], None] | None = None,
    ) -> None:
        self._state = state
        self._kind = kind
        self._cls = _CLASSES[kind]
        self._source = source
        self._on_added = on_added

    def replace(self, objects: list[KubeObject]) -> None:
        # Objects of another kind cannot come from this resource's path; drop rather than mis-file.
        objects = [o for o in objects if KIND_OF[type(o)] == self._kind]
        added: list[KubeObject] = []
        if self._on_added is not None:
            added = [o for o in objects if self._state.get(self._cls, o.key) is None]
        self._state.replace(self._kind, objects)
        for obj in added:
            self._notify(obj)

    def apply(self, obj: KubeObject) -> None:
        if KIND_OF[type(obj)] != self._kind:
            return
        new = self._on_added is not None and self._state.get(self._cls, obj.key) is None
        self._state.apply(obj)
        if new:
            self._notify(obj)

    def remove(self, key: ObjectKey) -> None:
        self._state.remove(self._kind, key)

    def synced(self) -> None:
        self._state.mark_synced(self._source)

    def _notify(self, obj: KubeObject) -> None:
        assert self._on_added is not None
        try:
            self._on_added(obj)
        except Exception:
            # A hook bug must not stop the cache from following the API server.
            log.exception("on_added hook failed for %s %s", self._kind, obj.key)


class KubeSource:
    """The watch caches of one node, feeding ``state``; ``secrets`` reads service-principal secrets.

    ``on_pod_added`` is called (synchronously, after the state holds the pod) the first time a
    pod is seen, from a watch event or a (re)list; it must not block.
    """

    def __init__(
        self,
        settings: Settings,
        state: ClusterState,
        metrics: Metrics,
        *,
        on_pod_added: Callable[[Pod], None] | None = None,
        kube: KubeSettings | None = None,  # None: defaults; tests shrink timeouts
        environ: dict[str, str] | None = None,  # None: os.environ (KUBECONFIG, in-cluster)
    ) -> None:
        if not settings.cluster.node_name:
            # The original watched "pods with no node" when --node was empty (nmi-spec §9.20).
            raise ConfigError("--node is required to watch this node's pods")
        self._settings = settings
        self._kube = kube or KubeSettings()
        self._state = state
        self._metrics = metrics
        self._on_pod_added = on_pod_added
        self._environ = environ
        self._resources = watched_resources(settings)
        self._health_changed = asyncio.Event()
        self._health = {
            r.name: WatchHealth(r.name, on_change=self._on_health_change) for r in self._resources
        }
        self._tasks: list[asyncio.Task[None]] = []
        self._client: KubeClient | None = None
        self._watchers: dict[str, Watcher] = {}
        self.secrets = SecretReader(self._kube, metrics)
        for r in self._resources:
            state.register_source(SOURCE_PREFIX + r.name)

    @property
    def resources(self) -> list[Resource]:
        return list(self._resources)

    @property
    def ready(self) -> bool:
        """Every cache has listed at least once (and keeps its last good state after that)."""
        return all(h.synced for h in self._health.values())

    def health(self) -> dict[str, dict[str, Any]]:
        """Per cache: ``synced``, ``broken_since`` (seconds the stream has been failing, or None),
        ``last_event_age``, ``last_error``, ``restarts``, ``relists``, ``objects``."""
        result = {}
        for r in self._resources:
            entry = self._health[r.name].snapshot()
            entry["objects"] = self._state.count(_CLASSES[r.kind])
            result[r.name] = entry
        return result

    def _on_health_change(self) -> None:
        changed, self._health_changed = self._health_changed, asyncio.Event()
        changed.set()

    async def wait_health_change(self, timeout: float) -> bool:
        """Wait until some cache's health changes (synced, broke, recovered); False on timeout."""
        try:
            async with asyncio.timeout(timeout):
                await self._health_changed.wait()
        except TimeoutError:
            return False
        return True

    async def start(self) -> None:
        """Load the connection settings and start one supervised task per watch; returns at once."""
        if self._tasks:
            return
        connection = await load_connection(
            self._settings.cluster.kubeconfig, self._kube, environ=self._environ
        )
        log.info(
            "kubernetes: %s at %s; node %s, %s mode, watching %s",
            connection.source,
            connection.server,
            self._settings.cluster.node_name,
            self._settings.identity.operation_mode,
            ", ".join(r.name for r in self._resources),
        )
        self._client = KubeClient(connection, self._kube)
        self.secrets.attach(self._client)
        for r in self._resources:
            hook = self._on_pod_added if r.kind == "Pod" else None
            sink = StateSink(self._state, r.kind, SOURCE_PREFIX + r.name, on_added=hook)
            watcher = Watcher(
                self._client, r, sink, settings=self._kube, metrics=self._metrics, health=self._health[r.name]
            )
            self._watchers[r.name] = watcher
            task = asyncio.create_task(
                supervise(
                    r.name, watcher.run, health=self._health[r.name], restart_delay_s=self._kube.backoff_max_s
                ),
                name=f"nmi-kube-watch-{r.name}",
            )
            self._tasks.append(task)

    async def wait_ready(self, timeout: float) -> bool:
        """Wait until every cache has listed once, or ``timeout`` seconds; True if ready."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self.ready:
            remaining = deadline - loop.time()
            if remaining <= 0 or not await self._state.wait_for_change(remaining):
                return self.ready
        return True

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.secrets.detach()
        if self._client is not None:
            await self._client.close()
            self._client = None
