"""The original's counter names on the wire: exact, typed counter, parseable by Prometheus."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families

from mic.metrics import MicMetrics
from nmi.metrics import Metrics
from podidentity.exposition import PlainCounter, render

ORIGINAL_NMI = {
    "aadpodidentity_kubernetes_api_operations_errors_count",
    "aadpodidentity_imds_operations_errors_count",
}
ORIGINAL_MIC = {
    "aadpodidentity_assigned_identity_addition_count",
    "aadpodidentity_assigned_identity_deletion_count",
    "aadpodidentity_assigned_identity_update_count",
    "aadpodidentity_mic_cycle_count",
    "aadpodidentity_mic_new_leader_election_count",
    "aadpodidentity_cloud_provider_operations_errors_count",
    "aadpodidentity_kubernetes_api_operations_errors_count",
}


def _types(text: bytes) -> dict[str, str]:
    return {
        line.split()[2]: line.split()[3] for line in text.decode().splitlines() if line.startswith("# TYPE ")
    }


@pytest.mark.parametrize(("build", "names"), [(Metrics, ORIGINAL_NMI), (MicMetrics, ORIGINAL_MIC)])
def test_the_original_counters_keep_their_names_and_type(build: type, names: set[str]) -> None:
    registry = CollectorRegistry()
    build(registry)
    text = render(registry)
    types = _types(text)
    for name in names:
        assert types.get(name) == "counter", (name, types.get(name))
        assert f"# TYPE {name}_total" not in text.decode()


def test_values_labels_and_a_real_parser() -> None:
    registry = CollectorRegistry()
    plain = PlainCounter("aadpodidentity_x_errors_count", "doc", ["operation_type"], registry=registry)
    ours = Counter("nmi_things", "ours keep the convention", registry=registry)
    plain.labels("vm_get").inc()
    plain.labels(operation_type="vm_get").inc(2)
    ours.inc()
    text = render(registry).decode()
    assert 'aadpodidentity_x_errors_count{operation_type="vm_get"} 3.0' in text
    assert "nmi_things_total 1.0" in text
    assert registry.get_sample_value("aadpodidentity_x_errors_count", {"operation_type": "vm_get"}) == 3.0
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["aadpodidentity_x_errors_count"].type == "counter"
    with pytest.raises(ValueError):
        plain.labels("vm_get").inc(-1)
    with pytest.raises(ValueError):
        plain.labels("a", "b")
