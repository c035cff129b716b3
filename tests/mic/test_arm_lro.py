"""MIC follows every ARM long-running operation to its end before an AAI turns ``Assigned``.

Microsoft.Compute answers an identity PATCH with 200 and ``provisioningState: Updating`` while the
update still runs; the stand-in does the same by default (``standins/arm.py``). An AAI is ``Assigned``
only once the identity is in effect on the VM/VMSS (``ArmStandIn.identities``), whatever the answer's
status and polling headers; failed, cancelled and refused operations leave it ``Created``, and one
slow or refused scale set does not hold up another.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from mic.arm import LRO_MAX_POLL_S, ArmClient, ArmError
from mic.metrics import MicMetrics
from mic.model import ArmTarget
from mic.settings import ArmSettings
from standins import apiserver as k8s
from standins.arm import ASYNC_OPERATION, LOCATION, VMSS, ArmStandIn

from .conftest import POOL, RG, SUB, Env, identity, uami, until

CLIENT_A = "aaaaaaaa-0000-0000-0000-000000000001"
CLIENT_B = "bbbbbbbb-0000-0000-0000-000000000002"
CLIENT_C = "cccccccc-0000-0000-0000-000000000003"
CLIENT_BAD = "dddddddd-0000-0000-0000-000000000004"
POOL2 = "aks-other-vmss"


def labelled(name: str, selector: str, node: str, **kw: Any) -> dict[str, Any]:
    return k8s.pod(name, node=node, labels={"aadpodidbinding": selector}, **kw)


def bind(env: Env, name: str, client_id: str, selector: str) -> None:
    env.api.create(identity(name, client_id))
    env.api.create(k8s.binding(f"bind-{name}", name, selector))


def add_second_pool(env: Env) -> None:
    env.arm.add_vmss(SUB, RG, POOL2)
    env.api.create(
        k8s.node(
            "aks-other-0",
            provider_id=f"azure:///subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.Compute/"
            f"virtualMachineScaleSets/{POOL2}/virtualMachines/0",
        )
    )


def in_effect(env: Env, name: str, pool: str = POOL) -> bool:
    return uami(name).casefold() in env.arm.identities(VMSS, SUB, RG, pool)


async def first_assigned(env: Env, aai: str, check: Callable[[], Any], timeout: float = 8.0) -> Any:
    """Wait for ``aai`` to turn Assigned; ``check()`` as it was the moment it did (5 ms resolution)."""
    deadline = time.monotonic() + timeout
    while env.status(aai) != "Assigned":
        if time.monotonic() > deadline:
            raise AssertionError(f"{aai} not Assigned in {timeout}s (status {env.status(aai)})")
        await asyncio.sleep(0.005)
    return check()


def polls(env: Env, prefix: str) -> list[str]:
    return [c.path for c in env.arm.calls if c.method == "GET" and c.path.startswith(prefix)]


@pytest.mark.parametrize(
    ("status", "headers", "polled"),
    [
        (200, (ASYNC_OPERATION, LOCATION), "/operations/"),  # Compute's answer
        (201, (ASYNC_OPERATION, LOCATION), "/operations/"),
        (202, (ASYNC_OPERATION, LOCATION), "/operations/"),
        (200, (LOCATION,), "/locations/"),
        (202, (LOCATION,), "/locations/"),
        (200, (), "/subscriptions/"),  # no polling header: the resource until it is not Updating
    ],
    ids=["200-async", "201-async", "202-async", "200-location", "202-location", "200-no-header"],
)
async def test_aai_is_assigned_only_once_the_operation_put_the_identity_in_effect(
    env: Env, status: int, headers: tuple[str, ...], polled: str
) -> None:
    env.arm.patch_status = status
    env.arm.lro_headers = headers
    env.arm.lro_delay_s = 0.6
    bind(env, "id-a", CLIENT_A, "sel-a")
    env.api.create(labelled("p", "sel-a", "aks-pool-0"))
    await env.start_mic()

    await until(lambda: env.arm.patches(POOL), what="the PATCH")
    await asyncio.sleep(0.1)  # ARM answered long ago; the operation still runs
    assert env.arm.provisioning_state(VMSS, SUB, RG, POOL) == "Updating"
    assert uami("id-a").casefold() in env.arm.model_identities(VMSS, SUB, RG, POOL)
    assert not in_effect(env, "id-a")
    assert env.status("p-default-id-a") == "Created"

    assert await first_assigned(env, "p-default-id-a", lambda: in_effect(env, "id-a"))
    assert polls(env, polled), f"MIC never polled {polled}"
    (op,) = env.arm.operations.values()
    assert op.status == "Succeeded"
    assert len(env.arm.patches(POOL)) == 1


@pytest.mark.parametrize("outcome", ["Failed", "Canceled"])
@pytest.mark.parametrize("headers", [(ASYNC_OPERATION, LOCATION), (LOCATION,)], ids=["async", "location"])
async def test_failed_or_canceled_operation_keeps_the_aai_created_until_a_retry_succeeds(
    env: Env, outcome: str, headers: tuple[str, ...]
) -> None:
    env.arm.lro_headers = headers
    env.arm.lro_delay_s = 0.3
    env.arm.fail_next_operation(1, status=outcome, name=POOL)
    bind(env, "id-a", CLIENT_A, "sel-a")
    env.api.create(labelled("p", "sel-a", "aks-pool-0"))
    await env.start_mic()

    assert await first_assigned(env, "p-default-id-a", lambda: in_effect(env, "id-a"))
    first, *rest = env.arm.operations.values()
    assert first.status == outcome and first.error is not None
    assert [op.status for op in rest] == ["Succeeded"]
    assert len(env.arm.patches(POOL)) == 2  # retried with backoff after the failed operation
    assert first.ended is not None and env.arm.patches(POOL)[1].at > first.ended


async def test_identity_refused_by_arm_stays_created_while_its_neighbours_on_the_vmss_are_assigned(
    env: Env,
) -> None:
    bind(env, "id-a", CLIENT_A, "sel-a")
    bind(env, "id-b", CLIENT_B, "sel-b")
    bind(env, "id-c", CLIENT_C, "sel-c")
    env.api.create(identity("id-bad", CLIENT_BAD))
    env.api.create(k8s.binding("bind-bad", "id-bad", "sel-a"))  # p gets id-a and id-bad
    env.arm.forbidden.add(uami("id-bad").casefold())
    env.arm.lro_delay_s = 0.3
    env.api.create(labelled("p", "sel-a", "aks-pool-0"))
    env.api.create(labelled("q", "sel-b", "aks-pool-1"))
    env.api.create(labelled("r", "sel-c", "aks-pool-1", namespace="other"))
    await env.start_mic()

    for aai, name in (("p-default-id-a", "id-a"), ("q-default-id-b", "id-b"), ("r-other-id-c", "id-c")):
        assert await first_assigned(env, aai, lambda name=name: in_effect(env, name)), aai
    await until(
        lambda: len([c for c in env.arm.patches(POOL) if c.status == 403]) >= 2, what="a retry of id-bad"
    )
    assert env.status("p-default-id-bad") == "Created"
    assert env.pool_ids() == {uami(n).casefold() for n in ("id-a", "id-b", "id-c")}
    refused = [c for c in env.arm.patches(POOL) if c.status == 403]
    assert uami("id-bad") in refused[-1].body["identity"]["userAssignedIdentities"]

    env.arm.forbidden.clear()  # the role assignment arrives: the next retry attaches it
    assert await first_assigned(env, "p-default-id-bad", lambda: in_effect(env, "id-bad"))


async def test_vmss_whose_patches_are_refused_does_not_hold_up_others(env: Env) -> None:
    add_second_pool(env)
    bind(env, "id-a", CLIENT_A, "sel-a")
    bind(env, "id-b", CLIENT_B, "sel-b")
    env.arm.refuse_patches(POOL, 409, code="OperationNotAllowed")
    env.api.create(labelled("p", "sel-a", "aks-pool-0"))
    env.api.create(labelled("q", "sel-b", "aks-other-0"))
    await env.start_mic()

    assert await first_assigned(env, "q-default-id-b", lambda: in_effect(env, "id-b", POOL2))
    await until(lambda: len(env.arm.patches(POOL)) >= 2, what="the refused VMSS retried")
    assert env.status("p-default-id-a") == "Created"
    assert all(c.status == 409 for c in env.arm.patches(POOL))
    env.arm.allow_patches(POOL)
    assert await first_assigned(env, "p-default-id-a", lambda: in_effect(env, "id-a"))


async def test_slow_vmss_does_not_delay_another_vmss(env: Env) -> None:
    add_second_pool(env)
    bind(env, "id-a", CLIENT_A, "sel-a")
    bind(env, "id-b", CLIENT_B, "sel-b")
    env.arm.lro_delay_s = 0.1
    env.arm.set_lro_delay(POOL, 2.5)  # a scale set that takes its time
    env.arm.set_request_delay(POOL, 0.2)  # and answers slowly
    env.api.create(labelled("p", "sel-a", "aks-pool-0"))
    env.api.create(labelled("q", "sel-b", "aks-other-0"))
    started = time.monotonic()
    await env.start_mic()

    assert await first_assigned(env, "q-default-id-b", lambda: in_effect(env, "id-b", POOL2))
    assert time.monotonic() - started < 2.0
    assert env.status("p-default-id-a") == "Created"
    assert not in_effect(env, "id-a")
    assert await first_assigned(env, "p-default-id-a", lambda: in_effect(env, "id-a"))
    assert time.monotonic() - started >= 2.5


async def test_identity_shown_by_another_running_operation_is_not_confirmed_until_it_ends(env: Env) -> None:
    bind(env, "id-a", CLIENT_A, "sel-a")
    # Someone else's update that attaches id-a is still running: ARM already shows it, Updating.
    env.arm.set_identities(VMSS, SUB, RG, POOL, {uami("id-a")}, lro_s=1.0)
    env.api.create(labelled("p", "sel-a", "aks-pool-0"))
    await env.start_mic()

    assert await first_assigned(env, "p-default-id-a", lambda: in_effect(env, "id-a"))
    assert env.arm.patches() == []  # nothing to change: MIC only waited


# --- the client alone -----------------------------------------------------------------------------


class _Token:
    async def token(self) -> str:
        return "t"

    def invalidate(self) -> None:
        pass


async def test_client_honours_retry_after_within_bounds_and_raises_the_operations_error() -> None:
    async with ArmStandIn(lro_delay_s=0.3, poll_retry_after="3600") as arm:
        arm.add_vmss(SUB, RG, POOL)
        target = ArmTarget(SUB, RG, "virtualMachineScaleSets", POOL)
        pauses: list[float] = []

        async def sleep(seconds: float) -> None:
            pauses.append(seconds)
            await asyncio.sleep(0.05)

        settings = ArmSettings(endpoint=arm.url, lro_min_poll_s=0.01, lro_timeout_s=600.0)
        async with aiohttp.ClientSession() as session:
            client = ArmClient(settings, session, _Token(), MicMetrics(CollectorRegistry()), sleep=sleep)
            body = {"identity": {"type": "UserAssigned", "userAssignedIdentities": {uami("x"): {}}}}
            await client.patch(target, body)
            assert arm.identities(VMSS, SUB, RG, POOL) == {uami("x").casefold()}
            assert pauses and all(p == LRO_MAX_POLL_S for p in pauses)  # Retry-After: 3600, bounded

            arm.fail_next_operation(1, status="Canceled")
            with pytest.raises(ArmError) as failed:
                await client.patch(target, body | {"identity": {"type": "None"}})
            assert failed.value.code == "OperationPreempted"
            assert "preempted" in failed.value.message
            assert arm.identities(VMSS, SUB, RG, POOL) == {uami("x").casefold()}

            arm.lro_delay_s = 10.0
            short = ArmClient(
                ArmSettings(
                    endpoint=arm.url, lro_min_poll_s=0.01, lro_default_poll_s=0.05, lro_timeout_s=0.3
                ),
                session,
                _Token(),
                MicMetrics(CollectorRegistry()),
            )
            arm.poll_retry_after = "0"
            with pytest.raises(ArmError) as timed_out:
                await short.patch(target, {"identity": {"type": "None"}})
            assert timed_out.value.code == "OperationTimeout"
