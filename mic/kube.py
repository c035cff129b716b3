"""MIC's view of the cluster: five watches into one ``ClusterState``, and the AAI writer.

Watched, cluster-wide: pods **with the ``aadpodidbinding`` label** (a label-exists selector, so
memory and watch traffic follow the labelled pods only, mic-spec §6.1), AzureIdentities,
AzureIdentityBindings, AzureAssignedIdentities and nodes (for their providerID). Each change calls
``on_change``, which only marks the reconciler dirty.

Writes go through ``KubeClient.write`` and are applied to the cache at once (write-through), so
the next reconcile never re-POSTs an object whose watch event has not arrived (mic-spec §6.9).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client import Histogram

from mic.metrics import KUBE_ADD, KUBE_DELETE, KUBE_STATUS, KUBE_UPDATE, MicMetrics
from mic.model import FINALIZER
from podidentity.exposition import PlainCounter
from podidentity.kube.client import KubeClient
from podidentity.kube.errors import KubeApiError, KubeError
from podidentity.kube.settings import KubeSettings
from podidentity.kube.watching import Resource
from podidentity.kube.watchset import WatchSet
from podidentity.model import (
    BINDING_LABEL,
    CRD_PATH,
    KIND_OF,
    AzureAssignedIdentity,
    AzureIdentity,
    AzureIdentityBinding,
    Node,
    ObjectKey,
    Pod,
    parse_assigned_identity,
)
from podidentity.state import ClusterState

log = logging.getLogger("mic.kube")

SOURCE_PREFIX = "mic/"

RESOURCES = (
    Resource(KIND_OF[Pod], label_selector=BINDING_LABEL),
    Resource(KIND_OF[AzureIdentity]),
    Resource(KIND_OF[AzureIdentityBinding]),
    Resource(KIND_OF[AzureAssignedIdentity]),
    Resource(KIND_OF[Node]),
)


def watch_set(
    state: ClusterState, metrics: MicMetrics, *, kube: KubeSettings, on_change: Callable[[], None]
) -> WatchSet:
    return WatchSet(
        RESOURCES,
        state,
        settings=kube,
        metrics=metrics,
        source_prefix=SOURCE_PREFIX,
        task_prefix="mic",
        on_change=on_change,
    )


@dataclass(frozen=True, slots=True)
class _WriteOp:
    error_label: str
    refresh_on: tuple[int, ...]
    """Statuses after which the server's copy is taken instead (exists already, conflict, gone)."""
    duration: Callable[[MicMetrics], Histogram]
    count: Callable[[MicMetrics], PlainCounter]


ADD = _WriteOp(KUBE_ADD, (409,), lambda m: m.addition_duration, lambda m: m.addition_count)
UPDATE = _WriteOp(KUBE_UPDATE, (404, 409), lambda m: m.update_duration, lambda m: m.update_count)


def _aai_path(namespace: str, name: str = "") -> str:
    base = f"{CRD_PATH}namespaces/{namespace}/{KIND_OF[AzureAssignedIdentity].plural}"
    return f"{base}/{name}" if name else base


class NotLeader(KubeError):
    """A write was attempted by a replica that does not hold the leader lock: refused here."""


class AaiWriter:
    """Creates, replaces, re-states and deletes AAIs; keeps the cache in step with each answer.

    Every write first asks ``may_write`` (the leader lock): a replica that lost the lease cannot
    write, even from a task that has not seen its cancellation yet.
    """

    def __init__(
        self,
        client: KubeClient,
        state: ClusterState,
        metrics: MicMetrics,
        *,
        may_write: Callable[[], bool] = lambda: True,
    ) -> None:
        self._client = client
        self._state = state
        self._metrics = metrics
        self._may_write = may_write

    async def _send(
        self, method: str, path: str, body: dict[str, Any] | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        if not self._may_write():
            raise NotLeader(f"{method} {path}: not the leader")
        return await self._client.write(method, path, body, **kwargs)

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
        return await self._write("POST", _aai_path(meta["namespace"]), body, ADD)

    async def replace(self, body: dict[str, Any]) -> AzureAssignedIdentity | None:
        """PUT with the resourceVersion in ``body``; None on a conflict (server copy cached)."""
        meta = body["metadata"]
        return await self._write("PUT", _aai_path(meta["namespace"], meta["name"]), body, UPDATE)

    async def _write(
        self, method: str, path: str, body: dict[str, Any], op: _WriteOp
    ) -> AzureAssignedIdentity | None:
        meta = body["metadata"]
        started = time.monotonic()
        try:
            obj = await self._send(method, path, body)
        except KubeApiError as exc:
            self._metrics.kube_errors.labels(op.error_label).inc()
            if exc.status in op.refresh_on:
                await self._refresh(meta["namespace"], meta["name"])
                return None
            raise
        except KubeError:
            self._metrics.kube_errors.labels(op.error_label).inc()
            raise
        op.duration(self._metrics).observe(time.monotonic() - started)
        op.count(self._metrics).inc()
        return self._cache(obj)

    async def set_status(self, aai: AzureAssignedIdentity, status: str) -> AzureAssignedIdentity:
        """Merge-patch ``status.status`` (the original sent the same change as a JSON patch)."""
        try:
            obj = await self._send(
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
                obj = await self._send("DELETE", path)
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
                    await self._send(
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
