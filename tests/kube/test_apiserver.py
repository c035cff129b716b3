"""The API server stand-in behaves like the real one on the wire (checked with a plain HTTP client)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from standins.apiserver import FakeApiServer, assigned_identity, azure_identity, pod

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def server() -> AsyncIterator[FakeApiServer]:
    async with FakeApiServer(bookmark_interval_s=0.05) as s:
        yield s


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def _get(
    http: aiohttp.ClientSession, server: FakeApiServer, path: str, **params: str
) -> tuple[int, Any]:
    async with http.get(server.url + path, params=params) as resp:
        return resp.status, await resp.json()


async def _watch(
    http: aiohttp.ClientSession, server: FakeApiServer, path: str, count: int, **params: str
) -> list[dict[str, Any]]:
    """The first ``count`` events of a watch (or all of them, if the server ends the stream first)."""
    events: list[dict[str, Any]] = []
    async with asyncio.timeout(5), http.get(server.url + path, params={"watch": "true", **params}) as resp:
        assert resp.status == 200
        assert resp.headers["Transfer-Encoding"] == "chunked"
        while len(events) < count:
            line = await resp.content.readline()
            if not line:
                break
            events.append(json.loads(line))
    return events


async def test_selectors_filter_lists_like_the_real_server(
    server: FakeApiServer, http: aiohttp.ClientSession
) -> None:
    server.create(pod("a", node="n1", labels={"app": "web", "tier": "fe"}))
    server.create(pod("b", node="n2", labels={"app": "web"}))
    server.create(pod("c", node="n1", namespace="kube-system", labels={"app": "dns"}))

    async def names(path: str = "/api/v1/pods", **params: str) -> list[str]:
        status, body = await _get(http, server, path, **params)
        assert status == 200, body
        return [i["metadata"]["name"] for i in body["items"]]

    assert await names(fieldSelector="spec.nodeName=n1") == ["a", "c"]  # sorted by namespace/name
    assert await names(labelSelector="app=web") == ["a", "b"]
    assert await names(labelSelector="app=web,tier") == ["a"]
    assert await names(labelSelector="app!=web") == ["c"]
    assert await names(labelSelector="app in (dns, other)") == ["c"]
    assert await names(labelSelector="!tier,app notin (dns)") == ["b"]
    assert await names("/api/v1/namespaces/kube-system/pods") == ["c"]
    assert await names(fieldSelector="metadata.namespace=default,spec.nodeName!=n2") == ["a"]
    status, body = await _get(
        http, server, "/apis/aadpodidentity.k8s.io/v1/azureidentities", fieldSelector="spec.x=y"
    )
    assert status == 400
    assert body["kind"] == "Status" and "field label not supported" in body["message"]


async def test_pages_come_from_one_snapshot(server: FakeApiServer, http: aiohttp.ClientSession) -> None:
    for i in range(5):
        server.create(pod(f"p{i}"))
    status, first = await _get(http, server, "/api/v1/pods", limit="2")
    assert [i["metadata"]["name"] for i in first["items"]] == ["p0", "p1"]
    assert first["metadata"]["remainingItemCount"] == 3
    server.delete("pods", "default", "p3")
    server.create(pod("p5"))
    names = []
    token = first["metadata"]["continue"]
    while token:
        status, page = await _get(http, server, "/api/v1/pods", limit="2", **{"continue": token})
        assert page["metadata"]["resourceVersion"] == first["metadata"]["resourceVersion"]
        names += [i["metadata"]["name"] for i in page["items"]]
        token = page["metadata"].get("continue")
    assert names == ["p2", "p3", "p4"]  # as of the first page, not the writes in between
    server.compact()
    status, body = await _get(
        http, server, "/api/v1/pods", limit="2", **{"continue": first["metadata"]["continue"]}
    )
    assert status == 410 and body["reason"] == "Expired"


async def test_watch_replays_from_a_version_and_translates_selector_moves(
    server: FakeApiServer, http: aiohttp.ClientSession
) -> None:
    ident = azure_identity("id")
    server.create(assigned_identity("a", ident, node="n1"))
    rv = server.resource_version
    server.create(assigned_identity("b", ident, node="n1"))
    server.patch(
        "azureassignedidentities", "default", "a-default-id", {"metadata": {"labels": {"nodename": "n2"}}}
    )
    server.patch("azureassignedidentities", "default", "b-default-id", {"status": {"status": "Created"}})
    server.create(assigned_identity("c", ident, node="n2"))
    events = await _watch(
        http,
        server,
        "/apis/aadpodidentity.k8s.io/v1/azureassignedidentities",
        3,
        resourceVersion=str(rv),
        labelSelector="nodename=n1",
    )
    assert [(e["type"], e["object"]["spec"]["pod"]) for e in events] == [
        ("ADDED", "b"),
        ("DELETED", "a"),  # moved off this selector
        ("MODIFIED", "b"),
    ]
    versions = [int(e["object"]["metadata"]["resourceVersion"]) for e in events]
    assert versions == sorted(versions) and versions[0] > rv


async def test_watch_without_version_starts_with_synthetic_adds(
    server: FakeApiServer, http: aiohttp.ClientSession
) -> None:
    server.create(pod("x"))
    events = await _watch(http, server, "/api/v1/pods", 1)
    assert events[0]["type"] == "ADDED"
    assert events[0]["object"]["kind"] == "Pod"  # watch objects carry kind, unlike core list items


async def test_too_old_version_is_410_expired_and_bookmarks_carry_progress(
    server: FakeApiServer, http: aiohttp.ClientSession
) -> None:
    server.create(pod("x"))
    server.create(pod("y"))
    rv = server.resource_version
    server.compact()
    events = await _watch(http, server, "/api/v1/pods", 5, resourceVersion=str(rv - 1))
    assert len(events) == 1  # the stream ends after the error
    assert events[0]["type"] == "ERROR"
    assert events[0]["object"]["code"] == 410 and events[0]["object"]["reason"] == "Expired"

    server.create(azure_identity("other-kind"))  # progress elsewhere moves the bookmark
    events = await _watch(
        http, server, "/api/v1/pods", 1, resourceVersion=str(rv), allowWatchBookmarks="true"
    )
    assert events[0]["type"] == "BOOKMARK"
    assert events[0]["object"]["metadata"]["resourceVersion"] == str(server.resource_version)


async def test_timeout_seconds_ends_the_stream_cleanly(
    server: FakeApiServer, http: aiohttp.ClientSession
) -> None:
    events = await _watch(http, server, "/api/v1/pods", 100, resourceVersion="1", timeoutSeconds="0.2")
    assert events == []


async def test_http_writes_finalizers_and_conflicts(
    server: FakeApiServer, http: aiohttp.ClientSession
) -> None:
    base = server.url + "/apis/aadpodidentity.k8s.io/v1/namespaces/default/azureassignedidentities"
    obj = assigned_identity("p", azure_identity("id"), state="Created")
    async with http.post(base, json=obj) as resp:
        assert resp.status == 201
        created = await resp.json()
    async with http.post(base, json=obj) as resp:
        assert resp.status == 409
    stale = dict(created, status={"status": "Assigned"})
    async with http.put(f"{base}/p-default-id", json=stale) as resp:
        assert resp.status == 200
    async with http.put(f"{base}/p-default-id", json=stale) as resp:
        assert resp.status == 409  # resourceVersion moved on
    headers = {"Content-Type": "application/merge-patch+json"}
    async with http.patch(
        f"{base}/p-default-id", data=json.dumps({"spec": {"pod": "q"}}), headers=headers
    ) as resp:
        assert (await resp.json())["spec"]["pod"] == "q"
    async with http.delete(f"{base}/p-default-id") as resp:
        assert "deletionTimestamp" in (await resp.json())["metadata"]  # held by the finalizer
    async with http.patch(
        f"{base}/p-default-id", data=json.dumps({"metadata": {"finalizers": None}}), headers=headers
    ) as resp:
        assert resp.status == 200
    assert server.get("azureassignedidentities", "default", "p-default-id") is None


async def test_auth_and_injected_failures(http: aiohttp.ClientSession) -> None:
    async with FakeApiServer(token="t") as server:
        status, body = await _get(http, server, "/api/v1/pods")
        assert status == 401 and body["reason"] == "Unauthorized"
        server.fail_next(1, 429, retry_after=3)
        async with http.get(server.url + "/api/v1/pods", headers={"Authorization": "Bearer t"}) as resp:
            assert resp.status == 429
            assert resp.headers["Retry-After"] == "3"
        async with http.get(server.url + "/api/v1/pods", headers={"Authorization": "Bearer t"}) as resp:
            assert resp.status == 200


async def test_discovery(server: FakeApiServer, http: aiohttp.ClientSession) -> None:
    _, api = await _get(http, server, "/api")
    assert api["versions"] == ["v1"]
    _, groups = await _get(http, server, "/apis")
    assert [g["name"] for g in groups["groups"]] == ["coordination.k8s.io", "aadpodidentity.k8s.io"]
    _, resources = await _get(http, server, "/apis/aadpodidentity.k8s.io/v1")
    assert {r["name"] for r in resources["resources"]} == {
        "azureidentities",
        "azureidentitybindings",
        "azureassignedidentities",
        "azurepodidentityexceptions",
    }
    _, core = await _get(http, server, "/api/v1")
    assert {r["name"] for r in core["resources"]} == {"pods", "secrets", "endpoints", "events"}
    _, coordination = await _get(http, server, "/apis/coordination.k8s.io/v1")
    assert [r["name"] for r in coordination["resources"]] == ["leases"]


async def test_cli_loads_a_file_and_writes_a_kubeconfig(tmp_path: Path) -> None:
    objects = tmp_path / "objects.yaml"
    objects.write_text(yaml.safe_dump_all([pod("from-file"), azure_identity("id")]))
    kubeconfig = tmp_path / "kc"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "standins.apiserver",
        "--port",
        "0",
        "--load",
        str(objects),
        "--kubeconfig",
        str(kubeconfig),
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(10):
            line = (await proc.stdout.readline()).decode()
        url = line.rsplit(" ", 1)[-1].strip()
        assert yaml.safe_load(kubeconfig.read_text())["clusters"][0]["cluster"]["server"] == url
        async with aiohttp.ClientSession() as http, http.get(url + "/api/v1/pods") as resp:
            body = await resp.json()
        assert [i["metadata"]["name"] for i in body["items"]] == ["from-file"]
    finally:
        proc.terminate()
        await proc.wait()
