"""Leases, Endpoints and Events on the API server stand-in, over HTTPS as a real client reaches them."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from standins.apiserver import FakeApiServer, endpoints, event, lease, micro_time, pod

TOKEN = "lease-token"
LEASES = "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases"
ENDPOINTS = "/api/v1/namespaces/kube-system/endpoints"
EVENTS = "/api/v1/namespaces/default/events"
MERGE = "application/merge-patch+json"
STRATEGIC = "application/strategic-merge-patch+json"
LOCK = "control-plane.alpha.kubernetes.io/leader"


@pytest.fixture
async def server() -> AsyncIterator[FakeApiServer]:
    async with FakeApiServer(tls=True, token=TOKEN, bookmark_interval_s=0.05) as s:
        yield s


@pytest.fixture
async def api(server: FakeApiServer) -> AsyncIterator[Api]:
    ctx = ssl.create_default_context(cadata=(server.ca_pem or b"").decode())
    async with aiohttp.ClientSession(
        base_url=server.url,
        headers={"Authorization": f"Bearer {TOKEN}"},
        connector=aiohttp.TCPConnector(ssl=ctx),
    ) as session:
        yield Api(session)


class Api:
    def __init__(self, session: aiohttp.ClientSession) -> None:
        self.session = session

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str = "application/json",
        **params: str,
    ) -> tuple[int, dict[str, Any]]:
        data = json.dumps(body) if body is not None else None
        headers = {"Content-Type": content_type} if data is not None else {}
        async with self.session.request(method, path, data=data, headers=headers, params=params) as resp:
            return resp.status, await resp.json()


def _lease_body(name: str, holder: str, rv: str | None = None, transitions: int = 0) -> dict[str, Any]:
    body = lease(
        name,
        namespace="kube-system",
        holder=holder,
        duration_s=15,
        acquire_time="2026-12-07T02:32:57.123456Z",
        renew_time=micro_time(),
        transitions=transitions,
    )
    if rv is not None:
        body["metadata"]["resourceVersion"] = rv
    return body


# --- leases ----------------------------------------------------------------------------------


async def test_lease_create_get_and_conflicting_create(server: FakeApiServer, api: Api) -> None:
    rv_before = server.resource_version
    status, created = await api.call("POST", LEASES, _lease_body("mic", "pod-a"))
    assert status == 201, created
    assert created["apiVersion"] == "coordination.k8s.io/v1" and created["kind"] == "Lease"
    meta = created["metadata"]
    assert meta["uid"] and meta["creationTimestamp"].endswith("Z")
    assert int(meta["resourceVersion"]) == rv_before + 1 == server.resource_version
    assert created["spec"]["acquireTime"] == "2026-12-07T02:32:57.123456Z"

    status, got = await api.call("GET", f"{LEASES}/mic")
    assert (status, got) == (200, created)
    assert server.get("Lease", "kube-system", "mic") == created

    status, body = await api.call("POST", LEASES, _lease_body("mic", "pod-b"))
    assert status == 409
    assert body["kind"] == "Status" and body["reason"] == "AlreadyExists"
    assert body["message"] == 'leases.coordination.k8s.io "mic" already exists'
    assert body["details"] == {"name": "mic", "group": "coordination.k8s.io", "kind": "leases"}

    status, body = await api.call("GET", f"{LEASES}/nobody")
    assert status == 404 and body["message"] == 'leases.coordination.k8s.io "nobody" not found'


async def test_lease_update_is_optimistic(server: FakeApiServer, api: Api) -> None:
    _, created = await api.call("POST", LEASES, _lease_body("mic", "pod-a"))
    rv = created["metadata"]["resourceVersion"]

    status, renewed = await api.call("PUT", f"{LEASES}/mic", _lease_body("mic", "pod-a", rv))
    assert status == 200, renewed
    assert int(renewed["metadata"]["resourceVersion"]) > int(rv)
    assert renewed["metadata"]["uid"] == created["metadata"]["uid"]
    assert renewed["metadata"]["creationTimestamp"] == created["metadata"]["creationTimestamp"]

    # A standby that read the old version loses.
    status, body = await api.call("PUT", f"{LEASES}/mic", _lease_body("mic", "pod-b", rv, transitions=1))
    assert status == 409
    assert body["reason"] == "Conflict"
    assert body["message"] == (
        'Operation cannot be fulfilled on leases.coordination.k8s.io "mic": the object has been modified; '
        "please apply your changes to the latest version and try again"
    )
    assert server.get("leases", "kube-system", "mic")["spec"]["holderIdentity"] == "pod-a"

    # The Lease strategy does not allow unconditional updates: no resourceVersion is a 422.
    status, body = await api.call("PUT", f"{LEASES}/mic", _lease_body("mic", "pod-b"))
    assert status == 422 and body["reason"] == "Invalid"
    assert body["message"] == (
        'leases.coordination.k8s.io "mic" is invalid: '
        "metadata.resourceVersion: Invalid value: 0x0: must be specified for an update"
    )
    assert body["details"]["causes"] == [
        {
            "reason": "FieldValueInvalid",
            "message": "Invalid value: 0x0: must be specified for an update",
            "field": "metadata.resourceVersion",
        }
    ]

    # ...and a PUT to a missing Lease creates it (AllowCreateOnUpdate).
    status, body = await api.call("PUT", f"{LEASES}/other", _lease_body("other", "pod-c"))
    assert status == 201 and body["metadata"]["resourceVersion"]


async def test_lease_times_and_validation_are_the_real_servers(api: Api) -> None:
    body = _lease_body("mic", "pod-a")
    body["spec"]["renewTime"] = "2026-12-07T04:32:57.000001+02:00"
    status, created = await api.call("POST", LEASES, body)
    assert status == 201
    assert created["spec"]["renewTime"] == "2026-12-07T02:32:57.000001Z"  # MicroTime, in UTC

    body = _lease_body("seconds", "pod-a")
    body["spec"]["renewTime"] = "2026-12-07T02:32:57Z"  # a metav1.Time is not a MicroTime
    status, refused = await api.call("POST", LEASES, body)
    assert status == 400 and refused["reason"] == "BadRequest"
    assert 'parsing time "2026-12-07T02:32:57Z"' in refused["message"]

    body = _lease_body("zero", "pod-a")
    body["spec"]["leaseDurationSeconds"] = 0
    status, refused = await api.call("POST", LEASES, body)
    assert status == 422
    assert refused["message"] == (
        'Lease.coordination.k8s.io "zero" is invalid: '
        "spec.leaseDurationSeconds: Invalid value: 0: must be greater than 0"
    )


@pytest.mark.parametrize("content_type", [MERGE, STRATEGIC])
async def test_lease_patch_list_watch_and_delete(server: FakeApiServer, api: Api, content_type: str) -> None:
    _, created = await api.call("POST", LEASES, _lease_body("mic", "pod-a"))
    server.create(lease("other", namespace="default", holder="x"))
    renew = micro_time()
    status, patched = await api.call(
        "PATCH",
        f"{LEASES}/mic",
        {"spec": {"renewTime": renew, "leaseTransitions": 3}},
        content_type=content_type,
    )
    assert status == 200, patched
    assert patched["spec"]["renewTime"] == renew and patched["spec"]["leaseTransitions"] == 3
    assert patched["spec"]["holderIdentity"] == "pod-a"  # untouched fields stay

    # A resourceVersion in a patch is a precondition.
    stale = {
        "metadata": {"resourceVersion": created["metadata"]["resourceVersion"]},
        "spec": {"holderIdentity": "b"},
    }
    status, body = await api.call("PATCH", f"{LEASES}/mic", stale, content_type=content_type)
    assert status == 409 and body["reason"] == "Conflict"

    status, listed = await api.call("GET", "/apis/coordination.k8s.io/v1/leases")
    assert listed["kind"] == "LeaseList" and listed["apiVersion"] == "coordination.k8s.io/v1"
    assert [(i["metadata"]["namespace"], i["metadata"]["name"]) for i in listed["items"]] == [
        ("default", "other"),
        ("kube-system", "mic"),
    ]
    assert listed["items"][0]["kind"] == "Lease"  # group list items keep their kind
    status, listed = await api.call("GET", LEASES, fieldSelector="metadata.name=mic")
    assert [i["metadata"]["name"] for i in listed["items"]] == ["mic"]

    async with api.session.get(
        LEASES, params={"watch": "true", "resourceVersion": listed["metadata"]["resourceVersion"]}
    ) as resp:
        status, gone = await api.call("DELETE", f"{LEASES}/mic")
        line = await asyncio.wait_for(resp.content.readline(), 5)
    assert json.loads(line)["type"] == "DELETED"
    assert status == 200
    assert gone["kind"] == "Status" and gone["status"] == "Success"
    assert gone["details"] == {
        "name": "mic",
        "group": "coordination.k8s.io",
        "kind": "leases",
        "uid": created["metadata"]["uid"],
    }
    assert server.get("Lease", "kube-system", "mic") is None
    status, body = await api.call("DELETE", f"{LEASES}/mic")
    assert status == 404 and body["reason"] == "NotFound"


async def test_delete_preconditions(server: FakeApiServer, api: Api) -> None:
    created = server.create(lease("mic", namespace="kube-system", holder="a"))
    server.patch("Lease", "kube-system", "mic", {"spec": {"holderIdentity": "b"}})
    options = {"preconditions": {"resourceVersion": created["metadata"]["resourceVersion"]}}
    status, body = await api.call("DELETE", f"{LEASES}/mic", options)
    assert status == 409 and "Precondition failed: ResourceVersion in precondition" in body["message"]
    options = {"preconditions": {"uid": created["metadata"]["uid"]}}
    status, body = await api.call("DELETE", f"{LEASES}/mic", options)
    assert status == 200 and server.get("Lease", "kube-system", "mic") is None


# --- endpoints -------------------------------------------------------------------------------


async def test_endpoints_lock_keeps_annotations_and_subsets(server: FakeApiServer, api: Api) -> None:
    record = json.dumps(
        {
            "holderIdentity": "mic-0",
            "leaseDurationSeconds": 15,
            "acquireTime": "2026-12-07T02:32:57Z",
            "renewTime": "2026-12-07T02:33:00Z",
            "leaderTransitions": 0,
        }
    )
    subsets = [{"addresses": [{"ip": "10.0.0.1"}], "ports": [{"port": 8080, "protocol": "TCP"}]}]
    body = endpoints(
        "aad-pod-identity-mic", namespace="kube-system", annotations={LOCK: record}, subsets=subsets
    )
    status, created = await api.call("POST", ENDPOINTS, body)
    assert status == 201, created
    assert created["metadata"]["annotations"][LOCK] == record and created["subsets"] == subsets

    renewed = dict(created)
    renewed["metadata"] = {
        **created["metadata"],
        "annotations": {LOCK: record.replace("02:33:00", "02:33:02")},
    }
    status, updated = await api.call("PUT", f"{ENDPOINTS}/aad-pod-identity-mic", renewed)
    assert status == 200 and "02:33:02" in updated["metadata"]["annotations"][LOCK]
    status, body = await api.call(
        "PUT", f"{ENDPOINTS}/aad-pod-identity-mic", renewed
    )  # the old version again
    assert status == 409
    assert body["message"].startswith('Operation cannot be fulfilled on endpoints "aad-pod-identity-mic"')

    status, patched = await api.call(
        "PATCH",
        f"{ENDPOINTS}/aad-pod-identity-mic",
        {"metadata": {"annotations": {"x": "y"}}},
        content_type=STRATEGIC,
    )
    assert status == 200 and set(patched["metadata"]["annotations"]) == {LOCK, "x"}
    assert server.get("Endpoints", "kube-system", "aad-pod-identity-mic") == patched
    status, got = await api.call("GET", f"{ENDPOINTS}/aad-pod-identity-mic")
    assert got == patched
    status, listed = await api.call("GET", ENDPOINTS)
    assert listed["kind"] == "EndpointsList" and "kind" not in listed["items"][0]  # a core list item

    status, gone = await api.call("DELETE", f"{ENDPOINTS}/aad-pod-identity-mic")
    assert status == 200 and gone["status"] == "Success"
    assert server.objects("Endpoints") == []


# --- events ----------------------------------------------------------------------------------


async def test_events_generate_names_patch_and_list_by_field(server: FakeApiServer, api: Api) -> None:
    web = server.create(pod("web"))
    batch = server.create(pod("batch"))
    status, first = await api.call("POST", EVENTS, event(web, "Assigned", "identity assigned"))
    assert status == 201, first
    name = first["metadata"]["name"]
    assert name.startswith("web.") and len(name) == len("web.") + 5
    assert first["involvedObject"] == {
        "kind": "Pod",
        "namespace": "default",
        "name": "web",
        "uid": web["metadata"]["uid"],
        "apiVersion": "v1",
        "resourceVersion": web["metadata"]["resourceVersion"],
    }
    status, second = await api.call("POST", EVENTS, event(web, "Assigned", "identity assigned"))
    assert second["metadata"]["name"] != name
    await api.call("POST", EVENTS, event(batch, "BindingFailed", "no identity", type_="Warning"))
    server.create(event(server.create(pod("dns", namespace="kube-system")), "Assigned", name="dns.1"))

    # The recorder bumps a repeated event with a merge patch.
    status, bumped = await api.call(
        "PATCH",
        f"{EVENTS}/{name}",
        {"count": 2, "lastTimestamp": "2030-01-02T03:04:05.678Z", "message": "identity assigned"},
        content_type=STRATEGIC,
    )
    assert status == 200, bumped
    assert bumped["count"] == 2 and bumped["lastTimestamp"] == "2030-01-02T03:04:05Z"  # metav1.Time: seconds
    assert bumped["firstTimestamp"] == first["firstTimestamp"]

    async def names(path: str = EVENTS, **params: str) -> list[str]:
        status, body = await api.call("GET", path, **params)
        assert status == 200, body
        assert body["kind"] == "EventList"
        return [i["metadata"]["name"] for i in body["items"]]

    assert await names(fieldSelector="involvedObject.name=web") == sorted([name, second["metadata"]["name"]])
    assert len(await names(fieldSelector="involvedObject.kind=Pod,involvedObject.namespace=default")) == 3
    assert len(await names(fieldSelector="type=Warning,reason=BindingFailed")) == 1
    assert await names(fieldSelector="type!=Warning,involvedObject.name!=web") == []
    assert len(await names(fieldSelector="source=standin")) == 3
    assert await names("/api/v1/events", fieldSelector="involvedObject.namespace=kube-system") == ["dns.1"]
    assert len(await names("/api/v1/events")) == 4
    status, body = await api.call("GET", EVENTS, fieldSelector="message=x")
    assert status == 400 and body["message"] == 'field label not supported: "message"'
    helper = server.objects("Event", "default", field_selector="involvedObject.name=web,reason=Assigned")
    assert {e["metadata"]["name"] for e in helper} == {name, second["metadata"]["name"]}

    status, gone = await api.call("DELETE", f"{EVENTS}/{name}")
    assert status == 200 and gone["kind"] == "Status"
    assert len(await names(fieldSelector="involvedObject.name=web")) == 1


async def test_bad_events_are_422_as_the_real_server_answers(server: FakeApiServer, api: Api) -> None:
    other = server.create(pod("p", namespace="other"))
    status, body = await api.call(
        "POST", EVENTS, event(other, "Assigned", name="p.1") | {"metadata": {"name": "p.1"}}
    )
    assert status == 422 and body["reason"] == "Invalid"
    assert body["message"] == (
        'Event "p.1" is invalid: involvedObject.namespace: Invalid value: "other": '
        "does not match event.namespace"
    )
    assert body["details"]["kind"] == "Event"
    assert body["details"]["causes"][0]["field"] == "involvedObject.namespace"

    # No involvedObject at all: its namespace is empty, which only "default" accepts (for old clients).
    bare = {"kind": "Event", "metadata": {"name": "bare"}, "reason": "R"}
    status, body = await api.call("POST", "/api/v1/namespaces/team-a/events", bare)
    assert status == 422
    assert body["message"] == (
        'Event "bare" is invalid: involvedObject.namespace: Invalid value: "": does not match event.namespace'
    )
    status, body = await api.call("POST", EVENTS, bare)
    assert status == 201, body

    # A new-style event (eventTime set) must say who reported it.
    new_style = {
        "kind": "Event",
        "metadata": {"name": "n"},
        "involvedObject": {"kind": "Pod", "name": "p", "namespace": "default"},
        "eventTime": "2026-12-07T02:32:57.123456Z",
        "reason": "R",
    }
    status, body = await api.call("POST", EVENTS, new_style)
    assert status == 422
    assert [c["field"] for c in body["details"]["causes"]] == [
        "reportingComponent",
        "reportingInstance",
        "action",
    ]

    status, body = await api.call("POST", EVENTS, {"kind": "Event", "metadata": {}, "involvedObject": {}})
    assert status == 422
    assert (
        body["message"]
        == 'Event "" is invalid: metadata.name: Required value: name or generateName is required'
    )

    # A patch that breaks the rule is refused too, and changes nothing.
    status, body = await api.call(
        "PATCH", f"{EVENTS}/bare", {"involvedObject": {"namespace": "elsewhere"}}, content_type=MERGE
    )
    assert status == 422
    assert "involvedObject" not in server.get("Event", "default", "bare")  # type: ignore[operator]


# --- faults ----------------------------------------------------------------------------------


async def test_renewals_fail_as_injected_for_leases_only(server: FakeApiServer, api: Api) -> None:
    _, created = await api.call("POST", LEASES, _lease_body("mic", "pod-a"))
    server.fail_next(1, 403, verbs=("update",), resources="leases")
    server.fail_next(1, 409, verbs=("update",), resources="Lease")
    server.fail_next(1, 500, verbs=("write",), resources=("leases",))

    # Other resources and verbs pass while the lease faults wait.
    status, _ = await api.call("PUT", f"{ENDPOINTS}/e", endpoints("e", namespace="kube-system"))
    assert status == 201
    status, _ = await api.call("GET", f"{LEASES}/mic")
    assert status == 200

    body = _lease_body("mic", "pod-a", created["metadata"]["resourceVersion"])
    status, refused = await api.call("PUT", f"{LEASES}/mic", body)
    assert status == 403 and refused["reason"] == "Forbidden"
    assert refused["message"] == (
        'leases.coordination.k8s.io "mic" is forbidden: User "system:serviceaccount:default:standin" '
        'cannot update resource "leases" in API group "coordination.k8s.io" in the namespace "kube-system"'
    )
    status, refused = await api.call("PUT", f"{LEASES}/mic", body)
    assert status == 409 and refused["reason"] == "Conflict" and "has been modified" in refused["message"]
    status, refused = await api.call("PUT", f"{LEASES}/mic", body)
    assert status == 500 and refused["reason"] == "InternalError"
    status, _ = await api.call("PUT", f"{LEASES}/mic", body)
    assert status == 200

    renewals = [r for r in server.requests if r.resource == "leases" and r.action == "update"]
    assert [r.status for r in renewals] == [403, 409, 500, 200]
    assert all(r.verb == "write" for r in renewals)


async def test_slow_resource(server: FakeApiServer, api: Api) -> None:
    server.delay_requests(0.3, resources="leases", verbs=("update", "create"))
    loop = asyncio.get_running_loop()
    started = loop.time()
    status, _ = await api.call("GET", "/api/v1/pods")
    assert status == 200 and loop.time() - started < 0.25  # other resources are not slowed

    # A write slowed before it is handled is not stored until the delay is over: a client that
    # gives up first did not write.
    task = asyncio.create_task(api.call("POST", LEASES, _lease_body("mic", "pod-a")))
    await asyncio.sleep(0.1)
    assert server.get("Lease", "kube-system", "mic") is None
    status, _ = await task
    assert status == 201 and loop.time() - started >= 0.3

    # Slowed after: the write is stored at once, its answer comes late.
    server.clear_delays()
    server.delay_requests(0.3, resources="leases", after=True)
    task = asyncio.create_task(api.call("DELETE", f"{LEASES}/mic"))
    await server.wait_for(lambda: server.get("Lease", "kube-system", "mic") is None, timeout=0.2)
    assert not task.done()
    status, _ = await task
    assert status == 200


# --- kubectl ---------------------------------------------------------------------------------

KUBECTL = shutil.which("kubectl")

if KUBECTL is not None:

    async def test_kubectl_gets_leases_and_events(server: FakeApiServer, tmp_path: Path) -> None:
        server.create(lease("mic", namespace="kube-system", holder="mic-pod-0"))
        server.create(event(server.create(pod("web")), "Assigned", "identity assigned", name="web.1"))
        kubeconfig = server.write_kubeconfig(tmp_path / "kubeconfig")
        env = {**os.environ, "KUBECONFIG": str(kubeconfig), "HOME": str(tmp_path)}

        async def kubectl(*args: str) -> str:
            proc = await asyncio.create_subprocess_exec(
                str(KUBECTL), *args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
            out, err = await asyncio.wait_for(proc.communicate(), 60)
            assert proc.returncode == 0, err.decode()
            return out.decode()

        leases = await kubectl("get", "leases", "-n", "kube-system", "-o", "json")
        assert [i["spec"]["holderIdentity"] for i in json.loads(leases)["items"]] == ["mic-pod-0"]
        assert "mic" in await kubectl("get", "leases", "-A")
        events = json.loads(await kubectl("get", "events", "-n", "default", "-o", "json"))
        assert [i["reason"] for i in events["items"]] == ["Assigned"]
        assert "web.1" in await kubectl("get", "events", "-n", "default")
        assert "web.1" in await kubectl("get", "ev")  # the short name, from discovery
        assert "identity assigned" in await kubectl("describe", "pod", "web")  # events by field selector
