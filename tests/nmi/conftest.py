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
from podidentity.kube.settings import KubeSettings
from standins.apiserver import FakeApiServer
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


# --- NMI fed by the watch caches of the API server stand-in (test_kube_integration, test_gating) ---

NODE = "node-a"
CLIENT_A = "aaaaaaaa-0000-0000-0000-00000000000a"
CLIENT_B = "bbbbbbbb-0000-0000-0000-00000000000b"
FAST = KubeSettings(
    qps=0,
    connect_timeout_s=1.0,
    request_timeout_s=2.0,
    inactivity_timeout_s=0.5,
    backoff_initial_s=0.05,
    backoff_max_s=0.3,
    secret_ttl_s=0.5,
)


@dataclass
class Cluster:
    api: FakeApiServer
    imds: ImdsStandIn
    app: App

    async def get(self, src: str, path: str | None = None) -> Reply:
        assert self.app.server is not None
        return await http(self.app.server.port, path or token_path(), src=src)

    async def ready(self) -> Reply:
        assert self.app.probe_server is not None
        return await http(self.app.probe_server.port, "/readyz", src="127.0.0.1")


@pytest.fixture
async def cluster_factory(tmp_path: Path) -> AsyncIterator[Any]:
    made: list[Cluster] = []

    async def make(
        mode: str = "standard",
        objects: tuple[dict[str, Any], ...] | list[dict[str, Any]] = (),
        before_start: Any = None,  # called with the API server before NMI starts (faults)
    ) -> Cluster:
        api = FakeApiServer(tls=True, token="t0ken", bookmark_interval_s=0.1)
        await api.start()
        api.load(objects)
        if before_start is not None:
            before_start(api)
        imds = ImdsStandIn()
        imds.add_identity(CLIENT_A)
        imds.add_identity(CLIENT_B)
        await imds.start("127.0.0.1", 0)
        kubeconfig = api.write_kubeconfig(tmp_path / f"kubeconfig-{len(made)}")
        settings = Settings(
            server=ServerSettings(port=0),
            upstream=UpstreamSettings(metadata_ip="127.0.0.1", metadata_port=imds.port),
            identity=IdentitySettings(
                operation_mode=mode,
                force_namespaced=mode == "managed",  # type: ignore[arg-type]
                pod_wait_timeout_s=3.0,
                identity_wait_timeout_s=1.0,
            ),
            observability=ObservabilitySettings(
                prometheus_port=0, probe_port=0, probe_address="127.0.0.1", metrics_address="127.0.0.1"
            ),
            cluster=ClusterSettings(node_name=NODE, kubeconfig=str(kubeconfig), watch_broken_threshold_s=0.5),
            iptables=IptablesSettings(manage=False),
            kube=FAST,
        )
        app = App(settings)
        cluster = Cluster(api, imds, app)
        made.append(cluster)
        await app.start()
        for _ in range(300):
            if app.state.synced:
                break
            await asyncio.sleep(0.01)
        assert app.state.synced
        return cluster

    yield make
    for c in made:
        await c.app.stop()
        await c.imds.stop()
        await c.api.stop()


async def eventually(check: Any, timeout: float = 5.0) -> Any:
    for _ in range(int(timeout / 0.02)):
        result = await check()
        if result:
            return result
        await asyncio.sleep(0.02)
    return await check()
