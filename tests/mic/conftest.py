"""MIC in-process against the API server, ARM and IMDS stand-ins, all on loopback sockets."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from mic.app import App
from mic.settings import ArmSettings, AzureConfig, LeaderSettings, MicSettings, ReconcileSettings
from podidentity.kube.settings import KubeSettings
from standins import apiserver as k8s
from standins.apiserver import FakeApiServer
from standins.arm import VM, VMSS, ArmStandIn
from standins.imds import ImdsStandIn

SUB = "11111111-1111-1111-1111-111111111111"
RG = "mc_rg"
POOL = "aks-pool-vmss"
VM_NAME = "aks-vm-0"
MIC_CLIENT = "99999999-0000-0000-0000-00000000000c"
ARM_AUDIENCE = "https://management.azure.com/"
AAI = "azureassignedidentities"

FAST_KUBE = KubeSettings(
    qps=0,
    connect_timeout_s=1.0,
    request_timeout_s=2.0,
    watch_timeout_s=30.0,
    inactivity_timeout_s=2.0,
    backoff_initial_s=0.05,
    backoff_max_s=0.3,
)


def vmss_node(n: int) -> dict[str, Any]:
    return k8s.node(
        f"aks-pool-{n}",
        provider_id=f"azure:///subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.Compute/"
        f"virtualMachineScaleSets/{POOL}/virtualMachines/{n}",
    )


def vm_node() -> dict[str, Any]:
    return k8s.node(
        "vm-node",
        provider_id=f"azure:///subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.Compute/"
        f"virtualMachines/{VM_NAME}",
    )


def uami(name: str) -> str:
    return (
        f"/subscriptions/{SUB}/resourcegroups/ids/providers/Microsoft.ManagedIdentity/"
        + f"userAssignedIdentities/{name}"
    )


def identity(name: str, client_id: str, **kw: Any) -> dict[str, Any]:
    return k8s.azure_identity(name, client_id=client_id, resource_id=uami(name), **kw)


@dataclass
class Env:
    api: FakeApiServer
    arm: ArmStandIn
    imds: ImdsStandIn
    kubeconfig: Path
    started: list[App]

    async def start_mic(
        self, *, instance: str = "mic-0", lease_s: float = 15.0, wait_leader: bool = True, **reconcile: Any
    ) -> App:
        settings = MicSettings(
            kubeconfig=str(self.kubeconfig),
            kube=FAST_KUBE,
            leader=LeaderSettings(instance=instance, namespace="kube-system", duration_s=lease_s),
            azure=AzureConfig(
                subscription_id=SUB,
                resource_group=RG,
                use_managed_identity_extension=True,
                user_assigned_identity_id=MIC_CLIENT,
            ),
            arm=ArmSettings(
                endpoint=self.arm.url, lro_min_poll_s=0.02, lro_default_poll_s=0.05, throttle_default_s=1.0
            ),
            reconcile=ReconcileSettings(
                **{
                    "debounce_s": 0.02,
                    "retry_initial_s": 0.1,
                    "retry_max_s": 0.4,
                    "update_retry_interval_s": 0.01,
                }
                | reconcile
            ),
            imds_endpoint=self.imds.url,
            http_probe_host="127.0.0.1",
            http_probe_port=0,
            prometheus_host="127.0.0.1",
            prometheus_port=0,
        )
        app = App(settings, registry=CollectorRegistry(), environ={})
        await app.start()
        self.started.append(app)
        if wait_leader:
            await until(lambda: app.leading, 5.0, "leadership")
        return app

    def aai(self, name: str, namespace: str = "default") -> dict[str, Any] | None:
        return self.api.get(AAI, namespace, name)

    def status(self, name: str, namespace: str = "default") -> str | None:
        obj = self.aai(name, namespace)
        return None if obj is None else obj.get("status", {}).get("status")

    def pool_ids(self) -> set[str]:
        return self.arm.identities(VMSS, SUB, RG, POOL)

    def vm_ids(self) -> set[str]:
        return self.arm.identities(VM, SUB, RG, VM_NAME)


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    api = FakeApiServer(bookmark_interval_s=0.5)
    await api.start()
    arm = ArmStandIn(expect_audience=ARM_AUDIENCE, lro_delay_s=0.15, poll_retry_after="0")
    await arm.start()
    imds = ImdsStandIn()
    imds.add_identity(MIC_CLIENT, resource_id=uami("mic"))
    await imds.start()
    arm.add_vmss(SUB, RG, POOL, system_assigned=True)
    arm.add_vm(SUB, RG, VM_NAME)
    for doc in (vmss_node(0), vmss_node(1), vm_node()):
        api.create(doc)
    e = Env(api, arm, imds, api.write_kubeconfig(tmp_path / "kubeconfig"), [])
    try:
        yield e
    finally:
        for app in e.started:
            await app.stop()
        await imds.stop()
        await arm.stop()
        await api.stop()


async def until(predicate: Callable[[], Any], timeout: float = 5.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        await asyncio.sleep(0.01)
