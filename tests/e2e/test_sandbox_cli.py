"""``nmi-sandbox`` as a user runs it: up, status, exec, down, and its errors."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from standins.netns import HarnessError, cleanup_prefix, list_namespaces, pod_network, unique_prefix
from standins.sandbox import SandboxError, plan_pods
from tests.e2e.conftest import EXAMPLE

NMI_SANDBOX = Path(sys.executable).parent / "nmi-sandbox"
# Two pods with one name in two namespaces; the first holds the subnet's .1, so the node takes .2.
TWO_TEAMS = """\
apiVersion: v1
kind: Pod
metadata: {name: app, namespace: team-a, uid: 00000000-0000-0000-0000-00000000000a}
spec: {nodeName: node-7}
status: {phase: Running, podIP: 10.1.2.1}
---
apiVersion: v1
kind: Pod
metadata: {name: app, namespace: team-b, uid: 00000000-0000-0000-0000-00000000000b}
spec: {nodeName: node-7}
status: {phase: Running, podIP: 10.1.2.20}
"""


class Cli:
    def __init__(self, prefix: str, state_dir: Path) -> None:
        self.prefix = prefix
        self.state_dir = state_dir

    def __call__(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        command, rest = args[0], list(args[1:])
        argv = [str(NMI_SANDBOX), command, "--prefix", self.prefix, "--state-dir", str(self.state_dir), *rest]
        return subprocess.run(argv, capture_output=True, text=True, input=input, timeout=40, check=False)


@pytest.fixture
def cli(tmp_path: Path) -> Iterator[Cli]:
    runner = Cli(unique_prefix(), tmp_path / "state")
    try:
        yield runner
    finally:
        runner("down")
        cleanup_prefix(f"{runner.prefix}-")


def test_up_exec_status_down(cli: Cli, tmp_path: Path) -> None:
    state = tmp_path / "two-teams.yaml"
    state.write_text(TWO_TEAMS)

    up = cli("up", str(state))
    assert up.returncode == 0, up.stderr
    assert "NMI ready" in up.stdout
    again = cli("up", str(state))
    assert again.returncode == 1 and "already up" in again.stderr and "down" in again.stderr

    status = cli("status")
    assert status.returncode == 0, status.stderr
    assert "node node-7" in status.stdout and "bridge 10.1.2.2 (10.1.2.0/24)" in status.stdout
    assert "running, ready" in status.stdout and "team-b/app" in status.stdout

    # The pod's address is the source; stdin, stdout and the exit status pass through.
    shell = "read line; echo $line; ip -4 -o addr show dev eth0; ip route; exit 3"
    ran = cli("exec", "team-a/app", "--", "sh", "-c", shell, input="hello from stdin\n")
    assert ran.returncode == 3, ran.stderr
    lines = ran.stdout.splitlines()
    assert lines[0] == "hello from stdin"
    assert "10.1.2.1/24" in lines[1] and "default via 10.1.2.2" in ran.stdout

    ambiguous = cli("exec", "app", "--", "true")
    assert ambiguous.returncode == 2 and "team-a/app" in ambiguous.stderr
    unknown = cli("exec", "nope", "--", "true")
    assert unknown.returncode == 2 and "no pod 'nope'" in unknown.stderr

    down = cli("down")
    assert down.returncode == 0 and "deleted netns" in down.stdout
    assert not [ns for ns in list_namespaces() if ns.startswith(f"{cli.prefix}-")]
    assert list(cli.state_dir.iterdir()) == []
    again_down = cli("down")
    assert again_down.returncode == 0 and "nothing to tear down" in again_down.stdout
    assert cli("exec", "team-a/app", "--", "true").returncode != 0


def test_up_refuses_a_file_with_pods_on_several_nodes(cli: Cli, tmp_path: Path) -> None:
    state = tmp_path / "two-nodes.yaml"
    state.write_text(
        TWO_TEAMS.replace(
            "node-7}\nstatus: {phase: Running, podIP: 10.1.2.20}",
            "node-8}\nstatus: {phase: Running, podIP: 10.1.2.20}",
        )
    )
    up = cli("up", str(state))
    assert up.returncode == 1 and "several nodes (node-7, node-8)" in up.stderr
    assert not (cli.state_dir / f"{cli.prefix}.json").exists()
    assert not [ns for ns in list_namespaces() if ns.startswith(f"{cli.prefix}-")]


def test_the_example_names_one_node() -> None:
    from nmi.cluster_file import load

    node, pods = plan_pods(load(EXAMPLE))
    assert node == "demo-node" and [pod.ip for pod in pods] == ["10.244.0.10", "10.244.0.11", "10.244.0.12"]
    with pytest.raises(SandboxError, match=r"no pod has spec\.nodeName"):
        plan_pods([])


def test_pod_network_is_the_first_pods_slash_24_and_the_node_takes_the_first_free_address() -> None:
    network, bridge = pod_network(["10.244.0.10", "10.244.0.11"])
    assert (str(network), bridge) == ("10.244.0.0/24", "10.244.0.1")
    assert pod_network(["10.9.8.1", "10.9.8.2"])[1] == "10.9.8.3"
    with pytest.raises(HarnessError, match="share one subnet"):
        pod_network(["10.244.0.10", "10.244.1.10"])
    with pytest.raises(HarnessError, match="repeat"):
        pod_network(["10.244.0.10", "10.244.0.10"])
