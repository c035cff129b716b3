"""One typed settings object, grouped by concern.

Units are in the names (``_s`` seconds, ``_bytes`` bytes). Defaults follow aad-pod-identity NMI where
users rely on them (ports, modes, header checks) and fix its defects elsewhere (timeouts, limits).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from podidentity import __version__
from podidentity.http.settings import ServerSettings
from podidentity.imds.settings import UpstreamSettings
from podidentity.kube.settings import KubeSettings

OperationMode = Literal["standard", "managed"]
AntiSpoofingMode = Literal["auto", "routed", "bridge", "off"]
LogFormat = Literal["text", "json"]


@dataclass(frozen=True, slots=True)
class TokenCacheSettings:
    refresh_margin_s: float = 300.0
    """Refresh no later than this long before expiry."""
    min_refresh_interval_s: float = 30.0
    """At most one refresh attempt per key in this window."""
    jitter_fraction: float = 0.1
    """Refresh times are spread by up to this fraction of the token's lifetime, earlier only."""
    max_entries: int = 10_000
    expiry_safety_s: float = 60.0
    """A cached token this close to expiry is not served; a fresh one is fetched instead."""


@dataclass(frozen=True, slots=True)
class IdentitySettings:
    operation_mode: OperationMode = "standard"
    force_namespaced: bool = False
    metadata_header_required: bool = True
    set_retry_after_header: bool = False
    retry_after_s: int = 20
    block_instance_metadata: bool = False
    enable_host_token: bool = False
    """Legacy ``/host/token`` for node processes; off unless asked for."""
    pod_wait_timeout_s: float = 5.0
    """How long a request from an address not yet in the pod cache waits for the watch."""
    identity_wait_timeout_s: float = 15.0
    """How long a request waits for an identity to become ``Assigned`` (standard mode)."""
    workload_identity: bool = True
    """Serve federated identities (type 3, and pods following workload identity's conventions):
    watch ServiceAccounts and ask for their tokens. Off: neither, and RBAC may drop both."""
    federation_authority_host: str = "https://login.microsoftonline.com/"
    """Azure AD for federated (workload) identities: ``--federation-authority-host`` or
    ``AZURE_AUTHORITY_HOST``, as the workload-identity webhook injects it."""
    federation_tenant_id: str = ""
    """Tenant of federated identities that name none (``--federation-tenant-id`` / ``AZURE_TENANT_ID``)."""
    reject_ambiguous_identity: bool = False
    """Several identities and none named: IMDS's 400 instead of the deterministic default."""
    allow_cross_namespace_secrets: bool = False
    """Let ``clientPassword`` name a secret outside the identity's namespace (the original did)."""
    mic_namespace: str = "default"
    """Accepted for compatibility; no pod is trusted by its name (nmi-spec §9.9)."""


@dataclass(frozen=True, slots=True)
class ObservabilitySettings:
    prometheus_port: int = 9090
    probe_port: int = 8080
    """``--http-probe-port``: /healthz and /readyz."""
    probe_address: str = "0.0.0.0"
    metrics_address: str = "0.0.0.0"
    log_format: LogFormat = "text"
    log_level: str = "INFO"
    audit_lines_per_s: float = 50.0
    """Audit lines above this rate are counted and summarised instead of written."""


@dataclass(frozen=True, slots=True)
class ClusterSettings:
    node_name: str = ""
    cluster_state_path: str | None = None
    """``--cluster-state``: a YAML file instead of the Kubernetes API."""
    cluster_state_poll_s: float = 1.0
    kubeconfig: str | None = None
    enable_scale_features: bool = True
    startup_taint: str = "nmi.aadpodidentity.k8s.io/agent-not-ready"
    """Removed from this node once NMI is ready (``--startup-taint``; empty: leave taints alone)."""
    watch_broken_threshold_s: float = 30.0
    """A watch failing this long makes ``/readyz`` say not ready (tokens keep being served)."""


@dataclass(frozen=True, slots=True)
class IptablesSettings:
    manage: bool = True
    update_interval_s: float = 60.0
    cleanup_on_exit: bool = False
    """Rules stay on SIGTERM (fail closed) unless uninstalling."""
    enable_conntrack_deletion: bool = False
    allow_network_plugin_kubenet: bool = False
    kubelet_config: str = "/etc/default/kubelet"
    intercept_host_network: bool = False
    """Also send host processes' (and host-network pods') metadata traffic to NMI, via nat OUTPUT."""
    host_network_exempt_uids: tuple[int, ...] = ()
    host_network_exempt_cgroups: tuple[str, ...] = ()
    """Who keeps reaching IMDS directly when ``intercept_host_network`` is on; NMI must be among them."""
    anti_spoofing: AntiSpoofingMode = "auto"
    """``--anti-spoofing``: stop pods forging another pod's address toward IMDS (docs/security.md)."""
    cni_cache_dir: str = "/var/lib/cni/results"
    anti_spoofing_opt_out_namespaces: frozenset[str] = frozenset()
    """Namespaces whose pods may opt out of the bridge pins by label; none unless the operator says."""
    """``--cni-cache-dir``: the runtime's CNI result cache, the bridged mode's only source of pod facts."""


@dataclass(frozen=True, slots=True)
class Settings:
    server: ServerSettings = field(default_factory=ServerSettings)
    upstream: UpstreamSettings = field(default_factory=UpstreamSettings)
    cache: TokenCacheSettings = field(default_factory=TokenCacheSettings)
    identity: IdentitySettings = field(default_factory=IdentitySettings)
    observability: ObservabilitySettings = field(default_factory=ObservabilitySettings)
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    iptables: IptablesSettings = field(default_factory=IptablesSettings)
    kube: KubeSettings = field(default_factory=lambda: KubeSettings(user_agent=f"nmi/{__version__}"))
    """Kubernetes client and watch tuning (tests shrink its timeouts)."""
