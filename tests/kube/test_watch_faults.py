"""The caches survive what real API servers and networks do: cuts, stalls, compaction, errors, outages."""

from __future__ import annotations

import itertools

import pytest

from podidentity.kube.watching import Backoff
from podidentity.model import ObjectKey, Pod
from standins.apiserver import FakeApiServer, azure_identity, pod

from .conftest import FAST, CacheFactory, until, until_health


def _names(state) -> set[str]:  # type: ignore[no-untyped-def]
    return {p.name for p in state.all(Pod)}


@pytest.mark.parametrize("clean_end", [False, True], ids=["connection-closed", "chunked-body-ended"])
async def test_stream_cut_mid_event_reconnects_from_last_version_and_loses_nothing(
    apiserver: FakeApiServer, make_cache: CacheFactory, clean_end: bool
) -> None:
    apiserver.create(pod("a"))
    cache = await make_cache()
    # Let the stream prove itself first (a bookmark), so the cut is not mistaken for a quick end.
    await apiserver.wait_for(lambda: apiserver.delivered_rv("pods") >= 1)
    apiserver.cut_next_event(clean_end=clean_end)
    apiserver.create(pod("b"))  # this event's line is cut in half and the connection closed
    apiserver.create(pod("c"))
    await until(lambda: _names(cache.state) == {"a", "b", "c"}, cache.state)

    health = cache.source.health()["pods"]
    assert health["restarts"] == 1
    # A half event is a failure even when the body itself ended properly.
    assert ("middle of an event" if clean_end else "stream broke") in health["last_error"]
    assert health["relists"] == 1  # resumed by resourceVersion, no relist needed
    pod_watches = [r for r in apiserver.requests if r.verb == "watch" and r.path == "/api/v1/pods"]
    assert len(pod_watches) == 2
    assert int(pod_watches[1].query["resourceVersion"]) >= int(pod_watches[0].query["resourceVersion"])
    assert cache.errors("watch_pods") == 1


async def test_events_and_bookmarks_advance_the_resume_point(
    apiserver: FakeApiServer, make_cache: CacheFactory
) -> None:
    cache = await make_cache()
    apiserver.create(pod("x"))
    apiserver.create(azure_identity("unrelated"))  # the pods watch learns of this only by bookmark
    target = apiserver.resource_version
    await apiserver.wait_for(lambda: apiserver.delivered_rv("pods") >= target)
    # A stall (not a reset, which could discard unread bytes) makes the client reconnect after
    # reading everything already sent: it must resume from the bookmark, not the last pod event.
    apiserver.stall_watches()
    await apiserver.wait_for(
        lambda: any(
            r.verb == "watch" and r.path == "/api/v1/pods" and r.query["resourceVersion"] == str(target)
            for r in apiserver.requests
        )
    )
    assert cache.source.health()["pods"]["relists"] == 1


async def test_stalled_stream_hits_the_inactivity_timeout_and_reconnects(
    apiserver: FakeApiServer, make_cache: CacheFactory
) -> None:
    cache = await make_cache()
    apiserver.stall_watches()  # connections stay open, nothing more is sent, not even bookmarks
    await until_health(lambda: cache.source.health()["pods"]["restarts"] >= 1, cache.source)
    assert "no event for 0.4s" in cache.source.health()["pods"]["last_error"]
    await apiserver.wait_for(lambda: apiserver.watches_of("pods") == 1)
    apiserver.create(pod("after-stall"))
    await until(lambda: _names(cache.state) == {"after-stall"}, cache.state)
    # Proof of life (an event or bookmark) on the new stream clears the broken state.
    await until_health(lambda: cache.source.health()["pods"]["broken_since"] is None, cache.source, 2)


@pytest.mark.parametrize("as_http_error", [False, True], ids=["error-event", "http-410"])
async def test_compacted_history_relists_and_drops_objects_deleted_meanwhile(
    apiserver: FakeApiServer, make_cache: CacheFactory, as_http_error: bool
) -> None:
    for name in ("keep", "doomed", "changed"):
        apiserver.create(pod(name))
    cache = await make_cache()
    state = cache.state
    await apiserver.stop_listening()
    await until_health(lambda: cache.source.health()["pods"]["broken_since"] is not None, cache.source)

    apiserver.delete("pods", "default", "doomed")
    apiserver.patch("pods", "default", "changed", {"status": {"podIP": "10.7.7.7"}})
    apiserver.create(pod("born"))
    apiserver.compact(as_http_error=as_http_error)
    assert _names(state) == {"keep", "doomed", "changed"}  # last good state while away
    await apiserver.start_listening()

    await until(lambda: _names(state) == {"keep", "changed", "born"}, state)
    assert [p.name for p in state.pods_at("10.7.7.7")] == ["changed"]
    await until_health(lambda: cache.source.health()["pods"]["relists"] == 2, cache.source)
    assert cache.source.health()["pods"]["broken_since"] is None


async def test_list_errors_are_retried_with_growing_backoff_and_retry_after(
    apiserver: FakeApiServer, make_cache: CacheFactory
) -> None:
    apiserver.create(pod("a"))
    apiserver.fail_next(3, 500, verbs=("list",))
    apiserver.fail_next(1, 429, retry_after=1, verbs=("list",))
    cache = await make_cache(wait=False)
    assert await cache.source.wait_ready(5.0)
    assert _names(cache.state) == {"a"}

    lists = [r for r in apiserver.requests if r.verb == "list"]
    # 4 failures spread over 6 resources' first lists, then one success each.
    assert len(lists) == 4 + 6
    by_path: dict[str, list[float]] = {}
    for r in lists:
        by_path.setdefault(r.path, []).append(r.at)
    gaps = [b - a for times in by_path.values() for a, b in itertools.pairwise(times)]
    assert all(g >= FAST.backoff_initial_s / 2 for g in gaps)
    assert max(gaps) >= 1.0  # the 429's Retry-After: 1 was honoured, above backoff_max_s
    assert (
        sum(
            cache.errors(f"list_{n}")
            for n in (
                "pods",
                "azureidentities",
                "azureidentitybindings",
                "azureassignedidentities",
                "azurepodidentityexceptions",
                "serviceaccounts",
            )
        )
        == 4
    )


async def test_api_server_down_keeps_last_good_state_reports_broken_and_recovers(
    apiserver: FakeApiServer, make_cache: CacheFactory
) -> None:
    apiserver.create(pod("a", ip="10.0.0.1"))
    cache = await make_cache()
    await apiserver.stop_listening()
    await until_health(
        lambda: all(h["broken_since"] is not None for h in cache.source.health().values()), cache.source
    )
    assert cache.source.ready  # synced once; serving the last good state
    assert [p.name for p in cache.state.pods_at("10.0.0.1")] == ["a"]
    restarts = cache.source.health()["pods"]["restarts"]
    # Reconnects keep being tried (and refused) while the server is away.
    await until_health(lambda: cache.source.health()["pods"]["restarts"] >= restarts + 2, cache.source)

    apiserver.create(pod("b", ip="10.0.0.2"))  # happens while NMI cannot see it
    await apiserver.start_listening()
    await until(lambda: bool(cache.state.pods_at("10.0.0.2")), cache.state)
    await until_health(
        lambda: all(h["broken_since"] is None for h in cache.source.health().values()), cache.source
    )
    assert cache.source.health()["pods"]["relists"] == 1  # history still covered the outage


async def test_watch_errors_other_than_gone_back_off_and_resume_without_relisting(
    apiserver: FakeApiServer, make_cache: CacheFactory
) -> None:
    cache = await make_cache()
    apiserver.send_error_event(500, "InternalError", "etcd hiccup")
    await until_health(lambda: "etcd hiccup" in cache.source.health()["pods"]["last_error"], cache.source)
    apiserver.fail_next(2, 503, verbs=("watch",))  # the reconnects fail too, at the HTTP level
    apiserver.create(pod("x"))
    await until(lambda: cache.state.get(Pod, ObjectKey("default", "x")) is not None, cache.state)
    health = cache.source.health()
    assert all(h["relists"] == 1 for h in health.values())  # resumed by resourceVersion each time
    # Six ERROR events (one per stream), then the next two reconnects refused.
    assert sum(h["restarts"] for h in health.values()) == 8
    assert sum(cache.errors(f"watch_{name}") for name in health) == 8


def test_backoff_doubles_with_jitter_caps_and_honours_retry_after() -> None:
    backoff = Backoff(0.5, 4.0, rng=lambda: 1.0)
    assert [backoff.next() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    backoff.reset()
    low = Backoff(0.5, 4.0, rng=lambda: 0.0)
    assert [low.next() for _ in range(3)] == [0.25, 0.5, 1.0]
    assert backoff.next(at_least=3.0) == 3.0
    assert backoff.next(at_least=60.0) == 60.0  # the server's word beats our ceiling...
    assert backoff.next(at_least=86400.0) == 120.0  # ...up to a point
    for _ in range(5000):
        backoff.next()  # a very long outage must not overflow
