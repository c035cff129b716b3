"""Connection settings (kubeconfig, in-cluster, exec plugins), rate limiting and stream framing."""

from __future__ import annotations

import asyncio
import base64
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest
import trustme
import yaml
from prometheus_client import CollectorRegistry

from nmi.metrics import Metrics
from nmi.settings import ClusterSettings, Settings
from nmi.watches import KubeSource
from podidentity.errors import ConfigError
from podidentity.kube.client import KubeClient, RateLimiter
from podidentity.kube.config import load_connection
from podidentity.kube.errors import KubeApiError, KubeUnavailable
from podidentity.model import Pod
from podidentity.state import ClusterState
from standins.apiserver import FakeApiServer, pod

from .conftest import FAST, TOKEN, CacheFactory, until


def _kubeconfig(server: FakeApiServer, user: Mapping[str, object], path: Path) -> Path:
    cluster: dict[str, object] = {"server": server.url}
    if server.ca_pem:
        cluster["certificate-authority-data"] = base64.b64encode(server.ca_pem).decode()
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": cluster}],
        "users": [{"name": "u", "user": user}],
        "contexts": [{"name": "ctx", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "ctx",
    }
    path.write_text(yaml.safe_dump(doc))
    return path


async def test_plain_http_kubeconfig_without_credentials(tmp_path: Path) -> None:
    async with FakeApiServer() as server:
        server.create(pod("a"))
        connection = await load_connection(str(server.write_kubeconfig(tmp_path / "kc")), FAST)
        assert connection.ssl_context is None
        client = KubeClient(connection, FAST)
        try:
            body = await client.get("/api/v1/pods")
        finally:
            await client.close()
        assert [i["metadata"]["name"] for i in body["items"]] == ["a"]
        assert "kind" not in body["items"][0]  # core list items come without kind


async def test_kubeconfig_env_is_used_when_no_flag(apiserver: FakeApiServer, kubeconfig: Path) -> None:
    connection = await load_connection(None, FAST, environ={"KUBECONFIG": str(kubeconfig)})
    assert connection.server == apiserver.url
    assert str(kubeconfig) in connection.source


async def test_wrong_token_is_a_401_api_error(apiserver: FakeApiServer, tmp_path: Path) -> None:
    path = apiserver.write_kubeconfig(tmp_path / "kc", token="wrong")
    client = KubeClient(await load_connection(str(path), FAST), FAST)
    try:
        with pytest.raises(KubeApiError) as info:
            await client.get("/api/v1/pods")
    finally:
        await client.close()
    assert info.value.status == 401
    assert info.value.reason == "Unauthorized"


async def test_token_file_is_reread_after_a_401(apiserver: FakeApiServer, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("one\n")
    apiserver.token = "one"
    path = apiserver.write_kubeconfig(tmp_path / "kc", token_file=str(token_file))
    client = KubeClient(await load_connection(str(path), FAST), FAST)
    try:
        await client.get("/api/v1/pods")
        token_file.write_text("two\n")  # rotated by the kubelet
        apiserver.token = "two"
        with pytest.raises(KubeApiError):
            await client.get("/api/v1/pods")  # the cached token is refused...
        await client.get("/api/v1/pods")  # ...so the file is read again
    finally:
        await client.close()


async def test_in_cluster_service_account(apiserver: FakeApiServer, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text(TOKEN)
    ca = tmp_path / "ca.crt"
    ca.write_bytes(apiserver.ca_pem or b"")
    env = {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(apiserver.port)}
    connection = await load_connection(None, FAST, environ=env, token_path=str(token), ca_path=str(ca))
    assert connection.source == "in-cluster service account"
    client = KubeClient(connection, FAST)
    try:
        body = await client.get("/api/v1/namespaces/default/pods")
    finally:
        await client.close()
    assert body["kind"] == "PodList"


async def test_no_kubeconfig_and_not_in_a_cluster_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="KUBERNETES_SERVICE_HOST"):
        await load_connection(None, FAST, environ={})


async def test_broken_kubeconfig_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "kc"
    bad.write_text("current-context: nowhere\ncontexts: []\n")
    with pytest.raises(ConfigError, match=str(bad)):
        await load_connection(str(bad), FAST)


async def test_client_certificate_data_is_loaded(apiserver: FakeApiServer, tmp_path: Path) -> None:
    client_cert = trustme.CA().issue_cert("nmi@node-a")
    user = {
        "client-certificate-data": base64.b64encode(client_cert.cert_chain_pems[0].bytes()).decode(),
        "client-key-data": base64.b64encode(client_cert.private_key_pem.bytes()).decode(),
        "token": TOKEN,
    }
    connection = await load_connection(str(_kubeconfig(apiserver, user, tmp_path / "kc")), FAST)
    client = KubeClient(connection, FAST)
    try:
        assert (await client.get("/api/v1/pods"))["kind"] == "PodList"
    finally:
        await client.close()


_PLUGIN = """
import json, sys
token_file = sys.argv[1]
with open(token_file + ".runs", "a") as runs:
    runs.write("x")
print(json.dumps({
    "apiVersion": "client.authentication.k8s.io/v1beta1",
    "kind": "ExecCredential",
    "status": {"token": open(token_file).read().strip()},
}))
"""


async def test_exec_plugin_kubeconfig_goes_through_kubernetes_asyncio(
    apiserver: FakeApiServer, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    runs = tmp_path / "token.runs"
    user = {
        "exec": {
            "apiVersion": "client.authentication.k8s.io/v1beta1",
            "command": sys.executable,
            "args": ["-c", _PLUGIN, str(token_file)],
        }
    }
    connection = await load_connection(str(_kubeconfig(apiserver, user, tmp_path / "kc")), FAST)
    assert "kubernetes_asyncio" in connection.source
    client = KubeClient(connection, FAST)
    try:
        for _ in range(3):
            assert (await client.get("/api/v1/pods"))["kind"] == "PodList"
        assert runs.read_text() == "x"  # a credential without expiry is reused, not re-run per request

        token_file.write_text("rotated")
        apiserver.token = "rotated"
        with pytest.raises(KubeApiError):
            await client.get("/api/v1/pods")
        assert (await client.get("/api/v1/pods"))["kind"] == "PodList"  # the 401 made the plugin run again
        assert runs.read_text() == "xx"
    finally:
        await client.close()


async def test_refused_connection_is_unavailable(apiserver: FakeApiServer, kubeconfig: Path) -> None:
    client = KubeClient(await load_connection(str(kubeconfig), FAST), FAST)
    await apiserver.stop_listening()
    try:
        with pytest.raises(KubeUnavailable):
            await client.get("/api/v1/pods")
    finally:
        await client.close()


async def test_rate_limiter_allows_a_burst_then_paces() -> None:
    limiter = RateLimiter(qps=50, burst=2)
    loop = asyncio.get_running_loop()
    start = loop.time()
    await limiter.acquire()
    await limiter.acquire()
    assert loop.time() - start < 0.015  # the burst passes at once
    for _ in range(5):
        await limiter.acquire()
    assert loop.time() - start >= 5 / 50 - 0.005


async def test_events_larger_than_aiohttp_line_limit_are_framed(
    apiserver: FakeApiServer, make_cache: CacheFactory
) -> None:
    cache = await make_cache()
    big = pod("big")
    big["metadata"]["annotations"] = {"blob": "x" * 300_000}  # > aiohttp's 128 KiB readline limit
    apiserver.create(big)
    apiserver.create(pod("small"))
    await until(lambda: cache.state.count(Pod) == 2, cache.state)
    assert cache.source.health()["pods"]["restarts"] == 0


def test_node_name_is_required() -> None:
    with pytest.raises(ConfigError, match="--node"):
        KubeSource(
            Settings(cluster=ClusterSettings(node_name="")), ClusterState(), Metrics(CollectorRegistry())
        )


async def test_stop_ends_every_watch_task(apiserver: FakeApiServer, make_cache: CacheFactory) -> None:
    cache = await make_cache()
    names = {t.get_name() for t in asyncio.all_tasks()}
    assert {"nmi-kube-watch-pods", "nmi-kube-watch-azureassignedidentities"} <= names
    await cache.source.stop()
    assert not any(t.get_name().startswith("nmi-kube-") for t in asyncio.all_tasks())
    await apiserver.wait_for(lambda: apiserver.open_watches == 0)
