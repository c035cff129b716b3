from __future__ import annotations

import asyncio
import time

from prometheus_client import CollectorRegistry

from nmi.metrics import Metrics
from nmi.settings import Settings
from nmi.tokens.cache import TokenCache
from nmi.warmup import WarmStart
from podidentity.model import IdentityType, ObjectKey, Pod, parse_object
from podidentity.state import ClusterState
from podidentity.tokens import Token, TokenRequest
from tests.core.builders import assigned, identity, pod

IDENT = identity("id-a", "aaaa")


class CountingSource:
    def __init__(self) -> None:
        self.calls: list[str] = []

    async def fetch(self, request: TokenRequest, *, deadline: float) -> Token:
        self.calls.append(request.resource)
        now = time.time()
        return Token(f"tok-{len(self.calls)}", request.resource, "Bearer", "aaaa", now + 3600, now, now)


async def test_new_pod_gets_recently_used_resources_prefetched() -> None:
    settings = Settings()
    state = ClusterState()
    for obj in (pod("old", "10.0.0.1"), assigned("old", IDENT)):
        state.apply(parse_object(obj))
    cache = TokenCache(settings.cache, Metrics(CollectorRegistry()))
    source = CountingSource()
    warm = WarmStart(settings, state, cache, lambda: {IdentityType.USER_ASSIGNED_MSI: source})
    loop = asyncio.get_running_loop()
    old_pod = state.get(Pod, ObjectKey("default", "old"))
    assert old_pod is not None
    ident = state.assigned_identities(old_pod.key)[0].identity
    for resource in ("https://vault.azure.net", "https://storage.azure.com/"):
        await cache.get(TokenRequest(ident, resource, "2018-02-01"), source, deadline=loop.time() + 5)
    cache.invalidate(lambda key: True)

    for obj in (pod("new", "10.0.0.2"), assigned("new", IDENT)):
        state.apply(parse_object(obj))
    new_pod = state.get(Pod, ObjectKey("default", "new"))
    assert new_pod is not None
    assert sorted(r.resource for r in warm.plan(new_pod)) == [
        "https://storage.azure.com/",
        "https://vault.azure.net",
    ]
    warm.on_pod_added(new_pod)
    for _ in range(100):
        if warm.prefetched == 2:
            break
        await asyncio.sleep(0.01)
    assert warm.prefetched == 2 and len(source.calls) == 4
    assert cache.peek(TokenRequest(ident, "https://vault.azure.net", "2018-02-01")) is not None

    unbound = parse_object(pod("lonely", "10.0.0.3"))
    assert isinstance(unbound, Pod) and warm.plan(unbound) == []
    await warm.close()
    await cache.close()
