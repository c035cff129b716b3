"""What users see when something is wrong: Kubernetes Events with ARM's error code, a refused
identity that stays Created without holding back its neighbours, and invalid identities reported."""

from __future__ import annotations

import time
from typing import Any

from standins import apiserver as k8s

from .conftest import Env, identity, uami, until

CLIENT_OK = "aaaaaaaa-0000-0000-0000-0000000000a1"
CLIENT_REFUSED = "bbbbbbbb-0000-0000-0000-0000000000b2"
CLIENT_LATE = "cccccccc-0000-0000-0000-0000000000c3"


def labelled(name: str, selector: str, node: str = "aks-pool-0") -> dict[str, Any]:
    return k8s.pod(name, node=node, labels={"aadpodidbinding": selector})


def events(env: Env, *, kind: str, name: str, namespace: str = "default") -> list[dict[str, Any]]:
    selector = f"involvedObject.kind={kind},involvedObject.name={name}"
    return list(env.api.objects("Event", namespace, field_selector=selector))


async def test_a_refused_identity_gets_its_event_with_the_arm_code_and_holds_back_no_one(env: Env) -> None:
    for name, client in (("ok", CLIENT_OK), ("refused", CLIENT_REFUSED), ("late", CLIENT_LATE)):
        env.api.create(identity(f"id-{name}", client))
        env.api.create(k8s.binding(f"bind-{name}", f"id-{name}", f"sel-{name}"))
    env.arm.forbidden.add(uami("id-refused").casefold())  # Managed Identity Operator missing on it
    env.api.create(labelled("p-ok", "sel-ok"))
    env.api.create(labelled("p-refused", "sel-refused"))
    app = await env.start_mic(retry_initial_s=30.0, retry_max_s=60.0)  # a long backoff, on purpose

    await until(lambda: env.status("p-ok-default-id-ok") == "Assigned", 10.0, "the neighbour Assigned")
    await until(lambda: bool(events(env, kind="AzureIdentityBinding", name="bind-refused")), 10.0, "event")
    assert env.status("p-refused-default-id-refused") == "Created"
    [refused] = events(env, kind="AzureIdentityBinding", name="bind-refused")
    assert refused["type"] == "Warning" and refused["reason"] == "binding apply error"
    assert "LinkedAuthorizationFailed" in refused["message"] and "403" in refused["message"]
    assert refused["source"]["component"] == "aadpodidentity.k8s.io"
    on_aai = events(env, kind="AzureAssignedIdentity", name="p-refused-default-id-refused")
    assert [e["reason"] for e in on_aai] == ["binding apply error"]
    applied = events(env, kind="AzureAssignedIdentity", name="p-ok-default-id-ok")
    assert [e["reason"] for e in applied] == ["binding applied"] and applied[0]["type"] == "Normal"
    assert not events(env, kind="AzureIdentityBinding", name="bind-ok")  # successes: on the AAI only

    # A new pod on the same scale set is not held back by the refused identity's 30 s backoff.
    started = time.monotonic()
    env.api.create(labelled("p-late", "sel-late", node="aks-pool-1"))
    await until(lambda: env.status("p-late-default-id-late") == "Assigned", 10.0, "the newcomer Assigned")
    assert time.monotonic() - started < 10.0
    assert env.status("p-refused-default-id-refused") == "Created"
    # Refused again along with the newcomer: one Event, counted, not a new one per attempt.
    assert app.events is not None
    await app.events.flush()
    [refused] = events(env, kind="AzureIdentityBinding", name="bind-refused")
    assert refused["count"] >= 2

    # The operator grants the role: the identity goes through on its next attempt.
    env.arm.forbidden.clear()
    env.api.create(labelled("p-next", "sel-ok", node="aks-pool-1"))
    await until(
        lambda: env.status("p-refused-default-id-refused") == "Assigned", 10.0, "refused one Assigned"
    )
    assert app.metrics.assignment_latency.collect()[0].samples  # latency from pod creation observed
    count = app.registry.get_sample_value("mic_assignment_latency_seconds_count")
    assert count is not None and count >= 3


async def test_an_identity_with_an_invalid_resource_id_is_reported_once(env: Env) -> None:
    bad = k8s.azure_identity("bad", client_id=CLIENT_OK, resource_id="/subscriptions/x/not-an-identity")
    env.api.create(bad)
    env.api.create(k8s.binding("bind-bad", "bad", "sel-bad"))
    env.api.create(labelled("p-bad", "sel-bad"))
    app = await env.start_mic()
    await until(lambda: bool(events(env, kind="AzureIdentity", name="bad")), 10.0, "invalid identity event")
    [event] = events(env, kind="AzureIdentity", name="bad")
    assert event["reason"] == "invalid identity" and "/subscriptions/x/not-an-identity" in event["message"]
    env.api.create(labelled("p-bad-2", "sel-bad"))  # more cycles: no second event for the same version
    await until(lambda: app.reconciler is not None and app.reconciler.cycles >= 2, 5.0)
    assert app.events is not None
    await app.events.flush()
    assert len(events(env, kind="AzureIdentity", name="bad")) == 1
    assert env.aai("p-bad-default-bad") is None


async def test_one_object_gets_at_most_a_burst_of_events_then_one_per_five_minutes() -> None:
    from mic.events import SPAM_BURST, EventRecorder, Subject

    now = [1000.0]
    recorder = EventRecorder(None, instance="mic-0", clock=lambda: now[0])  # type: ignore[arg-type]
    subject = Subject("AzureIdentityBinding", "default", "busy")
    for i in range(SPAM_BURST + 10):
        recorder.record(subject, "Warning", "binding apply error", f"attempt {i}")
    assert recorder.dropped == 10
    recorder.record(Subject("AzureIdentityBinding", "default", "quiet"), "Normal", "x", "y")
    assert recorder.dropped == 10  # another object has its own budget
    now[0] += 300.0
    recorder.record(subject, "Warning", "binding apply error", "later")
    assert recorder.dropped == 10
