"""One pod must not starve the others: connection slots, the upstream queue, abandoned fetches.

These came out of a review of the request path; each failed before the fix it guards.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from podidentity.http import HttpServer, Request, Response
from podidentity.http.settings import ServerSettings
from tests.core import builders as b
from tests.nmi.conftest import base_docs, token_path

pytestmark = pytest.mark.timeout(30)

WEB = "127.0.0.10"
VICTIM = "127.0.0.13"
VICTIM_CLIENT_ID = "0b6a6f5e-1111-4c4c-8d8d-222233334444"


async def until(predicate: Any, timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.02)):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached in time")


def _ok(request: Request) -> Response:
    return Response(200, b"ok")


async def _status(port: int, src: str) -> tuple[int, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(src, 0))
    writer.write(b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n")
    async with asyncio.timeout(5):
        head = await reader.readuntil(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), writer


async def test_one_peer_cannot_take_every_connection_slot() -> None:
    server = HttpServer(ServerSettings(port=0, max_connections=10, max_connections_per_peer=2), _ok)
    await server.start("127.0.0.1", 0)
    writers: list[asyncio.StreamWriter] = []
    try:
        statuses = []
        for _ in range(3):
            status, writer = await _status(server.port, "127.0.0.10")
            statuses.append(status)
            writers.append(writer)
        assert statuses == [200, 200, 503]
        status, writer = await _status(server.port, "127.0.0.11")
        writers.append(writer)
        assert status == 200
    finally:
        for writer in writers:
            writer.close()
        await server.shutdown(0.5)


async def test_noisy_pod_cannot_starve_another_pods_token(make_node) -> None:
    victim_identity = b.identity("victim-identity", VICTIM_CLIENT_ID, ns="team-b")
    docs: list[dict[str, Any]] = [
        *base_docs(),
        b.pod("victim", VICTIM, ns="team-b", node="demo-node"),
        victim_identity,
        b.assigned("victim", victim_identity, pod_ns="team-b", node="demo-node", ns="team-b"),
    ]
    node = await make_node(
        docs,
        upstream={"max_concurrent": 1, "rate_per_s": 0.0, "request_timeout_s": 1.0},
        identity={"identity_wait_timeout_s": 0.5},
    )
    node.imds.add_identity(VICTIM_CLIENT_ID)
    node.imds.set_delay(0.3)
    # Twelve different audiences from one pod: 3.6 s of upstream work if they all queued.
    attack = [
        asyncio.create_task(node.get(token_path(f"https://attacker-{i}.blob.core.windows.net"), src=WEB))
        for i in range(12)
    ]
    await asyncio.sleep(0.2)
    started = time.monotonic()
    reply = await node.get(token_path("https://vault.azure.net"), src=VICTIM)
    waited = time.monotonic() - started
    for task in attack:
        task.cancel()
    await asyncio.gather(*attack, return_exceptions=True)
    assert reply.status == 200, (reply.status, reply.body, round(waited, 2))


async def test_abandoned_cold_fetches_are_dropped(make_node) -> None:
    node = await make_node()
    node.imds.hold()
    writers = []
    for i in range(20):
        _, writer = await asyncio.open_connection("127.0.0.1", node.port, local_addr=(WEB, 0))
        writer.write(
            f"GET {token_path(f'https://a{i}.blob.core.windows.net')} HTTP/1.1\r\n"
            "Host: x\r\nMetadata: true\r\n\r\n".encode()
        )
        writers.append(writer)
    cache = node.app.cache
    await until(lambda: len(cache._flights) >= 2 and node.app.server.connections == 20)
    # The pod's other requests wait for its own turn, not in the node's upstream queue.
    assert len(cache._flights) == 2
    for writer in writers:
        writer.close()
    await until(lambda: not node.app.server.connections and not cache._flights)
    assert not cache._flights
    node.imds.release()


def test_azure_ad_descriptions_redact_ids() -> None:
    from nmi.tokens.aad_answers import _refusal

    client_id = "6f1c3e2a-52b4-4d0e-9a57-2b7c0d1e4f10"
    body = {
        "error": "unauthorized_client",
        "error_description": f"AADSTS700016: Application with identifier '{client_id}' was not found "
        "in the directory 'contoso'.\r\nTrace ID: x",
    }
    refusal = _refusal(body, 400, ("the-client-secret",))
    assert client_id not in refusal.description
    assert "6f1c##### REDACTED #####4f10" in refusal.description and "AADSTS700016" in refusal.description
