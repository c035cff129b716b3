"""The composition root: builds every collaborator from ``Settings`` and runs the node daemon.

Start order keeps the node fail-closed (nmi-spec §4.3, §9.6 and §9.7):
1. the cluster state source starts (file loaded, or watches started; readiness waits for them);
2. the token listener is bound;
3. only then are the interception rules installed and reconciled;
4. probes and metrics listen.
On SIGTERM the listener drains and the rules stay, so a pod's request during a restart is
refused instead of reaching IMDS; ``--cleanup-iptables-on-exit`` removes them for uninstall.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import aiohttp
from prometheus_client import CollectorRegistry

from nmi.cluster_file import ClusterStateFile
from nmi.handlers import NmiHandler
from nmi.logs import AuditLog, configure
from nmi.metrics import Metrics
from nmi.proxy import ImdsProxy
from nmi.service import TokenService
from nmi.settings import Settings
from nmi.tokens.cache import TokenCache
from nmi.warmup import WarmStart
from podidentity import __version__
from podidentity.errors import ConfigError, UpstreamUnavailable
from podidentity.http.server import HttpServer
from podidentity.imds.limiter import UpstreamLimiter
from podidentity.imds.source import ImdsTokenSource
from podidentity.model import IdentityType, ObjectKey, Pod, Secret
from podidentity.probes import Check, MetricsEndpoint, Probes

if TYPE_CHECKING:
    from nmi.interception import Interception
    from nmi.tokens.msal_source import MsalTokenSource
    from nmi.watches import KubeSource
from podidentity.state import ClusterState
from podidentity.tokens import TokenSource

log = logging.getLogger("nmi")


def user_agent(settings: Settings) -> str:
    base = f"aad-pod-identity/NMI/{__version__} nmi-py/{__version__}"
    extra = settings.upstream.custom_user_agent
    return f"{base} {extra}" if extra else base


class App:
    """One NMI process. ``start`` and ``stop`` are separate so tests can drive it in-process."""

    def __init__(
        self,
        settings: Settings,
        *,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry or CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.state = ClusterState()
        self.audit = AuditLog(settings.observability.audit_lines_per_s)
        self.cache = TokenCache(settings.cache, self.metrics)
        self._limiter = UpstreamLimiter(settings.upstream.max_concurrent, settings.upstream.rate_per_s)
        self.sources: dict[IdentityType, TokenSource] = {}
        self.warmup = WarmStart(settings, self.state, self.cache, lambda: self.sources)
        self.server: HttpServer | None = None
        self.probe_server: HttpServer | None = None
        self.metrics_server: HttpServer | None = None
        self._session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._closers: list[Callable[[], Awaitable[None]]] = []
        self._file: ClusterStateFile | None = None
        # Built only when used: each imports what it needs (kube client, iptables, msal) lazily.
        self._kube: KubeSource | None = None
        self._reconciler: Interception | None = None
        self._msal: MsalTokenSource | None = None
        self.stopped = asyncio.Event()
        self._started = False
        self.metrics.gauge_fn("nmi_token_cache_entries", "Tokens in the cache", lambda: len(self.cache))
        self.metrics.gauge_fn(
            "nmi_pod_cache_size", "Pods of this node in the cache", lambda: self.state.count(Pod)
        )

    # --- pieces ---------------------------------------------------------------------------

    def _secret_from_state(self, namespace: str, name: str) -> Awaitable[Secret]:
        async def read() -> Secret:
            secret = self.state.get(Secret, ObjectKey(namespace, name))
            if secret is None:
                raise UpstreamUnavailable(f"secret {namespace}/{name} not found")
            return secret

        return read()

    def _sources(self, session: aiohttp.ClientSession) -> dict[IdentityType, TokenSource]:
        upstream = self.settings.upstream
        limiter = self._limiter
        sources: dict[IdentityType, TokenSource] = {
            IdentityType.USER_ASSIGNED_MSI: ImdsTokenSource(
                upstream, session, limiter, self.metrics.upstream, user_agent=user_agent(self.settings)
            )
        }
        from nmi.tokens.msal_source import FederationSettings, MsalTokenSource

        kube = self._kube
        reader = kube.secrets.get_secret if kube is not None else self._secret_from_state
        assertions = None
        federated = self.settings.identity.workload_identity
        if kube is not None and federated:
            from nmi.service_accounts import ServiceAccountTokens

            errors = self.metrics.kube_errors.labels("create_serviceaccount_token")
            accounts = ServiceAccountTokens(
                lambda: kube.client,
                live=self._pod_is_live,
                pod_of=self._live_pod_of,
                errors=lambda: errors.inc(),
            )
            assertions = accounts.for_request
        identity = self.settings.identity
        self._msal = MsalTokenSource(
            reader,
            self.metrics,
            ca_bundle=upstream.aad_ca_bundle,
            allow_cross_namespace_secrets=identity.allow_cross_namespace_secrets,
            http_timeout_s=upstream.request_timeout_s,
            on_credentials_changed=self.cache.invalidate_identity,
            assertions=assertions,
            federation=FederationSettings(
                authority_host=identity.federation_authority_host, tenant_id=identity.federation_tenant_id
            ),
        )
        sources[IdentityType.SERVICE_PRINCIPAL] = self._msal
        sources[IdentityType.SERVICE_PRINCIPAL_CERTIFICATE] = self._msal
        if federated:
            sources[IdentityType.FEDERATED] = self._msal
        return sources

    def _live_pod_of(self, namespace: str, account: str) -> Pod | None:
        """A live pod of this node running as ``namespace/account``, for a refresh whose pod went."""
        for pod in self.state.in_namespace(Pod, namespace):
            if pod.live and pod.service_account == account:
                return pod
        return None

    def _pod_is_live(self, pod: Pod) -> bool:
        """A pod of this node that NMI knows now, the same one (uid): only those get account tokens."""
        current = self.state.get(Pod, pod.key)
        return current is not None and current.uid == pod.uid and current.live

    def _start_state_source(self) -> None:
        cluster = self.settings.cluster
        if cluster.cluster_state_path is not None:
            self._file = ClusterStateFile(
                cluster.cluster_state_path,
                self.state,
                node_name=cluster.node_name,
                poll_s=cluster.cluster_state_poll_s,
            )
            self._file.load_initial()
            source = self._file
            # A counter in all but type: prometheus_client's Counter cannot read a value at scrape time.
            self.metrics.gauge_fn(
                "nmi_cluster_state_reload_failures",
                "Edits of --cluster-state that were refused (unparsable, or empty); the previous state stays",
                lambda: source.reload_failures,
            )
            self._spawn(self._file.run(), "cluster-state-file")
            return
        from nmi.watches import KubeSource

        self._kube = KubeSource(
            self.settings,
            self.state,
            self.metrics,
            on_pod_added=self.warmup.on_pod_added,
        )

    def _spawn(self, coro: Awaitable[Any], name: str) -> None:
        async def guarded() -> None:
            try:
                await coro
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("task %s failed", name)
                raise

        self._tasks.append(asyncio.create_task(guarded(), name=name))

    def checks(self) -> list[Check]:
        checks = [
            Check("started", lambda: self._started),
            Check("listener", lambda: self.server is not None and self.server.serving),
            Check("cluster_state", lambda: self.state.synced, lambda: self.state.sources()),
        ]
        kube, rules = self._kube, self._reconciler
        if kube is not None:
            checks.append(Check("watches", lambda: self._watches_ok(kube), kube.health, True))
        if rules is not None:
            checks.append(Check("iptables", lambda: rules.healthy, lambda: rules.last_error))
            checks.extend(rules.checks())
        return checks

    def _watches_ok(self, kube: KubeSource) -> bool:
        """Every cache listed once and none broken for longer than the threshold.

        A broken watch makes the node not ready but keeps it alive: tokens are still served
        from the last good state, and a restart would only lose that state.
        """
        threshold = self.settings.cluster.watch_broken_threshold_s
        if not kube.ready:
            return False
        return all(h["broken_since"] is None or h["broken_since"] < threshold for h in kube.health().values())

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        settings = self.settings
        obs = settings.observability
        # First, so probes say 503 (not "connection refused") while the rest comes up.
        self.probe_server = HttpServer(settings.server, Probes(self.checks), name="probe")
        await self.probe_server.start(obs.probe_address, obs.probe_port)
        self._start_state_source()
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=64, keepalive_timeout=30),
            headers={"User-Agent": user_agent(settings)},
            auto_decompress=False,
            # An HTTP_PROXY in the node's environment must never carry IMDS traffic.
            trust_env=False,
        )
        if self._kube is not None:
            await self._kube.start()
        self.sources = self._sources(self._session)
        service = TokenService(
            settings,
            self.state,
            self.cache,
            self.sources,
            self.metrics,
            retry_hint=self._limiter.retry_after_hint,
        )
        handler = NmiHandler(
            settings,
            service,
            ImdsProxy(settings.upstream, self._session, self.metrics),
            self.metrics,
            self.audit,
        )
        self.server = HttpServer(settings.server, handler, name="nmi")
        await self.server.start(settings.server.listen_address, settings.server.port)
        log.info("token listener on %s:%d", settings.server.listen_address, self.server.port)
        if settings.iptables.manage:
            await self._start_iptables()
        self._started = True
        kube = self._kube
        if kube is not None and settings.cluster.startup_taint:
            from nmi.gating import ungate_when_ready

            probes = Probes(self.checks)
            self._spawn(
                ungate_when_ready(
                    lambda: kube.client,
                    settings.cluster.node_name,
                    settings.cluster.startup_taint,
                    lambda: probes.report(readiness=True)[0],
                ),
                "startup-gating",
            )
        self.metrics_server = HttpServer(settings.server, MetricsEndpoint(self.registry), name="metrics")
        try:
            await self.metrics_server.start(obs.metrics_address, obs.prometheus_port)
        except OSError as exc:
            # As in the original, metrics are not worth failing the node for (nmi-spec §2.1).
            log.error("metrics listener not started: %s", exc)
            self.metrics_server = None

    async def _start_iptables(self) -> None:
        from nmi.interception import start_interception

        self._reconciler = await start_interception(self.settings, self.metrics, self.state)
        self._spawn(self._reconciler.run(), "iptables-reconciler")

    async def stop(self) -> None:
        grace = self.settings.server.graceful_timeout_s
        if self.server is not None:
            await self.server.shutdown(grace)
        for extra in (self.probe_server, self.metrics_server):
            if extra is not None:
                await extra.shutdown(0.5)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._reconciler is not None and self.settings.iptables.cleanup_on_exit:
            log.warning("removing interception rules on exit: pods reach IMDS directly until NMI returns")
            await self._reconciler.remove()
        elif self._reconciler is not None:
            log.info(
                "interception rules left in place: pods' metadata requests are refused until NMI returns"
            )
        if self._kube is not None:
            await self._kube.stop()
        await self.warmup.close()
        await self.cache.close()
        if self._msal is not None:
            self._msal.close()
        if self._session is not None:
            await self._session.close()
        self.stopped.set()


async def serve(settings: Settings) -> int:
    configure(settings.observability.log_format, settings.observability.log_level)
    app = App(settings)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = 0

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        if signals > 1:
            log.warning("second signal: exiting at once")
            raise SystemExit(1)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    try:
        await app.start()
    except (ConfigError, OSError) as exc:
        log.error("cannot start: %s", exc)
        await app.stop()
        return 1
    log.info("NMI %s ready to serve (mode %s)", __version__, settings.identity.operation_mode)
    started = time.monotonic()
    await stop.wait()
    log.info("stopping after %.0fs: draining requests", time.monotonic() - started)
    with contextlib.suppress(asyncio.CancelledError):
        await app.stop()
    return 0


def run(settings: Settings) -> int:
    import uvloop

    return uvloop.run(serve(settings))
