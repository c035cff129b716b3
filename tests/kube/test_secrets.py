"""The secret reader: one GET per secret per TTL, shared by concurrent callers, rotation seen."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from nmi.metrics import Metrics
from nmi.secrets import SecretReader
from podidentity.kube.client import KubeClient
from podidentity.kube.config import load_connection
from podidentity.kube.errors import KubeApiError, KubeUnavailable
from standins.apiserver import FakeApiServer, secret

from .conftest import FAST, CacheFactory

SETTINGS = replace(FAST, secret_ttl_s=30.0, secret_max_stale_s=300.0)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def client(kubeconfig: Path) -> AsyncIterator[KubeClient]:
    client = KubeClient(await load_connection(str(kubeconfig), SETTINGS), SETTINGS)
    yield client
    await client.close()


def _reader(client: KubeClient, clock: Clock) -> tuple[SecretReader, Metrics]:
    metrics = Metrics(CollectorRegistry())
    return SecretReader(SETTINGS, metrics, client=client, clock=clock), metrics


def _gets(server: FakeApiServer) -> int:
    return sum(1 for r in server.requests if r.path.endswith("/secrets/sp"))


async def test_cached_within_ttl_and_rotation_seen_after_it(
    apiserver: FakeApiServer, client: KubeClient
) -> None:
    apiserver.create(secret("sp", {"clientSecret": "v1"}, namespace="team-a"))
    clock = Clock()
    reader, _ = _reader(client, clock)

    assert (await reader.get_secret("team-a", "sp")).data == {"clientSecret": b"v1"}
    apiserver.apply(secret("sp", {"clientSecret": "v2"}, namespace="team-a"))
    clock.now += SETTINGS.secret_ttl_s - 1
    assert (await reader.get_secret("team-a", "sp")).data["clientSecret"] == b"v1"
    assert _gets(apiserver) == 1
    clock.now += 2
    assert (await reader.get_secret("team-a", "sp")).data["clientSecret"] == b"v2"
    assert _gets(apiserver) == 2


async def test_concurrent_callers_share_one_get(apiserver: FakeApiServer, client: KubeClient) -> None:
    apiserver.create(secret("sp", {"clientSecret": "v1"}))
    reader, _ = _reader(client, Clock())
    results = await asyncio.gather(*(reader.get_secret("default", "sp") for _ in range(20)))
    assert {r.data["clientSecret"] for r in results} == {b"v1"}
    assert _gets(apiserver) == 1


async def test_missing_secret_is_a_404_and_counted(apiserver: FakeApiServer, client: KubeClient) -> None:
    reader, metrics = _reader(client, Clock())
    with pytest.raises(KubeApiError) as info:
        await reader.get_secret("default", "sp")
    assert info.value.status == 404
    sample = metrics.registry.get_sample_value(
        "aadpodidentity_kubernetes_api_operations_errors_count", {"operation_type": "get_secret"}
    )
    assert sample == 1


async def test_outage_serves_a_recent_copy_then_fails(apiserver: FakeApiServer, client: KubeClient) -> None:
    apiserver.create(secret("sp", {"clientSecret": "v1"}))
    clock = Clock()
    reader, _ = _reader(client, clock)
    await reader.get_secret("default", "sp")
    apiserver.fail_next(1, 500, verbs=("get",))
    clock.now += SETTINGS.secret_ttl_s + 1
    assert (await reader.get_secret("default", "sp")).data["clientSecret"] == b"v1"  # stale but recent
    await apiserver.stop_listening()
    clock.now += SETTINGS.secret_max_stale_s
    with pytest.raises(KubeUnavailable):
        await reader.get_secret("default", "sp")


async def test_deleted_secret_is_not_served_from_cache(apiserver: FakeApiServer, client: KubeClient) -> None:
    apiserver.create(secret("sp", {"clientSecret": "v1"}))
    clock = Clock()
    reader, _ = _reader(client, clock)
    await reader.get_secret("default", "sp")
    apiserver.delete("secrets", "default", "sp")
    clock.now += SETTINGS.secret_ttl_s + 1
    with pytest.raises(KubeApiError):
        await reader.get_secret("default", "sp")


async def test_names_cannot_escape_the_secret_path(apiserver: FakeApiServer, client: KubeClient) -> None:
    reader, _ = _reader(client, Clock())
    with pytest.raises(KubeApiError):
        await reader.get_secret("default", "../../pods")
    assert apiserver.requests[-1].path == "/api/v1/namespaces/default/secrets/../../pods"
    assert apiserver.requests[-1].verb == "get"


async def test_kube_source_exposes_the_reader(apiserver: FakeApiServer, make_cache: CacheFactory) -> None:
    apiserver.create(secret("sp", {"clientSecret": "abc"}, namespace="team-a"))
    cache = await make_cache()
    assert (await cache.source.secrets.get_secret("team-a", "sp")).data == {"clientSecret": b"abc"}
