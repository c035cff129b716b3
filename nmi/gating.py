"""Node start-up gating: a node registered with the taint ``nmi.aadpodidentity.k8s.io/agent-not-ready``
gets no pods until NMI on it is ready (rules installed, cluster state synced), and then NMI removes
exactly that taint, from its own node only.

Without it, a pod scheduled on a fresh node can start before NMI's rules exist and reach IMDS
directly: the node's own identities, none of its checks (none of the IP-based peers gate this).
The removal is an optimistic-concurrency merge patch (``metadata.resourceVersion`` as a
precondition), so a taint another controller adds meanwhile is never lost: on a conflict NMI reads
the node again and retries.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from podidentity.kube.client import KubeClient
from podidentity.kube.errors import KubeApiError, KubeError

log = logging.getLogger("nmi.gating")

STARTUP_TAINT = "nmi.aadpodidentity.k8s.io/agent-not-ready"


def without_taint(taints: Any, key: str) -> list[dict[str, Any]] | None:
    """The node's taints minus every one with ``key``; ``None`` when there is none to remove."""
    if not isinstance(taints, list):
        return None
    kept = [t for t in taints if not (isinstance(t, dict) and t.get("key") == key)]
    return kept if len(kept) != len(taints) else None


async def remove_startup_taint(client: KubeClient, node: str, key: str) -> bool:
    """One attempt: True when the node no longer has the taint (removed now, or never had it)."""
    path = f"/api/v1/nodes/{node}"
    obj = await client.get(path)
    spec, meta = obj.get("spec"), obj.get("metadata")
    kept = without_taint(spec.get("taints") if isinstance(spec, dict) else None, key)
    if kept is None:
        return True
    version = meta.get("resourceVersion") if isinstance(meta, dict) else None
    patch = {"metadata": {"resourceVersion": version}, "spec": {"taints": kept or None}}
    try:
        await client.write("PATCH", path, patch, content_type="application/merge-patch+json")
    except KubeApiError as exc:
        if exc.status == 409:
            return False  # someone changed the node meanwhile: read it again
        raise
    log.info("node %s ready: removed its start-up taint %s", node, key)
    return True


async def ungate_when_ready(
    client: Callable[[], KubeClient | None],
    node: str,
    key: str,
    ready: Callable[[], bool],
    *,
    poll_s: float = 0.5,
    retry_max_s: float = 30.0,
) -> None:
    """Wait until NMI is ready, then remove the taint; retried with backoff until it is done."""
    delay = poll_s
    while True:
        current = client()
        if ready() and current is not None:
            try:
                if await remove_startup_taint(current, node, key):
                    return
                delay = poll_s
            except (KubeError, ValueError) as exc:
                log.warning("cannot remove start-up taint %s from node %s yet: %s", key, node, exc)
                delay = min(retry_max_s, delay * 2)
        await asyncio.sleep(delay)
