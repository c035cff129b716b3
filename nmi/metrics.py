"""Prometheus metrics: aad-pod-identity's names (nmi-spec §6) with bounded labels, plus our own.

One ``Metrics`` object per process, built on an injected registry so tests use a fresh one.
The metrics touched on every request are the light kind of ``_fastmetrics``.
Label values are drawn from small fixed sets (route names, status codes, operation names);
raw paths, resources and client IDs never become labels.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from nmi._fastmetrics import LightCounter, LightHistogram
from podidentity.exposition import PlainCounter
from podidentity.imds.metrics import UpstreamMetrics

PREFIX = "aadpodidentity_"
NMI_BUCKETS = (0.5, 1, 2, 3, 4, 5, 10, 15, 20, 25, 30, 40, 50, 60, 70, 80, 90, 100)
REQUEST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.upstream = upstream = UpstreamMetrics(registry)
        self.imds_operations = upstream.imds_operations
        self.imds_errors = upstream.imds_errors
        self.upstream_in_flight = upstream.upstream_in_flight
        self.upstream_retries = upstream.upstream_retries
        self.nmi_operations = LightHistogram(
            PREFIX + "nmi_operations_duration_seconds",
            "Duration of NMI token operations",
            ["operation_type", "status_code", "namespace", "resource"],
            buckets=NMI_BUCKETS,
            registry=registry,
        )
        self.kube_errors = PlainCounter(
            PREFIX + "kubernetes_api_operations_errors_count",
            "Failed Kubernetes lookups",
            ["operation_type"],
            registry=registry,
        )
        self.requests = LightHistogram(
            "nmi_http_request_duration_seconds",
            "Time from a complete request to its response, by route and status",
            ["route", "status_code"],
            buckets=REQUEST_BUCKETS,
            registry=registry,
        )
        self.token_cache = LightCounter(
            "nmi_token_cache_requests",
            "Token cache lookups by result (hit, miss, stale)",
            ["result"],
            registry=registry,
        )
        self.token_refreshes = Counter(
            "nmi_token_refreshes",
            "Background token refreshes by outcome",
            ["outcome"],
            registry=registry,
        )
        self.decisions = LightCounter(
            "nmi_identity_decisions",
            "Identity decisions by outcome",
            ["outcome"],
            registry=registry,
        )
        self.ambiguous_callers = Counter(
            "nmi_ambiguous_caller_ip",
            "Requests refused because several live pods claimed the caller address",
            registry=registry,
        )
        self.waits = Histogram(
            "nmi_wait_duration_seconds",
            "Time requests waited for the pod cache or an identity assignment",
            ["reason", "outcome"],
            buckets=REQUEST_BUCKETS,
            registry=registry,
        )
        self.iptables_repairs = Counter(
            "nmi_iptables_repairs",
            "Times the iptables rules were found drifted and restored",
            registry=registry,
        )
        self.iptables_errors = Counter(
            "nmi_iptables_errors",
            "Failed iptables operations",
            registry=registry,
        )
        self.proxy_requests = Counter(
            "nmi_proxy_requests",
            "Requests proxied to IMDS by outcome",
            ["outcome"],
            registry=registry,
        )

    def gauge_fn(self, name: str, doc: str, fn: Callable[[], float]) -> None:
        """A gauge computed at scrape time (cache sizes), so the hot path pays nothing."""
        Gauge(name, doc, registry=self.registry).set_function(fn)
