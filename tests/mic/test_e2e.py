"""MIC end to end: stand-in API server, ARM and IMDS on real sockets; MIC in-process."""

from __future__ import annotations

import time

import aiohttp

from mic.model import FINALIZER
from standins import apiserver as k8s
from standins.arm import VMSS

from .conftest import POOL, RG, SUB, Env, identity, uami, until

CLIENT_A = "aaaaaaaa-0000-0000-0000-000000000001"
CLIENT_B = "bbbbbbbb-0000-0000-0000-000000000002"


def setup_identities(env: Env) -> None:
    env.api.create(identity("id-a", CLIENT_A))
    env.api.create(identity("id-b", CLIENT_B))
    env.api.create(k8s.binding("bind-a", "id-a", "sel-a"))
    env.api.create(k8s.binding("bind-b", "id-b", "sel-b"))


def labelled(name: str, selector: str, node: str, **kw: object) -> dict[str, object]:
    return k8s.pod(name, node=node, labels={"aadpodidbinding": selector}, **kw)  # type: ignore[arg-type]


async def test_assigns_on_vmss_and_vm_only_after_arm_confirms(env: Env) -> None:
    env.arm.lro_delay_s = 0.5  # long enough to observe the Created window
    setup_identities(env)
    env.api.create(labelled("p1", "sel-a", "aks-pool-0", namespace="apps"))
    env.api.create(labelled("p2", "sel-b", "vm-node"))
    principal = env.arm.principal_id(VMSS, SUB, RG, POOL)
    app = await env.start_mic()

    await until(lambda: env.aai("p1-apps-id-a") is not None, what="AAI created")
    aai = env.aai("p1-apps-id-a")
    assert aai is not None
    assert env.status("p1-apps-id-a") == "Created"
    assert uami("id-a").casefold() not in env.pool_ids()
    assert aai["metadata"]["labels"] == {"nodename": "aks-pool-0"}
    assert aai["metadata"]["finalizers"] == [FINALIZER]
    assert aai["spec"]["azureIdentityRef"]["spec"]["clientID"] == CLIENT_A
    assert aai["spec"]["azureIdentityRef"]["metadata"] == {
        "name": "id-a",
        "namespace": "default",
        "resourceVersion": env.api.get("azureidentities", "default", "id-a")["metadata"]["resourceVersion"],  # type: ignore[index]
    }
    assert aai["spec"]["azureBindingRef"]["metadata"]["name"] == "bind-a"
    assert (aai["spec"]["pod"], aai["spec"]["podNamespace"], aai["spec"]["nodename"]) == (
        "p1",
        "apps",
        "aks-pool-0",
    )

    await until(lambda: env.status("p1-apps-id-a") == "Assigned", what="p1 Assigned")
    assert uami("id-a").casefold() in env.pool_ids()
    await until(lambda: env.status("p2-default-id-b") == "Assigned", what="p2 Assigned")
    assert env.vm_ids() == {uami("id-b").casefold()}
    assert env.pool_ids() == {uami("id-a").casefold()}  # VMSS and VM each get only their own
    assert env.arm.principal_id(VMSS, SUB, RG, POOL) == principal  # system-assigned identity kept
    patches = env.arm.patches(POOL)
    assert patches[0].body == {
        "identity": {"type": "SystemAssigned, UserAssigned", "userAssignedIdentities": {uami("id-a"): {}}}
    }
    # MIC authenticated to ARM with a token from IMDS for its own identity.
    assert env.imds.requests and env.imds.requests[0].query.get("client_id") is not None

    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{app.probe_port}/healthz") as resp:
            assert (resp.status, await resp.text()) == (200, "Active")
        async with http.get(f"http://127.0.0.1:{app.probe_port}/healthz?verbose") as resp:
            detail = await resp.json()
            assert resp.status == 200 and detail["healthy"] is True
            assert set(detail["watches"]) == {
                "pods",
                "azureidentities",
                "azureidentitybindings",
                "azureassignedidentities",
                "nodes",
            }
        async with http.get(f"http://127.0.0.1:{app.probe_port}/metrics") as resp:
            assert resp.status == 404
        async with http.get(f"http://127.0.0.1:{app.metrics_port}/metrics") as resp:
            text = await resp.text()
    # The original's exact names and types: no _total, typed counter (dashboards query these).
    assert "aadpodidentity_assigned_identity_addition_count 2.0" in text
    assert "# TYPE aadpodidentity_assigned_identity_addition_count counter" in text
    assert "_count_total" not in text
    assert (
        'aadpodidentity_cloud_provider_operations_duration_seconds_count{operation_type="vmss_update"}'
        in text
    )


async def test_pod_deletion_removes_identity_only_when_no_pod_on_the_vmss_uses_it(env: Env) -> None:
    setup_identities(env)
    env.api.create(labelled("p1", "sel-a", "aks-pool-0"))
    env.api.create(labelled("p3", "sel-a", "aks-pool-1", namespace="other"))
    principal = env.arm.principal_id(VMSS, SUB, RG, POOL)
    await env.start_mic()
    await until(lambda: env.status("p1-default-id-a") == env.status("p3-other-id-a") == "Assigned")

    env.api.delete("pods", "default", "p1")
    await until(lambda: env.aai("p1-default-id-a") is None, what="p1's AAI deleted")
    assert uami("id-a").casefold() in env.pool_ids()  # p3, on another instance, still uses it
    assert len(env.arm.patches(POOL)) == 1

    env.api.delete("pods", "other", "p3")
    await until(lambda: env.aai("p3-other-id-a") is None, what="p3's AAI deleted")
    assert env.pool_ids() == set()
    assert env.arm.principal_id(VMSS, SUB, RG, POOL) == principal
    assert env.arm.patches(POOL)[-1].body == {"identity": {"type": "SystemAssigned"}}


async def test_finished_pod_releases_its_identity(env: Env) -> None:
    setup_identities(env)
    env.api.create(labelled("job", "sel-b", "vm-node"))
    await env.start_mic()
    await until(lambda: env.status("job-default-id-b") == "Assigned")
    env.api.patch("pods", "default", "job", {"status": {"phase": "Succeeded"}})
    await until(lambda: env.aai("job-default-id-b") is None and env.vm_ids() == set(), what="release")
    assert env.arm.patches()[-1].body == {"identity": {"type": "None"}}


async def test_immutable_identity_is_never_removed(env: Env) -> None:
    setup_identities(env)
    env.api.create(labelled("p", "sel-b", "vm-node"))
    await env.start_mic(immutable_client_ids=frozenset({CLIENT_B.upper().casefold()}))
    await until(lambda: env.status("p-default-id-b") == "Assigned")
    env.api.delete("pods", "default", "p")
    await until(lambda: env.aai("p-default-id-b") is None)
    assert env.vm_ids() == {uami("id-b").casefold()}
    assert len(env.arm.patches()) == 1


async def test_arm_429_is_honoured_per_resource(env: Env) -> None:
    setup_identities(env)
    env.arm.fail_next(1, 429, code="TooManyRequests", retry_after="1", methods=("PATCH",))
    env.api.create(labelled("p", "sel-a", "aks-pool-0"))
    await env.start_mic()
    await until(lambda: env.status("p-default-id-a") == "Assigned", timeout=6.0)
    calls = [c for c in env.arm.calls if c.path.endswith("/" + POOL)]
    throttled = next(i for i, c in enumerate(calls) if c.status == 429)
    assert calls[throttled + 1].at - calls[throttled].at >= 0.95


async def test_unauthorised_identity_stays_created_while_the_others_are_assigned(env: Env) -> None:
    setup_identities(env)
    env.api.create(identity("id-bad", "cccccccc-0000-0000-0000-000000000003"))
    env.api.create(k8s.binding("bind-bad", "id-bad", "sel-a"))  # same selector: p gets both
    env.arm.forbidden.add(uami("id-bad").casefold())
    env.api.create(labelled("p", "sel-a", "aks-pool-0"))
    env.api.create(labelled("q", "sel-b", "aks-pool-1"))
    await env.start_mic()
    await until(
        lambda: env.status("p-default-id-a") == env.status("q-default-id-b") == "Assigned", timeout=6.0
    )
    await until(lambda: len([c for c in env.arm.patches(POOL) if c.status == 403]) >= 2, what="a retry")
    assert env.status("p-default-id-bad") == "Created"
    assert env.pool_ids() == {uami("id-a").casefold(), uami("id-b").casefold()}


async def test_drift_repair_re_adds_an_identity_removed_by_hand(env: Env) -> None:
    setup_identities(env)
    env.api.create(labelled("p", "sel-a", "aks-pool-0"))
    await env.start_mic(drift_interval_s=0.3)
    await until(lambda: env.status("p-default-id-a") == "Assigned")
    env.arm.set_identities(VMSS, SUB, RG, POOL, set())
    started = time.monotonic()
    await until(lambda: uami("id-a").casefold() in env.pool_ids(), what="drift repair")
    assert time.monotonic() - started < 2.0
    assert env.status("p-default-id-a") == "Assigned"


async def test_service_principal_identity_is_assigned_without_arm(env: Env) -> None:
    env.api.create(
        k8s.azure_identity("sp", id_type=1, client_id=CLIENT_A, secret=("default", "s"), tenant_id="t")
    )
    env.api.create(k8s.binding("bind-sp", "sp", "sel-sp"))
    env.api.create(labelled("p", "sel-sp", "aks-pool-0"))
    await env.start_mic()
    await until(lambda: env.status("p-default-sp") == "Assigned")
    assert env.arm.calls == []
