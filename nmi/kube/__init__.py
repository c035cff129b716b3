"""Kubernetes API access: node-scoped watch caches feeding ``ClusterState`` and a secret reader.

Only ``nmi.kube.client`` talks HTTP to the API server, and only ``nmi.kube.config`` may import
``kubernetes_asyncio`` (for kubeconfigs that need its loader); the rest of NMI sees ``KubeSource``
and the frozen objects of ``nmi.model``.
"""

from __future__ import annotations

from nmi.kube.caches import KubeSource
from nmi.kube.errors import KubeApiError, KubeError, KubeUnavailable
from nmi.kube.settings import KubeSettings

__all__ = ["KubeApiError", "KubeError", "KubeSettings", "KubeSource", "KubeUnavailable"]
