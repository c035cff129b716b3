"""MIC as a process: watches, reconciler, ARM client, /healthz and /metrics, started and stopped as one.

Single replica: there is no leader election yet (see docs/mic.md); run one MIC per cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp
from prometheus_client import CollectorRegistry

from mic.arm import ArmClient
from mic.credentials import ArmCredential, FileArmCredential, ImdsArmCredential
from mic.kube import AaiWriter, watch_set
from mic.metrics import MicMetrics
from mic.reconcile import Reconciler
from mic.settings import MicSettings, dumps
from podidentity.errors import ConfigError
from podidentity.http import HttpServer, Request, Response, json_response, text_response
from podidentity.http.settings import ServerSettings
from podidentity.kube.client import KubeClient
from podidentity.kube.config import load_connection
from podidentity.kube.settings import KubeSettings
from podidentity.kube.watchset import WatchSet
from podidentity.model import Node
from podidentity.probes import NOT_FOUND, MetricsEndpoint
from podidentity.state import ClusterState

log = logging.getLogger("mic")

USER_AGENT = "aad-pod-identity/MIC/python"


class App:
    def __init__(
        self,
        settings: MicSettings,
        *,
        registry: CollectorRegistry | None = None,  # None: a fresh one
        kube: KubeSettings | None = None,  # None: defaults; tests shrink timeouts
        environ: Mapping[str, str] | None = None,  # None: os.environ (KUBECONFIG, in-cluster)
        credential: ArmCredential | None = None,  # None: from settings (IMDS or token file)
    ) -> None:
        self.settings = settings
        self.registry = registry or CollectorRegistry()
        self.metrics = MicMetrics(self.registry)
        self._kube = kube or KubeSettings(user_agent=USER_AGENT)
        self._environ = environ
        self._credential = credential
        self.state = ClusterState()
        self.source: WatchSet | None = None
        self.reconciler: Reconciler | None = None
        self._client: KubeClient | None = None
        self._session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._servers: list[HttpServer] = []
        self.probe_port = 0
        self.metrics_port = 0

    async def start(self) -> None:
        s = self.settings
        if not s.azure.subscription_id:
            raise ConfigError("subscriptionId is required (--cloudconfig azure.json or SUBSCRIPTION_ID)")
        connection = await load_connection(s.kubeconfig or None, self._kube, environ=self._environ)
        self._client = KubeClient(connection, self._kube)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=64, keepalive_timeout=30.0),
            headers={"User-Agent": USER_AGENT},
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        credential = self._credential or self._make_credential()
        arm = ArmClient(s.arm, self._session, credential, self.metrics)
        source = watch_set(self.state, self.metrics, kube=self._kube, on_change=self._changed)
        self.source = source
        self.reconciler = Reconciler(
            state=self.state,
            nodes=lambda: {n.name: n for n in self.state.all(Node)},
            ready=lambda: source.ready,
            writer=AaiWriter(self._client, self.state, self.metrics),
            arm=arm,
            azure=s.azure,
            settings=s.reconcile,
            metrics=self.metrics,
        )
        self.metrics.new_leader.inc()
        log.info("MIC starting: kubernetes %s (%s); %s", connection.server, connection.source, dumps(s))
        source.start(self._client)
        r = self.reconciler
        self._tasks += [
            asyncio.create_task(r.run(), name="mic-reconcile"),
            asyncio.create_task(
                r.run_every(s.reconcile.drift_interval_s, r.request_drift_repair), name="mic-drift-repair"
            ),
            asyncio.create_task(r.run_every(s.reconcile.full_resync_s, r.mark_dirty), name="mic-resync"),
        ]
        for task in self._tasks:
            task.add_done_callback(_report_exit)
        self.probe_port = await self._serve(s.http_probe_host, s.http_probe_port, self._healthz, "mic-probe")
        self.metrics_port = await self._serve(
            s.prometheus_host, s.prometheus_port, MetricsEndpoint(self.registry), "mic-metrics"
        )

    def _make_credential(self) -> ArmCredential:
        s = self.settings
        if s.arm_token_file:
            return FileArmCredential(s.arm_token_file)
        if s.azure.use_managed_identity_extension:
            assert self._session is not None
            return ImdsArmCredential(
                s.imds_endpoint,
                s.arm.audience,
                self._session,
                client_id=s.azure.user_assigned_identity_id,
                user_agent=USER_AGENT,
            )
        raise ConfigError(
            "no ARM credential: set useManagedIdentityExtension in azure.json (service-principal "
            "credentials are not supported yet) or --arm-token-file"
        )

    def _changed(self) -> None:
        if self.reconciler is not None:
            self.reconciler.mark_dirty()

    async def _serve(self, host: str, port: int, handler: Callable[[Request], Response], name: str) -> int:
        # The core's server, as NMI's probes use: limits and deadlines included, nothing to tune here.
        server = HttpServer(ServerSettings(max_connections=256, graceful_timeout_s=1.0), handler, name=name)
        await server.start(host, port)
        self._servers.append(server)
        return server.port

    def health(self) -> dict[str, Any]:
        assert self.source is not None and self.reconciler is not None
        return {
            "healthy": self.healthy(),
            "watches": self.source.snapshot(),
            "reconcile": self.reconciler.status(),
        }

    def healthy(self) -> bool:
        if self.source is None or self.reconciler is None:
            return False
        return all(not t.done() for t in self._tasks) and self.reconciler.healthy()

    def _healthz(self, request: Request) -> Response:
        if request.raw_path != "/healthz":
            return NOT_FOUND
        ok = self.healthy()
        status = 200 if ok else 503
        if any(part.partition("=")[0] == "verbose" for part in request.query.split("&")):
            return json_response(status, json.dumps(self.health()).encode())
        # The original's bodies; unlike it, not-healthy is a 503 so probes see it.
        return text_response(status, "Active" if ok else "Not Active")

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.remove_done_callback(_report_exit)
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.source is not None:
            await self.source.stop()
        for server in self._servers:
            await server.shutdown()
        self._servers = []
        if self._client is not None:
            await self._client.close()
            self._client = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> App:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def _report_exit(task: asyncio.Task[None]) -> None:
    if task.cancelled():
        return
    with contextlib.suppress(asyncio.CancelledError):
        exc = task.exception()
        log.error("task %s ended unexpectedly: %r; /healthz now fails", task.get_name(), exc)
