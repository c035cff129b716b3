"""The token listener end to end over real sockets: routes, errors, modes, waits and the cache."""

from __future__ import annotations

import asyncio
import copy
import json
import time
from typing import Any

import pytest

from tests.nmi.conftest import WEB_CLIENT_ID, base_docs, http, token_path

pytestmark = pytest.mark.timeout(60)

WEB = "127.0.0.10"
BATCH = "127.0.0.11"
AGENT = "127.0.0.12"
MISSING_HEADER = {"error": "invalid_request", "error_description": "Required metadata header not specified"}


def docs_without(kind: str) -> list[dict[str, Any]]:
    return [d for d in base_docs() if d["kind"] != kind]


def with_state(status: str) -> list[dict[str, Any]]:
    docs = base_docs()
    for d in docs:
        if d["kind"] == "AzureAssignedIdentity":
            d["status"]["status"] = status
    return docs


async def test_bound_pod_gets_imds_shaped_token_then_cached(make_node) -> None:
    node = await make_node()
    first = await node.get(token_path(), src=WEB)
    assert first.status == 200, first.body
    body = first.json()
    assert set(body) >= {
        "access_token",
        "client_id",
        "expires_in",
        "expires_on",
        "not_before",
        "resource",
        "token_type",
    }
    assert all(isinstance(v, str) for v in body.values())
    assert body["client_id"] == WEB_CLIENT_ID and body["resource"] == "https://vault.azure.net"
    assert first.headers["content-type"].startswith("application/json")
    second = await node.get(token_path(), src=WEB)
    assert second.json()["access_token"] == body["access_token"]
    assert node.imds.count(resource="https://vault.azure.net") == 1
    seen = node.imds.requests[0]
    assert seen.headers.get("Metadata") == "true" and "X-Forwarded-For" not in seen.headers


async def test_expires_in_is_recomputed_at_serve_time(make_node) -> None:
    node = await make_node()
    first = (await node.get(token_path(), src=WEB)).json()
    await asyncio.sleep(1.1)
    second = (await node.get(token_path(), src=WEB)).json()
    assert second["expires_on"] == first["expires_on"]
    assert int(second["expires_in"]) < int(first["expires_in"])


async def test_unbound_pod_is_denied_at_once_with_imds_identity_not_found(make_node) -> None:
    node = await make_node()
    started = time.monotonic()
    reply = await node.get(token_path(), src=BATCH)
    assert time.monotonic() - started < 1.0
    # IMDS's answer for an identity the VM does not have: SDKs stop at once instead of retrying.
    assert reply.status == 400
    body = reply.json()
    assert body["error"] == "invalid_request" and body["error_description"].startswith("Identity not found")
    assert "default/batch" in body["error_description"] and "aadpodidbinding" in body["error_description"]
    assert node.imds.count() == 0


async def test_retry_after_flag_turns_only_the_ended_wait_into_503(make_node) -> None:
    node = await make_node(
        with_state("Created"), identity={"set_retry_after_header": True, "identity_wait_timeout_s": 0.2}
    )
    reply = await node.get(token_path(), src=WEB)
    assert reply.status == 503 and reply.headers["retry-after"] == "20"
    final = await node.get(token_path(), src=BATCH)
    assert final.status == 400 and "retry-after" not in final.headers


async def test_exception_pod_is_forwarded_untouched_to_imds(make_node) -> None:
    node = await make_node()
    reply = await node.get(token_path(**{"api-version": "2019-08-01", "msi_res_id": "x"}), src=AGENT)
    # The stand-in answers for itself: an unknown resource ID is IMDS's own 400.
    assert reply.status == 400 and "Identity not found" in reply.body.decode()
    forwarded = node.imds.requests[-1]
    assert forwarded.query.get("api-version") == "2019-08-01" and forwarded.query.get("msi_res_id") == "x"
    ok = await node.get(token_path(**{"api-version": "2018-02-01"}), src=AGENT)
    assert ok.status == 200


@pytest.mark.parametrize(
    ("headers", "status"),
    [({}, 400), ({"Metadata": "false"}, 400), ({"Metadata": "TRUE"}, 200), ({"metadata": "true"}, 200)],
)
async def test_metadata_header(make_node, headers: dict[str, str], status: int) -> None:
    node = await make_node()
    reply = await node.get(token_path(), src=WEB, headers=headers)
    assert reply.status == status
    if status == 400:
        assert reply.json() == MISSING_HEADER


async def test_metadata_header_can_be_optional(make_node) -> None:
    node = await make_node(identity={"metadata_header_required": False})
    assert (await node.get(token_path(), src=WEB, headers={})).status == 200


async def test_bad_requests(make_node) -> None:
    node = await make_node()
    assert (await node.get("/metadata/identity/oauth2/token", src=WEB)).status == 400
    assert (await node.get("/metadata/identity/oauth2/token?resource=", src=WEB)).status == 400
    for path in (
        "/metadata/identity\\oauth2\\token?resource=x",
        "/metadata/Identity/oauth2/token?resource=x",
        "/metadata/identity/oauth2/tokenXYZ?resource=x",
    ):
        reply = await node.get(path, src=WEB)
        assert reply.status == 400 and reply.json()["error_description"] == "Invalid request"
    reply = await node.get("/metadata/../metadata/instance", src=WEB)
    assert reply.status == 400
    assert node.imds.count() == 0 and not node.imds.requests


async def test_named_identity_matching(make_node) -> None:
    node = await make_node()
    upper = await node.get(token_path(client_id=WEB_CLIENT_ID.upper()), src=WEB)
    assert upper.status == 200 and upper.json()["client_id"] == WEB_CLIENT_ID
    by_res = await node.get(
        token_path(
            mi_res_id="/SUBSCRIPTIONS/00000000-0000-0000-0000-000000000000/"
            "resourcegroups/demo/providers/Microsoft.ManagedIdentity/"
            "userAssignedIdentities/web-identity"
        ),
        src=WEB,
    )
    assert by_res.status == 200
    other = await node.get(token_path(client_id="11111111-2222-3333-4444-555555555555"), src=WEB)
    assert other.status == 400 and other.json()["error_description"].startswith("Identity not found")


async def test_managed_mode_uses_bindings(make_node) -> None:
    node = await make_node(
        docs_without("AzureAssignedIdentity"),
        identity={"operation_mode": "managed", "force_namespaced": True},
    )
    assert (await node.get(token_path(), src=WEB)).status == 200
    assert (await node.get(token_path(), src=BATCH)).status == 400


async def test_unknown_caller_waits_for_pod_then_is_served(make_node) -> None:
    node = await make_node()
    docs = base_docs()
    new_pod = copy.deepcopy(next(d for d in docs if d["metadata"]["name"] == "web"))
    new_pod["metadata"].update(name="late", uid="late-uid")
    new_pod["status"]["podIP"] = "127.0.0.20"
    aai = copy.deepcopy(next(d for d in docs if d["kind"] == "AzureAssignedIdentity"))
    aai["metadata"]["name"] = "late-default-web-identity"
    aai["spec"]["pod"] = "late"
    started = time.monotonic()
    request = asyncio.create_task(node.get(token_path(), src="127.0.0.20"))
    await asyncio.sleep(0.2)
    assert not request.done()
    node.write_state([*docs, new_pod, aai])
    reply = await asyncio.wait_for(request, 5)
    assert reply.status == 200 and time.monotonic() - started < 1.9


async def test_unknown_caller_is_refused_after_the_bound(make_node) -> None:
    node = await make_node(identity={"pod_wait_timeout_s": 0.3})
    started = time.monotonic()
    reply = await node.get(token_path(), src="127.0.0.99")
    assert reply.status == 404 and 0.25 < time.monotonic() - started < 2


async def test_identity_waits_until_assigned(make_node) -> None:
    node = await make_node(with_state("Created"))
    request = asyncio.create_task(node.get(token_path(), src=WEB))
    await asyncio.sleep(0.2)
    assert not request.done()
    node.write_state(with_state("Assigned"))
    assert (await asyncio.wait_for(request, 5)).status == 200


async def test_identity_never_assigned_is_refused_after_the_bound(make_node) -> None:
    node = await make_node(with_state("Created"), identity={"identity_wait_timeout_s": 0.3})
    reply = await node.get(token_path(), src=WEB)
    assert reply.status == 404 and "not yet assigned" in reply.json()["error_description"]


async def test_client_disconnect_cancels_the_wait(make_node) -> None:
    node = await make_node(identity={"pod_wait_timeout_s": 30})
    _, writer = await asyncio.open_connection("127.0.0.1", node.port, local_addr=("127.0.0.98", 0))
    writer.write(f"GET {token_path()} HTTP/1.1\r\nHost: x\r\nMetadata: true\r\n\r\n".encode())
    await writer.drain()

    def waiting() -> list[asyncio.Task[Any]]:
        return [t for t in asyncio.all_tasks() if "127.0.0.98" in t.get_name()]

    for _ in range(100):
        if waiting():
            break
        await asyncio.sleep(0.01)
    assert waiting(), "the request should be waiting for the pod cache"
    writer.close()
    for _ in range(100):
        if not waiting():
            break
        await asyncio.sleep(0.01)
    assert not waiting()


async def test_removed_assignment_denies_even_with_cached_token(make_node) -> None:
    node = await make_node()
    assert (await node.get(token_path(), src=WEB)).status == 200
    node.write_state(docs_without("AzureAssignedIdentity"))
    for _ in range(200):
        reply = await node.get(token_path(), src=WEB)
        if reply.status != 200:
            break
        await asyncio.sleep(0.02)
    assert reply.status == 404


async def test_single_flight_1000_requests_from_100_pods(make_node) -> None:
    docs = [d for d in base_docs() if d["kind"] != "Pod" and d["kind"] != "AzureAssignedIdentity"]
    identity = next(d for d in docs if d["kind"] == "AzureIdentity")
    for i in range(100):
        name = f"pod-{i}"
        docs.append(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": name, "namespace": "default", "uid": f"u{i}"},
                "spec": {"nodeName": "demo-node"},
                "status": {"phase": "Running", "podIP": f"127.0.1.{i + 1}"},
            }
        )
        docs.append(
            {
                "apiVersion": "aadpodidentity.k8s.io/v1",
                "kind": "AzureAssignedIdentity",
                "metadata": {"name": f"{name}-default-web-identity", "namespace": "default"},
                "spec": {"pod": name, "podNamespace": "default", "azureIdentityRef": identity},
                "status": {"status": "Assigned"},
            }
        )
    node = await make_node(docs, imds_options={"max_concurrent": 5})
    node.imds.set_delay(0.3)
    replies = await asyncio.gather(
        *(node.get(token_path(), src=f"127.0.1.{i % 100 + 1}") for i in range(1000))
    )
    assert [r.status for r in replies].count(200) == 1000
    assert node.imds.count() == 1
    assert len({r.json()["access_token"] for r in replies}) == 1


async def test_background_refresh_ahead_of_expiry(make_node) -> None:
    node = await make_node(
        imds_options={"token_lifetime_s": 6},
        cache={
            "refresh_margin_s": 1.0,
            "expiry_safety_s": 0.5,
            "min_refresh_interval_s": 0.5,
            "jitter_fraction": 0.0,
        },
    )
    first = (await node.get(token_path(), src=WEB)).json()
    # Only tokens in use are refreshed: an idle one is left to expire.
    assert (await node.get(token_path(), src=WEB)).json()["access_token"] == first["access_token"]
    await node.imds.wait_for_requests(2, timeout=5)
    await asyncio.sleep(0.05)
    second = (await node.get(token_path(), src=WEB)).json()
    assert second["access_token"] != first["access_token"]
    assert node.imds.count() == 2


async def test_upstream_refusal_and_unavailability(make_node) -> None:
    node = await make_node()
    node.imds.identities.clear()
    refused = await node.get(token_path(), src=WEB)
    assert refused.status == 403 and "Identity not found" in refused.json()["error_description"]
    assert "169.254" not in refused.body.decode() and "127.0.0.1" not in refused.body.decode()
    await node.imds.stop()
    unavailable = await node.get(token_path(resource="https://management.azure.com/"), src=WEB)
    assert unavailable.status == 503


async def test_instance_metadata_proxy_and_block(make_node) -> None:
    node = await make_node()
    reply = await node.get(
        "/metadata/instance?api-version=2021-02-01",
        src=BATCH,
        headers={"Metadata": "true", "X-Forwarded-For": "1.2.3.4", "Connection": "close"},
    )
    assert reply.status == 200 and "compute" in reply.json()
    assert "X-Forwarded-For" not in node.imds.requests[-1].headers if node.imds.requests else True
    assert (await node.get("/metadata/instance?api-version=2021-02-01", src=BATCH, headers={})).status == 400
    blocked = await make_node(identity={"block_instance_metadata": True})
    reply = await blocked.get("/metadata/instance/compute?api-version=2021-02-01", src=BATCH)
    assert reply.status == 403


async def test_host_token_is_off_by_default_and_local_only(make_node) -> None:
    node = await make_node()
    headers = {"podns": "default", "podname": "web"}
    assert (
        await node.get("/host/token/?resource=https://vault.azure.net", src="127.0.0.1", headers=headers)
    ).status == 404
    enabled = await make_node(identity={"enable_host_token": True})
    reply = await enabled.get(
        "/host/token/?resource=https://vault.azure.net", src="127.0.0.1", headers=headers
    )
    assert reply.status == 200 and reply.json()["clientid"] == WEB_CLIENT_ID
    assert reply.json()["token"]["resource"] == "https://vault.azure.net"
    assert (await enabled.get("/host/token/?resource=x", src=WEB, headers=headers)).status == 403
    assert (await enabled.get("/host/token/?resource=x", src="127.0.0.1", headers={})).status == 400


async def test_health_and_metrics(make_node) -> None:
    node = await make_node()
    assert node.app.probe_server is not None and node.app.metrics_server is not None
    health = await http(node.app.probe_server.port, "/healthz", src="127.0.0.1")
    assert health.status == 200 and health.json()["checks"]["cluster_state"]["ok"] is True
    assert (await http(node.app.probe_server.port, "/debug/pprof/", src="127.0.0.1")).status == 404
    await node.get(token_path(resource="https://attacker.example/" + "x" * 50), src=WEB)
    metrics = (await http(node.app.metrics_server.port, "/metrics", src="127.0.0.1")).body.decode()
    assert "aadpodidentity_nmi_operations_duration_seconds_count" in metrics
    assert 'resource="other"' in metrics and "attacker" not in metrics
    assert "nmi_pod_cache_size 3.0" in metrics


def test_error_bodies_are_json() -> None:
    from nmi.handlers import error_response
    from podidentity.errors import UpstreamUnavailable

    response = error_response(UpstreamUnavailable("down", retry_after=5))
    assert json.loads(response.body) == {"error": "service_unavailable", "error_description": "down"}
    assert (b"retry-after", b"5") in response.headers


async def test_two_live_pods_on_one_address_are_refused_not_guessed(make_node) -> None:
    docs = base_docs()
    twin = copy.deepcopy(next(d for d in docs if d["metadata"]["name"] == "web"))
    twin["metadata"].update(name="web-twin", uid="twin-uid")
    node = await make_node([*docs, twin])
    reply = await node.get(token_path(), src=WEB)
    assert reply.status == 500
    assert (
        "default/web" in reply.json()["error_description"]
        and "default/web-twin" in reply.json()["error_description"]
    )
    metrics = node.app.registry.get_sample_value("nmi_ambiguous_caller_ip_total")
    assert metrics == 1.0
    assert node.imds.count() == 0


async def test_probe_reports_unavailable_until_started() -> None:
    from podidentity.probes import Check, Probes

    state = {"up": False}
    probes = Probes(
        lambda: [Check("listener", lambda: state["up"]), Check("watches", lambda: False, readiness_only=True)]
    )
    assert probes.report(readiness=False)[0] is False
    state["up"] = True
    assert probes.report(readiness=False)[0] is True
    ok, results = probes.report(readiness=True)
    assert ok is False and results["watches"] == {"ok": False}


async def test_malformed_api_version_is_refused(make_node) -> None:
    node = await make_node()
    reply = await node.get(token_path(**{"api-version": "2018-02-01&client_id=x"}), src=WEB)
    assert reply.status == 400 and "api-version" in reply.json()["error_description"]
    assert (await node.get(token_path(**{"api-version": "2019-08-01"}), src=WEB)).status == 200
    assert node.imds.count() == 1
