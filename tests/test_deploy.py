"""The shipped manifests parse, and what they pass to NMI is what NMI accepts."""

from __future__ import annotations

from pathlib import Path

import yaml

from nmi.cli import parse

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]


def test_daemonset_arguments_are_accepted_and_probes_match() -> None:
    (daemonset,) = docs("daemonset.yaml")
    pod = daemonset["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True and pod["serviceAccountName"] == "nmi"
    (container,) = pod["containers"]
    args = [a.replace("$(NODE_NAME)", "node-1") for a in container["args"]]
    settings = parse(args)
    probe_port = settings.observability.probe_port
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": probe_port}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": probe_port}
    caps = container["securityContext"]["capabilities"]
    assert caps["drop"] == ["ALL"] and set(caps["add"]) == {"NET_ADMIN", "NET_RAW"}
    assert {"name": "xtables-lock", "mountPath": "/run/xtables.lock"} in container["volumeMounts"]


def test_rbac_never_grants_secrets_cluster_wide() -> None:
    for doc in docs("rbac.yaml"):
        if doc["kind"] == "ClusterRole":
            resources = {r for rule in doc["rules"] for r in rule["resources"]}
            assert "secrets" not in resources
            verbs = {v for rule in doc["rules"] for v in rule["verbs"]}
            assert verbs <= {"get", "list", "watch"}


def test_crds_cover_the_four_kinds() -> None:
    kinds = {d["spec"]["names"]["kind"] for d in docs("crds.yaml")}
    assert kinds == {
        "AzureIdentity",
        "AzureIdentityBinding",
        "AzureAssignedIdentity",
        "AzurePodIdentityException",
    }


def test_mic_deployment_arguments_are_accepted(tmp_path: Path) -> None:
    from mic.cli import parse as parse_mic

    deployment = next(d for d in docs("mic.yaml") if d["kind"] == "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    azure_json = tmp_path / "azure.json"
    azure_json.write_text(
        '{"subscriptionId": "s", "resourceGroup": "rg", "useManagedIdentityExtension": true}'
    )
    args = [
        a.replace("/etc/kubernetes/azure.json", str(azure_json)).replace("$(POD_NAME)", "mic-7d9f")
        for a in container["args"]
    ]
    settings = parse_mic(args, environ={})
    assert container["livenessProbe"]["httpGet"]["port"] == settings.http_probe_port
    assert deployment["spec"]["replicas"] == 2
    assert settings.leader.instance == "mic-7d9f" and settings.leader.namespace == "kube-system"
    # RBAC for exactly what leader election and Events need, the lock only in MIC's namespace.
    role = next(d for d in docs("mic.yaml") if d["kind"] == "Role")
    assert role["metadata"]["namespace"] == settings.leader.namespace
    named = [r for r in role["rules"] if r.get("resourceNames")]
    assert {n for r in named for n in r["resourceNames"]} == {settings.leader.name}
    assert {r for rule in role["rules"] for r in rule["resources"]} == {"leases", "endpoints"}
    cluster_role = next(d for d in docs("mic.yaml") if d["kind"] == "ClusterRole")
    events = [r for r in cluster_role["rules"] if "events" in r["resources"]]
    assert events and set(events[0]["verbs"]) == {"create", "patch"}
    exception = next(d for d in docs("mic.yaml") if d["kind"] == "AzurePodIdentityException")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert any(labels.get(k) == v for k, v in exception["spec"]["podLabels"].items())
