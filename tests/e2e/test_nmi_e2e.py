"""The real NMI process on a sandbox node: pods ask the metadata address as an Azure SDK does.

Every test runs ``python -m nmi`` (iptables management on) and ``python -m standins.imds`` inside
the node namespace; pods are network namespaces with their ``status.podIP`` from the example file.
"""

from __future__ import annotations

import re
import signal
import time
from typing import Any

import pytest

from standins._jwt import claims_of
from standins.sandbox import METADATA_IP, TOKEN_PATH, Sandbox
from tests.e2e.conftest import UpSandbox

WEB_CLIENT_ID = "6f1c3e2a-52b4-4d0e-9a57-2b7c0d1e4f10"
SYSTEM_ASSIGNED = "00000000-5157-4d1f-9000-000000000001"  # the stand-in's VM identity
VAULT = "https://vault.azure.net"
SDK_AGENT = "User-Agent: azsdk-python-identity/1.15.0 Python/3.11.7 (Linux)"
DNAT = "-A aad-metadata ! -s 127.0.0.1/32 -d 169.254.169.254/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 127.0.0.1:2579"  # noqa: E501
JUMP = "-A PREROUTING -j aad-metadata"


def sdk_get(sandbox: Sandbox, pod: str, resource: str = VAULT, **options: Any) -> dict[str, Any]:
    """What ManagedIdentityCredential sends on a VM: api-version 2018-02-01, encoded resource."""
    netns = sandbox.pod(pod).netns
    assert netns is not None
    path = f"{TOKEN_PATH}?api-version=2018-02-01&resource={resource.replace(':', '%3A').replace('/', '%2F')}"
    return sandbox.http(netns, METADATA_IP, 80, path, header=SDK_AGENT, **options)


def token_claims(answer: dict[str, Any]) -> dict[str, Any]:
    assert answer["status"] == 200, answer
    return claims_of(answer["body"]["access_token"])


def rule_lines(sandbox: Sandbox) -> list[str]:
    return [line for line in sandbox.nat_rules().splitlines() if "aad-metadata" in line]


# --- one shared sandbox: requests that leave it as it was --------------------------------------------


def test_bound_pod_gets_a_token_through_nmi_then_a_cached_one(shared: Sandbox) -> None:
    before = len(shared.imds_requests())
    answer = sdk_get(shared, "web")

    assert answer["status"] == 200 and answer["headers"]["server"] == "nmi", answer
    assert answer["headers"]["content-type"].startswith("application/json")
    body = answer["body"]
    assert all(isinstance(value, str) for value in body.values()), body
    assert body["token_type"] == "Bearer" and body["resource"] == VAULT and body["expires_on"].isdigit()
    claims = token_claims(answer)
    assert claims["appid"] == WEB_CLIENT_ID and claims["aud"] == VAULT

    new = shared.imds_requests()[before:]
    assert len(new) == 1, new
    upstream = new[0]
    assert upstream["query"]["client_id"] == WEB_CLIENT_ID and upstream["resource"] == VAULT
    assert upstream["peer"] != shared.pod("web").ip, "IMDS must see NMI, never the pod"
    assert ["Metadata", "true"] in upstream["headers"]

    again = sdk_get(shared, "web")
    assert again["status"] == 200 and again["body"]["access_token"] == body["access_token"]
    assert len(shared.imds_requests()) == before + 1, "the second answer must come from NMI's cache"


def test_unbound_pod_is_denied_at_once_with_imds_identity_not_found(shared: Sandbox) -> None:
    before = len(shared.imds_requests())
    answer = sdk_get(shared, "batch")

    assert answer["status"] == 400, answer
    assert answer["body"]["error_description"].startswith("Identity not found"), answer
    assert answer["headers"]["content-type"].startswith("application/json")
    assert answer["body"]["error"] == "invalid_request" and answer["body"]["error_description"]
    assert len(shared.imds_requests()) == before


def test_excepted_pod_passes_through_to_imds(shared: Sandbox) -> None:
    before = len(shared.imds_requests())
    answer = sdk_get(shared, "node-agent", resource="https://management.azure.com/")

    claims = token_claims(answer)
    new = shared.imds_requests()[before:]
    assert len(new) == 1 and new[0]["status"] == 200, new
    # The VM's own identity, fetched by the node: the pod's address never reaches IMDS.
    assert claims["appid"] == new[0]["client_id"] == SYSTEM_ASSIGNED
    assert new[0]["peer"] != shared.pod("node-agent").ip


def test_request_without_metadata_header_is_refused(shared: Sandbox) -> None:
    before = len(shared.imds_requests())
    answer = sdk_get(shared, "web", no_metadata=True)

    assert answer["status"] == 400, answer
    assert answer["body"] == {
        "error": "invalid_request",
        "error_description": "Required metadata header not specified",
    }
    assert len(shared.imds_requests()) == before


def test_node_traffic_is_not_intercepted(shared: Sandbox) -> None:
    before = len(shared.imds_requests())
    path = f"{TOKEN_PATH}?api-version=2018-02-01&resource={VAULT}"
    answer = shared.http(shared.node_ns, METADATA_IP, 80, path, header="User-Agent: e2e-from-the-node")

    assert answer["status"] == 200 and answer["headers"]["server"].startswith("IMDS/"), answer
    new = shared.imds_requests()[before:]
    assert len(new) == 1 and ["User-Agent", "e2e-from-the-node"] in new[0]["headers"], new


def test_rules_flushed_by_someone_else_come_back_within_one_interval(shared: Sandbox) -> None:
    installed = shared.nat_rules()
    assert DNAT in installed and JUMP in installed
    repairs = _sample(shared.metrics(), "nmi_iptables_repairs_total")

    shared.run(shared.node_ns, ["iptables", "-w", "5", "-t", "nat", "-F", "aad-metadata"], check=True)
    flushed = time.monotonic()
    assert DNAT not in shared.nat_rules()
    while shared.nat_rules() != installed:
        assert time.monotonic() - flushed < 5, f"rules not restored:\n{shared.nat_rules()}"
        time.sleep(0.05)
    elapsed = time.monotonic() - flushed

    assert elapsed < 1.0 + 0.75, f"restored after {elapsed:.2f}s with a 1 s interval"
    assert _sample(shared.metrics(), "nmi_iptables_repairs_total") == repairs + 1
    assert sdk_get(shared, "web")["headers"]["server"] == "nmi"


def _sample(metrics: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", metrics, re.MULTILINE)
    return float(match[1]) if match else 0.0


# --- sandboxes of their own: NMI stopped, restarted, other flags ----------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_stopped_nmi_fails_closed_and_leaves_its_rules(up_sandbox: UpSandbox, sig: signal.Signals) -> None:
    sandbox = up_sandbox()
    assert sdk_get(sandbox, "web")["status"] == 200
    rules = sandbox.nat_rules()
    served = len(sandbox.imds_requests())

    status = sandbox.stop_nmi(sig)

    assert status == (0 if sig == signal.SIGTERM else -signal.SIGKILL)
    for pod in ("web", "batch"):
        answer = sdk_get(sandbox, pod)
        assert not answer["ok"] and "ConnectionRefused" in answer["error"], answer
    assert len(sandbox.imds_requests()) == served, "a pod's request reached IMDS with NMI down"
    assert sandbox.nat_rules() == rules


def test_a_second_start_adds_no_duplicate_rules(up_sandbox: UpSandbox) -> None:
    sandbox = up_sandbox()
    first = sandbox.nat_rules()
    assert rule_lines(sandbox).count(JUMP) == 1 and rule_lines(sandbox).count(DNAT) == 1

    sandbox.stop_nmi(signal.SIGTERM)
    sandbox.start_nmi()

    assert sandbox.nat_rules() == first
    assert token_claims(sdk_get(sandbox, "web"))["appid"] == WEB_CLIENT_ID


def test_cleanup_on_exit_removes_the_rules_on_sigterm(up_sandbox: UpSandbox) -> None:
    sandbox = up_sandbox(nmi_args=["--cleanup-iptables-on-exit"])
    assert rule_lines(sandbox) != []

    assert sandbox.stop_nmi(signal.SIGTERM) == 0

    assert rule_lines(sandbox) == []
    # Uninstalled means fail open: the pod now talks to IMDS itself.
    before = len(sandbox.imds_requests())
    answer = sdk_get(sandbox, "batch")
    assert answer["status"] == 200 and answer["headers"]["server"].startswith("IMDS/"), answer
    new = sandbox.imds_requests()[before:]
    assert [r["peer"] for r in new] == [sandbox.pod("batch").ip]


def test_managed_mode_serves_bound_pods_and_denies_others(up_sandbox: UpSandbox) -> None:
    sandbox = up_sandbox(mode="managed")
    assert token_claims(sdk_get(sandbox, "web"))["appid"] == WEB_CLIENT_ID
    denied = sdk_get(sandbox, "batch")
    assert denied["status"] == 400 and denied["body"]["error"] == "invalid_request", denied
