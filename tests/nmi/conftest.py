"""An in-process NMI on loopback with the IMDS stand-in; pods are 127.0.0.x source addresses."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from nmi.app import App
from nmi.settings import (
    ClusterSettings,
    IdentitySettings,
    IptablesSettings,
    ObservabilitySettings,
    ServerSettings,
    Settings,
    UpstreamSettings,
)
from standins.imds import ImdsStandIn

WEB_CLIENT_ID = "6f1c3e2a-52b4-4d0e-9a57-2b7c0d1e4f10"


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        import json

        return json.loads(self.body)


async def http(
    port: int,
    path: str,
    *,
    src: str = "127.0.0.10",
    headers: dict[str, str] | None = None,
    method: str = "GET",
    host: str = "127.0.0.1",
) -> Reply:
    reader, writer = await asyncio.open_connection(host, port, local_addr=(src, 0))
    try:
        lines = [f"{method} {path} HTTP/1.1", "Host: 169.254.169.254", "Connection: close"]
        lines += [f"{k}: {v}" for k, v in (headers if headers is not None else {"Metadata": "true"}).items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        raw = await reader.read()
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parsed = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        parsed[name.strip().lower()] = value.strip()
    return Reply(int(status_line.split()[1]), parsed, body)


def token_path(resource: str = "https://vault.azure.net", **params: str) -> str:
    from urllib.parse import urlencode

    return "/metadata/identity/oauth2/token?" + urlencode({"resource": resource, **params})


@dataclass
class Node:
    app: App
    imds: ImdsStandIn
    state_file: Path

    @property
    def port(self) -> int:
        assert self.app.server is not None
        return self.app.server.port

    async def get(self, path: str, **kw: Any) -> Reply:
        return await http(self.port, path, **kw)

    def write_state(self, docs: list[dict[str, Any]]) -> None:
        self.state_file.write_text(yaml.safe_dump_all(docs))


def base_docs() -> list[dict[str, Any]]:
    example = Path(__file__).resolve().parents[2] / "examples" / "cluster-state.yaml"
    docs = list(yaml.safe_load_all(example.read_text()))
    for doc in docs:
        if doc["kind"] == "Pod":
            doc["status"]["podIP"] = doc["status"]["podIP"].replace("10.244.0.", "127.0.0.")
    return docs


NodeFactory = Callable[..., Any]


@pytest.fixture
async def make_node(tmp_path: Path) -> AsyncIterator[NodeFactory]:
    started: list[Node] = []

    async def factory(
        docs: list[dict[str, Any]] | None = None,
        *,
        identity: dict[str, Any] | None = None,
        upstream: dict[str, Any] | None = None,
        cache: dict[str, Any] | None = None,
        imds_options: dict[str, Any] | None = None,
    ) -> Node:
        imds = ImdsStandIn(**(imds_options or {}))
        imds.add_identity(
            WEB_CLIENT_ID,
            resource_id="/subscriptions/00000000-0000-0000-0000-000000000000/"
            "resourcegroups/demo/providers/Microsoft.ManagedIdentity/userAssignedIdentities/web-identity",
        )
        await imds.start("127.0.0.1", 0)
        state_file = tmp_path / f"state-{len(started)}.yaml"
        state_file.write_text(yaml.safe_dump_all(docs if docs is not None else base_docs()))
        settings = Settings(
            server=ServerSettings(port=0),
            upstream=UpstreamSettings(metadata_ip="127.0.0.1", metadata_port=imds.port, **(upstream or {})),
            identity=IdentitySettings(
                **{"pod_wait_timeout_s": 2.0, "identity_wait_timeout_s": 2.0, **(identity or {})}
            ),
            observability=ObservabilitySettings(
                prometheus_port=0, probe_port=0, probe_address="127.0.0.1", metrics_address="127.0.0.1"
            ),
            cluster=ClusterSettings(
                node_name="demo-node", cluster_state_path=str(state_file), cluster_state_poll_s=0.02
            ),
            iptables=IptablesSettings(manage=False),
        )
        if cache:
            settings = dataclasses.replace(settings, cache=dataclasses.replace(settings.cache, **cache))
        app = App(settings)
        try:
            await app.start()
        except BaseException:
            await app.stop()
            raise
        node = Node(app, imds, state_file)
        started.append(node)
        return node

    yield factory
    for node in started:
        await node.app.stop()
        await node.imds.stop()
