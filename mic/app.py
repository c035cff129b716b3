"""MIC as a process: watches, reconciler, ARM client, /healthz and /metrics, started and stopped as one.

Single replica: there is no leader election yet (see docs/mic.md); run one MIC per cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Mapping
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from mic.arm import ArmClient
from mic.credentials import ArmCredential, FileArmCredential, ImdsArmCredential
from mic.kube import AaiWriter, MicSource
from mic.metrics import MicMetrics
from mic.reconcile import Reconciler
from mic.settings import MicSettings, dumps
from nmi.errors import ConfigError
from nmi.kube.client import KubeClient
from nmi.kube.config import load_connection
from nmi.kube.settings import KubeSettings
from nmi.state import ClusterState

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
        self.source: MicSource | None = None
        self.reconciler: Reconciler | None = None
        self._client: KubeClient | None = None
        self._session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._runners: list[web.AppRunner] = []
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
        source = MicSource(self._client, self.state, self.metrics, kube=self._kube, on_change=self._changed)
        self.source = source
        self.reconciler = Reconciler(
            state=self.state,
            nodes=lambda: source.nodes.nodes,
            ready=lambda: source.ready,
            writer=AaiWriter(self._client, self.state, self.metrics),
            arm=arm,
            azure=s.azure,
            settings=s.reconcile,
            metrics=self.metrics,
        )
        self.metrics.new_leader.inc()
        log.info("MIC starting: kubernetes %s (%s); %s", connection.server, connection.source, dumps(s))
        source.start()
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
        self.probe_port = await self._serve(
            s.http_probe_host, s.http_probe_port, [("/healthz", self._healthz)]
        )
        self.metrics_port = await self._serve(
            s.prometheus_host, s.prometheus_port, [("/metrics", self._metrics)]
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

    async def _serve(self, host: str, port: int, routes: list[tuple[str, Any]]) -> int:
        app = web.Application()
        for path, handler in routes:
            app.router.add_get(path, handler)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
        self._runners.append(runner)
        bound: int = runner.addresses[0][1]
        return bound

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

    async def _healthz(self, request: web.Request) -> web.Response:
        ok = self.healthy()
        if "verbose" in request.query:
            return web.json_response(self.health(), status=200 if ok else 503, dumps=json.dumps)
        # The original's bodies; unlike it, not-healthy is a 503 so probes see it.
        return web.Response(text="Active" if ok else "Not Active", status=200 if ok else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.remove_done_callback(_report_exit)
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.source is not None:
            await self.source.stop()
        for runner in self._runners:
            await runner.cleanup()
        self._runners = []
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
