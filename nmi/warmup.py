"""Warm start: when a pod with identities appears on the node, fetch its likely tokens first.

"Likely" means the resources its identities were recently asked for on this node (the cache
remembers them), so a restarted or rescheduled replica's first request is a cache hit. Work is
bounded per pod and overall, and goes through the same upstream limiter as requests do; a
prefetch never delays a real request by more than one limiter slot.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from nmi.resolver import allowed_identities
from nmi.settings import Settings
from nmi.tokens.cache import TokenCache
from podidentity.errors import ServiceError
from podidentity.model import IdentityType, Pod
from podidentity.state import ClusterState
from podidentity.tokens import TokenRequest, TokenSource

log = logging.getLogger("nmi.warmup")


class WarmStart:
    def __init__(
        self,
        settings: Settings,
        state: ClusterState,
        cache: TokenCache,
        sources: Callable[[], dict[IdentityType, TokenSource]],
        *,
        max_per_pod: int = 4,
        max_pending: int = 64,
        deadline_s: float = 10.0,
    ) -> None:
        self._settings = settings
        self._state = state
        self._cache = cache
        self._sources = sources
        self._max_per_pod = max_per_pod
        self._max_pending = max_pending
        self._deadline_s = deadline_s
        self._tasks: set[asyncio.Task[None]] = set()
        self.prefetched = 0

    def plan(self, pod: Pod) -> list[TokenRequest]:
        """The token requests worth making for ``pod``: pure, so it is easy to test."""
        requests: list[TokenRequest] = []
        api_version = self._settings.upstream.api_version
        for identity in allowed_identities(self._state, pod, self._settings.identity):
            # A federated token is exchanged with this pod's own service-account token.
            account = ""
            if identity.type is IdentityType.FEDERATED:
                account = f"{pod.namespace}/{pod.service_account}"
            for resource in self._cache.recent_resources(identity):
                requests.append(
                    TokenRequest(
                        identity=identity,
                        resource=resource,
                        api_version=api_version,
                        service_account=account,
                        pod=pod if account else None,
                    )
                )
                if len(requests) >= self._max_per_pod:
                    return requests
        return requests

    def on_pod_added(self, pod: Pod) -> None:
        if len(self._tasks) >= self._max_pending:
            return
        requests = self.plan(pod)
        if not requests:
            return
        task = asyncio.get_running_loop().create_task(self._prefetch(requests), name=f"warmup-{pod.key}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _prefetch(self, requests: list[TokenRequest]) -> None:
        sources = self._sources()
        loop = asyncio.get_running_loop()
        for request in requests:
            identity = request.identity
            source = sources.get(identity.type) if identity is not None else None
            if source is None:
                continue
            try:
                await self._cache.prefetch(request, source, deadline=loop.time() + self._deadline_s)
                self.prefetched += 1
            except ServiceError as exc:
                log.info("warm start skipped %s: %s", request.resource, exc.description)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
