"""MIC as a process: watches, leader election, reconciler, ARM client, /healthz and /metrics.

Every replica watches (a standby's caches are warm); only the leader reconciles and writes. Losing
the lease cancels the reconciler at once, and the AAI writer refuses to write without it, so a
former leader never writes beside the new one (mic/leader.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp
from prometheus_client import CollectorRegistry

from mic.arm import ArmClient
from mic.credentials import (
    ArmCredential,
    FileArmCredential,
    ImdsArmCredential,
    ReloadingCredential,
    ServicePrincipalArmCredential,
)
from mic.events import EventRecorder
from mic.kube import AaiWriter, watch_set
from mic.leader import EndpointsLock, LeaderElector, LeaseLock, Lock
from mic.metrics import MicMetrics
from mic.reconcile import Reconciler
from mic.settings import USER_AGENT, AzureConfig, MicSettings, dumps
from podidentity.errors import ConfigError
from podidentity.http import HttpServer, Request, Response, json_response, text_response
from podidentity.http.settings import ServerSettings
from podidentity.kube.client import KubeClient
from podidentity.kube.config import Connection, load_connection
from podidentity.kube.watchset import WatchSet
from podidentity.model import Node
from podidentity.probes import NOT_FOUND, MetricsEndpoint
from podidentity.state import ClusterState

log = logging.getLogger("mic")


class App:
    def __init__(
        self,
        settings: MicSettings,
        *,
        registry: CollectorRegistry | None = None,  # None: a fresh one
        environ: Mapping[str, str] | None = None,  # None: os.environ (KUBECONFIG, in-cluster)
        credential: ArmCredential | None = None,  # None: from settings (IMDS or token file)
    ) -> None:
        self.settings = settings
        self.registry = registry or CollectorRegistry()
        self.metrics = MicMetrics(self.registry)
        self._kube = settings.kube
        self._environ = environ
        self._credential = credential
        self.state = ClusterState()
        self.source: WatchSet | None = None
        self.reconciler: Reconciler | None = None
        self.elector: LeaderElector | None = None
        self._writer: AaiWriter | None = None
        self._arm: ArmClient | None = None
        self._work: list[asyncio.Task[None]] = []
        """The reconciler's tasks: running only while this replica leads."""
        self._lock_client: KubeClient | None = None
        self._events_client: KubeClient | None = None
        self.events: EventRecorder | None = None
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
        self._arm = ArmClient(s.arm, self._session, credential, self.metrics)
        source = watch_set(self.state, self.metrics, kube=self._kube, on_change=self._changed)
        self.source = source
        elector = self.elector = self._make_elector(connection)
        self._writer = AaiWriter(self._client, self.state, self.metrics, may_write=lambda: elector.leading)
        log.info("MIC starting: kubernetes %s (%s); %s", connection.server, connection.source, dumps(s))
        # Events have a budget of their own too: best effort, never in the way of writes or the lock.
        self._events_client = KubeClient(connection, dataclasses.replace(self._kube, qps=10.0, burst=25))
        self.events = EventRecorder(self._events_client, instance=s.leader.instance)
        self.events.start()
        recorder = self.events
        self.metrics.events_dropped.set_function(lambda: recorder.dropped)
        source.start(self._client)
        self._tasks.append(asyncio.create_task(elector.run(), name="mic-leader-election"))
        for task in self._tasks:
            task.add_done_callback(_report_exit)
        self.probe_port = await self._serve(s.http_probe_host, s.http_probe_port, self._healthz, "mic-probe")
        self.metrics_port = await self._serve(
            s.prometheus_host, s.prometheus_port, MetricsEndpoint(self.registry), "mic-metrics"
        )

    def _make_elector(self, connection: Connection) -> LeaderElector:
        lead = self.settings.leader
        # Its own client and budget: a burst of AAI writes must never starve the renewals.
        # An attempt is a GET and a write per lock, every quarter lease; twice that leaves room to spare.
        qps = max(lead.qps, 2 * 2 * (2 if lead.endpoints_lock else 1) / (lead.duration_s / 4))
        budget = dataclasses.replace(self._kube, qps=qps, burst=max(8, int(qps)))
        self._lock_client = KubeClient(connection, budget)
        locks: list[Lock] = [LeaseLock(self._lock_client, lead.namespace, lead.name)]
        if lead.endpoints_lock:
            locks.insert(0, EndpointsLock(self._lock_client, lead.namespace, lead.name))
        return LeaderElector(
            locks,
            lead.instance,
            lease_duration_s=lead.duration_s,
            on_started_leading=self._lead,
            on_stopped_leading=self._step_down,
        )

    def _lead(self) -> None:
        """Leadership won: a fresh reconciler over the warm caches, and its tasks."""
        s = self.settings
        source, writer, arm = self.source, self._writer, self._arm
        assert source is not None and writer is not None and arm is not None
        self.metrics.new_leader.inc()
        self.metrics.leader.set(1)
        r = self.reconciler = Reconciler(
            state=self.state,
            nodes=lambda: {n.name: n for n in self.state.all(Node)},
            ready=lambda: source.ready,
            writer=writer,
            arm=arm,
            azure=s.azure,
            settings=s.reconcile,
            metrics=self.metrics,
            events=self.events,
        )
        self._work = [
            asyncio.create_task(r.run(), name="mic-reconcile"),
            asyncio.create_task(
                r.run_every(s.reconcile.drift_interval_s, r.request_drift_repair), name="mic-drift-repair"
            ),
            asyncio.create_task(r.run_every(s.reconcile.full_resync_s, r.mark_dirty), name="mic-resync"),
        ]
        for task in self._work:
            task.add_done_callback(_report_exit)
        r.mark_dirty()

    async def _step_down(self) -> None:
        self.metrics.leader.set(0)
        work, self._work = self._work, []
        for task in work:
            task.remove_done_callback(_report_exit)
            task.cancel()
        await asyncio.gather(*work, return_exceptions=True)

    def _make_credential(self) -> ArmCredential:
        s = self.settings
        if s.arm_token_file:
            return FileArmCredential(s.arm_token_file)
        if s.cloudconfig:
            return ReloadingCredential(s.cloudconfig, self._credential_for)
        return self._credential_for(s.azure)

    def _credential_for(self, azure: AzureConfig) -> ArmCredential:
        """The credential azure.json (or the environment) describes (mic-spec §4)."""
        s = self.settings
        if azure.use_managed_identity_extension:
            assert self._session is not None
            return ImdsArmCredential(
                s.imds_endpoint,
                s.arm.audience,
                self._session,
                client_id=azure.user_assigned_identity_id,
                user_agent=USER_AGENT,
            )
        missing = [
            key
            for key, value in (
                ("tenantId", azure.tenant_id),
                ("aadClientId", azure.aad_client_id),
                ("aadClientSecret", azure.aad_client_secret),
            )
            if not value
        ]
        if missing:
            raise ConfigError(
                f"no Azure credential for MIC: {', '.join(missing)} missing (or set "
                "useManagedIdentityExtension: true to use a managed identity)"
            )
        return ServicePrincipalArmCredential(
            s.cloud, azure.tenant_id, azure.aad_client_id, azure.aad_client_secret, s.arm.audience
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
        return {
            "healthy": self.healthy(),
            "leader_election": self.elector.status() if self.elector is not None else None,
            "watches": self.source.snapshot() if self.source is not None else {},
            "reconcile": self.reconciler.status() if self.reconciler is not None and self._work else None,
        }

    @property
    def leading(self) -> bool:
        return self.elector is not None and self.elector.leading

    def healthy(self) -> bool:
        """A standby is healthy while it watches and campaigns; a leader while it also reconciles."""
        if self.source is None or self.elector is None:
            return False
        if any(t.done() for t in self._tasks):
            return False
        if not self.leading:
            return True
        return (
            self.reconciler is not None
            and all(not t.done() for t in self._work)
            and self.reconciler.healthy()
        )

    def _healthz(self, request: Request) -> Response:
        if request.raw_path != "/healthz":
            return NOT_FOUND
        ok = self.healthy()
        status = 200 if ok else 503
        if any(part.partition("=")[0] == "verbose" for part in request.query.split("&")):
            return json_response(status, json.dumps(self.health()).encode())
        # The original's bodies ("Active" on the leader); unlike it, not-healthy is a 503 so probes see it.
        return text_response(status, "Active" if ok and self.leading else "Not Active")

    async def stop(self) -> None:
        was_leading = self.leading
        await self._step_down()
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.remove_done_callback(_report_exit)
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if was_leading and self.elector is not None:
            await self.elector.release()
        if self.events is not None:
            with contextlib.suppress(TimeoutError):
                await self.events.flush(1.0)  # what the last leadership had to say
            await self.events.stop()
        for client in (self._lock_client, self._events_client):
            if client is not None:
                await client.close()
        self._lock_client = self._events_client = None
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
