"""The pure core: desired AAIs, diff, grouping by VM/VMSS, in-use, immutable, ARM PATCH bodies."""

from __future__ import annotations

import dataclasses

from mic.armbody import identity_patches
from mic.desired import Assignment, desired_assignments, render
from mic.diff import diff, plan_work
from mic.model import FINALIZER, ArmTarget, parse_provider_id, target_of
from podidentity.model import (
    AzureAssignedIdentity,
    AzureIdentity,
    AzureIdentityBinding,
    IdentityType,
    Node,
    ObjectKey,
    Pod,
    parse_assigned_identity,
)

SUB = "11111111-1111-1111-1111-111111111111"


def rid(name: str) -> str:
    return (
        f"/subscriptions/{SUB}/resourcegroups/rg/providers/Microsoft.ManagedIdentity/"
        + f"userAssignedIdentities/{name}"
    )


def ident(
    name: str, ns: str = "default", *, client: str = "", namespaced: bool = False, **kw: object
) -> AzureIdentity:
    return AzureIdentity(
        namespace=ns,
        name=name,
        type=kw.pop("type", IdentityType.USER_ASSIGNED_MSI),  # type: ignore[arg-type]
        client_id=client or f"client-{name}",
        resource_id=kw.pop("resource_id", rid(name)),  # type: ignore[arg-type]
        namespaced=namespaced,
        resource_version=str(kw.pop("rv", "1")),
    )


def bind(name: str, identity: str, selector: str, ns: str = "default", rv: str = "1") -> AzureIdentityBinding:
    return AzureIdentityBinding(ns, name, identity, selector, resource_version=rv)


def pod(name: str, selector: str, *, ns: str = "default", node: str = "n0", phase: str = "Running") -> Pod:
    return Pod(ns, name, "uid-" + name, "10.0.0.1", phase, {"aadpodidbinding": selector}, node)


def current(a: Assignment, state: str = "Assigned") -> AzureAssignedIdentity:
    """What the watch would hand back after MIC wrote ``a``."""
    return parse_assigned_identity(render(a, status=state))


VMSS = f"azure:///subscriptions/{SUB}/resourceGroups/rg/providers/Microsoft.Compute/virtualMachineScaleSets/pool/virtualMachines/"


# --- desired set ----------------------------------------------------------------------------------


def test_desired_names_aai_after_pod_namespace_and_identity_in_default_namespace() -> None:
    got = desired_assignments([pod("web", "sel", ns="apps")], [ident("id")], [bind("b", "id", "sel")])
    (a,) = got.values()
    assert a.key == ObjectKey("default", "web-apps-id")
    assert (a.pod_namespace, a.pod_name, a.node_name, a.binding.name) == ("apps", "web", "n0", "b")


def test_desired_skips_unscheduled_unlabelled_and_finished_pods() -> None:
    pods = [
        pod("unscheduled", "sel", node=""),
        pod("empty", ""),
        pod("done", "sel", phase="Succeeded"),
        pod("failed", "sel", phase="Failed"),
        pod("pending", "sel", phase="Pending"),
    ]
    got = desired_assignments(pods, [ident("id")], [bind("b", "id", "sel")])
    assert [a.pod_name for a in got.values()] == ["pending"]


def test_selector_matches_exactly_and_identity_is_looked_up_in_the_binding_namespace() -> None:
    identities = [ident("id", "team")]
    bindings = [bind("b1", "id", "Sel"), bind("b2", "id", "sel", ns="team")]
    got = desired_assignments([pod("p", "sel")], identities, bindings)
    (a,) = got.values()
    assert a.binding.key == ObjectKey("team", "b2")
    assert a.namespace == "default"  # not namespaced: binding in any namespace, AAI in default


def test_namespaced_identity_requires_one_namespace_and_puts_the_aai_there() -> None:
    identities = [ident("id", "team", namespaced=True)]
    bindings = [bind("b", "id", "sel", ns="team")]
    got = desired_assignments(
        [pod("other", "sel", ns="apps"), pod("mine", "sel", ns="team")], identities, bindings
    )
    assert list(got) == [ObjectKey("team", "mine-team-id")]


def test_force_namespaced_applies_to_every_identity() -> None:
    identities = [ident("id", "team")]
    bindings = [bind("b", "id", "sel", ns="team")]
    pods = [pod("other", "sel", ns="apps"), pod("mine", "sel", ns="team")]
    assert len(desired_assignments(pods, identities, bindings)) == 2
    assert list(desired_assignments(pods, identities, bindings, force_namespaced=True)) == [
        ObjectKey("team", "mine-team-id")
    ]


def test_invalid_resource_id_drops_the_identity_but_service_principals_need_none() -> None:
    identities = [
        ident("bad", resource_id="not-an-id"),
        ident("sp", type=IdentityType.SERVICE_PRINCIPAL, resource_id=""),
    ]
    bindings = [bind("b1", "bad", "sel"), bind("b2", "sp", "sel")]
    got = desired_assignments([pod("p", "sel")], identities, bindings)
    assert [a.identity.name for a in got.values()] == ["sp"]


def test_name_clash_keeps_the_first_binding_and_reports_it() -> None:
    clashes: list[str] = []
    bindings = [bind("b1", "id", "sel"), bind("b2", "id", "sel")]
    got = desired_assignments([pod("p", "sel")], [ident("id")], bindings, clashes=clashes)
    assert [a.binding.name for a in got.values()] == ["b1"]
    assert len(clashes) == 1


def test_render_has_label_finalizer_refs_and_round_trips_through_nmis_parser() -> None:
    (a,) = desired_assignments(
        [pod("p", "sel", node="node-7")], [ident("id")], [bind("b", "id", "sel")]
    ).values()
    body = render(a, status="Created")
    assert body["metadata"]["labels"] == {"nodename": "node-7"}
    assert body["metadata"]["finalizers"] == [FINALIZER]
    assert body["spec"]["azureIdentityRef"]["spec"] == {
        "type": 0,
        "clientID": "client-id",
        "resourceID": rid("id"),
    }
    assert body["spec"]["azureBindingRef"]["metadata"]["name"] == "b"
    assert (body["spec"]["pod"], body["spec"]["podNamespace"], body["spec"]["nodename"]) == (
        "p",
        "default",
        "node-7",
    )
    assert body["status"] == {"status": "Created", "availableReplicas": 1}
    parsed = parse_assigned_identity(body)
    assert parsed.identity == a.identity and parsed.state == "Created"


# --- diff -----------------------------------------------------------------------------------------


def _one(**kw: object) -> Assignment:
    (a,) = desired_assignments([pod("p", "sel")], [ident("id", **kw)], [bind("b", "id", "sel")]).values()
    return a


def test_diff_creates_confirms_keeps_and_deletes() -> None:
    a = _one()
    stale = current(dataclasses.replace(a, name="gone-default-id"))
    assert diff({a.key: a}, []).create == (a,)
    assert diff({a.key: a}, [current(a, "Created")]).confirm[0][1] == a
    assert diff({a.key: a}, [current(a, "Assigned")]).keep[0][1] == a
    assert diff({a.key: a}, [current(a, "")]).keep  # legacy objects count as assigned
    assert diff({}, [stale]).delete == (stale,)


def test_diff_compares_content_not_resource_versions() -> None:
    old = _one(rv="1")
    new = _one(rv="99")  # a label edit on the identity: nothing to rewrite
    assert diff({new.key: new}, [current(old)]).keep
    changed = _one(client="another-client")
    plan = diff({changed.key: changed}, [current(old)])
    assert plan.update and not plan.create and not plan.delete


# --- grouping, in-use, immutable ------------------------------------------------------------------


def test_provider_ids_route_vmss_instances_and_vms() -> None:
    assert parse_provider_id(VMSS + "3") == ArmTarget(SUB, "rg", "virtualMachineScaleSets", "pool")
    vm = f"azure:///subscriptions/{SUB}/resourceGroups/other-rg/providers/Microsoft.Compute/virtualMachines/vm-1"
    assert parse_provider_id(vm) == ArmTarget(SUB, "other-rg", "virtualMachines", "vm-1")
    assert parse_provider_id("kind://docker/x") is None
    fallback = target_of(Node("node-9"), subscription=SUB, resource_group="rg")
    assert fallback == ArmTarget(SUB, "rg", "virtualMachines", "node-9")


def _targets(**nodes: str) -> dict[str, ArmTarget]:
    result = {}
    for name, provider in nodes.items():
        target = parse_provider_id(provider)
        assert target is not None
        result[name] = target
    return result


def test_vmss_nodes_share_one_target_and_identity_in_use_on_the_scale_set_stays() -> None:
    identities = [ident("id")]
    bindings = [bind("b", "id", "sel")]
    leaving = desired_assignments([pod("a", "sel", node="n0")], identities, bindings)
    staying = desired_assignments([pod("b", "sel", node="n1")], identities, bindings)
    targets = _targets(n0=VMSS + "0", n1=VMSS + "1")
    plan = diff(staying, [current(a) for a in [*leaving.values(), *staying.values()]])
    work = plan_work(plan, staying, targets)
    (tw,) = work.targets.values()
    assert [d.pod_name for d in tw.delete] == ["a"]
    assert tw.remove_ids == {}  # pod b on another instance of the same VMSS still needs it
    alone = plan_work(diff({}, [current(a) for a in leaving.values()]), {}, targets)
    (tw,) = alone.targets.values()
    assert list(tw.remove_ids) == [rid("id").casefold()]


def test_in_use_tells_pods_apart_by_namespace() -> None:
    identities = [ident("id")]
    bindings = [bind("b", "id", "sel")]
    targets = _targets(n0=VMSS + "0")
    old = desired_assignments([pod("web", "sel", ns="a")], identities, bindings)
    # Same pod name, other namespace, other VMSS: not a reason to keep the identity here.
    other = desired_assignments([pod("web", "sel", ns="b", node="elsewhere")], identities, bindings)
    targets["elsewhere"] = ArmTarget(SUB, "rg", "virtualMachines", "vm-x")
    work = plan_work(diff(other, [current(a) for a in old.values()]), other, targets)
    assert list(work.targets[targets["n0"].folded].remove_ids) == [rid("id").casefold()]


def test_immutable_client_ids_are_never_removed_case_insensitively() -> None:
    a = _one(client="ABC-Client")
    work = plan_work(diff({}, [current(a)]), {}, _targets(n0=VMSS + "0"), immutable={"abc-client"})
    (tw,) = work.targets.values()
    assert tw.delete and not tw.remove_ids


def test_only_confirmed_user_assigned_identities_are_released() -> None:
    created = current(_one(), "Created")
    sp = current(_one(type=IdentityType.SERVICE_PRINCIPAL))
    work = plan_work(diff({}, [created, sp]), {}, _targets(n0=VMSS + "0"))
    (tw,) = work.targets.values()
    assert len(tw.delete) == 2 and not tw.remove_ids


def test_aais_of_deleted_nodes_are_deleted_without_azure_and_new_ones_wait_for_the_node() -> None:
    a = _one()
    work = plan_work(diff({}, [current(a)]), {}, {})
    assert work.node_gone and not work.targets
    work = plan_work(diff({a.key: a}, []), {a.key: a}, {})
    assert work.waiting_for_node == 1 and not work.targets


# --- ARM PATCH bodies (mic-spec §3.7) ------------------------------------------------------------


def test_add_to_vmss_with_system_assigned_identity_keeps_it() -> None:
    resource = {"identity": {"type": "SystemAssigned", "principalId": "p"}}
    assert identity_patches(resource, [rid("foo")], []) == [
        {"identity": {"type": "SystemAssigned, UserAssigned", "userAssignedIdentities": {rid("foo"): {}}}}
    ]


def test_removing_the_last_user_identity() -> None:
    vm = {"identity": {"type": "UserAssigned", "userAssignedIdentities": {rid("foo"): {}}}}
    assert identity_patches(vm, [], [rid("foo").upper()]) == [{"identity": {"type": "None"}}]
    both = {"identity": {"type": "SystemAssigned, UserAssigned", "userAssignedIdentities": {rid("foo"): {}}}}
    assert identity_patches(both, [], [rid("foo")]) == [{"identity": {"type": "SystemAssigned"}}]


def test_delta_only_and_no_patch_when_nothing_changes() -> None:
    vm = {"identity": {"type": "UserAssigned", "userAssignedIdentities": {rid("a"): {}, rid("b"): {}}}}
    assert identity_patches(vm, [rid("A")], [rid("zzz")]) == []
    # The original would send type None here and strip a lone system-assigned identity (§6.15).
    assert identity_patches({"identity": {"type": "SystemAssigned"}}, [], [rid("gone")]) == []
    assert identity_patches(None, [], []) == []
    assert identity_patches(vm, [rid("c")], [rid("b")]) == [
        {"identity": {"type": "UserAssigned", "userAssignedIdentities": {rid("c"): {}, rid("b"): None}}}
    ]


def test_an_id_both_added_and_removed_is_kept() -> None:
    vm = {"identity": {"type": "UserAssigned", "userAssignedIdentities": {rid("a"): {}}}}
    assert identity_patches(vm, [rid("a")], [rid("a")]) == []


def test_large_deltas_are_split_into_typed_chunks() -> None:
    ids = [rid(f"id{i:03}") for i in range(320)]
    bodies = identity_patches({"identity": {"type": "SystemAssigned"}}, ids, [])
    assert [len(b["identity"]["userAssignedIdentities"]) for b in bodies] == [150, 150, 20]
    assert all(b["identity"]["type"] == "SystemAssigned, UserAssigned" for b in bodies)
    existing = {"identity": {"type": "UserAssigned", "userAssignedIdentities": {i: {} for i in ids}}}
    bodies = identity_patches(existing, [], ids)
    assert [b["identity"]["type"] for b in bodies] == ["UserAssigned", "UserAssigned", "None"]
