"""MIC's Prometheus metrics, with the original's names (mic-spec §5), on an injected registry.

The original's counters keep its exact names, without ``_total`` (``PlainCounter``).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from podidentity.exposition import PlainCounter

PREFIX = "aadpodidentity_"
AAI_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10)
LATENCY_BUCKETS = (1, 2, 5, 10, 20, 30, 45, 60, 90, 120, 180, 300, 600, 1200)
CYCLE_BUCKETS = (0.5, 1, 5, 10, 30, 60, 120, 300, 600, 1200)

OP_VM_GET = "vm_get"
OP_VM_UPDATE = "vm_update"
OP_VMSS_GET = "vmss_get"
OP_VMSS_UPDATE = "vmss_update"
CLOUD_OPS = (OP_VM_GET, OP_VM_UPDATE, OP_VMSS_GET, OP_VMSS_UPDATE)

KUBE_ADD = "assigned_identity_addition"
KUBE_DELETE = "assigned_identity_deletion"
KUBE_UPDATE = "assigned_identity_update"
KUBE_STATUS = "update_azure_assigned_identity_status"


class MicMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

        def hist(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(PREFIX + name, doc, buckets=buckets, registry=registry)

        def count(name: str, doc: str) -> PlainCounter:
            return PlainCounter(PREFIX + name, doc, registry=registry)

        self.addition_duration = hist(
            "assigned_identity_addition_duration_seconds", "AAI creation time", AAI_BUCKETS
        )
        self.addition_count = count("assigned_identity_addition_count", "AAIs created")
        self.deletion_duration = hist(
            "assigned_identity_deletion_duration_seconds", "AAI deletion time", AAI_BUCKETS
        )
        self.deletion_count = count("assigned_identity_deletion_count", "AAIs deleted")
        self.update_duration = hist(
            "assigned_identity_update_duration_seconds", "AAI update time", AAI_BUCKETS
        )
        self.update_count = count("assigned_identity_update_count", "AAIs replaced")
        self.cycle_duration = hist("mic_cycle_duration_seconds", "Reconcile cycles with work", CYCLE_BUCKETS)
        self.cycle_count = count("mic_cycle_count", "Reconcile cycles with work")
        self.new_leader = count("mic_new_leader_election_count", "Leaderships won by this replica")
        cloud_duration = Histogram(
            PREFIX + "cloud_provider_operations_duration_seconds",
            "Successful ARM calls",
            ["operation_type"],
            buckets=CYCLE_BUCKETS,
            registry=registry,
        )
        cloud_errors = PlainCounter(
            PREFIX + "cloud_provider_operations_errors_count",
            "Failed ARM calls",
            ["operation_type"],
            registry=registry,
        )
        # Label children resolved once: .labels() locks and allocates.
        self.cloud_duration = {op: cloud_duration.labels(op) for op in CLOUD_OPS}
        self.cloud_errors = {op: cloud_errors.labels(op) for op in CLOUD_OPS}
        self.kube_errors = PlainCounter(
            PREFIX + "kubernetes_api_operations_errors_count",
            "Failed Kubernetes API operations",
            ["operation_type"],
            registry=registry,
        )
        self.pending = Gauge("mic_pending_targets", "VMs/VMSSs with work not done yet", registry=registry)
        # Ours, beyond the original's families.
        self.assignment_latency = Histogram(
            "mic_assignment_latency_seconds",
            "From a pod's creation to its AzureAssignedIdentity turning Assigned",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.arm_requests = Counter(
            "mic_arm_requests",
            "Resource Manager requests by operation and outcome",
            ["operation_type", "outcome"],
            registry=registry,
        )
        self.leader = Gauge(
            "mic_leader", "1 on the replica that holds the leader lock, 0 on standbys", registry=registry
        )
        self.events_dropped = Gauge(
            "mic_events_dropped", "Kubernetes Events dropped because their queue was full", registry=registry
        )
