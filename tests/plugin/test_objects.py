"""Object bodies and listings, as pure functions over the core's typed views."""

from __future__ import annotations

import json
import re

import yaml

from kubectl_pod_identity.objects import (
    IdentityRow,
    binding_body,
    dump,
    exception_body,
    exception_record,
    exception_table,
    identity_body,
    identity_record,
    identity_rows,
    identity_table,
    table,
)
from podidentity.model import IdentityType, parse_binding, parse_exception, parse_identity

CID = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"
RID = (
    "/subscriptions/11111111-1111-1111-1111-111111111111/resourcegroups/rg/providers/"
    "Microsoft.ManagedIdentity/userAssignedIdentities/web"
)


def test_bodies_parse_back_with_the_core_model() -> None:
    # What the plugin writes is what NMI and MIC read.
    identity = parse_identity(
        identity_body("ns", "web", id_type=IdentityType.USER_ASSIGNED_MSI, client_id=CID, resource_id=RID)
    )
    assert (identity.namespace, identity.name, identity.type, identity.client_id, identity.resource_id) == (
        "ns", "web", IdentityType.USER_ASSIGNED_MSI, CID, RID,
    )  # fmt: skip
    sp = parse_identity(
        identity_body(
            "ns",
            "sp",
            id_type=IdentityType.SERVICE_PRINCIPAL,
            client_id=CID,
            tenant_id="t",
            secret=("ns", "s"),
        )
    )
    assert sp.tenant_id == "t" and sp.client_password is not None and sp.client_password.name == "s"
    assert sp.resource_id == ""
    binding = parse_binding(binding_body("ns", "web-binding", identity_name="web", selector="sel"))
    assert (binding.identity_name, binding.selector) == ("web", "sel")
    exception = parse_exception(exception_body("kube-system", "agent", {"app": "x"}))
    assert dict(exception.pod_labels) == {"app": "x"}


def _rows() -> list[IdentityRow]:
    identities = [
        parse_identity(
            identity_body("b", "web", id_type=IdentityType.USER_ASSIGNED_MSI, client_id=CID, resource_id=RID)
        ),
        parse_identity(
            identity_body("a", "sp", id_type=IdentityType.SERVICE_PRINCIPAL, client_id=CID, tenant_id="t")
        ),
        parse_identity(
            identity_body(
                "a", "lonely", id_type=IdentityType.USER_ASSIGNED_MSI, client_id=CID, resource_id=RID
            )
        ),
    ]
    bindings = [
        parse_binding(binding_body("b", "web-binding", identity_name="web", selector="web")),
        parse_binding(binding_body("b", "web-2", identity_name="web", selector="shared")),
        parse_binding(binding_body("a", "sp-binding", identity_name="sp", selector="sp")),
        # Same identity name in another namespace: not a binding of b/web.
        parse_binding(binding_body("c", "web-binding", identity_name="web", selector="other")),
    ]
    return identity_rows(identities, bindings)


def test_rows_join_identities_with_their_bindings_in_their_namespace() -> None:
    rows = _rows()
    assert [(r.identity.namespace, r.identity.name) for r in rows] == [
        ("a", "lonely"),
        ("a", "sp"),
        ("b", "web"),
    ]
    assert rows[2].selectors == ["shared", "web"]
    assert [b.name for b in rows[2].bindings] == ["web-2", "web-binding"]
    assert rows[0].bindings == ()


def test_identity_table() -> None:
    text = identity_table(_rows())
    lines = text.splitlines()
    assert (
        lines[0]
        == "NAMESPACE   NAME     CLIENT ID"
        + " " * 30
        + "RESOURCE ID/TYPE"
        + " " * (len(RID) - 13)
        + "SELECTOR"
    )
    assert lines[1].split() == ["a", "lonely", CID, RID, "<none>"]
    assert re.split(r" {3,}", lines[2]) == ["a", "sp", CID, "type 1: service principal (client secret)", "sp"]
    assert lines[3].split() == ["b", "web", CID, RID, "shared,web"]
    assert text.endswith("\n") and not any(line.endswith(" ") for line in lines)


def test_records_and_dumps() -> None:
    records = [identity_record(r) for r in _rows()]
    assert records[1] == {
        "namespace": "a",
        "name": "sp",
        "type": 1,
        "clientID": CID,
        "resourceID": "",
        "tenantID": "t",
        "bindings": [{"name": "sp-binding", "selector": "sp"}],
    }
    assert json.loads(dump(records, "json")) == records
    assert yaml.safe_load(dump(records, "yaml")) == records
    assert dump([], "yaml") == "[]\n" and dump([], "json") == "[]\n"


def test_exception_listing() -> None:
    e = parse_exception(exception_body("kube-system", "agent", {"z": "1", "a": "2"}))
    assert exception_record(e) == {
        "namespace": "kube-system",
        "name": "agent",
        "podLabels": {"a": "2", "z": "1"},
    }
    assert exception_table([e]).splitlines() == [
        "NAMESPACE     NAME    POD LABELS",
        "kube-system   agent   a=2,z=1",
    ]


def test_table_alignment() -> None:
    assert table(("A", "BB"), [("long", "x"), ("s", "")]) == "A      BB\nlong   x\ns\n"
