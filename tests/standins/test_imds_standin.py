"""The IMDS stand-in over real HTTP: IMDS's wire behaviour, throttling, faults and the control API."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from standins._jwt import claims_of
from standins.imds import ImdsStandIn, identities_from

pytestmark = pytest.mark.timeout(20)

UA = "11111111-aaaa-4000-8000-000000000001"
UB = "22222222-bbbb-4000-8000-000000000002"
RID_A = "/subscriptions/s/resourcegroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/a"
VAULT = "https://vault.azure.net"
MD = {"Metadata": "true"}
ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "cluster-state.yaml"


@pytest.fixture
async def imds() -> AsyncIterator[ImdsStandIn]:
    server = ImdsStandIn(token_lifetime_s=600)
    server.add_identity(UA, resource_id=RID_A)
    server.add_identity(UB)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def get(
    client: aiohttp.ClientSession,
    imds: ImdsStandIn,
    path: str,
    headers: dict[str, str] | None = MD,
    **query: str,
) -> tuple[int, Any, aiohttp.ClientResponse]:
    async with client.get(imds.url + path, params=query, headers=headers) as resp:
        text = await resp.text()
        try:
            body: Any = json.loads(text)
        except ValueError:
            body = text
        return resp.status, body, resp


def token_query(**extra: str) -> dict[str, str]:
    return {"api-version": "2018-02-01", "resource": VAULT, **extra}


TOKEN = "/metadata/identity/oauth2/token"


async def test_success_body_is_imds_shaped_with_string_values(imds, client) -> None:
    before = int(time.time())
    status, body, resp = await get(client, imds, TOKEN, **token_query(client_id=UA))
    assert status == 200
    assert resp.headers["Content-Type"] == "application/json; charset=utf-8"
    assert resp.headers["Server"].startswith("IMDS/")
    assert set(body) == {
        "access_token", "client_id", "expires_in", "expires_on", "ext_expires_in", "not_before", "resource",
        "token_type",
    }  # fmt: skip
    assert all(isinstance(v, str) for v in body.values())
    assert body["client_id"] == UA and body["resource"] == VAULT and body["token_type"] == "Bearer"
    assert body["expires_in"] == "600"
    assert before <= int(body["not_before"]) <= int(body["expires_on"]) - 600 + 1
    claims = claims_of(body["access_token"])
    assert claims["aud"] == VAULT and claims["appid"] == UA and claims["xms_mirid"] == RID_A
    assert claims["exp"] == int(body["expires_on"]) and claims["nbf"] <= claims["exp"]


async def test_each_token_is_distinct(imds, client) -> None:
    first = (await get(client, imds, TOKEN, **token_query(client_id=UA)))[1]["access_token"]
    second = (await get(client, imds, TOKEN, **token_query(client_id=UA)))[1]["access_token"]
    assert first != second


@pytest.mark.parametrize("headers", [None, {"Metadata": "True"}, {"Metadata": "false"}])
async def test_metadata_header_must_be_exactly_true(imds, client, headers) -> None:
    status, body, _ = await get(client, imds, TOKEN, headers=headers, **token_query(client_id=UA))
    assert status == 400
    assert body == {"error": "invalid_request", "error_description": "Required metadata header not specified"}
    assert imds.requests[-1].status == 400


async def test_requests_are_recorded_with_headers_and_identity(imds, client) -> None:
    await get(
        client, imds, TOKEN, headers={"Metadata": "true", "X-Test": "1"}, **token_query(client_id=UA.upper())
    )
    (record,) = imds.requests
    assert record.headers["metadata"] == "true" and record.headers["X-Test"] == "1"
    assert "X-Forwarded-For" not in record.headers
    assert record.client_id == UA and record.resource == VAULT and record.status == 200
    assert imds.count(client_id=UA, resource=VAULT) == 1 and imds.count(client_id=UB) == 0


@pytest.mark.parametrize(
    ("param", "value"),
    [
        ("client_id", UA.upper()),
        ("msi_res_id", RID_A.upper()),
        ("mi_res_id", RID_A),
        ("object_id", "OBJECT-A"),
    ],
)
async def test_identity_is_chosen_by_any_selector_case_insensitively(client, param, value) -> None:
    imds = ImdsStandIn()
    imds.add_identity(UA, resource_id=RID_A, object_id="object-a")
    imds.add_identity(UB)
    await imds.start()
    try:
        status, body, _ = await get(client, imds, TOKEN, **token_query(**{param: value}))
    finally:
        await imds.stop()
    assert status == 200 and body["client_id"] == UA


async def test_unknown_identity_is_400_identity_not_found(imds, client) -> None:
    status, body, _ = await get(
        client, imds, TOKEN, **token_query(client_id="33333333-0000-0000-0000-000000000000")
    )
    assert (status, body) == (400, {"error": "invalid_request", "error_description": "Identity not found"})


async def test_selectors_naming_different_identities_find_none(imds, client) -> None:
    status, body, _ = await get(client, imds, TOKEN, **token_query(client_id=UB, msi_res_id=RID_A))
    assert status == 400 and body["error_description"] == "Identity not found"


async def test_no_selector_with_several_user_assigned_is_refused_as_imds_does(imds, client) -> None:
    status, body, _ = await get(client, imds, TOKEN, **token_query())
    assert status == 400 and body["error"] == "invalid_request"
    assert body["error_description"].startswith("Multiple user assigned identities exist")


async def test_no_selector_picks_system_assigned_then_the_only_user_assigned(client) -> None:
    imds = ImdsStandIn()
    await imds.start()
    try:
        status, body, _ = await get(client, imds, TOKEN, **token_query())
        assert (status, body["error_description"]) == (400, "Identity not found")
        imds.add_identity(UA)
        assert (await get(client, imds, TOKEN, **token_query()))[1]["client_id"] == UA
        imds.add_identity("system-cid", system_assigned=True)
        assert (await get(client, imds, TOKEN, **token_query()))[1]["client_id"] == "system-cid"
    finally:
        await imds.stop()


@pytest.mark.parametrize(
    ("query", "needle"),
    [
        ({"resource": VAULT, "client_id": UA}, "'api-version' is missing"),
        ({"api-version": "2017-08-01", "resource": VAULT, "client_id": UA}, "Invalid api-version"),
        ({"api-version": "2099-01-01", "resource": VAULT, "client_id": UA}, "Invalid api-version"),
        ({"api-version": "2018-02-01", "client_id": UA}, "'resource' is missing"),
    ],
)
async def test_api_version_and_resource_are_required(imds, client, query, needle) -> None:
    status, body, _ = await get(client, imds, TOKEN, **query)
    assert status == 400 and body["error"] == "invalid_request" and needle in body["error_description"]


async def test_concurrency_above_the_limit_is_429_with_retry_after(client) -> None:
    imds = ImdsStandIn(max_concurrent=2, throttle_retry_after_s=3)
    imds.add_identity(UA)
    await imds.start()
    imds.hold()
    try:
        held = [asyncio.create_task(get(client, imds, TOKEN, **token_query())) for _ in range(2)]
        await imds.wait_for_requests(2)
        status, body, resp = await get(client, imds, TOKEN, **token_query())
        assert status == 429 and resp.headers["Retry-After"] == "3" and body["error"] == "too_many_requests"
        imds.release()
        assert [(await t)[0] for t in held] == [200, 200]
        assert imds.max_seen_concurrency == 2
    finally:
        await imds.stop()


async def test_rate_above_the_limit_is_429_until_the_window_passes(client) -> None:
    now = [100.0]
    imds = ImdsStandIn(rate_per_s=2, throttle_window_s=1.0, monotonic=lambda: now[0])
    imds.add_identity(UA)
    await imds.start()
    try:
        assert [(await get(client, imds, TOKEN, **token_query()))[0] for _ in range(2)] == [200, 200]
        status, _, resp = await get(client, imds, TOKEN, **token_query())
        assert status == 429 and resp.headers["Retry-After"] == "1"
        now[0] += 0.5
        assert (await get(client, imds, TOKEN, **token_query()))[0] == 429
        now[0] += 0.5
        assert (await get(client, imds, TOKEN, **token_query()))[0] == 200
    finally:
        await imds.stop()


async def test_injected_failures_come_in_order_then_success(imds, client) -> None:
    imds.fail_next(1, 410)
    imds.fail_next(1, 429, retry_after=2)
    imds.fail_next(1, 500, error="custom", description="boom")
    first = await get(client, imds, TOKEN, **token_query(client_id=UA))
    second = await get(client, imds, TOKEN, **token_query(client_id=UA))
    third = await get(client, imds, TOKEN, **token_query(client_id=UA))
    assert first[0] == 410 and "Retry-After" not in first[2].headers
    assert second[0] == 429 and second[2].headers["Retry-After"] == "2"
    assert third[0] == 500 and third[1] == {"error": "custom", "error_description": "boom"}
    assert (await get(client, imds, TOKEN, **token_query(client_id=UA)))[0] == 200
    assert [r.status for r in imds.requests] == [410, 429, 500, 200]


async def test_delay_slows_every_token_request(imds, client) -> None:
    imds.set_delay(0.2)
    started = time.monotonic()
    assert (await get(client, imds, TOKEN, **token_query(client_id=UA)))[0] == 200
    assert time.monotonic() - started >= 0.19


async def test_dropped_connection_gives_the_client_a_transport_error(imds, client) -> None:
    # aiohttp retries an idempotent request once on a dropped connection, so drop two.
    imds.drop_next(2)
    with pytest.raises((aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
        await get(client, imds, TOKEN, **token_query(client_id=UA))
    assert [r.status for r in imds.requests] == [-1, -1]
    assert (await get(client, imds, TOKEN, **token_query(client_id=UA)))[0] == 200


async def test_control_endpoint_drives_faults_and_reports_requests(imds, client) -> None:
    async with client.post(imds.url + "/__standin/faults", json={"fail": {"count": 2, "status": 503}}) as r:
        assert r.status == 200 and len((await r.json())["fail"]) == 2
    assert (await get(client, imds, TOKEN, **token_query(client_id=UA)))[0] == 503
    async with client.delete(imds.url + "/__standin/faults") as r:
        assert (await r.json())["fail"] == []
    assert (await get(client, imds, TOKEN, **token_query(client_id=UA)))[0] == 200
    async with client.get(imds.url + "/__standin/requests") as r:
        report = await r.json()
    assert [q["status"] for q in report["requests"]] == [503, 200]
    assert ["Metadata", "true"] in report["requests"][0]["headers"]
    assert {"client_id": UA, "resource": VAULT, "count": 1} in report["counts"]
    async with client.delete(imds.url + "/__standin/requests") as r:
        assert r.status == 204
    assert imds.requests == []


async def test_control_endpoint_adds_identities_and_rejects_bad_input(imds, client) -> None:
    async with client.post(imds.url + "/__standin/identities", json={"client_id": "new-cid"}) as r:
        assert r.status == 201
    assert (await get(client, imds, TOKEN, **token_query(client_id="NEW-CID")))[0] == 200
    async with client.post(imds.url + "/__standin/faults", json={"fail": {"count": 1}}) as r:
        assert r.status == 400
    async with client.get(imds.url + "/__standin/nothing") as r:
        assert r.status == 404


async def test_instance_metadata_json_and_text_leaf(imds, client) -> None:
    status, body, _ = await get(client, imds, "/metadata/instance", **{"api-version": "2021-02-01"})
    assert status == 200 and body["compute"]["name"] == imds.vm_name and "network" in body
    status, body, _ = await get(client, imds, "/metadata/instance/compute", **{"api-version": "2021-02-01"})
    assert status == 200 and body["vmSize"]
    status, text, _ = await get(
        client, imds, "/metadata/instance/compute/name", **{"api-version": "2021-02-01", "format": "text"}
    )
    assert (status, text) == (200, imds.vm_name)
    status, _, _ = await get(client, imds, "/metadata/instance/compute/name", **{"api-version": "2021-02-01"})
    assert status == 400
    status, _, _ = await get(
        client, imds, "/metadata/instance/compute/nothing", **{"api-version": "2021-02-01"}
    )
    assert status == 404


async def test_instance_metadata_needs_header_and_version(imds, client) -> None:
    status, body, _ = await get(
        client, imds, "/metadata/instance", headers=None, **{"api-version": "2021-02-01"}
    )
    assert status == 400 and "metadata header" in body["error"]
    status, body, _ = await get(client, imds, "/metadata/instance")
    assert status == 400 and "api-version" in body["error"] and body["newest-versions"]
    status, body, _ = await get(client, imds, "/metadata/versions")
    assert status == 200 and "2018-02-01" in body["apiVersions"]


async def test_other_paths_are_404_json(imds, client) -> None:
    status, body, resp = await get(client, imds, "/doesnotexist")
    assert status == 404 and resp.headers["Content-Type"].startswith("application/json") and body["error"]


def test_identities_from_cluster_state_file() -> None:
    assert identities_from(str(EXAMPLE)) == [
        (
            "6f1c3e2a-52b4-4d0e-9a57-2b7c0d1e4f10",
            "/subscriptions/00000000-0000-0000-0000-000000000000/resourcegroups/demo/providers/"
            "Microsoft.ManagedIdentity/userAssignedIdentities/web-identity",
        )
    ]


async def test_cli_serves_identities_from_a_cluster_state_file(client) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "standins.imds", "--port", "0", "--identities-from", str(EXAMPLE),
        "--system-assigned",
        stdout=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 10)).decode()
        assert "listening on" in line and "with 2 identities" in line
        port = int(line.split()[4].rsplit(":", 1)[1])
        url = f"http://127.0.0.1:{port}{TOKEN}"
        query = token_query(client_id="6F1C3E2A-52B4-4D0E-9A57-2B7C0D1E4F10")
        async with client.get(url, params=query, headers=MD) as resp:
            assert resp.status == 200
    finally:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 10) == 0
