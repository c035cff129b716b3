"""The checks AKS makes, as pure functions."""

from __future__ import annotations

import pytest

from kubectl_pod_identity.errors import UsageError
from kubectl_pod_identity.validation import (
    binding_name,
    check_client_id,
    check_identity_name,
    check_identity_type,
    check_name,
    check_namespace,
    check_resource_id,
    check_secret_ref,
    check_selector,
    is_dns_label,
    is_dns_subdomain,
    is_label_key,
    is_label_value,
    parse_pod_labels,
)
from podidentity.model import IdentityType

SUB = "11111111-1111-1111-1111-111111111111"


@pytest.mark.parametrize(
    "name",
    ["a", "my-pod-identity", "a.b-c.d", "0abc", "x" * 253, "a1.b2", ".".join(["a" * 63] * 3) + ".abc"],
)
def test_dns_subdomains(name: str) -> None:
    assert is_dns_subdomain(name)
    assert check_name(name) == name


@pytest.mark.parametrize(
    "name",
    ["", "A", "my_identity", "-a", "a-", "a..b", ".a", "a.", "x" * 254, "a b", "é", "a/b", "a-.b"],
)
def test_not_dns_subdomains(name: str) -> None:
    assert not is_dns_subdomain(name)
    with pytest.raises(UsageError, match="RFC 1123 DNS subdomain"):
        check_name(name)


def test_namespaces_are_dns_labels() -> None:
    assert is_dns_label("kube-system") and is_dns_label("a" * 63)
    for bad in ("a.b", "a" * 64, "Default", "", "-x"):
        assert not is_dns_label(bad)
        with pytest.raises(UsageError, match="namespace"):
            check_namespace(bad)


def test_identity_name_leaves_room_for_its_binding() -> None:
    assert binding_name("web") == "web-binding"
    assert check_identity_name("x" * 245) == "x" * 245  # x*245 + "-binding" is 253
    with pytest.raises(UsageError, match="would exceed 253"):
        check_identity_name("x" * 246)


@pytest.mark.parametrize("value", ["a", "myMultiIdentitySelector", "a_b.c-d", "A" * 63, "9"])
def test_selectors(value: str) -> None:
    assert check_selector(value) == value


@pytest.mark.parametrize("value", ["a b", "-a", "a-", "_a", "A" * 64, "a/b", "a=b"])
def test_bad_selectors(value: str) -> None:
    with pytest.raises(UsageError, match="not a valid label value"):
        check_selector(value)


def test_empty_selector_selects_nothing() -> None:
    with pytest.raises(UsageError, match="must not be empty"):
        check_selector("")


def test_label_values_and_keys() -> None:
    assert is_label_value("") and is_label_value("v1.2_x-y")
    assert is_label_key("app") and is_label_key("example.com/app") and is_label_key("a.b/c_d.e-f")
    for bad in ("", "/app", "Example.com/app", "a/b/c", "app-", "x" * 64, "example.com/", "a b"):
        assert not is_label_key(bad), bad
    # The prefix is a DNS subdomain: at most 253 characters (Kubernetes limits no single DNS label in it).
    assert is_label_key("a" * 253 + "/b")
    assert not is_label_key("a" * 254 + "/b")
    assert is_label_key(".".join(["a" * 63] * 3) + ".abc/b")


@pytest.mark.parametrize(
    "rid",
    [
        f"/subscriptions/{SUB}/resourcegroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/id1",
        f"/subscriptions/{SUB}/resourceGroups/myIdentityResourceGroup/providers/Microsoft.ManagedIdentity/"
        "userAssignedIdentities/application-identity",
        f"/SUBSCRIPTIONS/{SUB.upper()}/RESOURCEGROUPS/RG/PROVIDERS/MICROSOFT.MANAGEDIDENTITY/"
        "USERASSIGNEDIDENTITIES/ID_1",
        f"/subscriptions/{SUB}/resourcegroups/my.rg(1)_-x/providers/microsoft.managedidentity/"
        "userassignedidentities/abc",
        f"/subscriptions/{SUB}/resourcegroups/grüppe/providers/Microsoft.ManagedIdentity/userAssignedIdentities/abc",
    ],
)
def test_resource_ids(rid: str) -> None:
    assert check_resource_id(rid) == rid


@pytest.mark.parametrize(
    "rid",
    [
        "",
        "application-identity",
        f"subscriptions/{SUB}/resourcegroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/id1",
        "/subscriptions/sub/resourcegroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/id1",
        f"/subscriptions/{SUB}/resourcegroups//providers/Microsoft.ManagedIdentity/userAssignedIdentities/id1",
        f"/subscriptions/{SUB}/resourcegroups/rg./providers/Microsoft.ManagedIdentity/userAssignedIdentities/id1",
        f"/subscriptions/{SUB}/resourcegroups/rg/providers/Microsoft.Compute/virtualMachines/vm1",
        f"/subscriptions/{SUB}/resourcegroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/",
        f"/subscriptions/{SUB}/resourcegroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/ab",
        f"/subscriptions/{SUB}/resourcegroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/_ab",
        f"/subscriptions/{SUB}/resourcegroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/id1/",
        f"/subscriptions/{SUB}/resourcegroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/a/b",
        f"/subscriptions/{SUB}/resourcegroups/{'r' * 91}/providers/Microsoft.ManagedIdentity/"
        "userAssignedIdentities/id1",
        " " + f"/subscriptions/{SUB}/resourcegroups/rg/providers/Microsoft.ManagedIdentity/"
        "userAssignedIdentities/id1",
    ],
)
def test_bad_resource_ids(rid: str) -> None:
    with pytest.raises(UsageError, match="not the resource ID of a user-assigned identity"):
        check_resource_id(rid)


def test_client_ids() -> None:
    assert check_client_id("aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee")
    assert check_client_id("AAAAAAAA-0000-1111-2222-333333333333")
    for bad in ("", "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeee", "{aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee}",
                "aaaaaaaabbbbccccddddeeeeeeeeeeee", "gaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"):  # fmt: skip
        with pytest.raises(UsageError, match="not a GUID"):
            check_client_id(bad)


def test_identity_types() -> None:
    assert check_identity_type(0) is IdentityType.USER_ASSIGNED_MSI
    assert check_identity_type(2) is IdentityType.SERVICE_PRINCIPAL_CERTIFICATE
    assert check_identity_type(3) is IdentityType.FEDERATED
    with pytest.raises(UsageError, match="not an identity type"):
        check_identity_type(-1)


def test_pod_labels() -> None:
    assert parse_pod_labels(["app=a,tier=b"]) == {"app": "a", "tier": "b"}
    assert parse_pod_labels(["app=a", "tier=b", " x = y ,"]) == {"app": "a", "tier": "b", "x": "y"}
    assert parse_pod_labels(["example.com/app=", "app=a,app=a"]) == {"example.com/app": "", "app": "a"}
    for bad, message in (
        ([], "at least one"),
        ([""], "at least one"),
        (["app"], "not key=value"),
        (["=a"], "not a valid label key"),
        (["app=a=b"], "not a valid label value"),
        (["app=a", "app=b"], "given twice"),
    ):
        with pytest.raises(UsageError, match=message):
            parse_pod_labels(bad)


def test_secret_refs() -> None:
    assert check_secret_ref("sp", "my-app") == ("my-app", "sp")
    assert check_secret_ref("other/sp", "my-app") == ("other", "sp")
    for bad in ("", "a/b/c", "Ns/sp", "ns/"):
        with pytest.raises(UsageError):
            check_secret_ref(bad, "my-app")
