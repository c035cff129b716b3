"""deploy/crds.yaml: structural schemas that accept the documented objects and reject what NMI can't use.

A small validator for the OpenAPI subset the CRDs use (type, properties, required, enum, pattern,
items, additionalProperties, nullable, x-kubernetes-preserve-unknown-fields) runs the declared
patterns with Python ``re``; they are written to mean the same in ECMA-262, which the API server uses.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from podidentity.model import parse_object
from standins.apiserver import assigned_identity, azure_identity, binding, exception

CRDS = Path(__file__).resolve().parents[2] / "deploy" / "crds.yaml"
GROUP = "aadpodidentity.k8s.io"
CLIENT_ID = "8d5f2b4e-1c3a-4b6d-9e7f-0a1b2c3d4e5f"
RESOURCE_ID = (
    "/subscriptions/11111111-2222-3333-4444-555555555555/resourcegroups/my-rg/providers/"
    "Microsoft.ManagedIdentity/userAssignedIdentities/demo-id"
)
_TYPES = {"object": dict, "string": str, "array": list, "boolean": bool}


def _schemas() -> dict[str, dict[str, Any]]:
    docs = list(yaml.safe_load_all(CRDS.read_text()))
    return {d["spec"]["names"]["kind"]: d["spec"]["versions"][0]["schema"]["openAPIV3Schema"] for d in docs}


def validate(value: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    errors: list[str] = []
    if value is None:
        return [] if schema.get("nullable") else [f"{path}: null"]
    kind = schema.get("type")
    if kind == "integer":
        if isinstance(value, bool) or not isinstance(value, int):
            return [f"{path}: not an integer"]
    elif kind in _TYPES and not isinstance(value, _TYPES[kind]):
        return [f"{path}: not a {kind}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} not in {schema['enum']}")
    if "pattern" in schema and not re.search(schema["pattern"], value):
        errors.append(f"{path}: {value!r} does not match the pattern")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for key in schema.get("required", []):
            if key not in value:
                errors.append(f"{path}.{key}: required")
        for key, item in value.items():
            if key in props:
                errors += validate(item, props[key], f"{path}.{key}")
            elif "additionalProperties" in schema:
                errors += validate(item, schema["additionalProperties"], f"{path}.{key}")
            elif not schema.get("x-kubernetes-preserve-unknown-fields") and kind == "object" and props:
                errors.append(f"{path}.{key}: unknown field (would be pruned)")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            errors += validate(item, schema["items"], f"{path}[{i}]")
    return errors


def _structural(schema: dict[str, Any], path: str = "") -> list[str]:
    problems = []
    if "type" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        problems.append(f"{path}: no type")
    for key, sub in schema.get("properties", {}).items():
        problems += _structural(sub, f"{path}.{key}")
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            problems += _structural(schema[key], f"{path}.{key}")
    return problems


def test_four_namespaced_kinds_in_the_original_group_with_approval_annotation() -> None:
    docs = list(yaml.safe_load_all(CRDS.read_text()))
    assert {d["spec"]["names"]["plural"] for d in docs} == {
        "azureidentities",
        "azureidentitybindings",
        "azureassignedidentities",
        "azurepodidentityexceptions",
    }
    for d in docs:
        assert d["apiVersion"] == "apiextensions.k8s.io/v1"
        assert d["metadata"]["name"] == f"{d['spec']['names']['plural']}.{GROUP}"
        assert d["metadata"]["annotations"]["api-approved.kubernetes.io"]  # required for *.k8s.io groups
        assert d["spec"]["scope"] == "Namespaced"
        assert [(v["name"], v["served"], v["storage"]) for v in d["spec"]["versions"]] == [("v1", True, True)]
        schema = d["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        assert _structural(schema) == []
        assert schema["properties"]["spec"]["x-kubernetes-preserve-unknown-fields"] is True


def test_field_names_keep_the_original_casing() -> None:
    s = _schemas()
    assert set(s["AzureIdentity"]["properties"]["spec"]["properties"]) >= {
        "type",
        "clientID",
        "resourceID",
        "clientPassword",
        "tenantID",
        "auxiliaryTenantIDs",
        "adEndpoint",
    }
    assert set(s["AzureIdentityBinding"]["properties"]["spec"]["properties"]) >= {"azureIdentity", "selector"}
    assert set(s["AzureAssignedIdentity"]["properties"]["spec"]["properties"]) >= {
        "azureIdentityRef",
        "azureBindingRef",
        "pod",
        "podNamespace",
        "nodename",
    }
    assert "status" in s["AzureAssignedIdentity"]["properties"]["status"]["properties"]
    assert "podLabels" in s["AzurePodIdentityException"]["properties"]["spec"]["properties"]


def _documented_objects() -> list[dict[str, Any]]:
    msi = azure_identity("demo", client_id=CLIENT_ID, resource_id=RESOURCE_ID)
    msi["spec"]["metadata"] = {"creationTimestamp": None}  # Go's artefact: must stay valid
    sp = azure_identity("sp", id_type=1, client_id=CLIENT_ID.upper(), secret=("default", "sp-secret"))
    sp["spec"]["tenantID"] = "contoso.onmicrosoft.com"
    sp["spec"]["auxiliaryTenantIDs"] = ["22222222-3333-4444-5555-666666666666"]
    cert = azure_identity("cert", id_type=2, client_id=CLIENT_ID, secret=("other-ns", "pfx"))
    cert["spec"]["resourceID"] = ""
    odd_case = azure_identity(
        "odd",
        client_id=CLIENT_ID,
        resource_id=RESOURCE_ID.replace("resourcegroups", "resourceGroups").replace("Microsoft", "microsoft"),
    )
    aai = assigned_identity("web", msi)
    aai["spec"]["azureBindingRef"] = binding("b", "demo", "web")
    return [
        msi,
        sp,
        cert,
        odd_case,
        binding("b", "demo", "web"),
        binding("empty", "demo", ""),
        aai,
        exception("mic", {"app": "mic", "component": "mic"}),
    ]


@pytest.mark.parametrize("obj", _documented_objects(), ids=lambda o: f"{o['kind']}-{o['metadata']['name']}")
def test_documented_objects_are_valid_and_parse(obj: dict[str, Any]) -> None:
    assert validate(obj, _schemas()[obj["kind"]]) == []
    parse_object(obj)  # and NMI reads them


def _with(obj: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    obj = copy.deepcopy(obj)
    *parents, last = path.split(".")
    target = obj
    for p in parents:
        target = target[p]
    if value is _DELETE:
        del target[last]
    else:
        target[last] = value
    return obj


_DELETE = object()
_MSI = azure_identity("demo", client_id=CLIENT_ID, resource_id=RESOURCE_ID)
INVALID = {
    "type-4": _with(_MSI, "spec.type", 4),
    "type-as-string": _with(_MSI, "spec.type", "0"),
    "clientID-not-guid": _with(_MSI, "spec.clientID", "my-app"),
    "clientID-missing": _with(_MSI, "spec.clientID", _DELETE),
    "resourceID-bad-subscription": _with(
        _MSI, "spec.resourceID", RESOURCE_ID.replace("11111111-2222", "sub")
    ),
    "resourceID-other-provider": _with(
        _MSI, "spec.resourceID", RESOURCE_ID.replace("Microsoft.ManagedIdentity", "Microsoft.Compute")
    ),
    "resourceID-trailing-segment": _with(_MSI, "spec.resourceID", RESOURCE_ID + "/extra"),
    "clientPassword-without-name": _with(_MSI, "spec.clientPassword", {"namespace": "x"}),
    "selector-not-string": _with(binding("b", "demo", "web"), "spec.selector", 7),
    "binding-without-identity": _with(binding("b", "demo", "web"), "spec.azureIdentity", _DELETE),
    "podLabels-value-not-string": _with(exception("e", {"app": "x"}), "spec.podLabels", {"app": 1}),
}


@pytest.mark.parametrize("name", sorted(INVALID))
def test_objects_nmi_cannot_use_are_rejected(name: str) -> None:
    obj = INVALID[name]
    assert validate(obj, _schemas()[obj["kind"]]) != []
