"""Fixtures: a stand-in API server on loopback and KubeSources that reach it through a kubeconfig."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from nmi.metrics import Metrics
from nmi.settings import ClusterSettings, IdentitySettings, Settings
from nmi.watches import KubeSource
from podidentity.kube.settings import KubeSettings
from podidentity.state import ClusterState
from standins.apiserver import FakeApiServer

NODE = "node-a"
TOKEN = "s3cret-token"

# Small timeouts so fault tests finish in well under a second each.
FAST = KubeSettings(
    user_agent="nmi/test",
    qps=0,
    connect_timeout_s=1.0,
    request_timeout_s=2.0,
    list_page_size=50,
    watch_timeout_s=30.0,
    inactivity_timeout_s=0.4,
    backoff_initial_s=0.05,
    backoff_max_s=0.4,
    secret_ttl_s=0.5,
)


@pytest.fixture
async def apiserver() -> AsyncIterator[FakeApiServer]:
    # HTTPS with a trustme CA and a bearer token, as a real cluster; bookmarks often enough
    # that a healthy watch never reaches FAST's inactivity timeout.
    server = FakeApiServer(tls=True, token=TOKEN, bookmark_interval_s=0.1)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
def kubeconfig(apiserver: FakeApiServer, tmp_path: Path) -> Path:
    return apiserver.write_kubeconfig(tmp_path / "kubeconfig")


def make_settings(
    kubeconfig: Path, *, mode: str = "standard", scale: bool = True, node: str = NODE
) -> Settings:
    return Settings(
        cluster=ClusterSettings(node_name=node, kubeconfig=str(kubeconfig), enable_scale_features=scale),
        identity=IdentitySettings(operation_mode=mode),  # type: ignore[arg-type]
    )


@dataclass
class Cache:
    source: KubeSource
    state: ClusterState
    metrics: Metrics

    def errors(self, operation: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "aadpodidentity_kubernetes_api_operations_errors_count", {"operation_type": operation}
        )
        return value or 0.0


CacheFactory = Callable[..., Awaitable[Cache]]


@pytest.fixture
async def make_cache(apiserver: FakeApiServer, kubeconfig: Path) -> AsyncIterator[CacheFactory]:
    started: list[KubeSource] = []

    async def factory(
        *,
        mode: str = "standard",
        scale: bool = True,
        kube: KubeSettings = FAST,
        wait: bool = True,
        **kwargs: Any,
    ) -> Cache:
        state = ClusterState()
        metrics = Metrics(CollectorRegistry())
        settings = dataclasses.replace(make_settings(kubeconfig, mode=mode, scale=scale), kube=kube)
        source = KubeSource(settings, state, metrics, **kwargs)
        await source.start()
        started.append(source)
        if wait:
            assert await source.wait_ready(5.0), source.health()
            # Listed is not yet watching: fault tests need the streams open before they strike.
            await apiserver.wait_for(lambda: apiserver.open_watches >= len(source.resources))
        return Cache(source, state, metrics)

    yield factory
    for source in started:
        await source.stop()


async def until(predicate: Callable[[], bool], state: ClusterState, timeout: float = 5.0) -> None:
    """Wait for the cache to reach a condition, woken by every state mutation (no polling)."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await state.wait_for_change(timeout)


async def until_health(predicate: Callable[[], bool], source: KubeSource, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await source.wait_health_change(timeout)
