"""Kubernetes API access: one HTTP client, list+watch into sinks, watch health.

Only ``podidentity.kube.client`` talks HTTP to the API server, and only ``podidentity.kube.config``
may import ``kubernetes_asyncio`` (for kubeconfigs that need its loader).
"""
