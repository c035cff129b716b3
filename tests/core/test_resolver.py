from __future__ import annotations

import pytest

from nmi.resolver import Deny, Grant, Learn, PassThrough, Pending, Refusal, object_id_key, resolve
from nmi.selectors import IdentityQuery
from nmi.settings import IdentitySettings
from podidentity.model import ObjectKey, Pod, parse_object
from podidentity.state import ClusterState
from tests.core.builders import assigned, binding, exception, identity, pod

ID_A = identity("id-a", "AAAA1111-0000-0000-0000-000000000001", resource_id="/subscriptions/s/rg/A")
ID_B = identity("id-b", "bbbb2222-0000-0000-0000-000000000002", resource_id="/subscriptions/s/rg/B")
ID_OTHER_NS = identity("id-c", "cccc3333-0000-0000-0000-000000000003", ns="other", namespaced=True)
STANDARD = IdentitySettings()
MANAGED = IdentitySettings(operation_mode="managed", force_namespaced=True)


def make_state(*objs: dict, synced: bool = True) -> ClusterState:
    state = ClusterState()
    state.register_source("test")
    state.mark_synced("test", synced)
    for obj in objs:
        state.apply(parse_object(obj))
    return state


def the_pod(state: ClusterState, name: str = "web", ns: str = "default") -> Pod:
    found = state.get(Pod, ObjectKey(ns, name))
    assert found is not None
    return found


ANY = IdentityQuery()


def decide(state: ClusterState, query: IdentityQuery = ANY, settings=STANDARD, name="web", object_ids=None):
    return resolve(state, the_pod(state, name), query, settings, object_ids or {})


def test_standard_assigned_identity_is_granted() -> None:
    state = make_state(pod("web", "10.0.0.5"), assigned("web", ID_A))
    decision = decide(state)
    assert isinstance(decision, Grant) and decision.identity.name == "id-a"


def test_standard_choice_is_deterministic_and_prefers_own_namespace() -> None:
    id_z = identity("zz", "dddd", ns="default")
    id_a_elsewhere = identity("aa", "eeee", ns="aaa-first")
    for order in ([id_z, id_a_elsewhere], [id_a_elsewhere, id_z]):
        state = make_state(pod("web", "10.0.0.5"), *(assigned("web", i) for i in order))
        decision = decide(state)
        assert isinstance(decision, Grant) and decision.identity.name == "zz"


def test_named_client_id_matches_case_insensitively() -> None:
    state = make_state(pod("web", "10.0.0.5"), assigned("web", ID_A), assigned("web", ID_B))
    decision = decide(state, IdentityQuery(client_id="BBBB2222-0000-0000-0000-000000000002".casefold()))
    assert isinstance(decision, Grant) and decision.identity.name == "id-b"
    decision = decide(state, IdentityQuery(resource_id="/SUBSCRIPTIONS/S/RG/A".casefold()))
    assert isinstance(decision, Grant) and decision.identity.name == "id-a"


def test_named_identity_not_assigned_is_denied_not_substituted() -> None:
    state = make_state(pod("web", "10.0.0.5", created="2020-01-01T00:00:00Z"), assigned("web", ID_A))
    decision = decide(state, IdentityQuery(client_id="not-mine"))
    assert isinstance(decision, Deny)


def test_created_but_not_assigned_is_pending() -> None:
    state = make_state(pod("web", "10.0.0.5"), assigned("web", ID_A, state="Created"))
    assert isinstance(decide(state), Pending)
    assert isinstance(decide(state, IdentityQuery(client_id=ID_A["spec"]["clientID"].casefold())), Pending)


def test_pod_no_binding_selects_is_denied_at_once_in_both_modes() -> None:
    for labels in ({}, {"aadpodidbinding": "nobody"}, {"aadpodidbinding": ""}):
        state = make_state(pod("web", "10.0.0.5", labels=labels), ID_A, binding("b1", "id-a", "web"))
        for settings in (STANDARD, MANAGED):
            decision = decide(state, settings=settings)
            assert isinstance(decision, Deny) and decision.refusal is Refusal.NOT_FOUND, (labels, settings)


def test_selected_but_not_yet_assigned_waits_for_mic() -> None:
    web = pod("web", "10.0.0.5", labels={"aadpodidbinding": "web"}, created="2020-01-01T00:00:00Z")
    state = make_state(web, ID_A, ID_B, binding("b1", "id-a", "web"))
    assert isinstance(decide(state), Pending)
    assert isinstance(decide(state, IdentityQuery(client_id=ID_A["spec"]["clientID"].casefold())), Pending)
    # A named identity that no binding of the pod selects never comes: final at once.
    decision = decide(state, IdentityQuery(client_id=ID_B["spec"]["clientID"].casefold()))
    assert isinstance(decision, Deny) and decision.refusal is Refusal.NOT_FOUND


def test_binding_in_other_namespace_selects_unless_namespaced() -> None:
    web = pod("web", "10.0.0.5", labels={"aadpodidbinding": "web"})
    shared = identity("shared", "5555", ns="infra")
    state = make_state(web, shared, binding("b", "shared", "web", ns="infra"))
    assert isinstance(decide(state), Pending)
    assert isinstance(decide(state, settings=IdentitySettings(force_namespaced=True)), Deny)


def test_unsynced_state_waits_rather_than_refusing() -> None:
    state = make_state(pod("web", "10.0.0.5"), synced=False)
    assert isinstance(decide(state), Pending)


def test_namespaced_identity_from_other_namespace_is_dropped_without_crash() -> None:
    state = make_state(pod("web", "10.0.0.5", created="2020-01-01T00:00:00Z"), assigned("web", ID_OTHER_NS))
    assert isinstance(decide(state), Deny)
    forced = IdentitySettings(force_namespaced=True)
    state = make_state(
        pod("web", "10.0.0.5", created="2020-01-01T00:00:00Z"),
        assigned("web", identity("x", "1234", ns="elsewhere")),
    )
    assert isinstance(decide(state, settings=forced), Deny)
    assert isinstance(decide(state), Grant)


def test_unassigned_state_is_ignored() -> None:
    state = make_state(
        pod("web", "10.0.0.5", created="2020-01-01T00:00:00Z"), assigned("web", ID_A, state="Unassigned")
    )
    assert isinstance(decide(state), Deny)


def test_exception_passes_through_by_any_label_case_insensitive_value() -> None:
    state = make_state(
        pod("agent", "10.0.0.9", labels={"app": "Monitor"}),
        exception("exc", {"app": "monitor", "other": "x"}),
        assigned("agent", ID_A),
    )
    assert isinstance(decide(state, name="agent"), PassThrough)


def test_exception_in_other_namespace_does_not_apply() -> None:
    state = make_state(
        pod("agent", "10.0.0.9", labels={"app": "monitor"}, created="2020-01-01T00:00:00Z"),
        exception("exc", {"app": "monitor"}, ns="kube-system"),
    )
    assert isinstance(decide(state, name="agent"), Deny)


def test_no_mic_name_prefix_shortcut() -> None:
    state = make_state(pod("mic-7d9f-abc", "10.0.0.7", created="2020-01-01T00:00:00Z"))
    assert isinstance(decide(state, name="mic-7d9f-abc"), Deny)


def test_managed_binding_by_label() -> None:
    state = make_state(
        pod("web", "10.0.0.5", labels={"aadpodidbinding": "web"}),
        ID_A,
        ID_B,
        binding("b1", "id-b", "web"),
        binding("b2", "id-a", "other"),
    )
    decision = decide(state, settings=MANAGED)
    assert isinstance(decision, Grant) and decision.identity.name == "id-b"
    assert isinstance(
        decide(state, IdentityQuery(client_id="aaaa1111-0000-0000-0000-000000000001"), settings=MANAGED), Deny
    )


def test_managed_selector_is_exact_and_empty_label_matches_nothing() -> None:
    state = make_state(
        pod("web", "10.0.0.5", labels={"aadpodidbinding": "Web"}),
        ID_A,
        binding("b1", "id-a", "web"),
        binding("empty", "id-a", ""),
    )
    assert isinstance(decide(state, settings=MANAGED), Deny)
    state.apply(parse_object(pod("web", "10.0.0.5")))
    assert isinstance(decide(state, settings=MANAGED), Deny)


def test_managed_identity_must_be_in_pod_namespace() -> None:
    state = make_state(
        pod("web", "10.0.0.5", labels={"aadpodidbinding": "web"}),
        identity("id-a", "1111", ns="other"),
        binding("b1", "id-a", "web"),
    )
    assert isinstance(decide(state, settings=MANAGED), Deny)


@pytest.mark.parametrize("phase", ["Succeeded", "Failed"])
def test_finished_pods_do_not_own_their_address(phase: str) -> None:
    state = make_state(pod("web", "10.0.0.5", phase=phase))
    assert state.pods_at("10.0.0.5") == []


def test_deleting_and_host_network_pods_are_not_indexed() -> None:
    state = make_state(pod("a", "10.0.0.5", deleting=True), pod("b", "10.1.1.1", host_network=True))
    assert state.pods_at("10.0.0.5") == [] and state.pods_at("10.1.1.1") == []


def test_ip_reuse_and_ambiguity_visible_in_index() -> None:
    state = make_state(pod("old", "10.0.0.5"), pod("new", "10.0.0.5"))
    assert {p.name for p in state.pods_at("10.0.0.5")} == {"old", "new"}
    state.apply(parse_object(pod("old", "10.0.0.5", phase="Succeeded")))
    assert [p.name for p in state.pods_at("10.0.0.5")] == ["new"]


def test_ip_change_moves_index_entry() -> None:
    state = make_state(pod("web", "10.0.0.5"))
    state.apply(parse_object(pod("web", "10.0.0.6")))
    assert state.pods_at("10.0.0.5") == [] and [p.name for p in state.pods_at("10.0.0.6")] == ["web"]


def test_replace_removes_missing_objects() -> None:
    state = make_state(pod("a", "10.0.0.1"), pod("b", "10.0.0.2"))
    state.replace("Pod", [parse_object(pod("b", "10.0.0.2"))])
    assert state.pods_at("10.0.0.1") == [] and len(state.pods_at("10.0.0.2")) == 1


async def test_wait_for_change_wakes_on_apply() -> None:
    import asyncio

    state = ClusterState()
    waiter = asyncio.create_task(state.wait_for_change(5))
    await asyncio.sleep(0)
    state.apply(parse_object(pod("a", "10.0.0.1")))
    assert await asyncio.wait_for(waiter, 1) is True
    assert await state.wait_for_change(0.01) is False


# --- selectors that name identities ----------------------------------------------------------

OID_A = "0a0a0a0a-0000-0000-0000-00000000000a"
OID_B = "0b0b0b0b-0000-0000-0000-00000000000b"
CID_A = ID_A["spec"]["clientID"].casefold()
CID_B = ID_B["spec"]["clientID"].casefold()
RID_A = ID_A["spec"]["resourceID"].casefold()
RID_B = ID_B["spec"]["resourceID"].casefold()


def two_identities() -> ClusterState:
    return make_state(pod("web", "10.0.0.5"), assigned("web", ID_A), assigned("web", ID_B))


def test_every_selector_must_agree_on_one_identity() -> None:
    state = two_identities()
    decision = decide(state, IdentityQuery(client_id=CID_B, resource_id=RID_B))
    assert isinstance(decision, Grant) and decision.identity.name == "id-b"
    # client id names A, resource id names B: refused, never one of them.
    decision = decide(state, IdentityQuery(client_id=CID_A, resource_id=RID_B))
    assert isinstance(decision, Deny) and decision.refusal is Refusal.CONFLICT


def test_object_id_unknown_asks_to_learn_then_grants_only_the_match() -> None:
    state = two_identities()
    decision = decide(state, IdentityQuery(object_id=OID_B))
    assert isinstance(decision, Learn) and {i.name for i in decision.identities} == {"id-a", "id-b"}
    key_a, key_b = (object_id_key(parse_object(i)) for i in (ID_A, ID_B))  # type: ignore[arg-type]
    learned = {key_a: OID_A, key_b: OID_B}
    decision = decide(state, IdentityQuery(object_id=OID_B), object_ids=learned)
    assert isinstance(decision, Grant) and decision.identity.name == "id-b"
    decision = decide(state, IdentityQuery(object_id="f" * 8), object_ids=learned)
    assert isinstance(decision, Deny) and decision.refusal is Refusal.NOT_FOUND
    # Only the identity whose object id is unknown is learned.
    decision = decide(state, IdentityQuery(object_id=OID_B), object_ids={key_a: OID_A})
    assert isinstance(decision, Learn) and [i.name for i in decision.identities] == ["id-b"]
    decision = decide(state, IdentityQuery(client_id=CID_A, object_id=OID_B), object_ids=learned)
    assert isinstance(decision, Deny) and decision.refusal is Refusal.CONFLICT


def test_reject_ambiguous_identity_only_when_several_and_none_named() -> None:
    strict = IdentitySettings(reject_ambiguous_identity=True)
    decision = decide(two_identities(), settings=strict)
    assert isinstance(decision, Deny) and decision.refusal is Refusal.AMBIGUOUS
    decision = decide(two_identities(), IdentityQuery(client_id=CID_A), settings=strict)
    assert isinstance(decision, Grant) and decision.identity.name == "id-a"
    one = make_state(pod("web", "10.0.0.5"), assigned("web", ID_A))
    assert isinstance(decide(one, settings=strict), Grant)
    managed = IdentitySettings(
        operation_mode="managed", force_namespaced=True, reject_ambiguous_identity=True
    )
    state = make_state(
        pod("web", "10.0.0.5", labels={"aadpodidbinding": "web"}),
        ID_A,
        ID_B,
        binding("b1", "id-a", "web"),
        binding("b2", "id-b", "web"),
        binding("b3", "id-b", "web"),
    )
    decision = decide(state, settings=managed)
    assert isinstance(decision, Deny) and decision.refusal is Refusal.AMBIGUOUS
    state.remove("AzureIdentityBinding", ObjectKey("default", "b1"))
    # Two bindings of one identity are not an ambiguity.
    decision = decide(state, settings=managed)
    assert isinstance(decision, Grant) and decision.identity.name == "id-b"


# --- federated identities (workload identity) ------------------------------------------------------

WI_CLIENT = "0f0f0f0f-0000-4000-8000-00000000000f"


def service_account(name: str, client_id: str = "", *, ns: str = "default") -> dict:
    annotations = {"azure.workload.identity/client-id": client_id} if client_id else {}
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {"name": name, "namespace": ns, "annotations": annotations},
    }


def wi_pod(name: str, ip: str, sa: str, *, use: str = "true", labels: dict | None = None) -> dict:
    obj = pod(name, ip, labels={"azure.workload.identity/use": use, **(labels or {})})
    obj["spec"]["serviceAccountName"] = sa
    return obj


@pytest.mark.parametrize("settings", [STANDARD, MANAGED], ids=["standard", "managed"])
def test_workload_identity_pod_gets_its_own_service_accounts_client_only(settings: IdentitySettings) -> None:
    state = make_state(
        wi_pod("web", "10.0.0.5", "app-sa"),
        service_account("app-sa", WI_CLIENT),
        service_account("other-sa", "11111111-0000-4000-8000-000000000001"),
    )
    decision = decide(state, settings=settings)
    assert isinstance(decision, Grant) and decision.identity.type.name == "FEDERATED"
    assert decision.identity.client_id == WI_CLIENT
    named = decide(state, IdentityQuery(client_id=WI_CLIENT), settings=settings)
    assert isinstance(named, Grant)
    other = decide(state, IdentityQuery(client_id="11111111-0000-4000-8000-000000000001"), settings=settings)
    assert isinstance(other, Deny) and other.refusal is Refusal.NOT_FOUND


def test_workload_identity_needs_the_label_and_the_annotation() -> None:
    for objs in (
        [wi_pod("web", "10.0.0.5", "app-sa", use="false"), service_account("app-sa", WI_CLIENT)],
        [wi_pod("web", "10.0.0.5", "app-sa"), service_account("app-sa")],
        [wi_pod("web", "10.0.0.5", "missing-sa"), service_account("app-sa", WI_CLIENT)],
    ):
        decision = decide(make_state(*objs))
        assert isinstance(decision, Deny) and decision.refusal is Refusal.NOT_FOUND


def test_type_3_identity_bound_by_a_binding_needs_no_assignment() -> None:
    federated = identity("fed", WI_CLIENT, type_=3, tenantID="t-1")
    state = make_state(
        pod("web", "10.0.0.5", labels={"aadpodidbinding": "web"}), federated, binding("b", "fed", "web")
    )
    for settings in (STANDARD, MANAGED):
        decision = decide(state, settings=settings)
        assert isinstance(decision, Grant) and decision.identity.name == "fed", settings


def test_object_ids_belong_to_the_client_in_its_tenant_and_authority_not_to_its_client_id() -> None:
    home = parse_object(identity("a", "1111", tenantID="t-home", type_=1))
    other = parse_object(identity("b", "1111", tenantID="t-other", type_=1))
    elsewhere = parse_object(
        identity("c", "1111", tenantID="t-home", type_=1, adEndpoint="https://evil.example/")
    )
    assert len({object_id_key(i) for i in (home, other, elsewhere)}) == 3  # type: ignore[arg-type]


def test_a_type_3_identity_of_another_namespace_never_gets_the_pods_service_account_token() -> None:
    # Without --forceNamespaced a binding may select pods of other namespaces for MIC-assigned
    # identities; a federated one would present the pod's own token: never across namespaces.
    foreign = identity("evil", WI_CLIENT, ns="attacker", type_=3)
    state = make_state(
        pod("web", "10.0.0.5", labels={"aadpodidbinding": "web"}),
        foreign,
        binding("b", "evil", "web", ns="attacker"),
    )
    decision = decide(state, IdentityQuery(client_id=WI_CLIENT.casefold()))
    assert not isinstance(decision, Grant)
    assert not isinstance(decide(state), Grant)
