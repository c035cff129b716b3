"""``add``, ``delete`` and ``list`` of pod identities through the console script, and every refusal."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.plugin.conftest import CLIENT_ID, Plugin, seed_identities, uami

NS = "my-app"
NAME = "my-pod-identity"
RID = uami("application-identity")


def add_args(name: str = NAME, *extra: str, ns: str = NS, rid: str = RID, cid: str = CLIENT_ID) -> list[str]:
    return [
        "add",
        "--namespace",
        ns,
        "--name",
        name,
        "--identity-resource-id",
        rid,
        "--client-id",
        cid,
        *extra,
    ]


async def test_add_creates_the_identity_and_its_binding(plugin: Plugin) -> None:
    result = await plugin.run(*add_args())
    assert result.status == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"azureidentity.aadpodidentity.k8s.io/{NAME} created",
        f"azureidentitybinding.aadpodidentity.k8s.io/{NAME}-binding created",
    ]
    identity = plugin.api.get("azureidentities", NS, NAME)
    binding = plugin.api.get("azureidentitybindings", NS, f"{NAME}-binding")
    assert identity is not None and binding is not None
    assert identity["apiVersion"] == "aadpodidentity.k8s.io/v1"
    assert identity["spec"] == {"type": 0, "clientID": CLIENT_ID, "resourceID": RID}
    assert binding["spec"] == {"azureIdentity": NAME, "selector": NAME}


async def test_add_with_a_shared_binding_selector(plugin: Plugin) -> None:
    # The AKS doc's "application with multiple identities": two identities, one selector.
    for n in ("id-1", "id-2"):
        result = await plugin.run(*add_args(n, "--binding-selector", "myMultiIdentitySelector", rid=uami(n)))
        assert result.status == 0, result.stderr
    bindings = plugin.objects("azureidentitybindings", NS)
    assert [(b["metadata"]["name"], b["spec"]["selector"]) for b in bindings] == [
        ("id-1-binding", "myMultiIdentitySelector"),
        ("id-2-binding", "myMultiIdentitySelector"),
    ]


async def test_add_a_service_principal(plugin: Plugin) -> None:
    result = await plugin.run(
        "add", "-n", NS, "--name", "sp", "--client-id", CLIENT_ID, "--type", "1",
        "--tenant-id", "72f988bf-86f1-41af-91ab-2d7cd011db47", "--client-password-secret", "sp-secret",
    )  # fmt: skip
    assert result.status == 0, result.stderr
    identity = plugin.api.get("azureidentities", NS, "sp")
    assert identity is not None
    assert identity["spec"] == {
        "type": 1,
        "clientID": CLIENT_ID,
        "tenantID": "72f988bf-86f1-41af-91ab-2d7cd011db47",
        "clientPassword": {"namespace": NS, "name": "sp-secret"},
    }


async def test_list_table_json_and_yaml(plugin: Plugin) -> None:
    assert (await plugin.run(*add_args())).status == 0
    assert (await plugin.run(*add_args("other", ns="default", rid=uami("other")))).status == 0

    table = await plugin.run("list")
    assert table.status == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["NAMESPACE", "NAME", "CLIENT", "ID", "RESOURCE", "ID/TYPE", "SELECTOR"]
    assert lines[1].split() == ["default", "other", CLIENT_ID, uami("other"), "other"]
    assert lines[2].split() == [NS, NAME, CLIENT_ID, RID, NAME]

    one = await plugin.run("list", "-n", NS, "-o", "json")
    assert one.status == 0, one.stderr
    assert json.loads(one.stdout) == [
        {
            "namespace": NS,
            "name": NAME,
            "type": 0,
            "clientID": CLIENT_ID,
            "resourceID": RID,
            "bindings": [{"name": f"{NAME}-binding", "selector": NAME}],
        }
    ]
    every = await plugin.run("list", "-A", "-o", "yaml")
    assert [r["name"] for r in yaml.safe_load(every.stdout)] == ["other", NAME]


async def test_list_of_nothing(plugin: Plugin) -> None:
    table = await plugin.run("list", "-n", NS)
    assert table.status == 0
    assert table.stdout == ""
    assert "No pod identities found in namespace my-app." in table.stderr
    assert json.loads((await plugin.run("list", "-o", "json")).stdout) == []


async def test_delete_removes_the_bindings_and_the_identity(plugin: Plugin) -> None:
    assert (await plugin.run(*add_args())).status == 0
    # A second binding of the same identity, and another identity's binding that must stay.
    from standins import apiserver as k8s

    plugin.api.create(k8s.binding("extra", NAME, "extra-selector", namespace=NS))
    plugin.api.create(k8s.azure_identity("keep", namespace=NS))
    plugin.api.create(k8s.binding("keep-binding", "keep", "keep", namespace=NS))

    result = await plugin.run("delete", "--namespace", NS, "--name", NAME)
    assert result.status == 0, result.stderr
    assert result.stdout.splitlines() == [
        "azureidentitybinding.aadpodidentity.k8s.io/extra deleted",
        f"azureidentitybinding.aadpodidentity.k8s.io/{NAME}-binding deleted",
        f"azureidentity.aadpodidentity.k8s.io/{NAME} deleted",
    ]
    assert plugin.names("azureidentities") == [f"{NS}/keep"]
    assert plugin.names("azureidentitybindings") == [f"{NS}/keep-binding"]


async def test_delete_of_a_missing_identity_is_refused(plugin: Plugin) -> None:
    result = await plugin.run("delete", "--namespace", NS, "--name", "nobody")
    assert result.status == 1
    assert "pod identity my-app/nobody not found" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (add_args("My_Identity"), "--name 'My_Identity' must be a valid RFC 1123 DNS subdomain name"),
        (add_args("trailing-"), "must be a valid RFC 1123 DNS subdomain name"),
        (add_args("x" * 250), "would exceed 253 characters"),
        (add_args(ns="My_NS"), "is not a valid namespace name"),
        (
            add_args(
                rid="/subscriptions/not-a-guid/resourcegroups/rg/providers/Microsoft.ManagedIdentity/"
                "userAssignedIdentities/x"
            ),
            "is not the resource ID of a user-assigned identity",
        ),
        (add_args(rid=uami("x").replace("ManagedIdentity", "Compute")), "is not the resource ID"),
        (add_args(rid=uami("application-identity") + "/extra"), "is not the resource ID"),
        (add_args(cid="not-a-guid"), "--client-id 'not-a-guid' is not a GUID"),
        (add_args(cid=CLIENT_ID + "0"), "is not a GUID"),
        (add_args(NAME, "--binding-selector", "bad selector"), "is not a valid label value"),
        # A valid object name that is not a valid label value: the default selector is the name.
        (add_args("a" * 64), "is not a valid label value"),
        (add_args(NAME, "--type", "3"), "--type 3 (federated) takes only --client-id"),
        (add_args(NAME, "--type", "7"), "--type 7 is not an identity type"),
        (["add", "-n", NS, "--name", NAME, "--client-id", CLIENT_ID], "--identity-resource-id is required"),
        (add_args(NAME, "--type", "1"), "--identity-resource-id is for user-assigned identities"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
async def test_invalid_values_are_refused_before_any_request(
    plugin: Plugin, args: list[str], message: str
) -> None:
    result = await plugin.run(*args)
    assert result.status == 2, result
    assert message in result.stderr
    assert result.stderr.startswith("error: ")
    assert result.stdout == ""
    assert len(plugin.api.requests) == 0  # nothing was sent
    assert plugin.objects("azureidentities") == []


async def test_bad_usage_exits_2(plugin: Plugin) -> None:
    result = await plugin.run("add", "--namespace", NS, "--client-id", CLIENT_ID)
    assert result.status == 2
    assert "the following arguments are required: --name" in result.stderr
    assert (await plugin.run("list", "-n", NS, "-A")).status == 2
    assert (await plugin.run("frobnicate")).status == 2


async def test_duplicate_add_is_refused_and_changes_nothing(plugin: Plugin) -> None:
    assert (await plugin.run(*add_args())).status == 0
    before = plugin.api.get("azureidentities", NS, NAME)
    result = await plugin.run(*add_args(cid="bbbbbbbb-bbbb-bbbb-bbbb-bbbbbbbbbbbb"))
    assert result.status == 1
    assert "pod identity my-app/my-pod-identity already exists" in result.stderr
    assert plugin.api.get("azureidentities", NS, NAME) == before
    assert len(plugin.objects("azureidentitybindings")) == 1


async def test_add_refused_when_a_binding_of_that_name_exists(plugin: Plugin) -> None:
    from standins import apiserver as k8s

    plugin.api.create(k8s.azure_identity("someone-else", namespace=NS))
    plugin.api.create(k8s.binding(f"{NAME}-binding", "someone-else", "x", namespace=NS))
    result = await plugin.run(*add_args())
    assert result.status == 1
    assert f"AzureIdentityBinding {NS}/{NAME}-binding already exists" in result.stderr
    assert plugin.names("azureidentities") == [f"{NS}/someone-else"]


async def test_the_201st_pod_identity_is_refused(plugin: Plugin) -> None:
    seed_identities(plugin.api, 200)
    result = await plugin.run(*add_args())
    assert result.status == 1
    assert "the cluster has 200 pod identities" in result.stderr
    assert "at most 200 are allowed" in result.stderr
    assert len(plugin.objects("azureidentities")) == 200
    assert plugin.api.get("azureidentities", NS, NAME) is None
    assert plugin.writes() == 0


async def test_the_200th_pod_identity_is_accepted(plugin: Plugin) -> None:
    seed_identities(plugin.api, 199)
    assert (await plugin.run(*add_args())).status == 0
    assert len(plugin.objects("azureidentities")) == 200


@pytest.mark.parametrize("status", [500, 403, 422])
async def test_binding_failure_rolls_the_identity_back(plugin: Plugin, status: int) -> None:
    plugin.api.fail_next(1, status, verbs=("create",), resources="azureidentitybindings")
    result = await plugin.run(*add_args())
    assert result.status == 1
    assert f"cannot create AzureIdentityBinding {NS}/{NAME}-binding: {status}" in result.stderr
    assert f"rolled back: AzureIdentity {NS}/{NAME} was deleted again" in result.stderr
    assert plugin.objects("azureidentities") == []
    assert plugin.objects("azureidentitybindings") == []
    # Exactly: identity created, binding refused, identity deleted.
    writes = [(r.action, r.resource) for r in plugin.api.requests if r.verb == "write"]
    assert writes == [
        ("create", "azureidentities"),
        ("create", "azureidentitybindings"),
        ("delete", "azureidentities"),
    ]


async def test_a_failed_rollback_is_reported(plugin: Plugin) -> None:
    plugin.api.fail_next(1, 500, verbs=("create",), resources="azureidentitybindings")
    plugin.api.fail_next(1, 503, verbs=("delete",), resources="azureidentities")
    result = await plugin.run(*add_args())
    assert result.status == 1
    assert f"AND the rollback failed, AzureIdentity {NS}/{NAME} is left without a binding" in result.stderr


async def test_identity_create_refused_by_the_server(plugin: Plugin) -> None:
    plugin.api.fail_next(1, 403, verbs=("create",), resources="azureidentities")
    result = await plugin.run(*add_args())
    assert result.status == 1
    assert f"cannot create AzureIdentity {NS}/{NAME}: 403 Forbidden" in result.stderr
    assert plugin.objects("azureidentities") == [] and plugin.objects("azureidentitybindings") == []


async def test_a_list_refused_by_the_server(plugin: Plugin) -> None:
    plugin.api.fail_next(1, 403, verbs=("list",), resources="azureidentities")
    result = await plugin.run("list")
    assert result.status == 1
    assert "cannot list azureidentities in all namespaces: 403 Forbidden" in result.stderr


async def test_malformed_objects_are_skipped_with_a_warning(plugin: Plugin) -> None:
    from standins import apiserver as k8s

    assert (await plugin.run(*add_args())).status == 0
    bad = k8s.azure_identity("broken", namespace=NS)
    bad["spec"]["type"] = "zero"
    plugin.api.create(bad)
    result = await plugin.run("list", "-o", "json")
    assert result.status == 0
    assert [r["name"] for r in json.loads(result.stdout)] == [NAME]
    assert "warning: skipped: AzureIdentity my-app/broken: spec.type must be 0, 1, 2 or 3" in result.stderr


async def test_add_a_federated_identity(plugin: Plugin) -> None:
    args = ["add", "-n", NS, "--name", "wi", "--client-id", CLIENT_ID, "--type", "3", "--tenant-id", "t-1"]
    assert (await plugin.run(*args)).status == 0
    identity = plugin.api.get("azureidentities", NS, "wi")
    assert identity is not None
    assert identity["spec"]["type"] == 3 and identity["spec"]["clientID"] == CLIENT_ID
    assert identity["spec"].get("tenantID") == "t-1" and "resourceID" not in identity["spec"]
    binding = plugin.api.get("azureidentitybindings", NS, "wi-binding")
    assert binding is not None and binding["spec"]["selector"] == "wi"
