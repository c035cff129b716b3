"""MIC's configuration: one frozen object, grouped, units in the names (flags in ``mic.cli``)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from podidentity import __version__
from podidentity.clouds import KNOWN, CloudEnvironment
from podidentity.errors import ConfigError
from podidentity.kube.settings import KubeSettings

USER_AGENT = f"aad-pod-identity/MIC/{__version__}"
ARM_PUBLIC = "https://management.azure.com/"
IMDS_DEFAULT = "http://169.254.169.254"


@dataclass(frozen=True, slots=True)
class AzureConfig:
    """The keys of ``azure.json`` MIC uses (mic-spec §4), or their environment variables."""

    subscription_id: str = ""
    resource_group: str = ""
    """Node resource group: used only for nodes whose providerID does not name one."""
    vm_type: str = ""
    cloud: str = "AzurePublicCloud"
    tenant_id: str = ""
    aad_client_id: str = ""
    aad_client_secret: str = field(default="", repr=False)
    use_managed_identity_extension: bool = False
    user_assigned_identity_id: str = ""
    """With managed identity: the client ID MIC authenticates as; also never removed from nodes."""


_FILE_KEYS = {
    "subscriptionId": "subscription_id",
    "resourceGroup": "resource_group",
    "vmType": "vm_type",
    "cloud": "cloud",
    "tenantId": "tenant_id",
    "aadClientId": "aad_client_id",
    "aadClientSecret": "aad_client_secret",
    "useManagedIdentityExtension": "use_managed_identity_extension",
    "userAssignedIdentityID": "user_assigned_identity_id",
}
_ENV_KEYS = {
    "SUBSCRIPTION_ID": "subscription_id",
    "RESOURCE_GROUP": "resource_group",
    "VM_TYPE": "vm_type",
    "CLOUD": "cloud",
    "TENANT_ID": "tenant_id",
    "CLIENT_ID": "aad_client_id",
    "CLIENT_SECRET": "aad_client_secret",
    "USE_MSI": "use_managed_identity_extension",
    "USER_ASSIGNED_MSI_CLIENT_ID": "user_assigned_identity_id",
}


def _truthy(value: Any) -> bool:
    return value is True or (isinstance(value, str) and value.strip().casefold() == "true")


def parse_azure_config(text: str, *, source: str = "azure.json") -> AzureConfig:
    """``azure.json`` is read as YAML, as the original (JSON is a subset)."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid JSON/YAML: {exc}") from exc
    if not isinstance(doc, Mapping):
        raise ConfigError(f"{source}: expected an object")
    values: dict[str, Any] = {}
    for key, attr in _FILE_KEYS.items():
        if key in doc and doc[key] is not None:
            values[attr] = _truthy(doc[key]) if attr == "use_managed_identity_extension" else str(doc[key])
    return AzureConfig(**values)


def read_azure_config(path: str) -> AzureConfig:
    try:
        with open(path, encoding="utf-8") as f:
            return parse_azure_config(f.read(), source=path)
    except OSError as exc:
        raise ConfigError(f"cannot read --cloudconfig {path}: {exc.strerror}") from None


def azure_config_from_env(environ: Mapping[str, str]) -> AzureConfig:
    values: dict[str, Any] = {}
    for key, attr in _ENV_KEYS.items():
        if key in environ:
            values[attr] = _truthy(environ[key]) if attr == "use_managed_identity_extension" else environ[key]
    return AzureConfig(**values)


@dataclass(frozen=True, slots=True)
class ArmSettings:
    endpoint: str = ARM_PUBLIC
    """Resource Manager base URL (``--arm-endpoint``: private clouds, the stand-in)."""
    audience: str = ARM_PUBLIC
    """Resource MIC asks its token for (``--arm-audience``; private clouds have their own)."""
    api_version: str = "2019-12-01"
    """The original's compute API version (mic-spec §3.7)."""
    connect_timeout_s: float = 5.0
    request_timeout_s: float = 60.0
    """One GET, PATCH or poll; the original had none, so one hung call blocked everything (§6.4)."""
    lro_timeout_s: float = 15 * 60.0
    """Give up polling an operation after this (go-autorest's budget)."""
    lro_default_poll_s: float = 5.0
    """Poll interval when ARM sends no Retry-After."""
    lro_min_poll_s: float = 1.0
    """Floor for polls even when Retry-After says 0: never spin on ARM."""
    throttle_default_s: float = 10.0
    """How long a 429 without Retry-After closes the resource's gate."""
    max_patch_entries: int = 150
    """ARM's per-request limit of identity changes."""


@dataclass(frozen=True, slots=True)
class ReconcileSettings:
    force_namespaced: bool = False
    immutable_client_ids: frozenset[str] = frozenset()
    """Folded client IDs never removed from a VM/VMSS (``--immutable-user-msis`` + azure.json's)."""
    debounce_s: float = 0.1
    """Events only mark the state dirty; a reconcile starts this long after the first mark."""
    max_concurrent_targets: int = 10
    """VMs/VMSSs worked on at once (the original had no cap, mic-spec §6.20)."""
    kube_write_concurrency: int = 20
    """AAI writes in flight per VM/VMSS (``--createDeleteBatch``)."""
    drift_interval_s: float = 180.0
    """``--identity-assignment-reconcile-interval``: re-add Assigned identities missing on Azure."""
    update_max_retry: int = 2
    """``--update-user-msi-max-retry``: PATCHes retried after dropping unauthorised identities."""
    update_retry_interval_s: float = 1.0
    retry_initial_s: float = 1.0
    retry_max_s: float = 60.0
    """A VM/VMSS whose work failed is retried after a doubling delay, without waiting for an event."""
    full_resync_s: float = 3600.0
    """``--syncRetryDuration``: an unconditional reconcile this often."""
    stale_after_s: float = 600.0
    """/healthz turns unhealthy when no reconcile finished for this long while work is pending."""


@dataclass(frozen=True, slots=True)
class LeaderSettings:
    """``--leader-election-*`` (mic-spec §2, §3.2)."""

    instance: str = ""
    """Holder identity; the hostname (the pod name) when empty."""
    namespace: str = "default"
    name: str = "aad-pod-identity-mic"
    duration_s: float = 15.0
    """Lease duration; renew deadline half of it, retry period a quarter."""
    endpoints_lock: bool = True
    """Also hold the Go MIC's Endpoints annotation lock: two leaders never act during an upgrade."""
    qps: float = 5.0
    """The lock's own client budget, apart from the writes': a burst of AAI writes never starves it."""


CLIENT_QPS = 20.0
"""``--clientQps`` default: writes per second to the API server, burst equal (client-go's rule in the
original). 20 is kube-controller-manager's own default; the original's 5 made a 2,000-pod burst
(two writes per pod) wait ~13 minutes for the client alone, 20 makes it ~3."""


@dataclass(frozen=True, slots=True)
class MicSettings:
    kubeconfig: str = ""
    cloudconfig: str = ""
    """``--cloudconfig`` (azure.json): re-read when it changes; empty means environment variables."""
    kube: KubeSettings = field(default_factory=lambda: kube_settings(CLIENT_QPS))
    """The client of watches and AAI writes (``--clientQps``)."""
    leader: LeaderSettings = LeaderSettings()
    azure: AzureConfig = AzureConfig()
    cloud: CloudEnvironment = KNOWN["azurepubliccloud"]
    arm: ArmSettings = ArmSettings()
    reconcile: ReconcileSettings = ReconcileSettings()
    imds_endpoint: str = IMDS_DEFAULT
    """Where MIC asks for its own ARM token with managed identity (``--imds-endpoint``)."""
    arm_token_file: str = ""
    """A file holding an ARM bearer token, re-read on use: for tests and break-glass only."""
    log_level: str = "INFO"
    """``-v=N``: 4 and above is DEBUG, as klog's verbosity in the original."""
    http_probe_host: str = "0.0.0.0"
    http_probe_port: int = 8080
    prometheus_host: str = "0.0.0.0"
    prometheus_port: int = 8888


def kube_settings(qps: float, *, user_agent: str = USER_AGENT) -> KubeSettings:
    """A client budget of ``qps`` requests per second and the same burst, as the original's client-go."""
    return KubeSettings(qps=qps, burst=max(1, int(qps)), user_agent=user_agent)


def dumps(settings: MicSettings) -> str:
    """For the start-up log line; the client secret is not part of ``repr``."""
    return json.dumps(
        {
            "subscription": settings.azure.subscription_id,
            "resourceGroup": settings.azure.resource_group,
            "arm": settings.arm.endpoint,
            "forceNamespaced": settings.reconcile.force_namespaced,
            "clientQps": settings.kube.qps,
            "leaderElection": f"{settings.leader.namespace}/{settings.leader.name}",
            "immutable": sorted(settings.reconcile.immutable_client_ids),
        }
    )
