"""Wiring the interception rules for this node: checks, sysctls, the reconciler.

Called by the app only after the token listener is bound, so the rules never point at a port
nobody listens on because of the daemon's own start-up order (nmi-spec §9.7).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

from iptables.bridge import BridgePinner, opted_out_ips
from iptables.drift import Drift
from iptables.reconcile import Reconciler
from iptables.rules import HostNetworkInterception, RuleSpec
from iptables.runner import IptablesRunner
from nmi.antispoof import AntiSpoofing
from nmi.metrics import Metrics
from nmi.netsetup import KUBENET_REFUSAL, NetSetupError, ensure_route_localnet, is_kubenet, purge_conntrack
from nmi.settings import Settings
from podidentity.errors import ConfigError
from podidentity.model import Pod
from podidentity.probes import Check
from podidentity.state import ClusterState

log = logging.getLogger("nmi.iptables")


class AntiSpoofingRules:
    """The reconciler's rule manager: decides the anti-spoofing rule, then repairs every rule.

    The spec is re-decided on every pass, so ``auto`` follows the pods NMI learns about and a
    rule left by an earlier run with another mode is removed as stale.
    """

    def __init__(self, runner: IptablesRunner, anti: AntiSpoofing) -> None:
        self.runner = runner
        self.anti = anti
        self.install_s: float | None = None
        """How long the pass that first installed the raw rule took (seconds)."""

    async def repair(self) -> Drift:
        wanted = await self.anti.decide()
        if wanted != self.runner.spec.anti_spoofing:
            self.runner.spec = dataclasses.replace(self.runner.spec, anti_spoofing=wanted)
        started = time.perf_counter()
        drift = await self.runner.repair()
        if wanted and self.install_s is None:
            self.install_s = time.perf_counter() - started
            if not drift.ok:
                log.info("anti-spoofing rule installed in %.1f ms", self.install_s * 1000)
        return drift


class Interception:
    """The reconciler plus the runner it drives, so the app can remove rules on uninstall."""

    def __init__(
        self,
        runner: IptablesRunner,
        reconciler: Reconciler,
        anti_spoofing: AntiSpoofing | None = None,
        state: ClusterState | None = None,
        bridge: BridgePinner | None = None,
    ) -> None:
        self.runner = runner
        self.reconciler = reconciler
        self.anti_spoofing = anti_spoofing
        self._state = state
        self.bridge = bridge
        """``--anti-spoofing=bridge``: the nftables table pinning each pod's bridge port."""

    def checks(self) -> list[Check]:
        """Extra readiness checks: the anti-spoofing report, failing only while an asked-for bridge
        table is not in place yet."""
        anti = self.anti_spoofing
        if anti is None:
            return []
        bridge = self.bridge
        if bridge is None:
            return [Check("antispoofing", lambda: True, anti.detail, True)]
        # Bridge mode is asked for explicitly: until its table is in place nothing is pinned, and a
        # ready node would be serving a node that is open to spoofing.
        return [Check("antispoofing", bridge.installed.is_set, anti.detail, True)]

    @property
    def healthy(self) -> bool:
        return self.reconciler.healthy and self.reconciler.installed.is_set()

    @property
    def last_error(self) -> str | None:
        return self.reconciler.last_error

    async def run(self) -> None:
        anti, state = self.anti_spoofing, self._state
        if self.bridge is None and (anti is None or state is None or anti.mode != "auto"):
            await self.reconciler.run()
            return
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self.reconciler.run())
            if self.bridge is not None:
                tasks.create_task(self.bridge.run())
            if anti is not None and state is not None and anti.mode == "auto":
                tasks.create_task(self._wake_on_first_pods(anti, state))

    async def _wake_on_first_pods(self, anti: AntiSpoofing, state: ClusterState) -> None:
        """While ``auto`` has no pod to look at, a pass follows the first pod changes (at most 1/s)."""
        while True:
            await state.wait_for_change(3600.0)
            if anti.undetermined:
                await self.reconciler.wake()
                await asyncio.sleep(1.0)

    async def remove(self) -> None:
        await self.runner.remove()
        if self.bridge is not None:
            await self.bridge.remove()


def host_network(settings: Settings) -> HostNetworkInterception | None:
    """The OUTPUT opt-in, refusing a set-up that would send NMI's own upstream calls to itself."""
    ipt = settings.iptables
    if not ipt.intercept_host_network:
        return None
    if not ipt.host_network_exempt_uids and not ipt.host_network_exempt_cgroups:
        raise ConfigError(
            "--intercept-host-network needs NMI exempted: --host-network-exempt-uid (a dedicated uid) "
            "or --host-network-exempt-cgroup (NMI's cgroup)"
        )
    if 0 in ipt.host_network_exempt_uids:
        log.warning("uid 0 is exempt from host-network interception: every root process keeps IMDS access")
    try:
        return HostNetworkInterception(ipt.host_network_exempt_uids, ipt.host_network_exempt_cgroups)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


async def start_interception(
    settings: Settings, metrics: Metrics, state: ClusterState | None = None
) -> Interception:
    ipt = settings.iptables
    if not ipt.allow_network_plugin_kubenet and await asyncio.to_thread(is_kubenet, ipt.kubelet_config):
        raise ConfigError(KUBENET_REFUSAL)
    spec = RuleSpec.for_listener(
        settings.server.listen_address,
        settings.server.port,
        metadata_ip=settings.upstream.metadata_ip,
        metadata_port=settings.upstream.metadata_port,
        host_network=host_network(settings),
    )
    if spec.target_ip.startswith("127."):
        try:
            changed = await asyncio.to_thread(ensure_route_localnet)
        except (OSError, NetSetupError) as exc:
            log.error("cannot enable route_localnet, pods' redirected packets may be dropped: %s", exc)
        else:
            if changed:
                log.info(
                    "enabled route_localnet on %s (pod packets DNATed to 127.0.0.1 are dropped without it)",
                    ", ".join(changed),
                )
    runner = IptablesRunner(spec)
    state = state or ClusterState()
    anti = AntiSpoofing(ipt.anti_spoofing, state, registry=metrics.registry)
    bridge = bridge_pinner(settings, anti, state, spec) if ipt.anti_spoofing == "bridge" else None
    manager = AntiSpoofingRules(runner, anti)

    async def purge(_drift: Drift) -> None:
        deleted = await asyncio.to_thread(
            purge_conntrack, spec.metadata_ip, spec.metadata_port, spare=(spec.target_ip, spec.target_port)
        )
        if deleted:
            log.info("purged %d conntrack entries that bypassed the rules", deleted)

    reconciler = Reconciler(
        manager,
        interval_s=ipt.update_interval_s,
        metrics=metrics,
        on_change=purge if ipt.enable_conntrack_deletion else None,
    )
    return Interception(runner, reconciler, anti, state, bridge)


def bridge_pinner(
    settings: Settings, anti: AntiSpoofing, state: ClusterState, spec: RuleSpec
) -> BridgePinner:
    """The bridged mode's table manager, wired to the readiness report; drift checked every
    ``--ipt-update-interval-sec``, the CNI cache polled every 0.5 s."""
    pinner = BridgePinner(
        settings.iptables.cni_cache_dir,
        opted_out=lambda: opted_out_ips(state.all(Pod), settings.iptables.anti_spoofing_opt_out_namespaces),
        metadata_ip=spec.metadata_ip,
        metadata_port=spec.metadata_port,
        check_interval_s=settings.iptables.update_interval_s,
    )
    anti.bridge_pinned = lambda: pinner.installed.is_set() and pinner.healthy
    anti.bridge_detail = lambda: {
        "cni_cache_dir": str(pinner.cache_dir),
        "pinned_ports": pinner.pinned_count,
        "last_error": pinner.last_error,
    }
    return pinner
