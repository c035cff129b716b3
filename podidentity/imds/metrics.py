"""The upstream token families, shared by every token source (IMDS here, Azure AD in NMI).

Names are aad-pod-identity's (nmi-spec §6) so dashboards keep working; operation names too.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from podidentity.exposition import PlainCounter

PREFIX = "aadpodidentity_"
IMDS_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1, 2, 3, 4, 5, 10)

OP_MSI = "adal_token_msi"
OP_MSI_USER_ASSIGNED = "adal_token_msi_userassignedid"
OP_AAD = "adal_token"
OP_FEDERATED = "adal_token_federated"
"""Ours: a service-account token exchanged for an Azure AD token (workload identity)."""


class UpstreamMetrics:
    """Registered once per process, on the registry the daemon injects."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.imds_operations = Histogram(
            PREFIX + "imds_operations_duration_seconds",
            "Duration of successful upstream token fetches",
            ["operation_type"],
            buckets=IMDS_BUCKETS,
            registry=registry,
        )
        self.imds_errors = PlainCounter(
            PREFIX + "imds_operations_errors_count",
            "Failed upstream token fetches",
            ["operation_type"],
            registry=registry,
        )
        self.upstream_in_flight = Gauge(
            "nmi_upstream_in_flight",
            "Upstream token requests in flight",
            registry=registry,
        )
        self.upstream_retries = Counter(
            "nmi_upstream_retries",
            "Upstream attempts that were retried, by reason",
            ["reason"],
            registry=registry,
        )
