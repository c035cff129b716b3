"""``exception add|update|delete|list`` through the console script, and their refusals."""

from __future__ import annotations

import json

import pytest

from tests.plugin.conftest import Plugin, seed_exceptions

NS = "kube-system"


async def test_exception_add_update_list_delete(plugin: Plugin) -> None:
    added = await plugin.run(
        "exception", "add", "--namespace", NS, "--name", "node-agent", "--pod-labels", "app=agent,tier=infra"
    )
    assert added.status == 0, added.stderr
    assert added.stdout == "azurepodidentityexception.aadpodidentity.k8s.io/node-agent created\n"
    stored = plugin.api.get("azurepodidentityexceptions", NS, "node-agent")
    assert stored is not None
    assert stored["spec"] == {"podLabels": {"app": "agent", "tier": "infra"}}

    # Labels given as several words, as `az aks pod-identity exception add --pod-labels a=b c=d`.
    updated = await plugin.run(
        "exception", "update", "-n", NS, "--name", "node-agent", "--pod-labels", "app=agent2", "team=ops"
    )
    assert updated.status == 0, updated.stderr
    assert updated.stdout == "azurepodidentityexception.aadpodidentity.k8s.io/node-agent updated\n"
    stored = plugin.api.get("azurepodidentityexceptions", NS, "node-agent")
    assert stored is not None
    assert stored["spec"] == {"podLabels": {"app": "agent2", "team": "ops"}}

    table = await plugin.run("exception", "list")
    assert table.status == 0, table.stderr
    assert [line.split() for line in table.stdout.splitlines()] == [
        ["NAMESPACE", "NAME", "POD", "LABELS"],
        [NS, "node-agent", "app=agent2,team=ops"],
    ]
    as_json = await plugin.run("exception", "list", "-n", NS, "-o", "json")
    assert json.loads(as_json.stdout) == [
        {"namespace": NS, "name": "node-agent", "podLabels": {"app": "agent2", "team": "ops"}}
    ]

    deleted = await plugin.run("exception", "delete", "-n", NS, "--name", "node-agent")
    assert deleted.status == 0, deleted.stderr
    assert deleted.stdout == "azurepodidentityexception.aadpodidentity.k8s.io/node-agent deleted\n"
    assert plugin.objects("azurepodidentityexceptions") == []
    empty = await plugin.run("exception", "list")
    assert empty.status == 0 and "No pod identity exceptions found." in empty.stderr


async def test_update_keeps_the_rest_of_the_object(plugin: Plugin) -> None:
    from standins import apiserver as k8s

    obj = k8s.exception("agent", {"app": "a"}, namespace=NS)
    obj["metadata"]["labels"] = {"owner": "ops"}
    plugin.api.create(obj)
    assert (
        await plugin.run("exception", "update", "-n", NS, "--name", "agent", "--pod-labels", "app=b")
    ).status == 0
    stored = plugin.api.get("azurepodidentityexceptions", NS, "agent")
    assert stored is not None
    assert stored["metadata"]["labels"] == {"owner": "ops"}
    assert stored["spec"]["podLabels"] == {"app": "b"}


async def test_update_of_a_missing_exception_is_refused(plugin: Plugin) -> None:
    result = await plugin.run("exception", "update", "-n", NS, "--name", "ghost", "--pod-labels", "app=x")
    assert result.status == 1
    assert "pod identity exception kube-system/ghost not found; use 'exception add'" in result.stderr
    assert plugin.objects("azurepodidentityexceptions") == []
    assert plugin.writes() == 0


async def test_update_that_lost_a_race_is_refused(plugin: Plugin) -> None:
    from standins import apiserver as k8s

    plugin.api.create(k8s.exception("agent", {"app": "a"}, namespace=NS))
    plugin.api.fail_next(1, 409, verbs=("update",), resources="azurepodidentityexceptions")
    result = await plugin.run("exception", "update", "-n", NS, "--name", "agent", "--pod-labels", "app=b")
    assert result.status == 1
    assert "was changed by someone else meanwhile; try again" in result.stderr


async def test_delete_of_a_missing_exception_is_refused(plugin: Plugin) -> None:
    result = await plugin.run("exception", "delete", "-n", NS, "--name", "ghost")
    assert result.status == 1
    assert "pod identity exception kube-system/ghost not found" in result.stderr


async def test_duplicate_exception_add_is_refused(plugin: Plugin) -> None:
    args = ("exception", "add", "-n", NS, "--name", "agent", "--pod-labels", "app=a")
    assert (await plugin.run(*args)).status == 0
    again = await plugin.run(*args[:-1], "app=other")
    assert again.status == 1
    assert "pod identity exception kube-system/agent already exists; use 'exception update'" in again.stderr
    stored = plugin.api.get("azurepodidentityexceptions", NS, "agent")
    assert stored is not None and stored["spec"]["podLabels"] == {"app": "a"}


async def test_the_201st_exception_is_refused(plugin: Plugin) -> None:
    seed_exceptions(plugin.api, 200)
    result = await plugin.run("exception", "add", "-n", NS, "--name", "one-more", "--pod-labels", "app=x")
    assert result.status == 1
    assert "the cluster has 200 pod identity exceptions" in result.stderr
    assert "at most 200 are allowed" in result.stderr
    assert len(plugin.objects("azurepodidentityexceptions")) == 200
    assert plugin.writes() == 0


async def test_updating_one_of_200_exceptions_is_not_limited(plugin: Plugin) -> None:
    seed_exceptions(plugin.api, 200)
    result = await plugin.run(
        "exception", "update", "-n", "team-0", "--name", "exc-0", "--pod-labels", "app=y"
    )
    assert result.status == 0, result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--name", "Bad_Name", "--pod-labels", "app=a"],
            "--name 'Bad_Name' must be a valid RFC 1123 DNS subdomain",
        ),
        (["--name", "ok", "--pod-labels", "app"], "--pod-labels: 'app' is not key=value"),
        (["--name", "ok", "--pod-labels", "app=bad value"], "is not a valid label value"),
        (["--name", "ok", "--pod-labels", "bad key=x"], "is not a valid label key"),
        (["--name", "ok", "--pod-labels", ","], "at least one key=value is required"),
        (["--name", "ok", "--pod-labels", "app=a,app=b"], "app is given twice"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
async def test_invalid_exceptions_are_refused_before_any_request(
    plugin: Plugin, args: list[str], message: str
) -> None:
    result = await plugin.run("exception", "add", "-n", NS, *args)
    assert result.status == 2
    assert message in result.stderr
    assert len(plugin.api.requests) == 0


async def test_exception_commands_need_their_arguments(plugin: Plugin) -> None:
    missing_labels = await plugin.run("exception", "add", "-n", NS, "--name", "x")
    assert missing_labels.status == 2
    assert "--pod-labels" in missing_labels.stderr
    assert (await plugin.run("exception", "delete", "--name", "x")).status == 2
    assert (await plugin.run("exception")).status == 2
