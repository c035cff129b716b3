"""A relist that suddenly returns nothing for a kind with cached objects is checked once more."""

from __future__ import annotations

import logging

import pytest

from podidentity.model import Pod
from podidentity.state import ClusterState
from standins.apiserver import FakeApiServer, pod

from .conftest import CacheFactory, until


def _record_replaces(state: ClusterState) -> list[tuple[str, int]]:
    """Every ``replace`` the watches make: (kind, how many objects)."""
    calls: list[tuple[str, int]] = []
    original = state.replace

    def replace(kind, objects):  # type: ignore[no-untyped-def]
        objects = list(objects)
        calls.append((kind, len(objects)))
        original(kind, objects)

    state.replace = replace  # type: ignore[method-assign]
    return calls


def _pod_lists_answered(apiserver: FakeApiServer) -> int:
    return sum(
        1 for r in apiserver.requests if r.verb == "list" and r.path == "/api/v1/pods" and r.status == 200
    )


async def _relist_with_pods_gone(
    apiserver: FakeApiServer, make_cache: CacheFactory
) -> tuple[ClusterState, list[tuple[str, int]]]:
    for name in ("a", "b"):
        apiserver.create(pod(name))
    cache = await make_cache()
    assert {p.name for p in cache.state.all(Pod)} == {"a", "b"}
    calls = _record_replaces(cache.state)
    # While the client is away every pod disappears and the history is compacted: the watch
    # comes back to a 410 and lists again, and that list is empty.
    await apiserver.stop_listening()
    for name in ("a", "b"):
        apiserver.delete("pods", "default", name)
    apiserver.compact()
    await apiserver.start_listening()
    await apiserver.wait_for(lambda: _pod_lists_answered(apiserver) >= 2, timeout=10)
    return cache.state, calls


async def test_an_empty_relist_is_listed_again_before_the_cache_is_emptied(
    apiserver: FakeApiServer, make_cache: CacheFactory, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="podidentity.kube"):
        state, calls = await _relist_with_pods_gone(apiserver, make_cache)
        # The empty answer was a blip: the pods are back before the second look.
        for name in ("a", "b"):
            apiserver.create(pod(name))
        await apiserver.wait_for(lambda: _pod_lists_answered(apiserver) >= 3, timeout=10)
        await until(lambda: ("Pod", 2) in calls, state)
    assert ("Pod", 0) not in calls  # the cache was never emptied
    assert {p.name for p in state.all(Pod)} == {"a", "b"}
    assert "returned no objects while the cache holds 2" in caplog.text


async def test_two_empty_lists_in_a_row_empty_the_cache_and_say_so(
    apiserver: FakeApiServer, make_cache: CacheFactory, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="podidentity.kube"):
        state, calls = await _relist_with_pods_gone(apiserver, make_cache)
        assert state.count(Pod) == 2  # still the last good state after the first empty list
        await until(lambda: state.count(Pod) == 0, state)
    assert _pod_lists_answered(apiserver) == 3
    assert calls.count(("Pod", 0)) == 1
    assert "listed no objects twice; the 2 cached ones are really gone" in caplog.text
