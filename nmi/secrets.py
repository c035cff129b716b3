"""Service-principal secrets: GET on demand, cached for a short TTL, one request per key at a time.

Not a watch: watching secrets needs ``list``/``watch`` on every secret in the cluster, while a GET
needs only ``get`` (nmi-spec §9.2 already found that too broad). The original did a live GET on
every token request; the TTL bounds that to one per secret per ``secret_ttl_s`` while a rotated
secret is still picked up within it. If the API server fails, a copy younger than
``secret_max_stale_s`` is served rather than failing the token request; a 404 is never masked.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from urllib.parse import quote

from nmi.metrics import Metrics
from podidentity.errors import ConfigError
from podidentity.kube.client import KubeClient
from podidentity.kube.errors import KubeApiError, KubeError, KubeUnavailable
from podidentity.kube.settings import KubeSettings
from podidentity.model import ObjectKey, Secret, parse_secret

log = logging.getLogger("nmi.kube")


class SecretReader:
    def __init__(
        self,
        settings: KubeSettings,
        metrics: Metrics,
        *,
        client: KubeClient | None = None,  # None until KubeSource.start() attaches one
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._client = client
        self._clock = clock
        self._errors = metrics.kube_errors.labels(operation_type="get_secret")
        self._cache: OrderedDict[ObjectKey, tuple[Secret, float]] = OrderedDict()
        self._inflight: dict[ObjectKey, asyncio.Task[Secret]] = {}
        self.fetches = 0
        """GETs sent, for tests and the benchmark."""

    def attach(self, client: KubeClient) -> None:
        self._client = client

    def detach(self) -> None:
        self._client = None
        for task in self._inflight.values():
            task.cancel()
        self._inflight.clear()

    async def get_secret(self, namespace: str, name: str) -> Secret:
        """The secret, at most ``secret_ttl_s`` old.

        Raises ``KubeApiError`` (``status`` 404 when it does not exist, 403 when NMI may not read
        it), ``KubeUnavailable`` when the API server cannot be reached and no recent copy exists,
        and ``ConfigError`` when the secret's data is malformed.
        """
        key = ObjectKey(namespace, name)
        cached = self._cache.get(key)
        now = self._clock()
        if cached is not None and now - cached[1] < self._settings.secret_ttl_s:
            return cached[0]
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.create_task(self._fetch(key), name=f"nmi-get-secret-{namespace}/{name}")
            self._inflight[key] = task
            task.add_done_callback(functools.partial(self._done, key))
        try:
            # Shielded: one caller giving up must not cancel the GET the others are waiting for.
            return await asyncio.shield(task)
        except KubeApiError as exc:
            self._errors.inc()
            if exc.status == 404:
                self._cache.pop(key, None)
                raise
            return self._stale_or_raise(key, cached, exc)
        except KubeUnavailable as exc:
            self._errors.inc()
            return self._stale_or_raise(key, cached, exc)

    def _done(self, key: ObjectKey, task: asyncio.Task[Secret]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # retrieved here too, in case every caller gave up before it ended

    def _stale_or_raise(self, key: ObjectKey, cached: tuple[Secret, float] | None, exc: KubeError) -> Secret:
        if cached is not None and self._clock() - cached[1] < self._settings.secret_max_stale_s:
            log.warning(
                "cannot refresh secret %s (%s); using the copy read %.0fs ago",
                key,
                exc,
                self._clock() - cached[1],
            )
            return cached[0]
        raise exc

    async def _fetch(self, key: ObjectKey) -> Secret:
        client = self._client
        if client is None:
            raise KubeUnavailable("the Kubernetes client is not started")
        self.fetches += 1
        body = await client.get(
            f"/api/v1/namespaces/{quote(key.namespace, safe='')}/secrets/{quote(key.name, safe='')}"
        )
        body.setdefault("kind", "Secret")
        try:
            secret = parse_secret(body)
        except ConfigError:
            self._cache.pop(key, None)
            raise
        self._cache[key] = (secret, self._clock())
        self._cache.move_to_end(key)
        while len(self._cache) > self._settings.secret_cache_entries:
            self._cache.popitem(last=False)
        return secret

    def forget(self, namespace: str, name: str) -> None:
        """Drop a cached copy, e.g. after Azure AD rejected the credential it held."""
        self._cache.pop(ObjectKey(namespace, name), None)
