"""End-to-end: the real ``python -m nmi`` and the IMDS stand-in in a sandbox node (network namespaces)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from standins.netns import (
    HarnessError,
    cleanup_prefix,
    cleanup_stale,
    list_namespaces,
    require_netns,
    unique_prefix,
)
from standins.sandbox import Sandbox

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "cluster-state.yaml"
UpSandbox = Callable[..., Sandbox]


@pytest.fixture(scope="session", autouse=True)
def _namespaces_available() -> None:
    # Fail, never skip: these tests are the proof that the daemon intercepts on a real kernel.
    try:
        require_netns()
    except HarnessError as exc:
        pytest.fail(f"end-to-end tests cannot run here: {exc}", pytrace=False)
    cleanup_stale()


def _up(state_dir: Path, made: list[Sandbox], **options: Any) -> Sandbox:
    options.setdefault("prefix", unique_prefix())
    options.setdefault("ready_timeout", 20.0)
    sandbox = Sandbox.up(options.pop("cluster_state", EXAMPLE), state_dir=state_dir, **options)
    made.append(sandbox)
    return sandbox


def _down(made: list[Sandbox]) -> None:
    for sandbox in made:
        pids = [entry["pid"] for entry in sandbox.state.get("processes", {}).values()]
        try:
            sandbox.down()
        finally:
            cleanup_prefix(f"{sandbox.prefix}-")
        left = [ns for ns in list_namespaces() if ns.startswith(f"{sandbox.prefix}-")]
        assert not left, f"down() left namespaces {left}"
        assert not any(Path(f"/proc/{pid}").exists() and _not_zombie(pid) for pid in pids), "processes left"
        assert not sandbox.state_path.exists(), "down() left its state file"


def _not_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture
def up_sandbox(tmp_path: Path) -> Iterator[UpSandbox]:
    """``up_sandbox(mode=..., nmi_args=[...])``: a sandbox removed after the test, also on failure."""
    made: list[Sandbox] = []
    yield lambda **options: _up(tmp_path, made, **options)
    _down(made)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    """One standard-mode sandbox for tests that leave it as they found it (rules checked each second)."""
    made: list[Sandbox] = []
    try:
        yield _up(tmp_path_factory.mktemp("sandbox"), made, nmi_args=["--ipt-update-interval-sec", "1"])
    finally:
        _down(made)
