"""Which identity a named request gets, over real sockets: the selector matrix and a bounded fuzz run.

Pods (standard mode, every identity assigned to the VM in the IMDS stand-in):
- ``one`` is bound to A; ``two`` to A and B; ``other`` to F; ``lonely`` has no label; ``stray`` has
  a label no binding selects. U is assigned to nothing at all.

The oracle is independent of NMI's parser: a request that names an identity (any selector key,
any case) gets exactly that identity or an error; no pod ever gets an identity it is not bound to.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import pytest

from standins._imds_state import new_identity
from tests.core.builders import assigned, binding, identity, pod
from tests.nmi.conftest import Reply, http, token_path

pytestmark = pytest.mark.timeout(120)

SUB = "/subscriptions/00000000-0000-0000-0000-000000000000/resourcegroups/rg/providers"


@dataclass(frozen=True)
class Ident:
    name: str
    client_id: str

    @property
    def resource_id(self) -> str:
        return f"{SUB}/Microsoft.ManagedIdentity/userAssignedIdentities/{self.name}"

    @property
    def object_id(self) -> str:
        return new_identity(self.client_id).object_id

    def value(self, prop: str) -> str:
        return {"client_id": self.client_id, "resource_id": self.resource_id, "object_id": self.object_id}[
            prop
        ]


A = Ident("id-a", "aaaaaaaa-0000-4000-8000-00000000000a")
B = Ident("id-b", "bbbbbbbb-0000-4000-8000-00000000000b")
F = Ident("id-f", "ffffffff-0000-4000-8000-00000000000f")
U = Ident("id-u", "eeeeeeee-0000-4000-8000-00000000000e")
IPS = {
    "one": "127.0.0.41",
    "two": "127.0.0.42",
    "other": "127.0.0.43",
    "lonely": "127.0.0.44",
    "stray": "127.0.0.45",
}
BOUND = {"one": (A,), "two": (A, B), "other": (F,), "lonely": (), "stray": ()}
LABELS = {"one": "one", "two": "two", "other": "other", "stray": "nobody"}
KEYS = {
    "client_id": "client_id",
    "msi_res_id": "resource_id",
    "mi_res_id": "resource_id",
    "resource_id": "resource_id",
    "object_id": "object_id",
    "principal_id": "object_id",
}
NOT_FOUND = "Identity not found"


def _docs() -> list[dict[str, Any]]:
    idents = {i.name: identity(i.name, i.client_id, resource_id=i.resource_id) for i in (A, B, F)}
    docs: list[dict[str, Any]] = list(idents.values())
    for name, ip in IPS.items():
        labels = {"aadpodidbinding": LABELS[name]} if name in LABELS else {}
        docs.append(pod(name, ip, node="demo-node", labels=labels, created="2026-01-01T00:00:00Z"))
        for ident in BOUND[name]:
            docs.append(binding(f"{name}-{ident.name}", ident.name, LABELS[name]))
            docs.append(assigned(name, idents[ident.name], node="demo-node"))
    return docs


async def _node(make_node: Any, **identity_settings: Any) -> Any:
    node = await make_node(_docs(), identity=identity_settings)
    for ident in (A, B, F, U):
        node.imds.add_identity(ident.client_id, resource_id=ident.resource_id)
    return node


def _claims(reply: Reply) -> dict[str, Any]:
    token = reply.json()["access_token"]
    payload = token.split(".")[1]
    claims: dict[str, Any] = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return claims


def _case(key: str, style: str) -> str:
    return {"lower": key, "upper": key.upper(), "mixed": key[0].upper() + key[1:]}[style]


@pytest.mark.parametrize("key", sorted(KEYS))
@pytest.mark.parametrize("style", ["lower", "upper", "mixed"])
async def test_selector_matrix(make_node: Any, key: str, style: str) -> None:
    node = await _node(make_node)
    prop = KEYS[key]
    for pod_name in ("one", "two"):
        for target in (A, B, F, U):
            reply = await node.get(token_path(**{_case(key, style): target.value(prop)}), src=IPS[pod_name])
            where = f"{pod_name} naming {target.name} by {_case(key, style)}"
            if target in BOUND[pod_name]:
                assert reply.status == 200, (where, reply.body)
                claims = _claims(reply)
                assert reply.json()["client_id"] == target.client_id, where
                assert claims["oid"] == target.object_id, where
            else:
                assert reply.status == 400, (where, reply.body)
                assert reply.json()["error_description"].startswith(NOT_FOUND), where


async def test_object_id_is_learned_once_then_costs_no_upstream_call(make_node: Any) -> None:
    node = await _node(make_node)
    first = await node.get(token_path(object_id=B.object_id), src=IPS["two"])
    assert first.status == 200 and first.json()["client_id"] == B.client_id
    calls = node.imds.count()
    assert calls <= 2  # at most one token per identity of the pod, each cached for later use
    for path in (
        token_path(object_id=B.object_id),
        token_path(principal_id=A.object_id.upper()),
        token_path(OBJECT_ID=F.object_id),
    ):
        await node.get(path, src=IPS["two"])
    wrong = await node.get(token_path(object_id=F.object_id), src=IPS["two"])
    assert wrong.status == 400
    assert node.imds.count() == calls


async def test_selectors_that_disagree_are_refused(make_node: Any) -> None:
    node = await _node(make_node)
    cases = [
        {"client_id": A.client_id, "msi_res_id": B.resource_id},
        {"client_id": B.client_id, "object_id": A.object_id},
        {"msi_res_id": A.resource_id, "resource_id": B.resource_id},
    ]
    for params in cases:
        # Learn the object ids first, so the last case is judged on facts, not guesses.
        await node.get(token_path(client_id=A.client_id), src=IPS["two"])
        await node.get(token_path(client_id=B.client_id), src=IPS["two"])
        reply = await node.get(token_path(**params), src=IPS["two"])
        assert reply.status == 400 and reply.json()["error"] == "invalid_request", params
        assert not reply.json()["error_description"].startswith(NOT_FOUND), params
    repeated = (
        "/metadata/identity/oauth2/token?resource=r&client_id=" + A.client_id + "&CLIENT_ID=" + B.client_id
    )
    assert (await node.get(repeated, src=IPS["two"])).status == 400
    agree = await node.get(
        token_path(client_id=B.client_id, MSI_RES_ID=B.resource_id.upper()), src=IPS["two"]
    )
    assert agree.status == 200 and agree.json()["client_id"] == B.client_id


@pytest.mark.parametrize("pod_name", ["lonely", "stray"])
async def test_pods_no_binding_selects_get_a_final_answer_at_once(make_node: Any, pod_name: str) -> None:
    node = await _node(make_node, identity_wait_timeout_s=15.0)
    for params in ({}, {"client_id": A.client_id}, {"object_id": A.object_id}):
        started = time.monotonic()
        reply = await node.get(token_path(**params), src=IPS[pod_name])
        assert time.monotonic() - started < 0.5
        assert reply.status == 400 and reply.json()["error_description"].startswith(NOT_FOUND)
    assert node.imds.count() == 0


async def test_reject_ambiguous_identity(make_node: Any) -> None:
    lenient = await _node(make_node)
    reply = await lenient.get(token_path(), src=IPS["two"])
    assert reply.status == 200 and reply.json()["client_id"] == A.client_id  # deterministic default
    strict = await _node(make_node, reject_ambiguous_identity=True)
    reply = await strict.get(token_path(), src=IPS["two"])
    assert reply.status == 400
    assert reply.json()["error_description"].startswith("Multiple user assigned identities exist")
    assert (await strict.get(token_path(), src=IPS["one"])).status == 200
    named = await strict.get(token_path(client_id=B.client_id), src=IPS["two"])
    assert named.status == 200 and named.json()["client_id"] == B.client_id


# --- malformed requests never reach IMDS ------------------------------------------------------


async def _raw(port: int, data: bytes, src: str) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(src, 0))
    try:
        writer.write(data)
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /metadata/instance?api-version=2021-02-01\r\nMetadata: true\r\n\r\n",
        b"GET /metadata/instance?api-version=2021-02-01 HTTP/2.0\r\nMetadata: true\r\n\r\n",
        b"GET /% HTTP/1.1\r\nMetadata: true\r\nConnection: close\r\n\r\n",
        b"GET /metadata/%zz HTTP/1.1\r\nMetadata: true\r\nConnection: close\r\n\r\n",
        b"GET /metadata/instance?api-version=%zz HTTP/1.1\r\nMetadata: true\r\nConnection: close\r\n\r\n",
    ],
)
async def test_malformed_request_lines_and_targets_are_400(make_node: Any, request_bytes: bytes) -> None:
    node = await _node(make_node)
    answer = await _raw(node.port, request_bytes, IPS["one"])
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:80]
    assert node.imds.requests == []


@pytest.mark.parametrize("method", ["CONNECT", "TRACE", "PUT", "DELETE", "OPTIONS", "PATCH"])
async def test_only_the_methods_imds_serves_are_forwarded(make_node: Any, method: str) -> None:
    node = await _node(make_node)
    target = "169.254.169.254:80" if method == "CONNECT" else "/metadata/instance?api-version=2021-02-01"
    answer = await _raw(
        node.port,
        f"{method} {target} HTTP/1.1\r\nMetadata: true\r\nContent-Length: 0\r\n"
        "Connection: close\r\n\r\n".encode(),
        IPS["one"],
    )
    assert answer.startswith(b"HTTP/1.1 405 ") or answer.startswith(b"HTTP/1.1 400 "), answer[:80]
    token = await http(
        node.port, token_path(), src=IPS["one"], method=method if method != "CONNECT" else "POST"
    )
    assert token.status == 405 and token.headers["allow"] == "GET"
    assert node.imds.requests == []


# --- fuzz ---------------------------------------------------------------------------------------


class KeepAlive:
    """One keep-alive connection from a pod address; requests one at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int, src: str) -> KeepAlive:
        return cls(*await asyncio.open_connection("127.0.0.1", port, local_addr=(src, 0)))

    async def get(self, target: str) -> tuple[int, bytes]:
        self.writer.write(f"GET {target} HTTP/1.1\r\nHost: h\r\nMetadata: true\r\n\r\n".encode())
        head = await self.reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        body = await self.reader.readexactly(length)
        return int(head.split(b" ", 2)[1]), body

    def close(self) -> None:
        self.writer.close()


def _mutated_query(rng: random.Random) -> tuple[str, list[tuple[str, str]]]:
    """A query string and the (property, folded value) pairs it names, by the oracle's own reading."""
    parts = [f"resource={quote(rng.choice(['https://vault.azure.net', 'https://management.azure.com/']))}"]
    named: list[tuple[str, str]] = []
    for _ in range(rng.choice([0, 1, 1, 1, 2, 3])):
        key = rng.choice([*KEYS, "clientid", "client-id", "msi_resid", "identity", "objectid"])
        spelled = "".join(c.upper() if rng.random() < 0.3 else c for c in key)
        ident = rng.choice([A, B, F, U])
        prop = KEYS.get(key, "client_id")
        value = ident.value(prop)
        if rng.random() < 0.3:
            value = value.upper()
        if rng.random() < 0.2:
            value = value[:-1] + "0"
        encoded = quote(value, safe="") if rng.random() < 0.5 else value
        parts.append(f"{spelled}={encoded}")
        if key in KEYS and value:
            named.append((prop, value.casefold()))
    if rng.random() < 0.1:
        parts.append(
            rng.choice(["api-version=2018-02-01", "api-version=x", "%zz=1", "client_id", "&&", "=="])
        )
    rng.shuffle(parts)
    return "&".join(parts), named


async def test_fuzz_no_token_for_an_identity_not_named_or_not_bound(make_node: Any) -> None:
    node = await _node(make_node, identity_wait_timeout_s=0.05)
    rng = random.Random(20261207)
    by_client = {i.client_id: i for i in (A, B, F, U)}
    conns = {name: await KeepAlive.open(node.port, ip) for name, ip in IPS.items()}
    statuses: dict[int, int] = {}
    try:
        for _ in range(20_000):
            pod_name = rng.choice(list(IPS))
            query, named = _mutated_query(rng)
            status, body = await conns[pod_name].get("/metadata/identity/oauth2/token?" + query)
            statuses[status] = statuses.get(status, 0) + 1
            if status != 200:
                continue
            got = by_client[json.loads(body)["client_id"]]
            assert got in BOUND[pod_name], (pod_name, query)
            for prop, value in named:
                assert got.value(prop).casefold() == value, (pod_name, query, got.name)
    finally:
        for conn in conns.values():
            conn.close()
    # The run exercised both outcomes in bulk, not one of them.
    assert statuses.get(200, 0) > 2_000 and statuses.get(400, 0) > 2_000, statuses
