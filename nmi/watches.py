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

import logging
from collections.abc import Callable
from typing import Any

from nmi.metrics import Metrics
from nmi.secrets import SecretReader
from nmi.settings import Settings
from podidentity.errors import ConfigError
from podidentity.kube.client import KubeClient
from podidentity.kube.config import load_connection
from podidentity.kube.settings import KubeSettings
from podidentity.kube.watching import Resource
from podidentity.kube.watchset import WatchSet
from podidentity.model import (
    KIND_OF,
    AzureAssignedIdentity,
    AzureIdentity,
    AzureIdentityBinding,
    AzurePodIdentityException,
    KubeObject,
    Pod,
    ServiceAccount,
)
from podidentity.state import ClusterState

log = logging.getLogger("nmi.kube")

SOURCE_PREFIX = "kube/"


def watched_resources(settings: Settings) -> list[Resource]:
    node = settings.cluster.node_name
    resources = [
        Resource(KIND_OF[Pod], field_selector=f"spec.nodeName={node}"),
        # Both modes: managed mode decides from them; standard mode tells from them whether MIC may
        # still assign an identity to a pod (a bounded wait) or never will (a final answer at once).
        Resource(KIND_OF[AzureIdentity]),
        Resource(KIND_OF[AzureIdentityBinding]),
    ]
    if settings.identity.operation_mode != "managed":
        selector = f"nodename={node}" if settings.cluster.enable_scale_features else ""
        resources.append(Resource(KIND_OF[AzureAssignedIdentity], label_selector=selector))
    resources.append(Resource(KIND_OF[AzurePodIdentityException]))
    if settings.identity.workload_identity:
        # Which client a service account is federated with (its annotations).
        resources.append(Resource(KIND_OF[ServiceAccount]))
    return resources


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
        environ: dict[str, str] | None = None,  # None: os.environ (KUBECONFIG, in-cluster)
    ) -> None:
        if not settings.cluster.node_name:
            # The original watched "pods with no node" when --node was empty (nmi-spec §9.20).
            raise ConfigError("--node is required to watch this node's pods")
        self._settings = settings
        self._kube: KubeSettings = settings.kube
        self._environ = environ
        hooks: dict[str, Callable[[KubeObject], None]] = {}
        if on_pod_added is not None:
            hook = on_pod_added
            hooks["Pod"] = lambda obj: hook(obj) if isinstance(obj, Pod) else None
        self.watches = WatchSet(
            watched_resources(settings),
            state,
            settings=self._kube,
            metrics=metrics,
            source_prefix=SOURCE_PREFIX,
            task_prefix="nmi-kube",
            on_added=hooks,
        )
        self._client: KubeClient | None = None
        self.secrets = SecretReader(self._kube, metrics)

    @property
    def client(self) -> KubeClient | None:
        """The API client, once ``start`` made it."""
        return self._client

    @property
    def resources(self) -> list[Resource]:
        return list(self.watches.resources)

    @property
    def ready(self) -> bool:
        return self.watches.ready

    def health(self) -> dict[str, dict[str, Any]]:
        return self.watches.snapshot()

    async def wait_health_change(self, timeout: float) -> bool:
        return await self.watches.wait_health_change(timeout)

    async def wait_ready(self, timeout: float) -> bool:
        return await self.watches.wait_ready(timeout)

    async def start(self) -> None:
        """Load the connection settings and start one supervised task per watch; returns at once."""
        if self.watches.running:
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
            ", ".join(r.name for r in self.watches.resources),
        )
        self._client = KubeClient(connection, self._kube)
        self.secrets.attach(self._client)
        self.watches.start(self._client)

    async def stop(self) -> None:
        await self.watches.stop()
        self.secrets.detach()
        if self._client is not None:
            await self._client.close()
            self._client = None
