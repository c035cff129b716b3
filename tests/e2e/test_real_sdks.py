"""The Azure SDKs users run, inside sandbox pods, through NMI's real iptables interception.

Pinned releases (scripts/setup-sdks, into ``.sdk/``, apart from the project's .venv): azure-identity
(sync and aio), msal, msrestazure in Python; @azure/identity 3.4 and 4.13 in Node.js. Each client asks
169.254.169.254 for a token as users' code does (tests/e2e/clients/ says which query keys each sends),
and the tests assert WHICH identity the token belongs to (its ``appid``/``oid``/``xms_mirid`` claims),
or that the SDK gave up with an error within 5 s, its own retries included.

The node (sdk-cluster.yaml, standard mode, NMI's default flags): pod ``one`` has identity I1, pod
``two`` has I1 and I2, F belongs to pod ``other`` only (so the VM has it, but it is foreign to the
others), U is on no VM at all; ``lonely`` has no ``aadpodidbinding`` label, ``stray`` a label no
binding selects. The contract:

- naming an identity the pod has, in any spelling its SDK uses, gets that identity's token;
- naming a foreign or unknown identity, or asking from an unbound pod, gets an error (never a token)
  within 5 s: NMI answers as IMDS does for an identity the VM lacks, 400 ``invalid_request``
  "Identity not found", which no SDK retries (measured against the IMDS stand-in: a 404 is retried by
  all but msal, for 5.7 s by @azure/identity 3.4, 15 s by 4.13, 24 s by azure-identity, about a minute
  or more by msrestazure);
- ``one`` naming nothing gets I1; a DefaultAzureCredential or chain in an unbound pod moves on.

Every client runs once, all pods at the same time, in one module-scoped sandbox; each test then reads
its case's answer. The clients on the node itself (not intercepted: the IMDS stand-in answers) are
the baseline: what the same SDKs do against IMDS.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from standins._imds_state import new_identity
from standins.netns import Node
from standins.sandbox import METADATA_IP, METADATA_PORT, Sandbox, clean_env
from tests.e2e.conftest import _down, _up

# The first test also brings the sandbox up, runs every client (90 s at most) and, on a machine where
# scripts/setup-env has not run, installs the SDKs: more than the suite's 120 s default may be needed.
pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
CLUSTER = HERE / "sdk-cluster.yaml"
PY_CLIENT = HERE / "clients" / "py_client.py"
JS_CLIENT = HERE / "clients" / "js_client.js"
SDK_PYTHON = ROOT / ".sdk" / "venv" / "bin" / "python"
SETUP_SDKS = ROOT / "scripts" / "setup-sdks"

BUDGET_S = 5.0
"""The longest an SDK may take to give up, its own retries included."""
CASE_TIMEOUT_S = 6.0
"""A client still busy then (retrying a 404, say) is stopped and reported as a timeout."""
PARALLEL = 6
"""Python cases at once per pod (forked children); Node.js runs a pod's cases all at once."""

RG = "/subscriptions/00000000-0000-0000-0000-000000000000/resourcegroups/sdk-tests/providers"
MI = f"{RG}/Microsoft.ManagedIdentity/userAssignedIdentities"


@dataclass(frozen=True)
class Identity:
    client_id: str
    resource_id: str
    object_id: str = ""
    """The object ID the IMDS stand-in gives it (read back from the running stand-in)."""


IDENTITIES = {
    "I1": Identity("11111111-1111-4111-8111-000000000001", f"{MI}/sdk-one"),
    "I2": Identity("22222222-2222-4222-8222-000000000002", f"{MI}/sdk-two"),
    "F": Identity("ffffffff-ffff-4fff-8fff-00000000000f", f"{MI}/sdk-foreign"),
    # On no VM and in no cluster: the stand-in would never mint a token for it.
    "U": Identity(
        "99999999-9999-4999-8999-000000000009",
        f"{MI}/sdk-unknown",
        "9a9a9a9a-9a9a-49a9-89a9-9a9a9a9a9a9a",
    ),
}

# Each SDK's ways of naming a user-assigned identity (the query keys they become: see the clients).
PY_SELECTORS = {
    "azure-identity": ("client_id", "resource_id", "object_id"),
    "azure-identity-aio": ("client_id", "resource_id", "msi_res_id", "object_id"),
    "msal": ("client_id", "resource_id", "object_id"),
    "msrestazure": ("client_id", "msi_res_id", "object_id"),
}
JS_SELECTORS = {
    "identity3": ("clientId", "resourceId"),  # 3.4 has no objectId option
    "identity4": ("clientId", "resourceId", "objectId"),
}
RESOURCE_SELECTORS = {"resource_id", "msi_res_id", "resourceId"}
OBJECT_SELECTORS = {"object_id", "objectId"}


@dataclass(frozen=True)
class Case:
    pod: str
    """A sandbox pod, or "node": the node itself, which NMI does not intercept (IMDS answers)."""
    runtime: str
    """"py" (tests/e2e/clients/py_client.py) or "js" (js_client.js)."""
    sdk: str
    kind: str
    """"mi" (ManagedIdentityCredential or msal/msrestazure's own), "dac" or "chain"."""
    by: str | None
    target: str | None
    """The identity named (a key of IDENTITIES), None when none is."""
    expect: str
    """An identity's key, "error", or "sentinel" (a chain moved on to its next credential)."""

    @property
    def id(self) -> str:
        kind = "" if self.kind == "mi" else f"{self.kind}-"
        named = f"{self.by}={self.target}" if self.by else "unnamed"
        return f"{self.pod}-{kind}{self.sdk}-{named}"

    def wire(self, identities: dict[str, Identity]) -> dict[str, Any]:
        """What the client script gets: the SDK, the option's name and the identifier's value."""
        value = None
        if self.target is not None and self.by is not None:
            identity = identities[self.target]
            value = identity.client_id
            if self.by in RESOURCE_SELECTORS:
                value = identity.resource_id
            elif self.by in OBJECT_SELECTORS:
                value = identity.object_id
        py_sdk = self.sdk if self.kind == "mi" else self.kind
        if self.runtime == "py":
            return {"id": self.id, "sdk": py_sdk, "by": self.by, "value": value}
        return {"id": self.id, "sdk": self.sdk, "kind": self.kind, "by": self.by, "value": value}


def _named_cases() -> list[Case]:
    """Every way of naming an identity, in every SDK, from every pod that tells something."""
    cases = []
    # (pod, identity named, what it must get)
    plan = [
        ("one", "I1", "I1"),
        ("one", "F", "error"),
        ("one", "U", "error"),
        ("two", "I1", "I1"),
        ("two", "I2", "I2"),
        ("lonely", "I1", "error"),
        ("stray", "I1", "error"),
    ]
    for runtime, selectors in (("py", PY_SELECTORS), ("js", JS_SELECTORS)):
        for sdk, keys in selectors.items():
            for pod, target, expect in plan:
                cases += [Case(pod, runtime, sdk, "mi", by, target, expect) for by in keys]
            for pod, expect in (("one", "I1"), ("lonely", "error"), ("stray", "error")):
                cases.append(Case(pod, runtime, sdk, "mi", None, None, expect))
    return cases


def _chain_cases() -> list[Case]:
    cases = []
    for pod, expect in (("one", "I1"), ("lonely", "error"), ("stray", "error")):
        cases.append(Case(pod, "py", "azure-identity", "dac", None, None, expect))
        cases.append(Case(pod, "js", "identity4", "dac", None, None, expect))
    for pod, by, target in (("lonely", None, None), ("stray", None, None), ("one", "client_id", "F")):
        cases.append(Case(pod, "py", "azure-identity", "chain", by, target, "sentinel"))
    for sdk in JS_SELECTORS:
        for pod, by, target in (("lonely", None, None), ("one", "clientId", "F")):
            cases.append(Case(pod, "js", sdk, "chain", by, target, "sentinel"))
    return cases


def _baseline_cases() -> list[Case]:
    """The same SDKs on the node, straight to the IMDS stand-in: a token, and IMDS's own fast 400."""
    cases = []
    for runtime, selectors in (("py", PY_SELECTORS), ("js", JS_SELECTORS)):
        for sdk, keys in selectors.items():
            cases.append(Case("node", runtime, sdk, "mi", keys[0], "I1", "I1"))
            cases.append(Case("node", runtime, sdk, "mi", keys[0], "U", "error"))
    return cases


CASES = _named_cases() + _chain_cases() + _baseline_cases()
assert len({case.id for case in CASES}) == len(CASES), "case ids must be unique"


# --- the sandbox and one run of every client -------------------------------------------------------


def _install_sdks() -> None:
    # Done by scripts/test before the suite; here too (a no-op then) so this file runs alone.
    # A failed install fails the tests: they are never skipped.
    result = subprocess.run([str(SETUP_SDKS)], capture_output=True, text=True, timeout=900, check=False)
    if result.returncode != 0:
        message = f"scripts/setup-sdks failed ({result.returncode}):\n{result.stderr[-3000:]}"
        pytest.fail(message, pytrace=False)


@pytest.fixture(scope="module")
def sdk_sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    """sdk-cluster.yaml in a sandbox of its own, NMI with its default flags (standard mode)."""
    _install_sdks()
    made: list[Sandbox] = []
    try:
        yield _up(tmp_path_factory.mktemp("sdk-sandbox"), made, cluster_state=CLUSTER)
    finally:
        _down(made)


@pytest.fixture(scope="module")
def identities(sdk_sandbox: Sandbox) -> dict[str, Identity]:
    """IDENTITIES with the object IDs the running IMDS stand-in gives I1, I2 and F."""
    answer = sdk_sandbox.http(
        sdk_sandbox.node_ns, METADATA_IP, METADATA_PORT, "/__standin/identities", no_metadata=True
    )
    assert answer["status"] == 200, answer
    on_vm = {entry["client_id"]: entry for entry in answer["body"]}
    known = {}
    for key, identity in IDENTITIES.items():
        entry = on_vm.get(identity.client_id)
        if key == "U":
            assert entry is None, "U must be on no VM"
            known[key] = identity
            continue
        assert entry is not None and entry["resource_id"] == identity.resource_id, (key, on_vm)
        # The stand-in's rule (standins/_imds_state.py new_identity): uuid5 of the client ID.
        assert entry["object_id"] == new_identity(identity.client_id).object_id
        known[key] = Identity(identity.client_id, identity.resource_id, entry["object_id"])
    assert known["U"].object_id not in {known[key].object_id for key in ("I1", "I2", "F")}
    return known


def _argv(sandbox: Sandbox, pod: str, runtime: str, cases: list[dict[str, Any]]) -> list[str]:
    payload = json.dumps(cases)
    if runtime == "py":
        argv = [str(SDK_PYTHON), str(PY_CLIENT), payload, "--timeout", str(CASE_TIMEOUT_S)]
        argv += ["--parallel", str(PARALLEL)]
    else:
        argv = ["node", str(JS_CLIENT), payload, str(CASE_TIMEOUT_S)]
    if pod == "node":
        return Node.wrap(sandbox.node_ns, argv)
    return sandbox.pod_argv(pod, argv)


@pytest.fixture(scope="module")
def results(sdk_sandbox: Sandbox, identities: dict[str, Identity]) -> dict[str, dict[str, Any]]:
    """Every case's answer: one client process per pod and runtime, all running at the same time."""
    batches: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for case in CASES:
        batches.setdefault((case.pod, case.runtime), []).append(case.wire(identities))
    procs = {
        key: subprocess.Popen(
            _argv(sdk_sandbox, *key, cases),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=clean_env(),
            cwd=ROOT,
        )
        for key, cases in batches.items()
    }
    deadline = time.monotonic() + 90
    answers: dict[str, dict[str, Any]] = {}
    for key, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        for line in out.splitlines():
            try:
                answer = json.loads(line)
            except ValueError:
                continue  # not an answer line: the missing answers below carry stderr
            if isinstance(answer, dict) and "id" in answer:
                answers[answer["id"]] = answer
        for wired in batches[key]:
            answers.setdefault(
                wired["id"],
                {"ok": None, "error_type": "NoAnswer", "batch_exit": proc.returncode, "stderr": err[-2000:]},
            )
    return answers


# --- the tests ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_sdk_gets_exactly_the_identity_it_may_have_or_a_fast_error(
    case: Case, results: dict[str, dict[str, Any]], identities: dict[str, Identity]
) -> None:
    answer = results[case.id]
    sent = case.wire(identities)
    if case.expect == "error":
        assert answer["ok"] is False, f"{case.id}: expected an error, got {answer} (sent {sent})"
        assert answer["error_type"] != "Timeout" and answer["elapsed"] is not None, answer
        assert answer["elapsed"] < BUDGET_S, f"{case.id}: the error took {answer['elapsed']}s: {answer}"
    elif case.expect == "sentinel":
        assert answer.get("sentinel") is True, f"{case.id}: the chain did not move on: {answer}"
        assert answer["elapsed"] < BUDGET_S, f"{case.id}: moving on took {answer['elapsed']}s: {answer}"
    else:
        expected = identities[case.expect]
        assert answer["ok"] is True, f"{case.id}: expected {case.expect}'s token, got {answer} (sent {sent})"
        got = (answer["appid"], answer["oid"], answer["mirid"])
        assert got == (expected.client_id, expected.object_id, expected.resource_id), (
            f"{case.id}: expected {case.expect} ({expected.client_id}), got {answer}"
        )


REFUSALS = {
    "one-client_id=F": ("one", {"client_id": IDENTITIES["F"].client_id}),
    "one-msi_res_id=F": ("one", {"msi_res_id": IDENTITIES["F"].resource_id}),
    "one-object_id=F": ("one", {"object_id": new_identity(IDENTITIES["F"].client_id).object_id}),
    "one-resource_id=F": ("one", {"resource_id": IDENTITIES["F"].resource_id}),  # azure-identity aio's key
    "one-client_id=U": ("one", {"client_id": IDENTITIES["U"].client_id}),
    "one-mi_res_id=U": ("one", {"mi_res_id": IDENTITIES["U"].resource_id}),
    "lonely-unnamed": ("lonely", {}),
    "lonely-client_id=I1": ("lonely", {"client_id": IDENTITIES["I1"].client_id}),
    "stray-unnamed": ("stray", {}),
    "stray-client_id=I1": ("stray", {"client_id": IDENTITIES["I1"].client_id}),
}


@pytest.mark.parametrize(("pod", "query"), list(REFUSALS.values()), ids=list(REFUSALS))
def test_refusals_are_the_400_imds_gives_for_an_identity_the_vm_lacks(
    sdk_sandbox: Sandbox, pod: str, query: dict[str, str]
) -> None:
    """On the wire: the answer no SDK retries (every SDK but msal retries a 404, for 5.7 s to minutes)."""
    answer = sdk_sandbox.token_from(pod, **query)
    assert answer["status"] == 400, answer
    assert answer["headers"]["content-type"].startswith("application/json"), answer
    body = answer["body"]
    assert body["error"] == "invalid_request", body
    assert body["error_description"].startswith("Identity not found"), body
    assert "access_token" not in body
