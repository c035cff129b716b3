"""The shipped install: what kustomize renders is valid Kubernetes, what it passes to NMI and MIC is
what they accept, and it stays in the namespaces it owns.

Rendered with ``kubectl kustomize`` (and ``kustomize build`` too where that binary exists), for
every entry point of deploy/; validated offline against the Kubernetes 1.30 schemas that
kubernetes-validate bundles, and the aadpodidentity objects against deploy/crds.yaml's own
openAPIV3Schema.
"""

from __future__ import annotations

import copy
import importlib.util
import re
import shutil
import subprocess
import sys
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement

import mic.cli
import nmi.cli

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
KUBERNETES = "1.30"  # the oldest release the install supports (ValidatingAdmissionPolicy v1)
GROUP = "aadpodidentity.k8s.io"
IMAGE = "ghcr.io/example/nmi"
NMI_SA = "system:serviceaccount:kube-system:nmi"

# Every entry point a user applies with `kubectl apply -k`.
ENTRY_POINTS = ("deploy", "deploy/managed", "deploy/mic-secret", "deploy/policy")
INSTALLS = ("deploy", "deploy/managed", "deploy/mic-secret")  # the ones that install the daemons
RENDERERS = ("kubectl",) + (("kustomize",) if shutil.which("kustomize") else ())

CLUSTER_SCOPED = {
    "CustomResourceDefinition",
    "ClusterRole",
    "ClusterRoleBinding",
    "Namespace",
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding",
    "ConstraintTemplate",
    "K8sPSPCapabilities",  # Gatekeeper constraints are cluster-scoped
}


# -- rendering -------------------------------------------------------------------------------------


@cache
def render(entry: str, renderer: str = "kubectl") -> tuple[dict[str, Any], ...]:
    command = {
        "kubectl": ["kubectl", "kustomize", str(ROOT / entry)],
        "kustomize": ["kustomize", "build", str(ROOT / entry)],
    }[renderer]
    if shutil.which(command[0]) is None:
        pytest.fail(f"{command[0]} is not installed: scripts/setup-env installs it (kubernetes-client)")
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stderr}"
    return tuple(d for d in yaml.safe_load_all(done.stdout) if d)


def one(objects: tuple[dict[str, Any], ...], kind: str, name: str) -> dict[str, Any]:
    (found,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def file_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    pod = obj.get("spec", {}).get("template", {}).get("spec", {})
    return [*pod.get("initContainers", []), *pod.get("containers", [])]


# -- schemas ---------------------------------------------------------------------------------------


def _openapi_to_jsonschema(schema: Any) -> Any:
    """OpenAPI v3 (as CRDs use it) to JSON Schema: ``nullable`` becomes a ``null`` type."""
    if isinstance(schema, list):
        return [_openapi_to_jsonschema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _openapi_to_jsonschema(v) for k, v in schema.items() if k != "nullable"}
    if schema.get("nullable") and "type" in schema:
        out["type"] = [schema["type"], "null"]
    return out


@cache
def crd_schemas() -> dict[str, dict[str, Any]]:
    found = {}
    for crd in file_docs(DEPLOY / "base" / "crds.yaml"):
        (version,) = crd["spec"]["versions"]
        kind = crd["spec"]["names"]["kind"]
        found[f"{crd['spec']['group']}/{version['name']}/{kind}"] = _openapi_to_jsonschema(
            version["schema"]["openAPIV3Schema"]
        )
    return found


def crd_errors(obj: dict[str, Any]) -> list[str]:
    schema = crd_schemas()[f"{obj['apiVersion']}/{obj['kind']}"]
    validator = jsonschema.Draft7Validator(schema)
    return sorted(f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(obj))


def validate(obj: dict[str, Any]) -> None:
    """Kubernetes kinds against the bundled schemas (strict: unknown fields fail), CRD kinds against
    deploy/crds.yaml, Gatekeeper objects against the template that defines them."""
    group = obj["apiVersion"].split("/")[0]
    if group == GROUP:
        assert crd_errors(obj) == [], obj["metadata"]["name"]
    elif group == "templates.gatekeeper.sh":
        spec = obj["spec"]
        assert spec["crd"]["spec"]["names"]["kind"]
        assert obj["metadata"]["name"] == spec["crd"]["spec"]["names"]["kind"].lower()
        jsonschema.Draft7Validator.check_schema(spec["crd"]["spec"]["validation"]["openAPIV3Schema"])
        assert [t["target"] for t in spec["targets"]] == ["admission.k8s.gatekeeper.sh"]
        assert "violation[" in spec["targets"][0]["rego"]
    elif group == "constraints.gatekeeper.sh":
        template = next(
            t
            for t in file_docs(DEPLOY / "policy" / "template.yaml")
            if t["spec"]["crd"]["spec"]["names"]["kind"] == obj["kind"]
        )
        parameters = template["spec"]["crd"]["spec"]["validation"]["openAPIV3Schema"]
        strict = {**parameters, "additionalProperties": False}
        jsonschema.validate(obj["spec"].get("parameters", {}), strict)
        match = obj["spec"]["match"]
        assert set(match) <= {"kinds", "namespaces", "excludedNamespaces", "labelSelector", "scope"}
    else:
        kubernetes_validate.validate(obj, KUBERNETES, strict=True)


# -- every entry point ----------------------------------------------------------------------------


@pytest.mark.parametrize("renderer", RENDERERS)
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_renders_and_every_object_is_valid_offline(entry: str, renderer: str) -> None:
    objects = render(entry, renderer)
    assert objects
    for obj in objects:
        validate(obj)
    keys = [
        (o["apiVersion"], o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in objects
    ]
    assert len(keys) == len(set(keys))


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_objects_only_in_namespaces_the_install_owns(entry: str) -> None:
    """A fresh cluster has kube-system and default only; the install creates no namespace, so every
    namespaced object names one of those (explicitly: none lands in the user's current namespace)."""
    objects = render(entry)
    created = {o["metadata"]["name"] for o in objects if o["kind"] == "Namespace"}
    crd_kinds = {
        c["spec"]["names"]["kind"]: c["spec"]["scope"]
        for c in objects
        if c["kind"] == "CustomResourceDefinition"
    }
    for obj in objects:
        namespace = obj["metadata"].get("namespace")
        if obj["kind"] in CLUSTER_SCOPED or crd_kinds.get(obj["kind"]) == "Cluster":
            assert namespace is None, obj["metadata"]["name"]
        else:
            assert namespace in {"kube-system", "default"} | created, (obj["kind"], obj["metadata"]["name"])
    for binding in (o for o in objects if o["kind"] in {"ClusterRoleBinding", "RoleBinding"}):
        for subject in binding["subjects"]:
            assert subject.get("namespace") in {"kube-system", None}


def test_examples_are_not_applied_by_any_entry_point() -> None:
    rendered = [o for entry in ENTRY_POINTS for o in render(entry)]
    assert not [o for o in rendered if o["kind"] == "Secret"]
    assert not [o for o in rendered if o["metadata"]["name"] == "nmi-secret-reader"]
    # The examples are still valid objects, for when a user applies them.
    for path in [*(DEPLOY / "examples").glob("*.yaml"), DEPLOY / "mic-secret" / "secret.example.yaml"]:
        for obj in file_docs(path):
            validate(obj)


def test_image_tag_is_the_package_version_everywhere() -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    images = [c["image"] for entry in INSTALLS for o in render(entry) for c in containers(o)]
    sources = [p for p in DEPLOY.rglob("*.yaml") if "monitoring" not in p.parts]
    images += [c["image"] for p in sources for o in file_docs(p) for c in containers(o) if "image" in c]
    images += re.findall(r"-t (\S+)", (DEPLOY / "Dockerfile").read_text())
    assert len(images) > 6 and set(images) == {f"{IMAGE}:{version}"}
    new_tags = re.findall(r"^\s*newTag:\s*(\S+)", "".join(p.read_text() for p in sources), re.M)
    assert new_tags and set(new_tags) == {version}


# -- NMI and MIC accept what they are given --------------------------------------------------------


def nmi_container(objects: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    daemonset = one(objects, "DaemonSet", "nmi")
    (container,) = daemonset["spec"]["template"]["spec"]["containers"]
    return container


@pytest.mark.parametrize(("entry", "mode"), [("deploy", "standard"), ("deploy/managed", "managed")])
def test_nmi_arguments_are_accepted_in_both_modes(entry: str, mode: str) -> None:
    objects = render(entry)
    daemonset = one(objects, "DaemonSet", "nmi")
    pod = daemonset["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True and pod["serviceAccountName"] == "nmi"
    container = nmi_container(objects)
    settings = nmi.cli.parse([a.replace("$(NODE_NAME)", "node-1") for a in container["args"]])
    assert settings.identity.operation_mode == mode
    assert settings.identity.force_namespaced is (mode == "managed")
    assert settings.cluster.node_name == "node-1"
    probe_port = settings.observability.probe_port
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": probe_port}
    assert container["startupProbe"]["httpGet"] == {"path": "/healthz", "port": probe_port}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": probe_port}
    annotations = daemonset["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(settings.observability.prometheus_port)
    caps = container["securityContext"]["capabilities"]
    assert caps["drop"] == ["ALL"] and set(caps["add"]) == {"NET_ADMIN", "NET_RAW"}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert {"name": "xtables-lock", "mountPath": "/run/xtables.lock"} in container["volumeMounts"]
    # It runs on nodes still carrying the start-up taint it removes.
    assert {"operator": "Exists"} in pod["tolerations"]
    for c in containers(daemonset):
        assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]


def test_managed_mode_installs_no_mic_and_keeps_everything_else() -> None:
    standard, managed = render("deploy"), render("deploy/managed")
    assert not [o for o in managed if o["metadata"]["name"].startswith("mic")]
    key = lambda o: (o["kind"], o["metadata"]["name"])  # noqa: E731
    assert {key(o) for o in standard if not o["metadata"]["name"].startswith("mic")} == {
        key(o) for o in managed
    }
    nmi_args = nmi_container(standard)["args"]
    managed_args = nmi_container(managed)["args"]
    assert [a for a in managed_args if "operation-mode" not in a and "forceNamespaced" not in a] == [
        a for a in nmi_args if "operation-mode" not in a
    ]


def mic_settings(objects: tuple[dict[str, Any], ...], tmp_path: Path, environ: dict[str, str]) -> Any:
    deployment = one(objects, "Deployment", "mic")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    azure_json = tmp_path / "azure.json"
    azure_json.write_text(
        '{"cloud": "AzurePublicCloud", "subscriptionId": "s", "resourceGroup": "rg",'
        ' "useManagedIdentityExtension": true}'
    )
    args = [
        a.replace("/etc/kubernetes/azure.json", str(azure_json)).replace("$(POD_NAME)", "mic-7d9f")
        for a in container["args"]
    ]
    return mic.cli.parse(args, environ=environ)


def test_mic_deployment_arguments_are_accepted(tmp_path: Path) -> None:
    objects = render("deploy")
    deployment = one(objects, "Deployment", "mic")
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    settings = mic_settings(objects, tmp_path, {})
    assert settings.cloudconfig.endswith("azure.json") and settings.azure.use_managed_identity_extension
    assert container["livenessProbe"]["httpGet"]["port"] == settings.http_probe_port
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(settings.prometheus_port) == "8888"
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert deployment["spec"]["replicas"] == 2
    assert settings.leader.instance == "mic-7d9f" and settings.leader.namespace == "kube-system"
    # Root only to read the root-only azure.json, from a read-only hostPath; nothing else granted.
    security = container["securityContext"]
    assert security["runAsUser"] == 0 and security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False and security["capabilities"] == {"drop": ["ALL"]}
    (mount,) = container["volumeMounts"]
    assert mount["readOnly"] is True and mount["mountPath"] == "/etc/kubernetes/azure.json"
    # RBAC for exactly what leader election and Events need, the lock only in MIC's namespace.
    role = one(objects, "Role", "mic-leader-election")
    assert role["metadata"]["namespace"] == settings.leader.namespace
    named = [r for r in role["rules"] if r.get("resourceNames")]
    assert {n for r in named for n in r["resourceNames"]} == {settings.leader.name}
    assert {r for rule in role["rules"] for r in rule["resources"]} == {"leases", "endpoints"}
    events = [r for r in one(objects, "ClusterRole", "mic")["rules"] if "events" in r["resources"]]
    assert events and set(events[0]["verbs"]) == {"create", "patch"}
    exception = one(objects, "AzurePodIdentityException", "mic")
    assert exception["metadata"]["namespace"] == deployment["metadata"]["namespace"]
    labels = pod["metadata"]["labels"]
    assert any(labels.get(k) == v for k, v in exception["spec"]["podLabels"].items())


def test_mic_with_credentials_from_a_secret(tmp_path: Path) -> None:
    objects = render("deploy/mic-secret")
    deployment = one(objects, "Deployment", "mic")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert "volumes" not in pod and "volumeMounts" not in container
    assert not any("cloudconfig" in a for a in container["args"])
    security = container["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] != 0
    from_secret = {
        e["name"]: e["valueFrom"]["secretKeyRef"]
        for e in container["env"]
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    assert set(from_secret) == {
        "CLOUD",
        "TENANT_ID",
        "CLIENT_ID",
        "CLIENT_SECRET",
        "SUBSCRIPTION_ID",
        "RESOURCE_GROUP",
        "USE_MSI",
        "USER_ASSIGNED_MSI_CLIENT_ID",
    }
    assert all(r["name"] == "mic-credentials" and r["optional"] is True for r in from_secret.values())
    assert all(r["key"] == name for name, r in from_secret.items())
    # What the example Secret holds, as the kubelet would pass it, is a configuration MIC accepts.
    (secret,) = file_docs(DEPLOY / "mic-secret" / "secret.example.yaml")
    assert secret["metadata"] == {"name": "mic-credentials", "namespace": deployment["metadata"]["namespace"]}
    environ = {k: str(v) for k, v in secret["stringData"].items() if k in from_secret}
    settings = mic_settings(objects, tmp_path, environ)
    assert settings.cloudconfig == ""
    assert settings.azure.aad_client_id == secret["stringData"]["CLIENT_ID"]
    assert settings.azure.resource_group == secret["stringData"]["RESOURCE_GROUP"]
    # Everything but MIC's credentials is the standard install.
    key = lambda o: (o["kind"], o["metadata"]["name"])  # noqa: E731
    assert {key(o) for o in objects} == {key(o) for o in render("deploy")}


# -- RBAC and start-up gating ---------------------------------------------------------------------


def test_nmi_rbac_reads_and_only_patches_nodes() -> None:
    objects = render("deploy")
    rules = one(objects, "ClusterRole", "nmi")["rules"]
    assert "secrets" not in {r for rule in rules for r in rule["resources"]}
    for rule in rules:
        if rule["resources"] == ["nodes"]:
            assert set(rule["verbs"]) == {"get", "patch"} and rule["apiGroups"] == [""]
        elif rule["resources"] == ["serviceaccounts/token"]:
            assert rule["verbs"] == ["create"]  # workload identity: tokens for pods of its node
        else:
            assert set(rule["verbs"]) <= {"get", "list", "watch"}
    assert any(r["resources"] == ["nodes"] for r in rules)
    # No Role or RoleBinding for NMI anywhere: per-namespace Secret access is the user's choice.
    assert not [o for o in objects if o["kind"] in {"Role", "RoleBinding"} and "nmi" in o["metadata"]["name"]]


def test_startup_gating_policy_binds_nmi_to_its_own_node_and_its_taint() -> None:
    objects = render("deploy")
    policy = next(o for o in objects if o["kind"] == "ValidatingAdmissionPolicy")
    binding = next(o for o in objects if o["kind"] == "ValidatingAdmissionPolicyBinding")
    assert policy["apiVersion"] == binding["apiVersion"] == "admissionregistration.k8s.io/v1"
    assert binding["spec"]["policyName"] == policy["metadata"]["name"]
    assert binding["spec"]["validationActions"] == ["Deny"]
    assert policy["spec"]["failurePolicy"] == "Fail"
    (rule,) = policy["spec"]["matchConstraints"]["resourceRules"]
    assert "nodes" in rule["resources"] and "UPDATE" in rule["operations"]
    # Only NMI's own service account is subject to it; that is the account the DaemonSet runs as.
    (condition,) = policy["spec"]["matchConditions"]
    assert condition["expression"] == f"request.userInfo.username == '{NMI_SA}'"
    daemonset = one(objects, "DaemonSet", "nmi")
    account = daemonset["spec"]["template"]["spec"]["serviceAccountName"]
    assert f"system:serviceaccount:{daemonset['metadata']['namespace']}:{account}" == NMI_SA
    variables = {v["name"]: v["expression"] for v in policy["spec"]["variables"]}
    # The taint it lets NMI remove is the one NMI removes.
    settings = nmi.cli.parse([a.replace("$(NODE_NAME)", "node-1") for a in nmi_container(objects)["args"]])
    assert variables["taintKey"] == f"'{settings.cluster.startup_taint}'"
    assert "authentication.kubernetes.io/node-name" in variables["callerNode"]
    expressions = " ".join(v["expression"] for v in policy["spec"]["validations"])
    assert "variables.callerNode[0] == object.metadata.name" in expressions
    assert "oldObject" in expressions and "filter(t, t.key != variables.taintKey)" in expressions
    assert all(v.get("message") and v.get("reason") == "Forbidden" for v in policy["spec"]["validations"])


def test_exceptions_for_mic_and_aks_addons() -> None:
    objects = render("deploy")
    aks = one(objects, "AzurePodIdentityException", "aks-addon-exception")
    assert aks["metadata"]["namespace"] == "kube-system"
    assert aks["spec"]["podLabels"] == {"kubernetes.azure.com/managedby": "aks"}
    assert one(render("deploy/managed"), "AzurePodIdentityException", "aks-addon-exception") == aks


# -- CRDs ------------------------------------------------------------------------------------------


def test_crds_cover_the_four_kinds() -> None:
    kinds = {d["spec"]["names"]["kind"] for d in file_docs(DEPLOY / "crds.yaml")}
    assert kinds == {
        "AzureIdentity",
        "AzureIdentityBinding",
        "AzureAssignedIdentity",
        "AzurePodIdentityException",
    }
    assert (DEPLOY / "crds.yaml").resolve() == (DEPLOY / "base" / "crds.yaml").resolve()


def documented_objects() -> list[tuple[str, dict[str, Any]]]:
    """Every aadpodidentity object in a YAML block of docs/, README.md, or a YAML file in examples/."""
    found = []
    for path in sorted([*(ROOT / "docs").glob("*.md"), ROOT / "README.md"]):
        for i, block in enumerate(re.findall(r"```ya?ml\n(.*?)```", path.read_text(), re.S)):
            for doc in yaml.safe_load_all(block):
                if isinstance(doc, dict) and str(doc.get("apiVersion", "")).startswith(GROUP):
                    found.append((f"{path.name}#{i}-{doc['metadata']['name']}", doc))
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        for doc in file_docs(path):
            if str(doc.get("apiVersion", "")).startswith(GROUP):
                found.append((f"{path.name}-{doc['metadata']['name']}", doc))
    return found


DOCUMENTED = documented_objects()


def test_docs_show_identities_and_bindings() -> None:
    kinds = {doc["kind"] for name, doc in DOCUMENTED if name.endswith(".md") or ".md#" in name}
    assert {"AzureIdentity", "AzureIdentityBinding"} <= kinds


@pytest.mark.parametrize("obj", [d for _, d in DOCUMENTED], ids=[n for n, _ in DOCUMENTED])
def test_crd_schemas_accept_the_documented_objects(obj: dict[str, Any]) -> None:
    assert crd_errors(obj) == []


CLIENT_ID = "6f1c3e2a-52b4-4d0e-9a57-2b7c0d1e4f10"
_IDENTITY = {
    "apiVersion": f"{GROUP}/v1",
    "kind": "AzureIdentity",
    "metadata": {"name": "web-identity", "namespace": "default"},
    "spec": {"type": 0, "clientID": CLIENT_ID},
}


def _identity(**changes: Any) -> dict[str, Any]:
    obj = copy.deepcopy(_IDENTITY)
    for key, value in changes.items():
        if value is None:
            obj["spec"].pop(key)
        else:
            obj["spec"][key] = value
    return obj


@pytest.mark.parametrize(
    "obj",
    [
        _identity(type="0"),
        _identity(type=9),
        _identity(type=-1),
        _identity(clientID=None),
        _identity(clientID="web"),
        _identity(clientPassword={"namespace": "default"}),
        _identity(resourceID="/subscriptions/x/resourceGroups/rg"),
    ],
    ids=[
        "type-as-string",
        "type-9",
        "type-negative",
        "no-clientID",
        "clientID-not-guid",
        "clientPassword-without-name",
        "resourceID-not-an-identity",
    ],
)
def test_crd_schemas_reject_malformed_identities(obj: dict[str, Any]) -> None:
    assert crd_errors(obj) != []


@pytest.mark.parametrize("identity_type", [0, 1, 2, 3])
def test_every_identity_type_up_to_federated_is_accepted(identity_type: int) -> None:
    assert crd_errors(_identity(type=identity_type)) == []


# -- the kubenet mitigation ------------------------------------------------------------------------


def test_net_raw_policy_spares_only_kube_system_where_nmi_runs() -> None:
    objects = render("deploy/policy")
    (template,) = [o for o in objects if o["kind"] == "ConstraintTemplate"]
    (constraint,) = [o for o in objects if o["kind"] == "K8sPSPCapabilities"]
    assert template["spec"]["crd"]["spec"]["names"]["kind"] == "K8sPSPCapabilities"
    assert constraint["spec"]["parameters"]["requiredDropCapabilities"] == ["NET_RAW"]
    assert constraint["spec"]["match"]["kinds"] == [{"apiGroups": [""], "kinds": ["Pod"]}]
    assert constraint["spec"]["match"]["excludedNamespaces"] == ["kube-system"]
    # NMI keeps NET_RAW, so it must stay where the constraint does not reach; everything else the
    # install runs drops every capability.
    for entry in INSTALLS:
        for obj in render(entry):
            for c in containers(obj):
                if "NET_RAW" in c.get("securityContext", {}).get("capabilities", {}).get("add", []):
                    assert obj["metadata"]["namespace"] == "kube-system"
                elif not c.get("securityContext", {}).get("privileged"):
                    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"], c["name"]
    rego = template["spec"]["targets"][0]["rego"]
    for parameter in template["spec"]["crd"]["spec"]["validation"]["openAPIV3Schema"]["properties"]:
        assert f'"{parameter}"' in rego
    assert rego.count("violation[") == 3 and "ephemeralContainers" in rego and "initContainers" in rego


# -- the image -------------------------------------------------------------------------------------


def _constraints_module() -> Any:
    spec = importlib.util.spec_from_file_location("deploy_constraints", DEPLOY / "constraints.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_constraints_pin_exactly_the_runtime_dependencies() -> None:
    constraints = _constraints_module()
    pins = constraints.parse((DEPLOY / "constraints.txt").read_text())
    assert all(re.fullmatch(r"\d[\w.+!-]*", v) for v in pins.values()), pins
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    direct = [Requirement(r) for r in project["dependencies"]]
    for req in direct:
        name = constraints.canonical(req.name)
        if name in constraints.NOT_IN_IMAGE:
            assert name not in pins
            continue
        assert name in pins, f"{name} is a runtime dependency but not pinned"
        assert req.specifier.contains(pins[name], prereleases=True), (name, pins[name], str(req.specifier))
    # No development or test tool in the image.
    dev = {constraints.canonical(Requirement(r).name) for r in project["optional-dependencies"]["dev"]}
    assert not (dev - {constraints.canonical(r.name) for r in direct}) & set(pins)
    assert not {"pytest", "ruff", "mypy", "trustme", "jsonschema", "pip", "setuptools"} & set(pins)
    # Closed under dependencies wherever this venv has the pinned version to read them from.
    installed = constraints.closure()
    for name, version in pins.items():
        if installed.get(name) == version:
            needed = set(constraints.closure(name, frozenset())) - {name}
            assert needed <= set(pins), (name, needed - set(pins))
    # And every package the venv's runtime closure has is pinned (versions may be newer here).
    assert set(installed) == set(pins)


def test_dockerfile_builds_a_pinned_venv_without_stand_ins() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    instructions = [line for line in text.splitlines() if line and not line.lstrip().startswith("#")]
    froms = [line.split()[1] for line in instructions if line.startswith("FROM ")]
    assert froms == ["${PYTHON_IMAGE}", "${PYTHON_IMAGE}"]
    (base,) = re.findall(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.M)
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+(@sha256:[0-9a-f]{64})?", base), base
    minor = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert base.startswith(f"python:{minor}."), "the image's Python is the one the lock was made with"
    copies = [line.split()[1] for line in instructions if line.startswith("COPY ") and "--from" not in line]
    assert "deploy/constraints.txt" in copies
    assert not {"standins", "tests", "benchmarks", "examples", "kubectl_pod_identity", "."} & set(copies)
    assert "pip install --no-deps -r /tmp/constraints.txt" in text
    assert "COPY --from=builder /opt/venv /opt/venv" in text
    assert '! python -c "import standins"' in text
    # Nothing the daemons import needs what the image leaves out.
    for package in ("podidentity", "nmi", "mic", "iptables"):
        for path in (ROOT / package).rglob("*.py"):
            assert not re.search(r"^\s*(from|import)\s+(standins|tests|trustme)\b", path.read_text(), re.M), (
                path
            )
