"""Workload identity through the real interception: a sandbox node whose NMI reads the API server
stand-in (TLS) and exchanges service-account tokens at the Azure AD stand-in (TLS), and azure-identity's
``ManagedIdentityCredential`` (the pinned SDK from ``.sdk/venv``) inside the workload-identity pod.

``examples/workload-identity.yaml``: pod ``wi-app``, labelled ``azure.workload.identity/use: "true"``,
runs as the service account ``wi-app`` annotated with client WI_CLIENT; the file's federated service
account makes ``Sandbox.up`` choose the API server mode by itself. The SDK asks 169.254.169.254 as in
production; iptables sends it to NMI, which asks the TokenRequest API for the pod's token and has Azure
AD exchange it. The contract: the token is for the service account's client, named or not; naming
another identity's client is an error within 5 s (NMI's 400 "Identity not found", which
azure-identity does not retry), with no service-account token minted for it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from standins._jwt import claims_of
from standins.netns import Node
from standins.sandbox import (
    FEDERATION_TENANT,
    Federation,
    Sandbox,
    SandboxError,
    clean_env,
    cluster_documents,
    plan_federation,
)
from tests.e2e.conftest import EXAMPLE, UpSandbox, _down, _up

# The first test may install the SDKs (scripts/setup-sdks), on a machine where that has not run yet.
pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
WORKLOAD_EXAMPLE = ROOT / "examples" / "workload-identity.yaml"
PY_CLIENT = HERE / "clients" / "py_client.py"
SDK_PYTHON = ROOT / ".sdk" / "venv" / "bin" / "python"
SETUP_SDKS = ROOT / "scripts" / "setup-sdks"
NMI_SANDBOX = Path(sys.executable).parent / "nmi-sandbox"

WI_CLIENT = "3b2f6a1c-8e4d-4f7a-b1c9-0d5e6f7a8b90"
WEB_CLIENT = "6f1c3e2a-52b4-4d0e-9a57-2b7c0d1e4f10"
"""web-identity: a user-assigned identity of the same file, bound to pod web, not to wi-app."""
UNKNOWN_CLIENT = "99999999-9999-4999-8999-000000000009"
SUBJECT = "system:serviceaccount:default:wi-app"
BUDGET_S = 5.0
CASE_TIMEOUT_S = 8.0

CASES: list[dict[str, str | None]] = [
    {"id": "unnamed", "sdk": "azure-identity", "by": None, "value": None},
    {"id": "own-client", "sdk": "azure-identity", "by": "client_id", "value": WI_CLIENT},
    {"id": "web-client", "sdk": "azure-identity", "by": "client_id", "value": WEB_CLIENT},
    {"id": "unknown-client", "sdk": "azure-identity", "by": "client_id", "value": UNKNOWN_CLIENT},
]


# --- the plan: what an operator would create in Azure (no root needed) ----------------------------------

TYPE3 = """\
apiVersion: v1
kind: Pod
metadata:
  name: orders
  namespace: shop
  uid: 00000000-0000-0000-0000-0000000000a1
  labels: {aadpodidbinding: orders}
spec: {nodeName: node-1, serviceAccountName: orders-sa}
status: {phase: Running, podIP: 10.9.0.5}
---
apiVersion: v1
kind: Pod
metadata: {name: plain, namespace: shop, uid: 00000000-0000-0000-0000-0000000000a2}
spec: {nodeName: node-1}
status: {phase: Running, podIP: 10.9.0.6}
---
apiVersion: v1
kind: ServiceAccount
metadata:
  name: api
  namespace: shop
  annotations:
    azure.workload.identity/client-id: 5c5c0000-0000-4000-8000-0000000000c1
    azure.workload.identity/tenant-id: 7a7a0000-0000-4000-8000-0000000000aa
---
apiVersion: aadpodidentity.k8s.io/v1
kind: AzureIdentity
metadata: {name: orders, namespace: shop}
spec: {type: 3, clientID: 5c5c0000-0000-4000-8000-0000000000c3}
---
apiVersion: aadpodidentity.k8s.io/v1
kind: AzureIdentityBinding
metadata: {name: orders, namespace: shop}
spec: {azureIdentity: orders, selector: orders}
---
apiVersion: aadpodidentity.k8s.io/v1
kind: AzureIdentity
metadata: {name: unbound, namespace: shop}
spec: {type: 3, clientID: 5c5c0000-0000-4000-8000-0000000000c4}
"""


def test_the_federated_credentials_are_those_an_operator_would_create() -> None:
    from nmi.cluster_file import parse_documents

    assert plan_federation(parse_documents(TYPE3)) == [
        # An annotated service account, in the tenant it names.
        Federation(
            "7a7a0000-0000-4000-8000-0000000000aa",
            "5c5c0000-0000-4000-8000-0000000000c1",
            "system:serviceaccount:shop:api",
        ),
        # A bound type-3 identity, for the service account of each pod its binding selects; an
        # identity no binding uses needs none.
        Federation(
            FEDERATION_TENANT, "5c5c0000-0000-4000-8000-0000000000c3", "system:serviceaccount:shop:orders-sa"
        ),
    ]
    from nmi.cluster_file import load

    assert plan_federation(load(EXAMPLE)) == []  # the classic demo file: no API server needed
    assert plan_federation(load(WORKLOAD_EXAMPLE)) == [Federation(FEDERATION_TENANT, WI_CLIENT, SUBJECT)]


def test_the_api_server_gets_the_service_accounts_and_node_a_cluster_would_have() -> None:
    docs = cluster_documents(TYPE3)
    accounts = {
        (d["metadata"]["namespace"], d["metadata"]["name"]) for d in docs if d["kind"] == "ServiceAccount"
    }
    assert accounts == {("shop", "api"), ("shop", "orders-sa"), ("shop", "default")}
    assert [d["metadata"]["name"] for d in docs if d["kind"] == "Node"] == ["node-1"]
    assert len(docs) == 6 + 3  # the file's six objects, untouched, then two service accounts and the node


# --- the sandbox and the SDK -----------------------------------------------------------------------------


def _install_sdks() -> None:
    # A no-op once installed; a failed install fails the tests: they are never skipped.
    result = subprocess.run([str(SETUP_SDKS)], capture_output=True, text=True, timeout=900, check=False)
    if result.returncode != 0:
        pytest.fail(
            f"scripts/setup-sdks failed ({result.returncode}):\n{result.stderr[-3000:]}", pytrace=False
        )


@pytest.fixture(scope="module")
def wi_sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    """examples/workload-identity.yaml, the API server mode chosen from the file itself."""
    _install_sdks()
    made: list[Sandbox] = []
    try:
        yield _up(tmp_path_factory.mktemp("wi-sandbox"), made, cluster_state=WORKLOAD_EXAMPLE)
    finally:
        _down(made)


@pytest.fixture(scope="module")
def sdk_answers(wi_sandbox: Sandbox) -> dict[str, dict[str, Any]]:
    """Each case's answer from azure-identity in pod wi-app, all cases at once (forked children)."""
    argv = [str(SDK_PYTHON), str(PY_CLIENT), json.dumps(CASES), "--timeout", str(CASE_TIMEOUT_S)]
    result = subprocess.run(
        wi_sandbox.pod_argv("wi-app", argv),
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(),
        cwd=ROOT,
        check=False,
    )
    answers: dict[str, dict[str, Any]] = {}
    for line in result.stdout.splitlines():
        try:
            answer = json.loads(line)
        except ValueError:
            continue
        if isinstance(answer, dict) and "id" in answer:
            answers[answer["id"]] = answer
    missing = [case["id"] for case in CASES if case["id"] not in answers]
    assert not missing, f"no answer for {missing}: exit {result.returncode}, stderr {result.stderr[-2000:]}"
    return answers


def test_the_sandbox_runs_nmi_against_the_api_server_and_azure_ad(wi_sandbox: Sandbox) -> None:
    kube = wi_sandbox.kube
    assert kube is not None
    argv = wi_sandbox.state["processes"]["nmi"]["argv"]
    assert "--cluster-state" not in argv
    for flag, value in (
        ("--kubeconfig", kube["kubeconfig"]),
        ("--aad-ca-bundle", kube["aad_ca"]),
        ("--federation-authority-host", kube["authority"]),
        ("--federation-tenant-id", FEDERATION_TENANT),
    ):
        assert argv[argv.index(flag) + 1] == value
    assert wi_sandbox.process_running("kube-aad") and wi_sandbox.nmi_running()
    seen = wi_sandbox.exchanges()
    assert seen["issuer"] == kube["issuer"] and seen["issuer"].startswith("https://")
    assert seen["federation"] == [{"tenant": FEDERATION_TENANT, "client_id": WI_CLIENT, "subject": SUBJECT}]


@pytest.mark.parametrize("case", ["unnamed", "own-client"])
def test_managed_identity_credential_gets_the_service_accounts_client(
    case: str, sdk_answers: dict[str, dict[str, Any]]
) -> None:
    answer = sdk_answers[case]
    assert answer["ok"] is True, answer
    assert answer["appid"] == WI_CLIENT, answer


@pytest.mark.parametrize("case", ["web-client", "unknown-client"])
def test_naming_another_client_fails_fast(case: str, sdk_answers: dict[str, dict[str, Any]]) -> None:
    answer = sdk_answers[case]
    assert answer["ok"] is False, f"expected an error, got a token: {answer}"
    assert answer["error_type"] != "Timeout" and answer["elapsed"] is not None, answer
    assert answer["elapsed"] < BUDGET_S, answer
    assert answer["error_type"] == "CredentialUnavailableError", answer  # final: no retries, no token
    assert "Identity not found" in answer["message"], answer


def test_the_token_came_by_federation_through_the_interception(
    wi_sandbox: Sandbox, sdk_answers: dict[str, dict[str, Any]]
) -> None:
    seen = wi_sandbox.exchanges()
    # The pod's own service-account token, bound to it, minted for the exchange and for nothing else:
    # the cases naming another client minted none.
    assert seen["token_requests"], seen
    for issued in seen["token_requests"]:
        assert (issued["namespace"], issued["service_account"], issued["pod"]) == (
            "default",
            "wi-app",
            "wi-app",
        )
        assert issued["sub"] == SUBJECT and issued["iss"] == seen["issuer"]
        assert issued["aud"] == ["api://AzureADTokenExchange"]
    calls = [call for call in seen["aad_calls"] if call["status"] == 200]
    assert calls and all(
        (call["client_id"], call["method"], call["federated_subject"]) == (WI_CLIENT, "assertion", SUBJECT)
        for call in seen["aad_calls"]
    ), seen["aad_calls"]
    # Nothing of it went to IMDS: the answer is NMI's, reached through the DNAT rule from the pod.
    assert all(request.get("client_id") != WI_CLIENT for request in wi_sandbox.imds_requests())
    rule = "-d 169.254.169.254/32 -p tcp -m tcp --dport 80 -j DNAT"
    counted = Node.wrap(wi_sandbox.node_ns, ["iptables-save", "-c", "-t", "nat"])
    text = subprocess.run(counted, capture_output=True, text=True, check=True, timeout=10).stdout
    packets = [int(line[1 : line.index(":")]) for line in text.splitlines() if rule in line]
    assert packets and packets[0] >= len(CASES), text


def test_the_raw_answer_is_imds_shaped_with_the_federated_token(wi_sandbox: Sandbox) -> None:
    answer = wi_sandbox.token_from("wi-app", resource="https://management.azure.com/")
    assert answer["status"] == 200, answer
    body = answer["body"]
    assert body["client_id"] == WI_CLIENT and body["token_type"] == "Bearer"
    claims = claims_of(body["access_token"])
    assert (claims["appid"], claims["tid"]) == (WI_CLIENT, FEDERATION_TENANT)
    assert claims["aud"].rstrip("/") == "https://management.azure.com"


def test_exchanges_needs_the_api_server_mode(wi_sandbox: Sandbox) -> None:
    file_mode = Sandbox({**wi_sandbox.state, "kube": None}, wi_sandbox.state_path)
    with pytest.raises(SandboxError, match="no API server"):
        file_mode.exchanges()


def test_status_shows_the_stand_ins(wi_sandbox: Sandbox) -> None:
    argv = [str(NMI_SANDBOX), "status", "--prefix", wi_sandbox.prefix]
    argv += ["--state-dir", str(wi_sandbox.state_path.parent)]
    status = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    assert status.returncode == 0, status.stderr
    assert "API server stand-in https://127.0.0.1:6443" in status.stdout, status.stdout
    assert "Azure AD stand-in https://127.0.0.1:8443/" in status.stdout, status.stdout
    assert "kube-aad" in status.stdout and "running" in status.stdout, status.stdout


def test_no_kube_keeps_nmi_on_the_file(up_sandbox: UpSandbox) -> None:
    sandbox = up_sandbox(cluster_state=WORKLOAD_EXAMPLE, kube=False)
    assert sandbox.kube is None and "kube-aad" not in sandbox.state["processes"]
    assert "--cluster-state" in sandbox.state["processes"]["nmi"]["argv"]
    answer = sandbox.token_from("web")
    assert answer["status"] == 200 and claims_of(answer["body"]["access_token"])["appid"] == WEB_CLIENT
